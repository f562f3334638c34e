//! The adaptation layer of gobelins (DESIGN.md, "Adaptation layer"): what every node does, for
//! every registered service, while the cluster moves from one epoch to the next.
//!
//! A [`Host`] on every node hosts the registered services: it routes each request to its
//! key's manager, holds requests for keys that move, migrates entries in four phases on every
//! change (driven by the [`Period`] state machine), rebuilds entries with `scan` after a
//! failure, and runs a retried request once (except across its manager's failure: the answers
//! it kept die with it).
//!
//! Modules:
//! - [`codec`]: the one module that names bincode, for this crate and the supervisor.
//! - [`period`]: [`Period`], events in and commands out for one epoch change.
//! - [`router`]: [`Router`], serve, hold, moved or wait for each request.
//! - [`service`]: the [`Service`] trait authors implement, and [`Plugin`], its form in bytes.
//! - [`run`]: [`Run`], entries encoded back to back, and [`Packer`], which cuts them into
//!   batches per destination ([`Packed`]).
//! - `pool`: migration buffers kept for the next batch.
//! - [`shared`]: byte strings in received entries that share their batch's memory.
//! - `settled`: which requests their senders have settled, so that their answers can go;
//!   `kept`: the order a manager kept its answers in, so that they go as soon as settled.
//! - [`registry`]: [`Registry`], the services of a node in registration order.
//! - [`host`]: [`Host`], one node's layer at work: routing, serving, and each change carried
//!   out; `driver`, the loop that feeds [`Period`] its events and runs its commands; `gate`,
//!   what a served request passes and a change's hold waits at; `mirrors`, the watched values a
//!   request reads, as atomics; `deadline`, a request's deadline.
//! - [`link`]: [`Link`], the one call to another node the layer needs from the network.
//! - [`wire`]: the messages hosts send each other.
//! - `testing` (feature `testing`): an in-memory cluster and the conformance suite.
//! - [`error`]: the one error type, [`AdaptationError`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod codec;
#[cfg(feature = "testing")]
mod conformance;
mod deadline;
mod driver;
pub mod error;
mod gate;
pub mod host;
mod kept;
pub mod link;
pub mod log_budget;
mod mirrors;
pub mod period;
mod pool;
pub mod registry;
pub mod router;
pub mod run;
pub mod service;
mod settled;
pub mod shared;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use error::AdaptationError;
pub use host::{ChangeRecord, Host, HostConfig, Progress, Stats, Update};
pub use link::Link;
pub use period::{Command, Event, Period, Phase, Role};
pub use registry::Registry;
pub use router::{Router, Verdict};
pub use run::{Packed, Packer, Run};
pub use service::{plugin, Answer, ChangeInfo, Context, Moving, Plugin, Service};
