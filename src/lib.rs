//! gobelins keeps a cluster's distributed services running while nodes join, leave or fail.
//!
//! This facade gathers the workspace's crates under one name:
//! - [`locator`]: which node manages each directory entry, and what moves on a change.
//! - [`adaptation`]: the service plug-in API, the host that routes requests and migrates
//!   entries in each configuration change.
//! - [`kvdir`]: the example service, a replicated key-value directory, hosted by every agent.
//! - [`supervisor`]: transport, consensus membership, failure detection, the agent.
//! - [`dsm`], [`process`], [`mod@file`], [`scheduler`]: the services (being built).
#![deny(missing_docs)]

pub use gobelins_adaptation as adaptation;
pub use gobelins_dsm as dsm;
pub use gobelins_file as file;
pub use gobelins_kvdir as kvdir;
pub use gobelins_locator as locator;
pub use gobelins_process as process;
pub use gobelins_scheduler as scheduler;
pub use gobelins_supervisor as supervisor;

/// The services every `gobelins agent` hosts, in registration order.
pub fn services() -> adaptation::Registry {
    let mut registry = adaptation::Registry::new();
    registry
        .register(adaptation::plugin(kvdir::KvDir::new()))
        .expect("the built-in services have valid, distinct declarations");
    registry
}
