//! The messages hosts send each other: requests for a manager, messages to a local server,
//! migration batches and acknowledgements.

use crate::codec;
use crate::error::AdaptationError;
use crate::run::Run;
use bytes::Bytes;
use gobelins_locator::{Key, NodeId, ServiceId};
use serde::{Deserialize, Serialize};

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

impl Settlement {
    /// Whether request number `seq` of the sender's life is settled.
    pub fn covers(&self, seq: u64) -> bool {
        self.since <= seq && seq < self.below
    }
}

/// A request answered before, kept so that a retry gets the same answer. Moves with its entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answered {
    /// The key it was for.
    pub key: Key,
    /// The request.
    pub id: RequestId,
    /// The encoded response.
    pub response: Bytes,
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
    /// The encoded request: on the manager's side, a slice of the frame it came in.
    pub body: Bytes,
    /// How long the origin will wait, in milliseconds.
    pub wait_ms: u64,
    /// What the origin has settled: the default for a fresh request, which never leaves its
    /// node (see `Inner::serve`), and for a repeatable one whose manager heard it already
    /// (see `crate::settled`).
    pub settled: Settlement,
    /// The origin found it repeatable (`Service::repeatable`): the manager keeps no answer
    /// for it and never refuses a copy of it. Taken on the origin's word, so that the manager
    /// does not decode the request once more to judge; a sender that lies only loses the
    /// run-once guarantee of its own request.
    pub repeatable: bool,
}

/// The first byte of a [`Message::Request`], and the last of a [`Reply::Done`]: they are laid
/// out by hand (below), as are a [`Message::Local`] (tag [`LOCAL`]) and a [`Message::Forward`]
/// (tag [`FORWARD`]); every other message is laid out by bincode, which starts with the
/// variant's index, one byte under 251 (its varint). No index reaches these tags, so the
/// layouts never mix.
const FIXED: u8 = 0xF0;

/// The first byte of a [`Message::Local`], laid out by hand as a routed request is: the tag,
/// the service and the key, then the body to the end. Told messages carry pages and replicas:
/// through bincode, the body was copied into the message, and on the way in zero-filled into a
/// buffer of its own and copied again.
const LOCAL: u8 = 0xF1;

/// The first byte of a [`Message::Forward`], laid out as a [`Message::Request`] is: the node
/// that passes a request on neither encodes nor its manager decodes it through bincode.
const FORWARD: u8 = 0xF2;

/// A told message's header: the tag, service and key.
const LOCAL_HEADER: usize = 1 + 2 + 8;

/// The last byte of a reply bincode encoded: a reply says at its end how it is laid out, so
/// that a `Done` is its response as the service encoded it, with one byte pushed after it.
const CODED: u8 = 0;

/// Bytes a service leaves free behind its encoded response: the reply's tag, then what the
/// link seals a message with. With less, the second push reallocated and copied every answer.
pub const RESPONSE_ROOM: usize = 1 + codec::SPARE;

/// A routed request's header: the tag, origin, number, service, key, epoch, wait, settlement
/// (two numbers) and the repeatable flag. The body follows, to the end of the message.
const ROUTED_HEADER: usize = 1 + 8 + 8 + 2 + 8 + 8 + 8 + 8 + 8 + 1;

impl Routed {
    /// `Message::Request(self)` with `body` for its body, as [`Message::encode`] encodes it.
    /// The body is borrowed: a sender keeps its request's body for retries.
    ///
    /// Every request crosses the wire in this layout, so it is fixed-width and written by hand:
    /// through bincode's varints and serde, the header cost more CPU than the rest of the layer's
    /// work on a request, and twice over, since encoding measures the message first.
    pub fn encode_request(&self, body: &[u8]) -> Vec<u8> {
        self.encode_tagged(FIXED, body)
    }

    /// The request with the typed `request` as its body, encoded behind the header in one
    /// buffer: what [`Routed::encode_request`] writes for that body, without encoding the
    /// body apart first and copying it.
    pub(crate) fn encode_typed<Q: Serialize>(
        &self,
        request: &Q,
    ) -> Result<Vec<u8>, AdaptationError> {
        codec::encode_after(&self.header(FIXED), request, codec::SPARE)
    }

