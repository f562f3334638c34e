//! The adaptation layer of gobelins (DESIGN.md, "Adaptation layer").
//!
//! Not built yet: this crate will hold the service plug-in trait, the adaptation-period state
//! machine, the request router and failure recovery. It sits on `gobelins-locator`.
#![deny(missing_docs)]
