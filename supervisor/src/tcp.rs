//! The TCP transport: one connection per pair of nodes, carrying requests both ways.
//!
//! ```text
//!  call(to) ──▶ connection(to): reuse, or dial (backoff) + handshake + admission
//!           ──▶ Wire::Request{id} ──────────────▶ peer's Handler ──▶ Wire::Response{id}
//!  pending[id] ◀──────────────────────────────────────────────────────────────┘
//! ```
//!
//! A caller writes its request on the socket itself, and the peer's reading task answers a
//! request whose handler finishes at once (most do) and writes the answer itself: a round
//! trip wakes three tasks (the peer's reader, our reader, the caller), as few as multiplexing
//! allows. A handler that has to wait, and a write that would block, continue in a task of
//! their own, so a reader never stops reading: two peers writing to each other with full
//! buffers cannot wedge.
//!
//! When both ends dial each other at once, both keep the connection opened by the lower node id
//! and retire the other, so a pair settles on one connection without talking about it. A
//! retired connection takes no new calls but stays open until the calls already on it are
//! answered, both ways, and it has been quiet for a moment: closed at once, it failed them, and
//! every join (both sides dial) stalled the requests in flight.

use crate::closer::Closer;
use crate::error::{Result, SupervisorError};
use crate::frame::{FrameCodec, Wire, DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME, NO_ANSWER};
use crate::frame_writer::FrameWriter;
use crate::handshake::{self, Hello};
use crate::net::{Net, TokioNet};
use crate::outbox::Outbox;
use crate::secret::ClusterSecret;
use crate::slots::{Slot, Slots};
use crate::sources::{Admitted, Busy, Sources};
use crate::transport::{Admission, Handler, Transport};
use crate::waiters::Waiters;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gobelins_adaptation::log_budget::{self, LogBudget};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::codec::{Framed, FramedParts};
use tokio_util::sync::CancellationToken;

/// Timeouts and limits of the TCP transport.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Largest frame accepted or sent.
    pub max_frame: usize,
    /// Longest a connect may take.
    pub connect_timeout: Duration,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
    /// First wait after a failed dial; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest wait between dials to an unreachable peer.
    pub backoff_max: Duration,
    /// Handshakes with not-yet-authenticated peers at once. Past that, a newcomer takes the
    /// oldest slot of the address with the most in progress, if that address has more than
    /// the newcomer's and that handshake has lasted a quarter of `handshake_timeout`;
    /// otherwise the newcomer is dropped at accept.
    pub max_handshakes: usize,
    /// Of those, handshakes from one source address at once: a host that opens connections
    /// and says nothing takes this many slots, not all of them.
    pub max_handshakes_per_source: usize,
    /// Requests from one peer handled at once. Past that, the reader holds the requests it
    /// reads (up to 16 MiB of them) until a slot frees, and goes on reading the answers behind
    /// them; past that too, it stops reading, so a flood slows its sender instead of spawning
    /// without bound.
    pub max_inflight: usize,
    /// A connection that received nothing for this long while a call waited is torn down, and a
    /// new connection may replace it: a link that came back after a partition would otherwise
    /// stay wedged behind TCP's retransmission backoff.
    pub stall_after: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(20),
            // Short, so that a node back from a blip is pinged again well within any failure
            // timeout; an unreachable peer then costs one dial per quarter second.
            backoff_max: Duration::from_millis(250),
            max_handshakes: 64,
            max_handshakes_per_source: 8,
            max_inflight: 256,
            stall_after: Duration::from_secs(2),
        }
    }
}

/// Who this node is on the wire.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The cluster id and key.
    pub secret: ClusterSecret,
    /// This node's id.
    pub node: u64,
    /// Where this node listens, as peers should dial it.
    pub addr: String,
}

/// The calls waiting on a connection, and when each gives up (`crate::waiters`).
type Pending = Arc<Waiters>;

/// The writing half of a connection, shared by the callers and the answering tasks.
type Writer = Arc<Outbox>;

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
struct Conn(Arc<ConnState>);

