//! One connection's life: registered, read from, answered on, and retired.

use super::{lock, Pending, TcpTransport, Writer};
use crate::closer::Closer;
use crate::error::{Result, SupervisorError};
use crate::frame::{FrameCodec, Wire, NO_ANSWER};
use crate::frame_writer::FrameWriter;
use crate::net::Net;
use crate::outbox::Outbox;
use crate::slots::{Slot, Slots};
use crate::waiters::Waiters;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::codec::{Framed, FramedParts};

/// Writes what is queued if the socket takes it now, else from a task of its own: a reader
/// that waited for its peer to read could wait for ever, were the peer's reader waiting for it.
async fn write_queued_or_spawn(writer: &Writer) -> Result<()> {
    // Polled once where it stands: a write the socket does not take now is dropped half way,
    // and the outbox hands the rest to a task of its own (see `Outbox::drain`). Boxed to be
    // spawned, it cost an allocation on every answer. A failed write closes the connection,
    // which the reader then sees.
    let writing = std::pin::pin!(writer.write_queued());
    match futures::poll!(writing) {
        Poll::Ready(result) => result,
        Poll::Pending => Ok(()),
    }
}

/// How long a retired connection must have been quiet, with nothing waiting on it, before it
/// closes: longer than a round trip, so that what the peer sent before it switched has
/// arrived, and short, so that a pair does not keep two connections long.
const RETIRED_LINGER: Duration = Duration::from_millis(100);

/// The most answers a reader queues before it writes them, though more requests are read: a
/// steady flood of requests must not hold back the answers to the first ones.
const ANSWERS_PER_WRITE: usize = 64;

/// Bytes of the peer's requests a reader holds while every handler slot is taken, so that it
/// goes on reading the answers behind them: a handler that calls the peer back (a write copied
/// to its backup, say) holds its slot until that answer comes, on this same connection. A
/// reader that stopped at the first request it had no slot for stalled every such handler
/// until a deadline: 600 writes in flight to one manager took 374 ms where 300 took 5 ms.
/// Past this, the reader stops reading, and the peer's flood slows down its sender.
const BACKLOG_BYTES: usize = 16 << 20;

/// What a held request counts for against [`BACKLOG_BYTES`]: its body and this, so that empty
/// requests cannot be held without bound either.
fn held_cost(body: &Bytes) -> usize {
    body.len() + 64
}

/// One connection, shared by its reader, its callers and the peer table. One `Arc`: every
/// call takes the connection from the table, and a handful of counted fields cost a handful
/// of atomic operations each way.
#[derive(Clone)]
pub(super) struct Conn(Arc<ConnState>);

pub(super) struct ConnState {
    pub(super) id: u64,
    /// The node that dialed: decides which of two simultaneous connections survives.
    initiator: u64,
    pub(super) writer: Writer,
    pub(super) pending: Pending,
    pub(super) closer: Arc<Closer>,
    /// When a frame last arrived, in nanoseconds after `born`, to tell a silent connection
    /// from a busy one. Written for every frame: an atomic, where a mutex cost a lock each.
    last_heard: AtomicU64,
    born: Instant,
    /// The peer's requests being handled.
    inflight: Arc<Slots>,
}

impl std::ops::Deref for Conn {
    type Target = ConnState;
    fn deref(&self) -> &ConnState {
        &self.0
    }
}

impl ConnState {
    pub(super) fn heard(&self) {
        let nanos = self.born.elapsed().as_nanos();
        self.last_heard.store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// When a frame last arrived (when the connection opened, if none has).
    fn heard_at(&self) -> Instant {
        self.born + Duration::from_nanos(self.last_heard.load(Ordering::Relaxed))
    }

    fn silent_for(&self) -> Duration {
        self.heard_at().elapsed()
    }

    /// Nothing came on this connection for the last `waited`, or since it opened if that is
    /// later: a call that dialed it waited on it only from then.
    pub(super) fn silent_through(&self, waited: Duration) -> bool {
        let began = Instant::now().checked_sub(waited).map_or(self.born, |b| b.max(self.born));
        self.heard_at() <= began
    }
}

/// A connection's reading and writing halves, split by `split` (`Net::split`: owned halves
/// that share no lock, nor a waker: with `Framed::split` a caller writing while the reader was
/// being polled had to wait for a cross-thread wake). Bytes the handshake read past its last
/// frame are decoded before the socket is read again.
pub(super) fn halves<S, R: AsyncRead, W: AsyncWrite + Unpin>(
    framed: Framed<S, FrameCodec>,
    split: impl FnOnce(S) -> (R, W),
    max_frame: usize,
) -> (Framed<R, FrameCodec>, FrameWriter<W>) {
    let parts = framed.into_parts();
    let (read, write) = split(parts.io);
    let sink = FrameWriter::new(write, max_frame);
    let mut reading = FramedParts::new::<Wire>(read, parts.codec);
    reading.read_buf = parts.read_buf;
    (Framed::from_parts(reading), sink)
}

/// Removes a request's waiter however the call ends, timeout or cancellation included.
pub(super) struct PendingGuard<'a> {
    pub(super) pending: &'a Pending,
    pub(super) id: u64,
    /// The reader took the waiter out to hand it the answer: nothing is left to remove.
    pub(super) answered: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.pending.forget(self.id);
        }
    }
}

