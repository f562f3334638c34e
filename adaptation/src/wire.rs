//! The messages hosts send each other: requests for a manager, messages to a local server,
//! migration batches and acknowledgements.

use crate::codec;
use crate::error::AdaptationError;
use crate::run::Run;
use bytes::Bytes;
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

/// What a sender has settled (received the answer of, or given up on): its requests numbered
/// from `since`, its first number in this life, up to `below`. No retry of them will come, so a
/// manager may forget their answers, and refuses a late copy of one rather than run it again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The sender's first request number in this life.
    pub since: u64,
    /// Every number from `since` below this one is settled.
    pub below: u64,
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

/// A request for the manager of its key, as its sender routed it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Routed {
    /// The request's id: its origin gets the answer.
    pub id: RequestId,
    /// The service.
    pub service: ServiceId,
    /// The key.
    pub key: Key,
    /// The epoch it was routed by.
    pub epoch: u64,
    /// The encoded request.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// How long the origin will wait, in milliseconds.
    pub wait_ms: u64,
    /// What the origin has settled.
    pub settled: Settlement,
    /// The origin found it repeatable (`Service::repeatable`): the manager keeps no answer
    /// for it and never refuses a copy of it. Taken on the origin's word, so that the manager
    /// does not decode the request once more to judge; a sender that lies only loses the
    /// run-once guarantee of its own request.
    pub repeatable: bool,
}

impl Routed {
    /// `Message::Request(self)` with `body` for its body, encoded as [`Message::encode`]
    /// would encode it, without copying `body` into the message first: a sender keeps its
    /// request's body for retries, and copied, it cost every request an allocation.
    pub fn encode_request(&self, body: &[u8]) -> Result<Vec<u8>, AdaptationError> {
        let Routed { id, service, key, epoch, wait_ms, settled, repeatable, .. } = *self;
        let out = RoutedOut { id, service, key, epoch, body, wait_ms, settled, repeatable };
        codec::encode(&Outgoing::Request(out))
    }
}

/// [`Message`] as far as its first variant, borrowing the body: the same bytes on the wire
/// (a test below holds the two together).
#[derive(Serialize)]
enum Outgoing<'a> {
    Request(RoutedOut<'a>),
}

/// [`Routed`], field for field, with a borrowed body.
#[derive(Serialize)]
struct RoutedOut<'a> {
    id: RequestId,
    service: ServiceId,
    key: Key,
    epoch: u64,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    wait_ms: u64,
    settled: Settlement,
    repeatable: bool,
}

/// One message between hosts. Encoded with [`Message::encode`]: `codec::encode` would leave a
/// batch's entries out.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// For the manager of the request's key, routed by the sender's epoch.
    Request(Routed),
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
        /// Answers the old manager gave for these keys, so retries still run once.
        answered: Vec<Answered>,
        /// What the old manager knew its senders had settled: their answers stayed behind, and
        /// a late copy of one of those requests must be refused here too.
        settled: Vec<(NodeId, Settlement)>,
        /// The entries: not encoded with the message but after it, to the end of the body
        /// ([`Message::encode`]), so that neither end copies a run to frame or unframe it.
        #[serde(skip)]
        entries: Run,
    },
    /// The sender has sent everything for `epoch`.
    Ack {
        /// The change.
        epoch: u64,
    },
    /// A [`Message::Request`] its receiver does not manage the key of, passed on to the
    /// manager in the receiver's epoch (its `epoch` is now the receiver's), who answers
    /// `id.origin` with a [`Message::Answer`] (`crate::forwarded`).
    Forward(Routed),
    /// The answer to the receiver's own request `id`, from the manager it was forwarded to.
    Answer {
        /// The request.
        id: RequestId,
        /// What the manager answered.
        reply: Reply,
    },
}

impl Message {
    /// The message's body: the message, then a batch's entries.
    pub fn encode(&self) -> Result<Vec<u8>, AdaptationError> {
        let mut body = codec::encode(self)?;
        if let Message::Batch { entries, .. } = self {
            body.reserve_exact(entries.size() + codec::SPARE);
            body.extend_from_slice(entries.bytes());
        }
        Ok(body)
    }

    /// Reads a body [`Message::encode`] wrote; a batch's entries are a slice of `body`.
    pub fn decode(body: Bytes) -> Result<Message, AdaptationError> {
        let (mut message, used) = codec::decode_prefix::<Message>(&body)?;
        match &mut message {
            Message::Batch { entries, .. } => *entries = Run::parse(body.slice(used..))?,
            _ if used != body.len() => {
                return Err(AdaptationError::Codec(format!("{} trailing bytes", body.len() - used)))
            }
            _ => {}
        }
        Ok(message)
    }
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
    /// The receiver does not manage the key and passed the request on to `to`, which will
    /// send the answer in a [`Message::Answer`].
    Forwarded {
        /// The node the request went on to.
        to: NodeId,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Packed;

    #[test]
    fn a_batch_reads_back_with_its_entries_a_slice_of_the_body() {
        let mut packed = Packed::with_capacity(0);
        packed.push_encoded(Key(4), &"four".to_string()).unwrap();
        let entries = packed.into_run();
        let answered = vec![Answered {
            key: Key(4),
            id: RequestId { origin: NodeId(1), seq: 9 },
            response: vec![1],
        }];
        let settled = vec![(NodeId(1), Settlement { since: 5, below: 9 })];
        let batch = Message::Batch { epoch: 3, service: ServiceId(2), answered, settled, entries };
        let body = Bytes::from(batch.encode().unwrap());
        let Message::Batch { epoch, service, answered, settled, entries } =
            Message::decode(body.clone()).unwrap()
        else {
            panic!("not a batch")
        };
        assert_eq!((epoch, service, answered.len()), (3, ServiceId(2), 1));
        assert_eq!(settled, vec![(NodeId(1), Settlement { since: 5, below: 9 })]);
        assert_eq!(entries.decode::<String>().unwrap(), vec![(Key(4), "four".to_string())]);
        let at = entries.bytes().as_ptr() as usize - body.as_ptr() as usize;
        assert_eq!(at + entries.size(), body.len(), "the entries are the body's tail, not a copy");
    }

    #[test]
    fn a_request_encoded_from_a_borrowed_body_is_the_message_it_stands_for() {
        let routed = Routed {
            id: RequestId { origin: NodeId(3), seq: u64::MAX - 7 },
            service: ServiceId(2),
            key: Key(1 << 63 | 12345),
            epoch: 41,
            body: Vec::new(),
            wait_ms: 2000,
            settled: Settlement { since: 1 << 40, below: (1 << 40) + 9 },
            repeatable: true,
        };
        let body = vec![7u8; 300];
        let borrowed = routed.encode_request(&body).unwrap();
        let owned = Message::Request(Routed { body: body.clone(), ..routed }).encode().unwrap();
        assert_eq!(borrowed, owned);
        let Message::Request(back) = Message::decode(Bytes::from(borrowed)).unwrap() else {
            panic!("not a request")
        };
        assert_eq!((back.id.seq, back.key, back.body), (u64::MAX - 7, Key(1 << 63 | 12345), body));
    }

    #[test]
    fn bytes_after_a_message_that_is_not_a_batch_are_refused() {
        let mut body = Message::Ack { epoch: 1 }.encode().unwrap();
        assert!(Message::decode(Bytes::from(body.clone())).is_ok());
        body.push(0);
        assert!(matches!(Message::decode(Bytes::from(body)), Err(AdaptationError::Codec(_))));
    }
}
