//! The file service of gobelins (DESIGN.md, "Services", File).
//!
//! Not built yet: files striped in replicated blocks over the nodes of the cluster.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
