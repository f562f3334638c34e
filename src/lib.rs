//! gobelins keeps a cluster's distributed services running while nodes join, leave or fail.
//!
//! This facade gathers the workspace's crates under one name:
//! - [`locator`]: which node manages each directory entry, and what moves on a change.
//! - [`adaptation`]: the service plug-in API, the host that routes requests and migrates
//!   entries in each configuration change.
//! - [`kvdir`]: the example service, a replicated key-value directory, hosted by every agent.
//! - [`supervisor`]: transport, consensus membership, failure detection, the agent.
//! - [`dsm`]: distributed shared memory, hosted by every agent, reached with `gobelins dsm`.
//! - [`process`], [`mod@file`], [`scheduler`]: the other services (not built yet).
//! - [`builtin`]: what an agent hosts, and the consoles the CLI reaches it through.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub use gobelins_adaptation as adaptation;
pub use gobelins_dsm as dsm;
pub use gobelins_file as file;
pub use gobelins_kvdir as kvdir;
pub use gobelins_locator as locator;
pub use gobelins_process as process;
pub use gobelins_scheduler as scheduler;
pub use gobelins_supervisor as supervisor;

pub mod builtin;

/// The services every `gobelins agent` hosts, in registration order, built afresh.
pub fn services() -> adaptation::Registry {
    builtin::Builtins::new().registry()
}
