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
//!
//! Its parts: `accept` (connections from peers), `dial` (connections to peers, and calls),
//! `conn` (one connection's life).

mod accept;
mod conn;
mod dial;

use crate::error::{Result, SupervisorError};
use crate::frame::DEFAULT_MAX_FRAME;
use crate::handshake::Hello;
use crate::net::{Net, TokioNet};
use crate::outbox::Outbox;
use crate::secret::ClusterSecret;
use crate::sources::Sources;
use crate::transport::{Admission, Handler, Transport};
use crate::waiters::Waiters;
use accept::{say_refusals_left_out, REFUSALS_LOGGED, REFUSALS_WINDOW};
use async_trait::async_trait;
use bytes::Bytes;
use conn::Conn;
use dial::Dialing;
use gobelins_adaptation::log_budget::LogBudget;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
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

    /// [`Transport::call_addr`], the handshake naming `to` as the node meant, if known.
    async fn call_addr_meaning(
        &self,
        addr: &str,
        to: Option<u64>,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)> {
        let until = Instant::now() + deadline;
        let dialed = tokio::time::timeout_at(until, self.dial(addr, to)).await.map_err(|_| {
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
        self.call_addr_meaning(addr, None, request, deadline).await
    }

    async fn call_addr_as(
        &self,
        node: u64,
        addr: &str,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)> {
        self.call_addr_meaning(addr, Some(node), request, deadline).await
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

    fn refusal(&self, node: u64) -> Option<String> {
        lock(&self.inner.peers).get(&node).and_then(|p| p.refused.clone())
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
    use super::conn::halves;
    use super::*;
    use crate::frame::{FrameCodec, Wire};
    use futures::StreamExt;
    use tokio_util::codec::{Encoder, Framed};

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

    /// An address held for node 3 that leads to node 2: asked as node 3's, node 2 refuses
    /// before either side proves anything, and no connection is registered; asked by address
    /// alone, or as node 2's, it answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_address_asked_as_another_node_s_is_refused_there() {
        let secret = ClusterSecret::generate();
        let ((a, _), (_b, b_addr)) = (started(&secret, 1).await, started(&secret, 2).await);
        let ping = || Bytes::from_static(b"ping");
        let wait = Duration::from_secs(5);
        let refused = a.call_addr_as(3, &b_addr, ping(), wait).await;
        let said = format!("{refused:?}");
        assert!(said.contains("this is node 2, not node 3"), "{said}");
        assert!(a.live_conn(2).is_none(), "nothing registered");
        let (node, answer) = a.call_addr_as(2, &b_addr, ping(), wait).await.expect("node 2's");
        assert_eq!((node, &answer[..]), (2, &b"ping"[..]));
        assert_eq!(a.call_addr(&b_addr, ping(), wait).await.expect("by address").0, 2);
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
