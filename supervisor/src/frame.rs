//! Framing on the wire: a 4-byte big-endian length, then a version byte, then the payload.
//!
//! ```text
//! | len: u32 BE (= 1 + payload) | version: u8 | payload: len - 1 bytes |
//! ```
//!
//! Once a connection is admitted, every payload is a [`Wire`] message: a kind byte and a
//! request id before the body. The body is written from its own buffer (one vectored write
//! carries many frames, `FrameWriter`), and read back as a slice of the received frame, so a
//! large message is not copied on its way.
//!
//! ```text
//! | kind: u8 (0 request, 1 response) | id: u64 BE | body |
//! ```
//!
//! The length is checked against the limit before a single byte of the frame is buffered, so an
//! oversized or hostile length costs nothing.

use crate::error::{Result, SupervisorError};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The protocol version this node writes (2: [`Wire`] headers instead of an encoded enum; 3:
/// the DSM places pages, locks and barriers on other managers, and peers answer `Stopped`, so
/// nodes of version 2 and 3 must not share a cluster; 4: every body ends with its
/// [`crate::lane::Lane`], and migration batches carry runs of entries; 5: a batch's entries
/// follow the encoded message instead of being encoded in it; 6: requests and batches carry
/// what senders have settled; 7: a DSM page entry carries the copy a leaving manager keeps
/// aside for a grant, and leaving nodes hand such copies over; 8: a routed request's header and
/// a `Done` reply of the adaptation layer are laid out by hand, fixed-width; 9: an adaptation
/// reply says how it is laid out in its last byte, not its first, and the DSM moves backups
/// (`BackupTo`, `Abandon`) and frees segments by marking its taint markers; 10: a DSM backup
/// says which of its owner's commits it holds, and a survivor's report of a copy carries that
/// and a digest of its content; 11: an adaptation message told to a node's local server
/// (`Message::Local`) is laid out by hand too; 12: a node that passes a request on to its key's
/// manager relays the manager's reply, and the manager no longer answers the origin itself;
/// 13: the replicated state refuses a join the locator has no room for, a service declared
/// otherwise than registered, and slots past the cluster's budget, with refusals of their own:
/// nodes of 12 would apply the same log otherwise; 14: a join is answered with `Admitted`,
/// which carries the state the joiner begins its change from; still 14: the leader's word that
/// a change began, `Request::Begun`, and its answer `Heard`, came last in their enums, so a node
/// without them answers `Malformed`, logs it as a malformed request, and only begins later;
/// 15: a node's view, the answer to `Request::State`, says how long its leader has heard from
/// no majority of the voters; 16: the replicated state's `Command::Dead`, the detector's
/// verdict, which may end the last live node's life; 17: `Command::Shape`, the label levels a
/// bootstrap gives the cell tree; 18: the DSM's `Request::Cover` and `Uncover`, a manager's
/// word to its replica holder, and `Entry::Covered`, which a recovery's batches carry; and the
/// handshake's `RefusedSecret`; 19: the DSM's `Request::Foster`, a leaving owner's page left
/// on a live node when its manager does not answer; 20: `Request::Abandon` carries the leaving
/// node's backup copy, and `Foster` says whether the page was owned or backed up; 21: a
/// node's view names the members its leader has not heard from, and the suspects; 22: the
/// DSM's `Request::Losses` and its answer, what `gobelins dsm lost` asks every node; 23: the
/// refusal `Refusal::Held` of a node that keeps failing, the nodes a view holds out, and
/// `Request::Unhold` with its answer `Unheld`, an operator's lifting of a hold; 24:
/// `Request::Stopping`, a member's word that it stops on purpose; 25: under label levels a
/// node keeps its replicas in another zone, and the nodes linked to a change's participants by
/// holding take part: nodes of 24 would apply the same log and disagree on who takes part; 26:
/// the replicated state records the last two changes that moved something of each node's, and
/// a `Fail` carries the dead node's, where 25 took every linked node part instead; an `Evict`
/// names the nodes its leaver held replicas for, for which the leaver stays should one die;
/// 27: a dialer's `Hello` names the node it means to reach; 28: a node's record says whether
/// its operator asked it out before it failed, and an `Evict` of a failed node records so; 29:
/// the replicated state records since when each node's word of its entries holds, and a
/// `Fail` or `Recover` carries the dead node's; the DSM's `Entry::Covered` carries the word's
/// sequence number, and a slot the word left out; and its `Request::KeepRetired`, a leaver's
/// copy kept aside for a write grant, left on another node; 30: a node's record in the
/// replicated state says who took it out, its own leave or another node's evict).
pub const VERSION: u8 = 30;
/// The oldest protocol version this node reads.
pub const MIN_VERSION: u8 = 30;
/// Default largest frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest frame before the peer has proved it holds the cluster secret: a Hello is small, and
/// a stranger must not make us hold megabytes.
pub const HANDSHAKE_MAX_FRAME: usize = 4 * 1024;

const HEADER: usize = 4;
const WIRE_HEADER: usize = 1 + 8;
/// A frame this long or longer is bulk (a migration batch, a copy to a backup): it is read
/// into an arena. Requests and answers are far shorter.
const LARGE: usize = 128 * 1024;
/// Room made at once for large frames: they are read one after the other into it, each kept
/// as a slice of it, where each used to get a buffer of its own and a copy of the part of it
/// read into the last one's. Advised to be backed by 2 MiB pages (`huge_pages`).
const ARENA: usize = 8 * 1024 * 1024;
/// The read buffer a connection goes back to when it leaves an arena (tokio-util's first one).
const SHORT_BUFFER: usize = 8 * 1024;

/// The id of a request that wants no answer: calls number theirs from 1, and the receiver
/// writes no response to this one. Nothing in this version sends one (the adaptation layer's
/// forwarded answer, the last told message, went with the relay); a receiver still takes one
/// without answering, so that an id nobody waits for never gets a response.
pub const NO_ANSWER: u64 = 0;

/// A message between two admitted peers: a request, or the response to the request of the
/// same id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wire {
    /// A request; `id` is unique among the sender's requests in flight on the connection.
    Request {
        /// Matches the response.
        id: u64,
        /// What the handler reads.
        body: Bytes,
    },
    /// The answer to request `id`.
    Response {
        /// The request's id.
        id: u64,
        /// What the handler answered.
        body: Bytes,
    },
}