/// Ends a connection however its reader stops, aborted by a close included: the connection is
/// closed, its waiters hear `Closed`, and it is no longer the pair's connection.
pub(super) struct Ended<N: Net> {
    transport: TcpTransport<N>,
    peer: u64,
    conn: Conn,
}

impl<N: Net> Drop for Ended<N> {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.closer.close();
        // Waiters see their sender dropped and report `Closed`.
        conn.pending.fail_all();
        let mut peers = lock(&self.transport.inner.peers);
        if let Some(entry) = peers.get_mut(&self.peer) {
            if entry.conn.as_ref().is_some_and(|c| c.id == conn.id) {
                entry.conn = None;
            }
        }
    }
}

impl<N: Net> TcpTransport<N> {
    /// Starts the connection's task and makes it the pair's connection, unless a connection
    /// opened by the lower node id already is. Returns the connection to use.
    pub(super) fn register(
        &self,
        peer: u64,
        initiator: u64,
        framed: Framed<N::Stream, FrameCodec>,
    ) -> Conn {
        let max_frame = self.inner.config.max_frame;
        let (stream, sink) = halves(framed, N::split, max_frame);
        let closer = Closer::new(self.inner.shutdown.child_token());
        let pending = Waiters::new();
        tokio::spawn(Arc::clone(&pending).expire(Arc::clone(&closer)));
        let abandoned = {
            let pending = Arc::clone(&pending);
            // A told message has nobody waiting for its answer, and none to abandon.
            Box::new(move |id| id != NO_ANSWER && !pending.waits_for(id))
        };
        let conn = Conn(Arc::new(ConnState {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            initiator,
            writer: Outbox::new(Box::pin(sink), Arc::clone(&closer), max_frame, abandoned),
            pending,
            closer,
            last_heard: AtomicU64::new(0),
            born: Instant::now(),
            inflight: Slots::new(self.inner.config.max_inflight),
        }));
        let chosen = {
            let mut peers = lock(&self.inner.peers);
            let entry = peers.entry(peer).or_default();
            let preferred = self.inner.identity.node.min(peer);
            match &entry.conn {
                Some(existing)
                    if !existing.closer.is_closed()
                        && existing.initiator == preferred
                        && conn.initiator != preferred
                        && existing.silent_for() < self.inner.config.stall_after =>
                {
                    // The peer may already have sent calls on it.
                    self.retire(peer, conn.clone());
                    existing.clone()
                }
                _ => {
                    if let Some(old) = entry.conn.replace(conn.clone()) {
                        if old.silent_for() < self.inner.config.stall_after {
                            self.retire(peer, old);
                        } else {
                            // Wedged: what waits on it would only wait longer.
                            old.closer.close();
                        }
                    }
                    entry.backoff = Duration::ZERO;
                    entry.retry_at = None;
                    entry.refused = None;
                    entry.secret_differs = false;
                    conn.clone()
                }
            }
        };
        let ended = Ended { transport: self.clone(), peer, conn: conn.clone() };
        let reader =
            tokio::spawn(async move { ended.transport.clone().run(peer, ended, stream).await });
        conn.closer.set_reader(reader.abort_handle());
        chosen
    }

