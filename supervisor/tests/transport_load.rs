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

/// Answers every request with its bytes over and over, to a MiB.
struct Echo;

const ANSWER: usize = 1 << 20;

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, _from: u64, request: Bytes) -> Bytes {
        request.iter().copied().cycle().take(ANSWER).collect::<Vec<u8>>().into()
    }
}

fn free_addr() -> String {
    StdListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").to_string()
}

async fn transport(secret: &ClusterSecret, node: u64) -> (TcpTransport, String) {
    let addr = free_addr();
    let identity = Identity { secret: secret.clone(), node, addr: addr.clone() };
    let handler = Arc::new(Echo);
    let t = TcpTransport::start(
        TokioNet,
        TcpConfig::default(),
        identity,
        1,
        None,
        handler,
        Arc::new(AdmitAll),
    )
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