    /// `self` with `body`, laid out by hand behind `tag`.
    fn encode_tagged(&self, tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ROUTED_HEADER + body.len() + codec::SPARE);
        out.extend_from_slice(&self.header(tag));
        out.extend_from_slice(body);
        out
    }

    /// The header `tag` and the fields, as [`Routed::decode_request`] reads them.
    fn header(&self, tag: u8) -> [u8; ROUTED_HEADER] {
        let mut header = [0u8; ROUTED_HEADER];
        header[0] = tag;
        header[1..9].copy_from_slice(&self.id.origin.0.to_le_bytes());
        header[9..17].copy_from_slice(&self.id.seq.to_le_bytes());
        header[17..19].copy_from_slice(&self.service.0.to_le_bytes());
        header[19..27].copy_from_slice(&self.key.0.to_le_bytes());
        header[27..35].copy_from_slice(&self.epoch.to_le_bytes());
        header[35..43].copy_from_slice(&self.wait_ms.to_le_bytes());
        header[43..51].copy_from_slice(&self.settled.since.to_le_bytes());
        header[51..59].copy_from_slice(&self.settled.below.to_le_bytes());
        header[59] = u8::from(self.repeatable);
        header
    }

    /// Reads what [`Routed::encode_request`] wrote, whatever its tag; the body is a slice of
    /// `bytes`.
    fn decode_request(bytes: &Bytes) -> Result<Routed, AdaptationError> {
        let header = header_of(bytes, ROUTED_HEADER, "a request")?;
        // Offsets as `encode_request` writes them.
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let (origin, seq) = (NodeId(u64_at(1)), u64_at(9));
        let service = ServiceId(u16::from_le_bytes([header[17], header[18]]));
        let (key, epoch, wait_ms) = (Key(u64_at(19)), u64_at(27), u64_at(35));
        let settled = Settlement { since: u64_at(43), below: u64_at(51) };
        let repeatable = match header[59] {
            0 => false,
            1 => true,
            other => {
                return Err(AdaptationError::Codec(format!(
                    "a request's repeatable flag is {other}, not 0 or 1"
                )))
            }
        };
        Ok(Routed {
            id: RequestId { origin, seq },
            service,
            key,
            epoch,
            body: bytes.slice(ROUTED_HEADER..),
            wait_ms,
            settled,
            repeatable,
        })
    }
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
        body: Bytes,
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
    /// manager in the receiver's epoch (its `epoch` is now the receiver's), whose reply the
    /// receiver relays to `id.origin` as its own.
    Forward(Routed),
}

impl Message {
    /// `Message::Local` for `request`, encoded straight behind its header: the request is
    /// encoded once, into the message.
    pub fn encode_local<Q: Serialize>(
        service: ServiceId,
        key: Key,
        request: &Q,
    ) -> Result<Vec<u8>, AdaptationError> {
        codec::encode_after(&local_header(service, key), request, codec::SPARE)
    }

    /// The body of a message [`Message::encode_local`] wrote.
    pub(crate) fn local_body(message: &[u8]) -> &[u8] {
        debug_assert!(message.len() >= LOCAL_HEADER, "not a told message");
        message.get(LOCAL_HEADER..).unwrap_or_default()
    }

    /// The message's body: the message, then a batch's entries.
    pub fn encode(&self) -> Result<Vec<u8>, AdaptationError> {
        match self {
            Message::Request(routed) => return Ok(routed.encode_request(&routed.body)),
            Message::Forward(routed) => return Ok(routed.encode_tagged(FORWARD, &routed.body)),
            Message::Local { service, key, body } => {
                let mut out = Vec::with_capacity(LOCAL_HEADER + body.len() + codec::SPARE);
                out.extend_from_slice(&local_header(*service, *key));
                out.extend_from_slice(body);
                return Ok(out);
            }
            _ => {}
        }
        let mut body = codec::encode(self)?;
        if let Message::Batch { entries, .. } = self {
            body.reserve_exact(entries.size() + codec::SPARE);
            body.extend_from_slice(entries.bytes());
        }
        Ok(body)
    }