impl Wire {
    /// Reads a message from a frame's payload, without copying its body.
    pub fn decode(mut payload: Bytes) -> Result<Wire> {
        if payload.len() < WIRE_HEADER {
            return Err(SupervisorError::Codec(format!(
                "a message of {} bytes is shorter than its header",
                payload.len()
            )));
        }
        let kind = payload.get_u8();
        let id = payload.get_u64();
        match kind {
            0 => Ok(Wire::Request { id, body: payload }),
            1 => Ok(Wire::Response { id, body: payload }),
            other => Err(SupervisorError::Codec(format!("unknown message kind {other}"))),
        }
    }
}

/// Splits a byte stream into frames and writes frames out.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// Where the arena the read buffer lies in was allocated (addresses); empty when it lies in
    /// none. The reader leaves an arena before it fills, and at a short frame, so that the
    /// arena is freed once the services drop its frames: kept as the read buffer, tokio-util
    /// took it back whole once its frames were gone, and a connection held 8 to 16 MiB for
    /// good.
    arena: std::ops::Range<usize>,
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame` bytes (version byte included).
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame, arena: 0..0 }
    }

    /// Changes the limit, as after a handshake.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Reads on into a new arena, with what was read of a large frame of `frame` bytes.
    fn enter_arena(&mut self, src: &mut BytesMut, frame: usize) {
        let mut arena = BytesMut::with_capacity(ARENA.min(self.max_frame + HEADER).max(frame));
        crate::huge_pages::advise(arena.spare_capacity_mut());
        let start = arena.as_ptr() as usize;
        self.arena = start..start + arena.capacity();
        arena.extend_from_slice(src);
        *src = arena;
    }

    /// Reads on into a buffer of its own, with room for `frame` bytes.
    fn leave_arena(&mut self, src: &mut BytesMut, frame: usize) {
        let mut own = BytesMut::with_capacity(src.len().max(frame).max(SHORT_BUFFER));
        own.extend_from_slice(src);
        *src = own;
        self.arena = 0..0;
    }
}

/// The frame `src` begins with is large, as far as its header says.
fn large_next(src: &BytesMut) -> bool {
    src.len() >= HEADER && u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize >= LARGE
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = SupervisorError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        if src.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(SupervisorError::FrameTooLarge { len, max: self.max_frame });
        }
        if len == 0 {
            return Err(SupervisorError::EmptyFrame);
        }
        let in_arena = self.arena.contains(&(src.as_ptr() as usize));
        if src.len() < HEADER + len {
            let needed = HEADER + len - src.len();
            if len >= LARGE {
                if src.capacity() - src.len() < needed {
                    self.enter_arena(src, HEADER + len);
                }
            } else if in_arena {
                self.leave_arena(src, HEADER + len);
            } else {
                src.reserve(needed);
            }
            return Ok(None);
        }
        let version = src[HEADER];
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(SupervisorError::UnsupportedVersion(version));
        }
        if len < LARGE && in_arena {
            // Copied: a service may keep a slice of a short frame for long (kvdir keeps a
            // replica's value), and that slice would keep the whole arena. The arena is left
            // unless a large frame is known to follow: a heartbeat between batches must not
            // cost a new arena, its 2 MiB pages zeroed again, at each batch after it.
            let frame = Bytes::copy_from_slice(&src[HEADER + 1..HEADER + len]);
            src.advance(HEADER + len);
            if !large_next(src) {
                self.leave_arena(src, 0);
            }
            return Ok(Some(frame));
        }
        src.advance(HEADER + 1);
        let frame = src.split_to(len - 1).freeze();
        if in_arena && src.capacity() - src.len() < HEADER + len {
            // No room for another frame as long: left before it fills (see `arena`).
            self.leave_arena(src, 0);
        }
        Ok(Some(frame))
    }

    /// A connection closed in the middle of a frame says so (tokio-util's own words were
    /// "bytes remaining on stream").
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        match self.decode(src)? {
            None if !src.is_empty() => Err(SupervisorError::io(
                "reading a frame",
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the peer closed the connection {} bytes into a frame", src.len()),
                ),
            )),
            frame => Ok(frame),
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = SupervisorError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<()> {
        let len = payload.len() + 1;
        if len > self.max_frame {
            return Err(SupervisorError::FrameTooLarge { len, max: self.max_frame });
        }
        dst.reserve(HEADER + len);
        dst.put_u32(len as u32);
        dst.put_u8(VERSION);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

/// Length, version, kind and request id: what goes before a [`Wire`] message's body.
pub(crate) const FRAME_HEADER: usize = HEADER + 1 + WIRE_HEADER;

impl Wire {
    /// The message's body, and the bytes before it in its frame.
    pub(crate) fn into_frame(self) -> ([u8; FRAME_HEADER], Bytes) {
        let (kind, id, body) = match self {
            Wire::Request { id, body } => (0u8, id, body),
            Wire::Response { id, body } => (1u8, id, body),
        };
        // The length counts the version byte, the kind, the id and the body.
        let len = (FRAME_HEADER - HEADER + body.len()) as u32;
        let mut header = [0u8; FRAME_HEADER];
        header[..HEADER].copy_from_slice(&len.to_be_bytes());
        header[HEADER] = VERSION;
        header[HEADER + 1] = kind;
        header[HEADER + 2..].copy_from_slice(&id.to_be_bytes());
        (header, body)
    }

    /// Its frame's length, the version byte included.
    pub(crate) fn frame_len(&self) -> usize {
        let (Wire::Request { body, .. } | Wire::Response { body, .. }) = self;
        1 + WIRE_HEADER + body.len()
    }

    /// `FrameTooLarge` when this frame would not fit in `max_frame` bytes.
    pub(crate) fn fits(&self, max_frame: usize) -> Result<()> {
        let len = self.frame_len();
        if len > max_frame {
            return Err(SupervisorError::FrameTooLarge { len, max: max_frame });
        }
        Ok(())
    }
}

impl Encoder<Wire> for FrameCodec {
    type Error = SupervisorError;

    fn encode(&mut self, wire: Wire, dst: &mut BytesMut) -> Result<()> {
        wire.fits(self.max_frame)?;
        let (header, body) = wire.into_frame();
        dst.reserve(header.len() + body.len());
        dst.extend_from_slice(&header);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
