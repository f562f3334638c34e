//! The adaptation layer of gobelins (DESIGN.md, "Adaptation layer"): what every node does, for
//! every registered service, while the cluster moves from one epoch to the next.
//!
//! Built so far: the adaptation-period protocol of one node as a pure state machine
//! ([`period`]), the router's decision for each request ([`router`]), and the service plug-in
//! trait with its type-erased registry ([`service`], [`registry`]). Still to come (issue 4): the
//! async driver that carries the machine's commands out over the supervisor's transport,
//! held-request queues and request-id deduplication, failure recovery by `scan`, and a
//! conformance suite for services.
//!
//! Modules:
//! - [`codec`]: the one module that names bincode, for this crate and the supervisor.
//! - [`period`]: [`Period`], events in and commands out for one epoch change.
//! - [`router`]: [`Router`], serve, hold, moved or wait for each request.
//! - [`service`]: the [`Service`] trait authors implement, and [`Plugin`], its form in bytes.
//! - [`registry`]: [`Registry`], the services of a node in registration order.
//! - [`error`]: the one error type, [`AdaptationError`].
#![deny(missing_docs)]

pub mod codec;
mod driver;
pub mod error;
pub mod host;
pub mod link;
pub mod period;
pub mod registry;
pub mod router;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use error::AdaptationError;
pub use host::{ChangeRecord, Host, HostConfig, Progress, Stats, Update};
pub use link::Link;
pub use period::{Command, Event, Period, Phase, Role};
pub use registry::Registry;
pub use router::{Router, Verdict};
pub use service::{plugin, Answer, ChangeInfo, Context, Moving, Plugin, Service};
