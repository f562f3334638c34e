//! Distributed shared memory for gobelins (DESIGN.md, "Services", DSM).
//!
//! Not built yet: segments of 4 KiB pages kept sequentially consistent by write-invalidate, with
//! page managers found through the locator.
#![deny(missing_docs)]
