//! gobelins keeps a cluster's distributed services running while nodes join, leave or fail.
//!
//! This facade gathers the workspace's crates under one name:
//! - [`locator`]: which node manages each directory entry, and what moves on a change.
//! - [`adaptation`]: the adaptation-period state machine and the router (the plug-in API and
//!   the migration driver are being built).
//! - [`supervisor`]: transport, consensus membership, failure detection, the agent.
//! - [`dsm`], [`process`], [`mod@file`], [`scheduler`]: the services (being built).
#![deny(missing_docs)]

pub use gobelins_adaptation as adaptation;
pub use gobelins_dsm as dsm;
pub use gobelins_file as file;
pub use gobelins_locator as locator;
pub use gobelins_process as process;
pub use gobelins_scheduler as scheduler;
pub use gobelins_supervisor as supervisor;
