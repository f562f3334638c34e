//! The process service of gobelins (DESIGN.md, "Services", Process).
//!
//! Not built yet: cluster-wide process ids, placement, signals and migration of processes.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
