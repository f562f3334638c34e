//! A request that reaches a node which does not manage its key (its sender routed by an old
//! epoch) is passed on to the manager, which answers the sender directly; when the manager
//! cannot be reached, the sender hears so at once and asks again.

use gobelins_adaptation::testing::{replay, MemCluster};
use gobelins_adaptation::wire::{Message, Reply, RequestId};
use gobelins_adaptation::{codec, plugin, HostConfig, Registry};
use gobelins_kvdir::{KvDir, Request, Response, KVDIR};
use gobelins_locator::{Key, NodeId};
use std::time::Duration;
use tokio::time::Instant;

/// Three nodes hosting kvdir, and a key node 2 manages.
async fn three_nodes() -> (MemCluster, Key) {
    let cluster = MemCluster::start(3, HostConfig::default(), || {
        let mut registry = Registry::new();
        registry.register(plugin(KvDir::new())).expect("registers");
        registry
    })
    .await;
    let key = (0..)
        .map(Key)
        .find(|&k| cluster.snapshot().locate(KVDIR, k) == Some(NodeId(2)))
        .expect("node 2 manages some key");
    (cluster, key)
}

fn put(value: u8) -> Vec<u8> {
    codec::encode(&Request::Put(vec![value])).expect("encode")
}

async fn get(cluster: &MemCluster, key: Key) -> Option<Vec<u8>> {
    let get = codec::encode(&Request::Get).expect("encode");
    let answer = cluster.host(NodeId(1)).request(KVDIR, key, get).await.expect("get");
    match codec::decode(&answer).expect("decode") {
        Response::Value(value) => value.map(|v| v.value.to_vec()),
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn a_request_sent_to_a_node_that_does_not_manage_its_key_is_answered_by_the_manager() {
    replay(async {
        let (cluster, key) = three_nodes().await;
        let sender = cluster.host(NodeId(1));

        let answer = sender.request_via(NodeId(3), KVDIR, key, put(7)).await.expect("put");

        assert!(matches!(codec::decode(&answer).expect("decode"), Response::Stored { .. }));
        assert_eq!(cluster.host(NodeId(3)).stats().forwarded, 1, "node 3 passed it on");
        assert_eq!(cluster.host(NodeId(3)).stats().served, 0, "and did not serve it");
        assert_eq!(cluster.host(NodeId(2)).stats().served, 1, "the manager ran it, once");
        let stats = sender.stats();
        assert_eq!((stats.requests_ok, stats.requests_delayed), (1, 1), "{stats:?}");
        assert_eq!(get(&cluster, key).await, Some(vec![7]));
    });
}

#[test]
fn a_forward_to_a_manager_cut_off_sends_the_sender_to_ask_again_at_once() {
    replay(async {
        let (cluster, key) = three_nodes().await;
        cluster.crash(NodeId(2));
        let sender = cluster.host(NodeId(1));
        let request = sender.request_via(NodeId(3), KVDIR, key, put(9));
        tokio::pin!(request);
        // Cut off for 300 ms: far less than one attempt (2 s), which the sender would wait out
        // if nobody told it the forward failed.
        let healed = tokio::select! {
            done = &mut request => panic!("answered while the manager was cut off: {done:?}"),
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                cluster.heal(NodeId(2));
                Instant::now()
            }
        };
        let answer = request.await.expect("put once the manager is back");
        assert!(matches!(codec::decode(&answer).expect("decode"), Response::Stored { .. }));
        let after_heal = healed.elapsed();
        assert!(
            after_heal < Duration::from_millis(200),
            "answered {after_heal:?} after the manager came back: the sender waited out its attempt"
        );
        assert_eq!(cluster.host(NodeId(2)).stats().served, 1, "run once");
        assert_eq!(get(&cluster, key).await, Some(vec![9]));
    });
}

#[test]
fn an_answer_to_another_nodes_request_is_refused() {
    replay(async {
        let (cluster, _) = three_nodes().await;
        let answer = Message::Answer {
            id: RequestId { origin: NodeId(3), seq: 1 },
            reply: Reply::Done(bytes::Bytes::new()),
        };
        let bytes = bytes::Bytes::from(answer.encode().expect("encode"));
        let reply = cluster.host(NodeId(1)).handle(NodeId(2), bytes).await;
        assert!(matches!(Reply::decode(&reply.into()).expect("decode"), Reply::Refused(_)));
    });
}
