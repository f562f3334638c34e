//! The adaptation layer of gobelins (DESIGN.md, "Adaptation layer"): what every node does, for
//! every registered service, while the cluster moves from one epoch to the next.
//!
//! Built so far: the adaptation-period protocol of one node as a pure state machine
//! ([`period`]) and the router's decision for each request ([`router`]). Still to come (issue
//! 4): the service plug-in trait and its type-erased registry, the async driver that carries the
//! machine's commands out over the supervisor's transport, held-request queues and request-id
//! deduplication, failure recovery by `scan`, and a conformance suite for services.
//!
//! Modules:
//! - [`codec`]: the one module that names bincode, for this crate and the supervisor.
//! - [`period`]: [`Period`], events in and commands out for one epoch change.
//! - [`router`]: [`Router`], serve, hold, moved or wait for each request.
//! - [`error`]: the one error type, [`AdaptationError`].
#![deny(missing_docs)]

pub mod codec;
pub mod error;
pub mod period;
pub mod router;

pub use error::AdaptationError;
pub use period::{Command, Event, Period, Phase, Role};
pub use router::{Router, Verdict};
