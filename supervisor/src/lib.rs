//! The supervisor of gobelins (DESIGN.md, "Supervisor").
//!
//! Not built yet: this crate will hold the TCP transport, the openraft-replicated cluster state,
//! the failure detector and the control socket behind `gobelins agent`.
#![deny(missing_docs)]