    /// Reads a body [`Message::encode`] wrote; a batch's entries are a slice of `body`.
    pub fn decode(body: Bytes) -> Result<Message, AdaptationError> {
        match body.first() {
            Some(&FIXED) => return Routed::decode_request(&body).map(Message::Request),
            Some(&LOCAL) => return decode_local(&body),
            Some(&FORWARD) => return Routed::decode_request(&body).map(Message::Forward),
            _ => {}
        }
        let (mut message, used) = codec::decode_prefix::<Message>(&body)?;
        match &mut message {
            Message::Batch { entries, .. } => *entries = Run::parse(body.slice(used..))?,
            // Never written so: a peer that does disagrees about the format.
            Message::Request(_) | Message::Local { .. } | Message::Forward(_) => {
                return Err(AdaptationError::Codec(
                    "a request, forward or told message in bincode's layout, not its own".into(),
                ))
            }
            _ if used != body.len() => {
                return Err(AdaptationError::Codec(format!("{} trailing bytes", body.len() - used)))
            }
            _ => {}
        }
        Ok(message)
    }
}

/// The first `len` bytes of `what`, a message laid out by hand: `Codec` if it is shorter.
fn header_of<'a>(bytes: &'a [u8], len: usize, what: &str) -> Result<&'a [u8], AdaptationError> {
    bytes.get(..len).ok_or_else(|| {
        AdaptationError::Codec(format!(
            "{what} of {} bytes is shorter than its {len}-byte header",
            bytes.len()
        ))
    })
}

fn local_header(service: ServiceId, key: Key) -> [u8; LOCAL_HEADER] {
    let mut header = [0; LOCAL_HEADER];
    header[0] = LOCAL;
    header[1..3].copy_from_slice(&service.0.to_le_bytes());
    header[3..].copy_from_slice(&key.0.to_le_bytes());
    header
}

/// Reads a `Message::Local`; its body is a slice of `bytes`.
fn decode_local(bytes: &Bytes) -> Result<Message, AdaptationError> {
    let header = header_of(bytes, LOCAL_HEADER, "a told message")?;
    let service = ServiceId(u16::from_le_bytes([header[1], header[2]]));
    let key = Key(u64::from_le_bytes(header[3..].try_into().expect("8 bytes")));
    Ok(Message::Local { service, key, body: bytes.slice(LOCAL_HEADER..) })
}

/// The answer to a [`Message`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The manager's encoded response.
    Done(Bytes),
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

impl Reply {
    /// The reply as it crosses the wire: a `Done` laid out by hand (the response, then the
    /// tag), anything else by bincode (then its own tag). A `Done` answers nearly every
    /// request, and its response, which the service encoded with room to spare, is sent in
    /// place rather than copied behind a header.
    pub fn encode(self) -> Result<Vec<u8>, AdaptationError> {
        let (mut out, tag) = match self {
            // Given back whole when nothing else holds it. One kept for retries is copied,
            // with room for the tag and what the link seals behind it, not grown for each.
            Reply::Done(response) if !response.is_unique() => {
                let mut out = Vec::with_capacity(response.len() + RESPONSE_ROOM);
                out.extend_from_slice(&response);
                (out, FIXED)
            }
            Reply::Done(response) => (Vec::from(response), FIXED),
            other => (codec::encode(&other)?, CODED),
        };
        out.push(tag);
        Ok(out)
    }

    /// Reads what [`Reply::encode`] wrote; a `Done`'s response is a slice of `bytes`.
    pub fn decode(bytes: &Bytes) -> Result<Reply, AdaptationError> {
        match bytes.split_last() {
            Some((&FIXED, _)) => Ok(Reply::Done(bytes.slice(..bytes.len() - 1))),
            Some((&CODED, coded)) => codec::decode(coded),
            Some((other, _)) => {
                Err(AdaptationError::Codec(format!("a reply ending in unknown tag {other}")))
            }
            None => Err(AdaptationError::Codec("an empty reply".into())),
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
