//! The messages hosts send each other: requests for a manager, messages to a local server,
//! migration batches and acknowledgements.

use crate::run::Run;
use gobelins_locator::{Key, NodeId, ServiceId};
use serde::{Deserialize, Serialize};
pub use serde_bytes::ByteBuf;

/// Names one request across retries, so that a manager runs it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The node that issued it.
    pub origin: NodeId,
    /// Its number there.
    pub seq: u64,
}

/// A request answered before, kept so that a retry gets the same answer. Moves with its entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answered {
    /// The key it was for.
    pub key: Key,
    /// The request.
    pub id: RequestId,
    /// The encoded response.
    #[serde(with = "serde_bytes")]
    pub response: Vec<u8>,
}

/// One message between hosts.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// For the manager of `key`, routed by the sender's `epoch`.
    Request {
        /// The request's id.
        id: RequestId,
        /// The service.
        service: ServiceId,
        /// The key.
        key: Key,
        /// The epoch the sender routed by.
        epoch: u64,
        /// The encoded request.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// How long the sender will wait, in milliseconds.
        wait_ms: u64,
    },
    /// For the receiving node's local server of `service` (a replica, a page copy).
    Local {
        /// The service.
        service: ServiceId,
        /// The key it concerns.
        key: Key,
        /// The encoded request.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// Entries for their new manager in the change to `epoch`.
    Batch {
        /// The change.
        epoch: u64,
        /// The service.
        service: ServiceId,
        /// Encoded entries.
        entries: Run,
        /// Answers the old manager gave for these keys, so retries still run once.
        answered: Vec<Answered>,
    },
    /// The sender has sent everything for `epoch`.
    Ack {
        /// The change.
        epoch: u64,
    },
}

/// The answer to a [`Message`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The manager's encoded response.
    Done(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The receiver does not manage the key in `epoch`; install it and retry.
    Moved {
        /// The receiver's epoch.
        epoch: u64,
    },
    /// No such service in the receiver's configuration.
    Unknown(u16),
    /// Taken (a batch, an ack).
    Accepted,
    /// The receiver could not complete it in the time the sender gave.
    Late,
    /// The receiver refused it, and says why.
    Refused(String),
    /// A batch for a change the receiver has already merged: it can only come from a sender
    /// the cluster gave up on (cut off, declared failed), whose entries recovery rebuilds.
    Merged {
        /// The change.
        epoch: u64,
    },
}
