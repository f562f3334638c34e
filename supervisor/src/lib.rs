//! The supervisor of gobelins (DESIGN.md, "Supervisor"): the daemon on every node that keeps one
//! consistent view of the cluster configuration.
//!
//! Modules:
//! - [`error`]: the crate's one error type.
//! - [`frame`]: length + version framing, with the size limit checked first.
//! - [`state`]: the replicated cluster state and its pure `apply`.
//! - [`types`], [`runtime`], [`store`]: openraft's instantiation, its seedable runtime, the
//!   redb-backed log and state machine; `layout`: the state as older builds stored it.
//! - [`transport`], [`net`], [`tcp`]: request/response between nodes over TCP; [`mem`]: the
//!   in-memory transport with fault injection that tests use.
//! - [`secret`]: the cluster id and key; [`handshake`]: both ends prove they hold the key.
//! - [`control`]: the agent's control socket; [`console`]: the commands services offer on it;
//!   [`entering`]: what the agent is doing while it enters the cluster, for the socket to say.
//! - [`link`]: the adaptation layer's messages over the transport; the supervisor feeds its
//!   [`gobelins_adaptation::Host`] every applied state and reports what the host finished.
#![deny(missing_docs)]

pub mod agent;
mod closer;
pub mod console;
pub mod control;
pub mod datadir;
pub mod detector;
mod disk;
pub mod entering;
pub mod error;
mod flaps;
pub mod frame;
mod frame_writer;
pub mod handshake;
mod huge_pages;
mod lag;
pub mod lane;
pub(crate) mod layout;
pub mod link;
pub mod mem;
pub mod net;
pub mod network;
mod outbox;
mod pauses;
pub mod preview;
mod quorum;
pub mod rpc;
pub mod runtime;
pub mod secret;
mod slots;
mod sources;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod tcp;
pub mod transport;
pub mod types;
mod voters;
mod waiters;

pub use error::{Result, SupervisorError};
pub use flaps::{FLAP_MEMORY, SHORT_LIFE};
pub use gobelins_adaptation::codec;
pub use supervisor::{Dispatch, Lifecycle, Me, Parts, Supervisor, SupervisorConfig};
