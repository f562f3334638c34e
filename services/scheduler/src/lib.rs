//! The scheduler service of gobelins (DESIGN.md, "Services", Scheduler).
//!
//! Not built yet: load vectors spread to random peers, initial placement and pairwise balancing.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