struct ConnState {
    id: u64,
    /// The node that dialed: decides which of two simultaneous connections survives.
    initiator: u64,
    writer: Writer,
    pending: Pending,
    closer: Arc<Closer>,
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
    fn heard(&self) {
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
    fn silent_through(&self, waited: Duration) -> bool {
        let began = Instant::now().checked_sub(waited).map_or(self.born, |b| b.max(self.born));
        self.heard_at() <= began
    }
}

/// A connection's reading and writing halves, split by `split` (`Net::split`: owned halves
/// that share no lock, nor a waker: with `Framed::split` a caller writing while the reader was
/// being polled had to wait for a cross-thread wake). Bytes the handshake read past its last
/// frame are decoded before the socket is read again.
fn halves<S, R: AsyncRead, W: AsyncWrite + Unpin>(
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
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
    /// The reader took the waiter out to hand it the answer: nothing is left to remove.
    answered: bool,
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
struct Ended<N: Net> {
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

/// Says, once a window of refusals ends, how many its budget left out: counted only at the
/// next refusal, the last window of a flood that stopped went unsaid, or was said minutes
/// later beside an unrelated line.
async fn say_refusals_left_out<N: Net>(inner: std::sync::Weak<Inner<N>>) {
    loop {
        tokio::time::sleep(REFUSALS_WINDOW).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutdown.is_cancelled() {
            return;
        }
        log_budget::say_ended(&inner.refusals, REFUSALS);
    }
}

/// What a transport's caller sees of a dial's error: a handshake refused, whatever its cause.
/// That the peer holds another secret is kept per peer (`Peer::secret_differs`).
fn refused(error: SupervisorError) -> SupervisorError {
    match error {
        SupervisorError::SecretDiffers { peer, reason } => {
            SupervisorError::Handshake { peer, reason }
        }
        other => other,
    }
}

#[derive(Default)]
struct Peer {
    addr: Option<String>,
    conn: Option<Conn>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Why the last dial's handshake failed (a secret that differs, say): what a call refused
    /// during the backoff says, rather than only that the node is unreachable.
    refused: Option<String>,
    /// The last dial found the peer holding another secret.
    secret_differs: bool,
}

/// Connections refused before their handshake ended: lines logged per window, and the window.
const REFUSALS_LOGGED: u32 = 5;
const REFUSALS_WINDOW: Duration = Duration::from_secs(10);
/// What the lines the refusals' budget leaves out are about.
const REFUSALS: &str = "connections refused or dropped before their handshake ended (a flood, or a peer with the wrong secret retrying)";

/// The dials to one peer: one at a time, and ended, waiters included, once the peer is
/// forgotten. A dial to a stopped agent connects (the kernel accepts into the backlog) and
/// then waits out its handshake: a call to a node the cluster had just declared failed held
/// its request for the call's whole deadline (2 s) where closing connections ended the rest.
#[derive(Default)]
struct Dialing {
    gate: tokio::sync::Mutex<()>,
    forgotten: CancellationToken,
}

struct Inner<N: Net> {
    net: N,
    config: TcpConfig,
    identity: Identity,
    incarnation: AtomicU64,
    handler: Arc<dyn Handler>,
    admission: Arc<dyn Admission>,
    /// Looked up on every call: foldhash, not std's SipHash (peers are authenticated).
    peers: Mutex<HashMap<u64, Peer, foldhash::fast::RandomState>>,
    dialing: Mutex<HashMap<u64, Arc<Dialing>, foldhash::fast::RandomState>>,
    next_id: AtomicU64,
    /// Handshakes in progress, per source address and in all.
    sources: Arc<Sources>,
    /// Lines about connections refused or dropped before their handshake ended.
    refusals: Mutex<LogBudget>,
    shutdown: CancellationToken,
}

/// The TCP transport. Cheap to clone; every clone is the same transport.
pub struct TcpTransport<N: Net = TokioNet> {
    inner: Arc<Inner<N>>,
}

impl<N: Net> Clone for TcpTransport<N> {
    fn clone(&self) -> Self {
        TcpTransport { inner: Arc::clone(&self.inner) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the transport: the maps stay consistent per operation.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<N: Net> TcpTransport<N> {
    /// Binds `identity.addr` (or `bind` if given) and starts accepting peers.
    pub async fn start(
        net: N,
        config: TcpConfig,
        identity: Identity,
        incarnation: u64,
        bind: Option<&str>,
        handler: Arc<dyn Handler>,
        admission: Arc<dyn Admission>,
    ) -> Result<Self> {
        let listen = bind.unwrap_or(&identity.addr).to_string();
        let listener = net
            .bind(&listen)
            .await
            .map_err(|e| SupervisorError::io(format!("listening on {listen}"), e))?;
        // A quarter of the handshake's timeout: far longer than a peer's own handshake takes.
        let floor = config.handshake_timeout / 4;
        let sources = Sources::new(config.max_handshakes_per_source, config.max_handshakes, floor);
        let transport = TcpTransport {
            inner: Arc::new(Inner {
                net,
                config,
                identity,
                incarnation: AtomicU64::new(incarnation),
                handler,
                admission,
                peers: Mutex::default(),
                dialing: Mutex::default(),
                next_id: AtomicU64::new(1),
                sources,
                refusals: Mutex::new(LogBudget::new(REFUSALS_WINDOW, REFUSALS_LOGGED)),
                shutdown: CancellationToken::new(),
            }),
        };
        let accepting = transport.clone();
        tokio::spawn(async move { accepting.accept_loop(listener).await });
        tokio::spawn(say_refusals_left_out(Arc::downgrade(&transport.inner)));
        Ok(transport)
    }

    /// This node's id.
    pub fn node(&self) -> u64 {
        self.inner.identity.node
    }

    /// Changes the incarnation announced on new connections (after a rejoin).
    pub fn set_incarnation(&self, incarnation: u64) {
        self.inner.incarnation.store(incarnation, Ordering::SeqCst);
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        for peer in lock(&self.inner.peers).values_mut() {
            if let Some(conn) = peer.conn.take() {
                conn.closer.close();
            }
        }
    }

    fn hello(&self) -> Hello {
        let identity = &self.inner.identity;
        Hello::new(
            identity.secret.cluster,
            identity.node,
            self.inner.incarnation.load(Ordering::SeqCst),
            identity.addr.clone(),
        )
    }

    async fn accept_loop(self, listener: N::Listener) {
        loop {
            let accepted = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                accepted = self.inner.net.accept(&listener) => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let counted = match self.inner.sources.admit(&peer) {
                        Ok(Admitted { counted, evicted: None }) => counted,
                        Ok(Admitted { counted, evicted: Some(from) }) => {
                            self.refused(|| tracing::warn!(%peer, evicted_from = %from, "every handshake slot was taken: ended the oldest handshake from the address with the most in progress to let this connection in (hosts that connect and say nothing?)"));
                            counted
                        }
                        Err(Busy::Source) => {
                            self.refused(|| tracing::warn!(%peer, "too many handshakes in progress from this address; dropped a connection (a host that connects and says nothing? or several agents dialing from this one address, reconnecting at once after a pause: they retry, and get in)"));
                            continue;
                        }
                        Err(Busy::All) => {
                            self.refused(|| tracing::warn!(%peer, "every handshake slot is taken, and none can be ended for this connection (none held by an address busier than its own, or none for long enough); dropped a connection (many hosts that connect and say nothing?)"));
                            continue;
                        }
                    };
                    let me = self.clone();
                    tokio::spawn(async move {
                        let admitted = tokio::select! {
                            admitted = me.admit_incoming(stream, &peer) => admitted,
                            _ = counted.evicted() => Err(SupervisorError::Handshake {
                                peer: peer.clone(),
                                reason: "its slot went to a newer connection: every handshake slot was taken, and its address had the most in progress".into(),
                            }),
                        };
                        drop(counted);
                        if let Err(error) = admitted {
                            me.refused(
                                || tracing::warn!(%peer, %error, "refused an incoming connection"),
                            );
                        }
                    });
                }
                Err(error) => {
                    // Out of descriptors, usually: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Logs a connection refused or dropped before it proved the secret with `log`, while the
    /// budget of such lines lasts: anyone who reaches the port can cause them.
    fn refused(&self, log: impl FnOnce()) {
        log_budget::budgeted(&self.inner.refusals, REFUSALS, log);
    }

    async fn admit_incoming(&self, stream: N::Stream, peer: &str) -> Result<()> {
        let mut framed = Framed::new(stream, FrameCodec::new(HANDSHAKE_MAX_FRAME));
        let config = &self.inner.config;
        let admission = &self.inner.admission;
        let theirs = handshake::accept(
            &mut framed,
            &self.inner.identity.secret,
            self.hello(),
            peer,
            config.handshake_timeout,
            |theirs| admission.admit(theirs.node, theirs.incarnation, &theirs.addr),
        )
        .await?;
        tracing::debug!(node = theirs.node, %peer, "peer connected");
        framed.codec_mut().set_max_frame(self.inner.config.max_frame);
        self.set_peer(theirs.node, theirs.addr.clone());
        self.register(theirs.node, theirs.node, framed);
        Ok(())
    }

    /// Starts the connection's task and makes it the pair's connection, unless a connection
    /// opened by the lower node id already is. Returns the connection to use.
    fn register(&self, peer: u64, initiator: u64, framed: Framed<N::Stream, FrameCodec>) -> Conn {
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
    fn retire(&self, peer: u64, conn: Conn) {
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
    async fn answer(&self, peer: u64, conn: &Conn, id: u64, body: Bytes, permit: Slot) -> usize {
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

    fn live_conn(&self, node: u64) -> Option<Conn> {
        lock(&self.inner.peers)
            .get(&node)
            .and_then(|p| p.conn.clone())
            .filter(|c| !c.closer.is_closed())
    }

    async fn connection(&self, node: u64) -> Result<Conn> {
        if let Some(conn) = self.live_conn(node) {
            return Ok(conn);
        }
        let dialing = Arc::clone(lock(&self.inner.dialing).entry(node).or_default());
        tokio::select! {
            biased;
            () = dialing.forgotten.cancelled() => Err(SupervisorError::Unreachable(node)),
            conn = self.dial_through(node, &dialing) => conn,
        }
    }

    /// The rest of [`TcpTransport::connection`], through `dialing`'s gate.
    async fn dial_through(&self, node: u64, dialing: &Dialing) -> Result<Conn> {
        let _dialing = dialing.gate.lock().await;
        if let Some(conn) = self.live_conn(node) {
            return Ok(conn);
        }
        let addr = {
            let peers = lock(&self.inner.peers);
            let peer = peers.get(&node).ok_or(SupervisorError::Unreachable(node))?;
            if peer.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(match &peer.refused {
                    Some(reason) => SupervisorError::Handshake {
                        peer: peer.addr.clone().unwrap_or_default(),
                        reason: reason.clone(),
                    },
                    None => SupervisorError::Unreachable(node),
                });
            }
            peer.addr.clone().ok_or(SupervisorError::Unreachable(node))?
        };
        match self.dial(&addr).await {
            Ok((theirs, framed)) if theirs.node == node => {
                Ok(self.register(node, self.node(), framed))
            }
            Ok((theirs, _)) => {
                self.failed_dial(node);
                let reason = format!("expected node {node}, found node {}", theirs.node);
                let mut peers = lock(&self.inner.peers);
                let peer = peers.entry(node).or_default();
                peer.refused = Some(reason.clone());
                // It proved our secret: some other node of ours took the address.
                peer.secret_differs = false;
                drop(peers);
                Err(SupervisorError::Handshake { peer: addr, reason })
            }
            Err(error) => {
                self.failed_dial(node);
                tracing::debug!(node, %addr, %error, "dial failed");
                let differs = matches!(error, SupervisorError::SecretDiffers { .. });
                let error = refused(error);
                let refused = match &error {
                    SupervisorError::Handshake { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                let mut peers = lock(&self.inner.peers);
                let peer = peers.entry(node).or_default();
                peer.refused = refused;
                peer.secret_differs = differs;
                drop(peers);
                Err(match error {
                    SupervisorError::Handshake { .. } => error,
                    _ => SupervisorError::Unreachable(node),
                })
            }
        }
    }

    fn failed_dial(&self, node: u64) {
        let config = &self.inner.config;
        let mut peers = lock(&self.inner.peers);
        let peer = peers.entry(node).or_default();
        peer.backoff = (peer.backoff * 2).clamp(config.backoff_min, config.backoff_max);
        peer.retry_at = Some(Instant::now() + peer.backoff);
    }

    async fn dial(&self, addr: &str) -> Result<(Hello, Framed<N::Stream, FrameCodec>)> {
        let config = &self.inner.config;
        let stream = tokio::time::timeout(config.connect_timeout, self.inner.net.connect(addr))
            .await
            .map_err(|_| SupervisorError::Timeout {
                what: format!("connecting to {addr}"),
                after_ms: config.connect_timeout.as_millis() as u64,
            })?
            .map_err(|e| SupervisorError::io(format!("connecting to {addr}"), e))?;
        // Small until the peer has proven it holds the secret, as on the accepting side: a
        // server that is not ours at a mistyped address must not make this node buffer 16 MiB.
        let mut framed = Framed::new(stream, FrameCodec::new(HANDSHAKE_MAX_FRAME));
        let theirs = handshake::initiate(
            &mut framed,
            &self.inner.identity.secret,
            self.hello(),
            addr,
            config.handshake_timeout,
        )
        .await?;
        framed.codec_mut().set_max_frame(config.max_frame);
        Ok((theirs, framed))
    }

    /// The connection to `to`, dialed if there is none live, by `until`. A live connection
    /// needs no timer to wait for it. Dialing is boxed: its future runs to kilobytes, and
    /// inline it would make every call's future (allocated once per call) that large.
    async fn conn_until(&self, to: u64, until: Instant) -> Result<Conn> {
        match self.live_conn(to) {
            Some(conn) => Ok(conn),
            None => tokio::time::timeout_at(until, Box::pin(self.connection(to)))
                .await
                .map_err(|_| SupervisorError::Unreachable(to))?,
        }
    }

    /// A call that began at `started` and ends `deadline` after it. Not through
    /// [`Transport::call_at`] from `call`: each trait call boxes its future.
    async fn call_from(
        &self,
        to: u64,
        request: Bytes,
        started: Instant,
        deadline: Duration,
    ) -> Result<Bytes> {
        let until = started + deadline;
        // Named only if the call times out: a string per call costs more than the lookup.
        let what = || format!("request to node {to}");
        let conn = self.conn_until(to, until).await?;
        self.call_on(&conn, request, until, deadline, what).await
    }

    async fn call_on(
        &self,
        conn: &Conn,
        request: Bytes,
        deadline: Instant,
        budget: Duration,
        what: impl FnOnce() -> String,
    ) -> Result<Bytes> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Fails at `deadline` (the connection's expiring task drops it) or when the
        // connection ends: no timer of its own.
        let mut rx = conn.pending.wait(id, deadline);
        let mut guard = PendingGuard { pending: &conn.pending, id, answered: false };
        let sent = conn.writer.send(Wire::Request { id, body: request });
        // The answer may come while this caller still writes frames other callers queued:
        // it is taken then, and the writing left to a task (see `Outbox`).
        tokio::pin!(sent);
        let mut written = false;
        let answer = loop {
            tokio::select! {
                // In order: a random start costs a random number per poll.
                biased;
                answer = &mut rx => break answer,
                result = &mut sent, if !written => {
                    result?;
                    written = true;
                }
            }
        };
        match answer {
            Ok(answer) => {
                guard.answered = true;
                Ok(answer)
            }
            Err(_) if Instant::now() < deadline => Err(SupervisorError::Closed),
            Err(_) => {
                // Nothing at all came back while we waited: the link is wedged, not busy.
                let what = what();
                // The call began a budget before its deadline: no clock read per call.
                if conn.silent_through(deadline.elapsed() + budget) {
                    tracing::debug!(%what, "connection silent past the deadline; closing it");
                    conn.closer.close();
                }
                Err(SupervisorError::Timeout { what, after_ms: budget.as_millis() as u64 })
            }
        }
    }
}

#[async_trait]
impl<N: Net> Transport for TcpTransport<N> {
    async fn call(&self, to: u64, request: Bytes, deadline: Duration) -> Result<Bytes> {
        self.call_from(to, request, Instant::now(), deadline).await
    }

    async fn call_at(
        &self,
        to: u64,
        request: Bytes,
        started: Instant,
        deadline: Duration,
    ) -> Result<Bytes> {
        self.call_from(to, request, started, deadline).await
    }

    async fn call_addr(
        &self,
        addr: &str,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)> {
        let until = Instant::now() + deadline;
        let dialed = tokio::time::timeout_at(until, self.dial(addr)).await.map_err(|_| {
            SupervisorError::Timeout {
                // The connection may have been made: the handshake is what did not end.
                what: format!("connecting to {addr} and proving the cluster secret"),
                after_ms: deadline.as_millis() as u64,
            }
        })?;
        // Not `refused`: a caller dialing an address (a seed) must tell a peer of another
        // cluster from one that refused it for now.
        let (theirs, framed) = dialed?;
        self.set_peer(theirs.node, theirs.addr.clone());
        let conn = self.register(theirs.node, self.node(), framed);
        let response =
            self.call_on(&conn, request, until, deadline, || format!("request to {addr}")).await?;
        Ok((theirs.node, response))
    }

    fn set_peer(&self, node: u64, addr: String) {
        if node == self.node() {
            return;
        }
        let mut peers = lock(&self.inner.peers);
        let peer = peers.entry(node).or_default();
        if peer.addr.as_deref() != Some(addr.as_str()) {
            peer.addr = Some(addr);
            peer.retry_at = None;
            peer.refused = None;
            peer.secret_differs = false;
        }
    }

    fn secret_differs(&self, node: u64) -> bool {
        lock(&self.inner.peers).get(&node).is_some_and(|p| p.secret_differs)
    }

    fn forget(&self, node: u64) {
        if let Some(dialing) = lock(&self.inner.dialing).remove(&node) {
            dialing.forgotten.cancel();
        }
        if let Some(peer) = lock(&self.inner.peers).remove(&node) {
            if let Some(conn) = peer.conn {
                conn.closer.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Encoder;

    /// Answers `hang` never, anything else at once.
    struct Hangs;

    #[async_trait]
    impl Handler for Hangs {
        async fn handle(self: Arc<Self>, _from: u64, request: Bytes) -> Bytes {
            if &request[..] == b"hang" {
                std::future::pending::<()>().await;
            }
            request
        }
    }

    async fn started(secret: &ClusterSecret, node: u64) -> (TcpTransport, String) {
        started_with(secret, node, TcpConfig::default()).await
    }

    async fn started_with(
        secret: &ClusterSecret,
        node: u64,
        config: TcpConfig,
    ) -> (TcpTransport, String) {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let identity = Identity { secret: secret.clone(), node, addr: addr.clone() };
        let admit = Arc::new(crate::transport::AdmitAll);
        let t = TcpTransport::start(TokioNet, config, identity, 1, None, Arc::new(Hangs), admit)
            .await
            .expect("start");
        (t, addr)
    }

    /// A host that opens as many connections as the node has handshake slots and says nothing
    /// takes only its own share of them: a peer from another address still gets in at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_that_say_nothing_from_one_host_do_not_keep_a_peer_out() {
        let secret = ClusterSecret::generate();
        let ((a, _), (_b, b_addr)) = (started(&secret, 1).await, started(&secret, 2).await);
        let mut silent = Vec::new();
        for _ in 0..TcpConfig::default().max_handshakes {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind("127.0.0.3:0".parse().expect("address")).expect("bind 127.0.0.3");
            silent.push(socket.connect(b_addr.parse().expect("address")).await.expect("connect"));
        }
        // Within a handshake's timeout (2 s), while the silent ones would still hold their slots.
        a.set_peer(2, b_addr);
        let call = a.call(2, Bytes::from_static(b"ping"), Duration::from_secs(1)).await;
        assert_eq!(call.expect("answered"), Bytes::from_static(b"ping"));
    }

    /// Hosts that each open their share of the handshake slots and say nothing, enough of them
    /// to take every slot, do not keep a peer out either: it takes the oldest slot of one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_that_take_every_handshake_slot_and_say_nothing_do_not_keep_a_peer_out() {
        let secret = ClusterSecret::generate();
        // Silent ones that would hold their slots for 8 s, and may be ended after 2 s.
        let config =
            TcpConfig { handshake_timeout: Duration::from_secs(8), ..TcpConfig::default() };
        let (a, _) = started(&secret, 1).await;
        let (_b, b_addr) = started_with(&secret, 2, config.clone()).await;
        let hosts = config.max_handshakes.div_ceil(config.max_handshakes_per_source);
        let mut silent = Vec::new();
        for host in 0..hosts {
            for _ in 0..config.max_handshakes_per_source {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                let from = format!("127.0.1.{}:0", host + 1);
                socket.bind(from.parse().expect("address")).expect("bind a loopback address");
                silent
                    .push(socket.connect(b_addr.parse().expect("address")).await.expect("connect"));
            }
        }
        // Past the age a handshake may be ended at, well before the silent ones time out.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        a.set_peer(2, b_addr);
        let call = a.call(2, Bytes::from_static(b"ping"), Duration::from_secs(2)).await;
        assert_eq!(call.expect("answered"), Bytes::from_static(b"ping"));
    }

    /// A call that heard nothing back by its deadline closes its connection, wedged, though
    /// the call dialed it: the time spent dialing is not silence the connection owes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_call_that_hears_nothing_closes_the_connection_it_dialed() {
        let secret = ClusterSecret::generate();
        let ((a, _), (_b, b_addr)) = (started(&secret, 1).await, started(&secret, 2).await);
        a.set_peer(2, b_addr);
        let call = a.call(2, Bytes::from_static(b"hang"), Duration::from_secs(1)).await;
        assert!(matches!(call, Err(SupervisorError::Timeout { .. })), "{call:?}");
        assert!(a.live_conn(2).is_none(), "the silent connection was kept");
        let answer = a.call(2, Bytes::from_static(b"hello"), Duration::from_secs(5)).await;
        assert_eq!(&answer.expect("a new connection")[..], b"hello");
    }

    /// A call dialing a peer that accepts the connection and never answers (an agent stopped
    /// with SIGSTOP: its kernel still accepts) ends as soon as the peer is forgotten, not at
    /// its deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_dialing_a_peer_forgotten_meanwhile_ends_at_once() {
        let secret = ClusterSecret::generate();
        let (a, _) = started(&secret, 1).await;
        let stopped = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        a.set_peer(2, stopped.local_addr().expect("its address").to_string());
        let a = Arc::new(a);
        let caller = Arc::clone(&a);
        let started = Instant::now();
        let call = tokio::spawn(async move {
            caller.call(2, Bytes::from_static(b"ping"), Duration::from_secs(5)).await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.forget(2);
        let call = call.await.expect("the call ends");
        assert!(matches!(call, Err(SupervisorError::Unreachable(2))), "{call:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "ended after {took:?}, not at once");
        drop(stopped);
    }

    /// The handshake may read past its last frame, into the first request the peer sent: that
    /// request must be decoded at once, not when the peer next sends something.
    #[tokio::test(start_paused = true)]
    async fn a_frame_read_with_the_handshake_is_decoded_before_the_socket_is_read_again() {
        let (ours, _theirs) = tokio::io::duplex(1 << 16);
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        let mut framed = Framed::new(ours, codec.clone());
        let request = Wire::Request { id: 7, body: Bytes::from_static(b"ping") };
        codec.encode(request, framed.read_buffer_mut()).expect("encode");

        let (mut stream, _sink) = halves(framed, tokio::io::split, DEFAULT_MAX_FRAME);
        let next = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
        let frame = next.expect("decoded without new bytes").expect("a frame").expect("valid");
        match Wire::decode(frame).expect("a message") {
            Wire::Request { id, body } => assert_eq!((id, &body[..]), (7, &b"ping"[..])),
            other => panic!("expected the request, got {other:?}"),
        }
    }
}
