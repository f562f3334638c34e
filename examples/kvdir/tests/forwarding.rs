//! A request that reaches a node which does not manage its key (its sender routed by an old
//! epoch) is passed on to the manager, whose reply that node relays to the sender; when the
//! manager cannot be reached, the sender hears so at once and asks again.

use gobelins_adaptation::testing::{replay, MemCluster};
use gobelins_adaptation::wire::{Message, Reply, RequestId, Routed};
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
        // Relayed: nothing told the sender to ask again.
        assert_eq!((stats.requests_ok, stats.requests_delayed), (1, 0), "{stats:?}");
        // A read, which may run twice and takes a shorter path, is passed on as well.
        let read = codec::encode(&Request::Get).expect("encode");
        let answer = sender.request_via(NodeId(3), KVDIR, key, read).await.expect("get");
        assert!(matches!(codec::decode(&answer).expect("decode"), Response::Value(Some(_))));
        assert_eq!(cluster.host(NodeId(3)).stats().forwarded, 2, "node 3 passed the read on");
        let stats = sender.stats();
        assert_eq!((stats.requests_ok, stats.requests_delayed), (2, 0), "{stats:?}");
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

/// One hop at most: a node that gets a passed-on request for a key it does not manage (its
/// epoch moved on meanwhile) says so, and passes it on no further.
#[test]
fn a_request_passed_on_is_not_passed_on_again() {
    replay(async {
        let (cluster, key) = three_nodes().await;
        let node3 = cluster.host(NodeId(3));
        let forward = Message::Forward(Routed {
            id: RequestId { origin: NodeId(1), seq: 1 },
            service: KVDIR,
            key,
            epoch: node3.epoch(),
            body: put(4).into(),
            wait_ms: 1_000,
            settled: Default::default(),
            repeatable: false,
        });
        let bytes = bytes::Bytes::from(forward.encode().expect("encode"));
        let reply = node3.handle(NodeId(1), bytes).await;
        assert!(
            matches!(Reply::decode(&reply.into()).expect("decode"), Reply::Moved { .. }),
            "told Moved"
        );
        assert_eq!(node3.stats().forwarded, 0, "not passed on again");
        assert_eq!(cluster.host(NodeId(2)).stats().served, 0, "the manager never saw it");
        assert_eq!(get(&cluster, key).await, None, "nothing stored");
    });
}

/// A write told to a node (`Context::tell`), not routed, is refused there, manager or not:
/// stored on a node that does not manage its key, it moved with that node's slots and could
/// come back over the manager's newer value (a helper's first-day read of kvdir).
#[test]
fn a_write_told_rather_than_routed_is_refused_and_stores_nothing() {
    replay(async {
        let (cluster, key) = three_nodes().await;
        let ctx = cluster.host(NodeId(1)).context();
        for to in [NodeId(2), NodeId(3)] {
            let told: Response =
                ctx.tell(to, KVDIR, key, &Request::Put(vec![9])).await.expect("told");
            assert_eq!(told, Response::NotManaged, "told to node {to}");
        }
        assert_eq!(get(&cluster, key).await, None, "nothing stored");
    });
}
