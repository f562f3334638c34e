//! The transport over real loopback TCP under load in both directions at once: short requests
//! for large answers, many in flight each way, one connection carrying both. Every call must be
//! answered with its own bytes, in whatever order the outboxes of the two ends write them.
//! (Readers never wait on a full socket, since a reader waiting for its peer to read while that
//! peer's reader waits for it would hang both; this test did not manage to provoke that hang
//! with a reader that waits, so it guards the answers, not that reasoning.)

use async_trait::async_trait;
use bytes::Bytes;
use gobelins_supervisor::net::TokioNet;
use gobelins_supervisor::secret::ClusterSecret;
use gobelins_supervisor::tcp::{Identity, TcpConfig, TcpTransport};
use gobelins_supervisor::transport::{AdmitAll, Handler, Transport};
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

/// Answers every request with its bytes over and over, to a MiB; tells `hung` when a `hang`
/// or a `slow` arrives, never answers `hang`, and answers `slow` once told `release`.
#[derive(Default)]
struct Echo {
    hung: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

const ANSWER: usize = 1 << 20;

#[async_trait]
impl Handler for Echo {
    async fn handle(self: Arc<Self>, _from: u64, request: Bytes) -> Bytes {
        if &request[..] == b"hang" {
            self.hung.notify_one();
            return std::future::pending().await;
        }
        if &request[..] == b"slow" {
            self.hung.notify_one();
            self.release.notified().await;
        }
        request.iter().copied().cycle().take(ANSWER).collect::<Vec<u8>>().into()
    }
}

fn free_addr() -> String {
    StdListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").to_string()
}

/// A call from `from` to node `to`, made by a task of its own.
fn call_in_background(
    from: &TcpTransport,
    to: u64,
    body: &'static [u8],
    deadline: Duration,
) -> tokio::task::JoinHandle<gobelins_supervisor::error::Result<Bytes>> {
    let from = from.clone();
    tokio::spawn(async move { from.call(to, Bytes::from_static(body), deadline).await })
}

async fn transport(secret: &ClusterSecret, node: u64) -> (TcpTransport, String) {
    transport_with(secret, node, Arc::default()).await
}

async fn transport_with(
    secret: &ClusterSecret,
    node: u64,
    handler: Arc<Echo>,
) -> (TcpTransport, String) {
    started(secret, node, TcpConfig::default(), handler).await
}

/// Node `node`'s transport with `config`, answering with `handler`, and its address.
async fn started(
    secret: &ClusterSecret,
    node: u64,
    config: TcpConfig,
    handler: Arc<dyn Handler>,
) -> (TcpTransport, String) {
    let addr = free_addr();
    let identity = Identity { secret: secret.clone(), node, addr: addr.clone() };
    let t = TcpTransport::start(TokioNet, config, identity, 1, None, handler, Arc::new(AdmitAll))
        .await
        .expect("start");
    (t, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_full_of_large_calls_all_answered() {
    let secret = ClusterSecret::generate();
    let ((a, a_addr), (b, b_addr)) = (transport(&secret, 1).await, transport(&secret, 2).await);
    a.set_peer(2, b_addr);
    b.set_peer(1, a_addr);
    // One connection, dialed by node 1, carries both directions: two dialing at once would
    // close one of them under its callers.
    a.call(2, Bytes::from_static(b"hello"), Duration::from_secs(10)).await.expect("connected");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..48u32 {
        for (from, to, t) in [(1u64, 2u64, a.clone()), (2, 1, b.clone())] {
            calls.spawn(async move {
                let body = Bytes::from(format!("call {i} from {from};"));
                let answer =
                    t.call(to, body.clone(), Duration::from_secs(60)).await.expect("answered");
                let want: Vec<u8> = body.iter().copied().cycle().take(ANSWER).collect();
                assert!(answer == want, "call {i} from {from} came back with other bytes");
            });
        }
    }
    let all = async {
        while let Some(done) = calls.join_next().await {
            done.expect("a call");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every call answered, none stuck");
}

/// A connection closed under a waiting call (here forgotten, as when its node is removed)
/// fails the call at once with `Closed`, not at its deadline: its reader stops and drops its
/// waiters, though the peer never answers and the socket stays quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_a_connection_closed_under_it_fails_at_once() {
    let secret = ClusterSecret::generate();
    let echo = Arc::new(Echo::default());
    let ((a, _), (_b, b_addr)) =
        (transport(&secret, 1).await, transport_with(&secret, 2, Arc::clone(&echo)).await);
    a.set_peer(2, b_addr);
    a.call(2, Bytes::from_static(b"hello"), Duration::from_secs(10)).await.expect("connected");
    let hung = echo.hung.notified();
    let waiting = call_in_background(&a, 2, b"hang", Duration::from_secs(60));
    hung.await;
    a.forget(2);
    let ended = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    let result = ended.expect("the call ended long before its deadline").expect("no panic");
    assert!(
        matches!(result, Err(gobelins_supervisor::error::SupervisorError::Closed)),
        "{result:?}"
    );
}

/// When both nodes dial each other (every join), each keeps the connection the lower id opened
/// and retires the other. A call already on the retired one is still answered on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_on_a_replaced_connection_is_still_answered() {
    let secret = ClusterSecret::generate();
    let echo = Arc::new(Echo::default());
    let ((a, a_addr), (b, b_addr)) =
        (transport_with(&secret, 1, Arc::clone(&echo)).await, transport(&secret, 2).await);
    b.set_peer(1, a_addr);
    // Node 2 dials: its connection is not the one the pair keeps.
    let arrived = echo.hung.notified();
    let slow = call_in_background(&b, 1, b"slow", Duration::from_secs(30));
    arrived.await;
    // Node 1 dials too: both ends replace node 2's connection with this one.
    let (node, _) = a
        .call_addr(&b_addr, Bytes::from_static(b"hello"), Duration::from_secs(10))
        .await
        .expect("node 1 reaches node 2");
    assert_eq!(node, 2);
    echo.release.notify_one();
    let answered = tokio::time::timeout(Duration::from_secs(10), slow).await;
    let answer = answered.expect("answered in time").expect("no panic").expect("answered");
    assert_eq!(answer.len(), ANSWER);
    assert!(answer.starts_with(b"slow"));
    // And the pair goes on over node 1's connection.
    let again = b.call(1, Bytes::from_static(b"again"), Duration::from_secs(10)).await;
    assert!(again.expect("answered").starts_with(b"again"));
}

/// Answers `back` only once it has called node 1 back and heard its answer, as a manager that
/// copies a write to its backup does; answers anything else at once.
#[derive(Default)]
struct CallsBack {
    transport: std::sync::OnceLock<TcpTransport>,
}

#[async_trait]
impl Handler for CallsBack {
    async fn handle(self: Arc<Self>, _from: u64, request: Bytes) -> Bytes {
        if &request[..] == b"back" {
            let transport = self.transport.get().expect("started").clone();
            transport
                .call(1, Bytes::from_static(b"ping"), Duration::from_secs(30))
                .await
                .expect("called back");
        }
        request
    }
}

/// More requests than a connection has handler slots, each of whose handlers waits for its own
/// call back to the sender, on the same connection: the reader holds the requests it has no
/// slot for and goes on reading the answers behind them. A reader that stopped at the first
/// request without a slot never read those answers, and every call waited for its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_handler_slots_do_not_hold_up_the_answers_behind_them() {
    let secret = ClusterSecret::generate();
    let config = TcpConfig { max_inflight: 4, ..TcpConfig::default() };
    let (one, two) = (Arc::new(CallsBack::default()), Arc::new(CallsBack::default()));
    let (a, a_addr) =
        started(&secret, 1, config.clone(), Arc::clone(&one) as Arc<dyn Handler>).await;
    let (b, b_addr) = started(&secret, 2, config, Arc::clone(&two) as Arc<dyn Handler>).await;
    one.transport.set(a.clone()).ok().expect("once");
    two.transport.set(b.clone()).ok().expect("once");
    a.set_peer(2, b_addr);
    b.set_peer(1, a_addr);
    a.call(2, Bytes::from_static(b"hello"), Duration::from_secs(10)).await.expect("connected");
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..40 {
        calls.spawn(call_in_background(&a, 2, b"back", Duration::from_secs(5)));
    }
    while let Some(done) = calls.join_next().await {
        let answer = done.expect("task").expect("task").expect("answered before its deadline");
        assert_eq!(&answer[..], b"back");
    }
}