    /// Takes `conn` out of use without failing what is on it: closed once no call of ours waits
    /// on it, no request of the peer's is being handled, and nothing came for a linger (the
    /// peer retires it too, and stops sending on it once it holds the pair's connection). A
    /// request the peer sends after that fails `Closed`, and its caller retries on the pair's
    /// connection, as every caller did before connections were retired.
    pub(super) fn retire(&self, peer: u64, conn: Conn) {
        let linger = RETIRED_LINGER;
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // Shut down: the parent token fired.
                    _ = conn.closer.closed() => break,
                    _ = tokio::time::sleep(linger) => {}
                }
                let known = lock(&inner.peers).contains_key(&peer);
                let idle =
                    conn.pending.is_empty() && conn.inflight.idle() && conn.silent_for() >= linger;
                if conn.closer.is_closed() || !known || idle {
                    break;
                }
            }
            conn.closer.close();
        });
    }

    /// Reads the connection until it closes: answers requests, hands responses to callers.
    /// Closing the connection aborts it; `ended` then cleans up.
    async fn run(self, peer: u64, ended: Ended<N>, mut stream: Framed<N::ReadHalf, FrameCodec>) {
        let conn = &ended.conn;
        let inflight = &conn.inflight;
        let result: Result<()> = async {
            // Answers queued since the reader last wrote.
            let mut unwritten = 0;
            // Requests read while every handler slot was taken, oldest first, and their bytes.
            let mut backlog: VecDeque<(u64, Bytes)> = VecDeque::new();
            let mut held_bytes = 0;
            loop {
                if conn.closer.is_closed() {
                    return Ok(());
                }
                while !backlog.is_empty() {
                    let Some(permit) = inflight.try_take() else { break };
                    let (id, body) = backlog.pop_front().expect("not empty");
                    held_bytes -= held_cost(&body);
                    unwritten += self.answer(peer, conn, id, body, permit).await;
                }
                // Answers to requests read together leave together: the reader writes what it
                // queued when the next frame is not already read, or when it has queued many.
                if unwritten >= ANSWERS_PER_WRITE {
                    write_queued_or_spawn(&conn.writer).await?;
                    unwritten = 0;
                }
                if held_bytes >= BACKLOG_BYTES {
                    // Held as much as it may: the answers queued so far must not wait for a
                    // slot to free (its handler may wait for them), and nothing more is read.
                    write_queued_or_spawn(&conn.writer).await?;
                    unwritten = 0;
                    tokio::select! {
                        _ = conn.closer.closed() => return Ok(()),
                        permit = inflight.take() => {
                            let (id, body) = backlog.pop_front().expect("held");
                            held_bytes -= held_cost(&body);
                            unwritten += self.answer(peer, conn, id, body, permit).await;
                        }
                    }
                    continue;
                }
                let incoming = match futures::poll!(stream.next()) {
                    Poll::Ready(incoming) => incoming,
                    Poll::Pending => {
                        // Only answers this reader queued wait for it: a caller writes its own
                        // frames, or leaves them to whoever holds the socket.
                        if unwritten > 0 {
                            write_queued_or_spawn(&conn.writer).await?;
                            unwritten = 0;
                        }
                        if backlog.is_empty() {
                            stream.next().await
                        } else {
                            // A slot freed starts the oldest request held.
                            tokio::select! {
                                biased;
                                incoming = stream.next() => incoming,
                                permit = inflight.take() => {
                                    let (id, body) = backlog.pop_front().expect("held");
                                    held_bytes -= held_cost(&body);
                                    unwritten += self.answer(peer, conn, id, body, permit).await;
                                    continue;
                                }
                            }
                        }
                    }
                };
                let Some(frame) = incoming else { return Ok(()) };
                conn.heard();
                match Wire::decode(frame?)? {
                    Wire::Request { id, body } => {
                        // Requests start in the order they came: none passes one held.
                        let permit = if backlog.is_empty() { inflight.try_take() } else { None };
                        match permit {
                            Some(permit) => {
                                unwritten += self.answer(peer, conn, id, body, permit).await;
                            }
                            None => {
                                held_bytes += held_cost(&body);
                                backlog.push_back((id, body));
                            }
                        }
                    }
                    Wire::Response { id, body } => conn.pending.answer(id, body),
                }
            }
        }
        .await;
        match result {
            // Closed on this side (replaced, silent, shut down), or by a failed write, which
            // the outbox reported: nothing of the peer's to report here.
            Err(SupervisorError::Closed) if conn.closer.is_closed() => {}
            // The peer went away (killed, crashed, or its machine restarted).
            Err(error) if error.is_peer_gone() => {
                tracing::debug!(node = peer, %error, "connection reset by the peer")
            }
            Err(error @ SupervisorError::Io { .. }) => {
                tracing::warn!(node = peer, %error, "connection closed on an I/O error")
            }
            Err(error @ SupervisorError::Codec(_)) => {
                tracing::warn!(node = peer, %error, "connection closed on a frame that does not decode")
            }
            Err(error) => tracing::warn!(node = peer, %error, "connection closed on an error"),
            Ok(()) => {}
        }
    }

    /// Handles the peer's request `id` in `permit`'s slot: answered at once if its handler
    /// finishes in one poll (1 when that answer is queued for the reader to write), else from
    /// a task of its own (0).
    pub(super) async fn answer(
        &self,
        peer: u64,
        conn: &Conn,
        id: u64,
        body: Bytes,
        permit: Slot,
    ) -> usize {
        let mut answering = Arc::clone(&self.inner.handler).handle(peer, body);
        match futures::poll!(&mut answering) {
            Poll::Ready(_) if id == NO_ANSWER => 0,
            Poll::Ready(body) => {
                drop(permit);
                match conn.writer.push(Wire::Response { id, body }) {
                    Ok(()) => 1,
                    Err(error @ SupervisorError::FrameTooLarge { .. }) => {
                        tracing::warn!(node = peer, %error, "an answer too large for a frame was dropped; its caller will time out (raise max_frame, or make the service answer in parts)");
                        0
                    }
                    // The outbox closed the connection, and said why.
                    Err(_) => 0,
                }
            }
            Poll::Pending => {
                let writer = Arc::clone(&conn.writer);
                tokio::spawn(async move {
                    let body = answering.await;
                    drop(permit);
                    if id == NO_ANSWER {
                        return;
                    }
                    // The connection may be gone; the caller then times out.
                    let _ = writer.send(Wire::Response { id, body }).await;
                });
                0
            }
        }
    }
}
