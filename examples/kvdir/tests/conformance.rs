//! The replicated directory against the adaptation layer's conformance suite, on an in-memory
//! cluster under a paused clock.

use gobelins_adaptation::testing::{conformance, replay, Faults, MemCluster, Probe};
use gobelins_adaptation::{
    codec, plugin, AdaptationError as Error, Answer, ChangeInfo, Context, HostConfig, Moving,
    Packer, Plugin, Registry, Run, Service,
};
use gobelins_kvdir::{KvDir, Request, Response, Versioned, KVDIR};
use gobelins_locator::{CellTree, Change, Key, Labels, NodeId, ServiceSpec, Snapshot, TreeConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps every instance it makes, to read what each reported.
struct KvProbe(Made);

impl Probe for KvProbe {
    type S = Arc<KvDir>;

    fn make(&self) -> Arc<KvDir> {
        self.0.make()
    }

    fn write(&self, value: u64) -> Request {
        Request::Put(value.to_le_bytes().to_vec())
    }

    fn read(&self) -> Request {
        Request::Get
    }

    fn value(&self, response: Response) -> Option<u64> {
        match response {
            Response::Value(Some(v)) => Some(u64::from_le_bytes(v.value[..].try_into().ok()?)),
            _ => None,
        }
    }

    fn survives_one_failure(&self) -> bool {
        true
    }
}

/// `nodes` in-memory nodes hosting kvdir alone.
async fn kvdir_cluster(
    nodes: u64,
    config: gobelins_adaptation::HostConfig,
) -> gobelins_adaptation::testing::MemCluster {
    gobelins_adaptation::testing::MemCluster::start(nodes, config, || {
        let mut registry = gobelins_adaptation::Registry::new();
        registry.register(gobelins_adaptation::plugin(KvDir::new())).expect("registers");
        registry
    })
    .await
}

/// Writes each of `keys` through node 1, its value its own bytes.
async fn put_own_bytes(cluster: &MemCluster, keys: &[Key]) {
    for &key in keys {
        let put = codec::encode(&Request::Put(key.0.to_le_bytes().to_vec())).expect("encode");
        cluster.host(NodeId(1)).request(KVDIR, key, put).await.expect("put");
    }
}

/// The first `n` keys `node` manages, among the first 100,000.
fn keys_managed_by(cluster: &MemCluster, node: NodeId, n: usize) -> Vec<Key> {
    let table = cluster.snapshot();
    let keys: Vec<Key> =
        (0..100_000).map(Key).filter(|k| table.locate(KVDIR, *k) == Some(node)).take(n).collect();
    assert_eq!(keys.len(), n, "node {node} manages too few keys");
    keys
}

/// On a runtime whose random choices come from `GOBELINS_TEST_SEED`: a failure replays.
#[test]
fn ten_thousand_keys_survive_joins_evictions_and_failures_under_load() {
    let made = Made::default();
    let verdict = replay(conformance(KvProbe(made.clone()), 10_000));
    eprintln!("{verdict}");
    verdict.assert_conforms();
    assert_eq!(verdict.stages.len(), 8, "every step ran: {verdict}");
    let reported: u64 = made.0.lock().expect("made").iter().map(|kv| kv.slots_lost()).sum();
    assert_eq!(reported, 0, "one failure at a time: a survivor vouched for every slot rebuilt");
}

#[test]
fn what_a_node_sent_to_a_joiner_that_died_at_once_is_rebuilt_from_the_copy_it_kept() {
    replay(async {
        use gobelins_adaptation::{codec, HostConfig};
        use gobelins_kvdir::KVDIR;
        use gobelins_locator::{Key, NodeId};

        // One node: no backup holds a replica, so the sender's own copy is the only one left.
        let mut cluster = kvdir_cluster(1, HostConfig::default()).await;
        let keys: Vec<Key> = (0..300).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        cluster.add_and_crash().await;
        let stats = cluster.host(NodeId(1)).stats();
        assert!(stats.entries_rebuilt > 0, "some keys had moved to the joiner: {stats:?}");
        let get = codec::encode(&Request::Get).expect("encode");
        for &key in &keys {
            let answer =
                cluster.host(NodeId(1)).request(KVDIR, key, get.clone()).await.expect("get");
            let value: Response = codec::decode(&answer).expect("decode");
            assert!(
                matches!(&value, Response::Value(Some(v)) if v.value[..] == key.0.to_le_bytes()),
                "{key:?}: {value:?}"
            );
        }
    });
}

#[test]
fn a_batch_that_reaches_its_receiver_after_the_change_merged_is_refused_and_changes_nothing() {
    replay(async {
        use gobelins_adaptation::wire::{Message, Reply};
        use gobelins_adaptation::{codec, HostConfig, Packed};
        use gobelins_kvdir::{Versioned, KVDIR};
        use gobelins_locator::{Key, NodeId};

        let cluster = kvdir_cluster(2, HostConfig::default()).await;
        let epoch = cluster.snapshot().epoch().0;
        let key = (0..)
            .map(Key)
            .find(|k| cluster.snapshot().table(KVDIR).expect("table").locate(*k) == NodeId(1))
            .expect("a key node 1 manages");
        let host = cluster.host(NodeId(1));
        let stale = Versioned { version: 99, value: b"stale".to_vec().into() };
        let mut entries = Packed::with_capacity(0);
        entries.push_encoded(key, &stale).expect("encode");
        let entries = entries.into_run();
        let batch = Message::Batch {
            epoch,
            service: KVDIR,
            answered: Vec::new(),
            settled: Vec::new(),
            entries,
        };
        let reply = host.handle(NodeId(2), batch.encode().expect("encode").into()).await;
        assert!(
            matches!(Reply::decode(&reply.into()).expect("decode"), Reply::Merged { epoch: e } if e == epoch),
            "a late batch is told the change is closed"
        );
        let get = codec::encode(&Request::Get).expect("encode");
        let answer: Response =
            codec::decode(&host.request(KVDIR, key, get).await.expect("get")).expect("decode");
        assert!(
            matches!(answer, Response::Value(None)),
            "the late entry was not merged: {answer:?}"
        );
    });
}

#[test]
fn a_write_is_acknowledged_only_once_its_backup_holds_it() {
    replay(async {
        use gobelins_adaptation::{codec, AdaptationError, HostConfig};
        use gobelins_kvdir::KVDIR;
        use gobelins_locator::{Key, NodeId};
        use std::time::Duration;

        let config =
            HostConfig { request_deadline: Duration::from_secs(2), ..HostConfig::default() };
        let mut cluster = kvdir_cluster(3, config).await;
        let snapshot = cluster.snapshot();
        assert_eq!(
            snapshot.nodes(),
            vec![NodeId(1), NodeId(2), NodeId(3)],
            "node 2 backs node 1 up"
        );
        let key = (0..)
            .map(Key)
            .find(|k| snapshot.table(KVDIR).expect("table").locate(*k) == NodeId(1))
            .expect("a key node 1 manages");
        let put = codec::encode(&Request::Put(b"v".to_vec())).expect("encode");

        // The backup is down and nobody has noticed: the write must not be acknowledged.
        cluster.crash(NodeId(2));
        let early = cluster.host(NodeId(1)).request(KVDIR, key, put.clone()).await;
        assert!(matches!(early, Err(AdaptationError::Deadline { .. })), "{early:?}");

        // Once the failure is recovered, node 1 has a live backup again and the write goes through.
        cluster.fail(NodeId(2)).await;
        let late = cluster.host(NodeId(1)).request(KVDIR, key, put).await.expect("put");
        assert!(
            matches!(codec::decode::<Response>(&late).expect("decode"), Response::Stored { .. }),
            "stored once a backup holds it"
        );
    });
}

#[test]
fn a_manager_whose_lease_ran_out_serves_nothing_until_it_is_renewed() {
    replay(async {
        use gobelins_adaptation::{codec, AdaptationError, HostConfig};
        use gobelins_kvdir::KVDIR;
        use gobelins_locator::{Key, NodeId};
        use std::time::Duration;
        use tokio::time::Instant;

        let config =
            HostConfig { request_deadline: Duration::from_secs(1), ..HostConfig::default() };
        let cluster = kvdir_cluster(2, config).await;
        let key = (0..)
            .map(Key)
            .find(|k| cluster.snapshot().table(KVDIR).expect("table").locate(*k) == NodeId(1))
            .expect("a key node 1 manages");
        let get = codec::encode(&Request::Get).expect("encode");
        let (one, two) = (cluster.host(NodeId(1)), cluster.host(NodeId(2)));

        one.lease(Instant::now());
        for (host, from) in [(&one, "its own node"), (&two, "another node")] {
            let answer = host.request(KVDIR, key, get.clone()).await;
            assert!(
                matches!(answer, Err(AdaptationError::Deadline { .. })),
                "a request from {from} is not served without a lease: {answer:?}"
            );
        }

        // Renewed while a request waits: it is served.
        let waiting = tokio::spawn({
            let two = two.clone();
            let get = get.clone();
            async move { two.request(KVDIR, key, get).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        one.lease(Instant::now() + Duration::from_secs(10));
        assert!(waiting.await.expect("task").is_ok(), "served once the lease is renewed");
    });
}

/// Node 77, a requester that sends its own messages: keys node 1 manages in `cluster`, so that
/// some move to a node added later, and its requests as a host would send them.
mod node77 {
    use gobelins_adaptation::testing::MemCluster;
    use gobelins_adaptation::wire::{Message, Reply, RequestId, Routed, Settlement};
    use gobelins_adaptation::{codec, Host};
    use gobelins_kvdir::{Request, Response, KVDIR};
    use gobelins_locator::{Key, NodeId};

    pub(crate) fn keys_of_node_1(cluster: &MemCluster) -> Vec<Key> {
        let table = cluster.snapshot();
        (0..2000).map(Key).filter(|k| table.locate(KVDIR, *k) == Some(NodeId(1))).collect()
    }

    pub(crate) fn message(
        key: Key,
        seq: u64,
        epoch: u64,
        body: &Request,
        settled: Settlement,
    ) -> Message {
        Message::Request(Routed {
            id: RequestId { origin: NodeId(77), seq },
            service: KVDIR,
            key,
            epoch,
            body: codec::encode(body).expect("encode").into(),
            wait_ms: 5_000,
            settled,
            // As a sender judges it.
            repeatable: <gobelins_kvdir::KvDir as gobelins_adaptation::Service>::repeatable(body),
        })
    }

    pub(crate) async fn ask(host: Host, message: &Message) -> Reply {
        let bytes = message.encode().expect("encode").into();
        Reply::decode(&host.handle(NodeId(77), bytes).await.into()).expect("reply")
    }

    /// Of `keys`, the indexes the node just added manages.
    pub(crate) fn moved(cluster: &MemCluster, keys: &[Key], added: NodeId) -> Vec<usize> {
        let after = cluster.snapshot();
        let moved: Vec<usize> =
            (0..keys.len()).filter(|&i| after.locate(KVDIR, keys[i]) == Some(added)).collect();
        assert!(!moved.is_empty(), "the new node takes some of node 1's keys");
        moved
    }

    /// Asserts `key` was written once, read through `node`.
    pub(crate) async fn written_once(cluster: &MemCluster, node: NodeId, key: Key) {
        written(cluster, node, key, 1).await
    }

    /// Asserts `key` was written `times` times (each write ran once), read through `node`.
    pub(crate) async fn written(cluster: &MemCluster, node: NodeId, key: Key, times: u64) {
        let get = codec::encode(&Request::Get).expect("encode");
        let value: Response =
            codec::decode(&cluster.host(node).request(KVDIR, key, get).await.expect("get"))
                .expect("decode");
        assert!(
            matches!(&value, Response::Value(Some(v)) if v.version == times),
            "{times} writes of {key:?}, no more: {value:?}"
        );
    }
}

#[test]
fn a_retry_that_reaches_the_new_manager_gets_the_answer_the_old_one_gave() {
    replay(async {
        use gobelins_adaptation::wire::Reply;
        use gobelins_adaptation::HostConfig;
        use gobelins_locator::NodeId;
        use node77::{ask, message, moved, written_once};

        let mut cluster = kvdir_cluster(2, HostConfig::default()).await;
        let keys = node77::keys_of_node_1(&cluster);
        let epoch = cluster.snapshot().epoch().0;
        let put = Request::Put(b"once".to_vec());
        let nothing = Default::default();
        let mut first = Vec::new();
        for (seq, &key) in keys.iter().enumerate() {
            match ask(cluster.host(NodeId(1)), &message(key, seq as u64, epoch, &put, nothing))
                .await
            {
                Reply::Done(answer) => first.push(answer),
                other => panic!("first run of {key:?}: {other:?}"),
            }
        }
        let added = cluster.add().await;
        let epoch = cluster.snapshot().epoch().0;
        for i in moved(&cluster, &keys, added) {
            // The same request, retried at the key's new manager: it must not run a second time.
            match ask(cluster.host(added), &message(keys[i], i as u64, epoch, &put, nothing)).await
            {
                Reply::Done(answer) => assert_eq!(answer, first[i], "key {:?}", keys[i]),
                other => panic!("retry of {:?}: {other:?}", keys[i]),
            }
            written_once(&cluster, added, keys[i]).await;
        }
    });
}

#[test]
fn a_late_copy_of_a_request_its_sender_settled_runs_neither_at_the_old_manager_nor_at_the_new() {
    replay(async {
        use gobelins_adaptation::wire::{Reply, Settlement};
        use gobelins_adaptation::HostConfig;
        use gobelins_locator::NodeId;
        use node77::{ask, message, moved, written_once};

        let mut cluster = kvdir_cluster(2, HostConfig::default()).await;
        let keys = node77::keys_of_node_1(&cluster);
        let epoch = cluster.snapshot().epoch().0;
        // Node 77 numbers its requests from 1,000 and settles each once the next is sent.
        let since = 1_000;
        let settled = |seq| Settlement { since, below: seq };
        let put = Request::Put(b"once".to_vec());
        for (i, &key) in keys.iter().enumerate() {
            let seq = since + i as u64;
            let reply =
                ask(cluster.host(NodeId(1)), &message(key, seq, epoch, &put, settled(seq))).await;
            assert!(matches!(reply, Reply::Done(_)), "first run of {key:?}: {reply:?}");
        }
        // A read that tells node 1 every write before it is settled.
        let last = since + keys.len() as u64;
        let read = message(keys[0], last, epoch, &Request::Get, settled(last));
        let reply = ask(cluster.host(NodeId(1)), &read).await;
        assert!(matches!(reply, Reply::Done(_)), "{reply:?}");
        let late =
            ask(cluster.host(NodeId(1)), &message(keys[0], since, epoch, &put, settled(since)))
                .await;
        assert!(matches!(late, Reply::Refused(_)), "refused by the manager that ran it: {late:?}");

        let added = cluster.add().await;
        let epoch = cluster.snapshot().epoch().0;
        for i in moved(&cluster, &keys, added) {
            let seq = since + i as u64;
            let late =
                ask(cluster.host(added), &message(keys[i], seq, epoch, &put, settled(seq))).await;
            assert!(matches!(late, Reply::Refused(_)), "refused by the new manager: {late:?}");
            written_once(&cluster, added, keys[i]).await;
        }
    });
}

#[test]
fn a_late_copy_of_a_settled_read_is_answered_afresh_not_refused() {
    replay(async {
        use gobelins_adaptation::wire::{Reply, Settlement};
        use gobelins_adaptation::{codec, HostConfig};
        use gobelins_locator::NodeId;
        use node77::{ask, message};

        let cluster = kvdir_cluster(2, HostConfig::default()).await;
        let key = node77::keys_of_node_1(&cluster)[0];
        let epoch = cluster.snapshot().epoch().0;
        let settled = |seq| Settlement { since: 1_000, below: seq };
        let host = || cluster.host(NodeId(1));
        let put = |value: &[u8]| Request::Put(value.to_vec());
        let first = ask(host(), &message(key, 1_000, epoch, &put(b"one"), settled(1_000))).await;
        assert!(matches!(first, Reply::Done(_)), "{first:?}");
        let read = message(key, 1_001, epoch, &Request::Get, settled(1_001));
        assert!(matches!(ask(host(), &read).await, Reply::Done(_)));
        // The next write settles the read; then a late copy of the read arrives.
        let second = ask(host(), &message(key, 1_002, epoch, &put(b"two"), settled(1_002))).await;
        assert!(matches!(second, Reply::Done(_)), "{second:?}");
        match ask(host(), &read).await {
            Reply::Done(answer) => {
                let value: Response = codec::decode(&answer).expect("decode");
                assert!(
                    matches!(&value, Response::Value(Some(v)) if v.version == 2),
                    "a read runs again and sees the latest write: {value:?}"
                );
            }
            other => panic!("a repeatable request is never refused as settled: {other:?}"),
        }
    });
}

#[test]
fn a_manager_forgets_the_answers_of_requests_their_sender_has_settled() {
    replay(async {
        use gobelins_adaptation::{codec, HostConfig};
        use gobelins_kvdir::KVDIR;
        use gobelins_locator::NodeId;
        use std::time::Duration;

        // A sweep every second; answers younger than two seconds are kept unless settled.
        let config =
            HostConfig { request_deadline: Duration::from_secs(1), ..HostConfig::default() };
        let cluster = kvdir_cluster(2, config).await;
        let keys = keys_managed_by(&cluster, NodeId(2), 200);
        let (one, two) = (cluster.host(NodeId(1)), cluster.host(NodeId(2)));
        let put = codec::encode(&Request::Put(b"v".to_vec())).expect("encode");
        // All at once: none is settled before the last is answered.
        let writes = keys.iter().map(|&key| one.request(KVDIR, key, put.clone()));
        for answer in futures::future::join_all(writes).await {
            answer.expect("put");
        }
        assert!(two.stats().answers_kept >= keys.len() as u64, "each write's answer is kept");
        // One more request tells node 2 that node 1 has every answer before it: they go at once,
        // not at the sweep a second later.
        let get = codec::encode(&Request::Get).expect("encode");
        one.request(KVDIR, keys[0], get).await.expect("get");
        assert_eq!(two.stats().answers_kept, 0, "settled answers are forgotten when settled");
        // One after the other: each write settles the one before.
        for &key in &keys {
            one.request(KVDIR, key, put.clone()).await.expect("put");
        }
        assert_eq!(two.stats().answers_kept, 1, "only the last write is not settled yet");
        // The keep time (2 s) and one more sweep (every second).
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_eq!(two.stats().answers_kept, 0, "an answer never settled expires at a sweep");
    });
}

#[test]
fn a_manager_keeps_no_answer_to_its_own_request_on_its_first_attempt() {
    replay(async {
        use gobelins_adaptation::{codec, HostConfig};
        use gobelins_kvdir::KVDIR;
        use gobelins_locator::{Key, NodeId};

        let cluster = kvdir_cluster(2, HostConfig::default()).await;
        let table = cluster.snapshot();
        let key = (0..)
            .map(Key)
            .find(|k| table.locate(KVDIR, *k) == Some(NodeId(2)))
            .expect("node 2 manages some key");
        let (one, two) = (cluster.host(NodeId(1)), cluster.host(NodeId(2)));
        let put = codec::encode(&Request::Put(b"v".to_vec())).expect("encode");
        two.request(KVDIR, key, put.clone()).await.expect("put");
        assert_eq!(two.stats().requests_delayed, 0, "answered on its first attempt");
        assert_eq!(
            two.stats().answers_kept,
            0,
            "a request that never left its node has no copy anywhere: nothing to keep"
        );
        one.request(KVDIR, key, put).await.expect("put");
        assert_eq!(two.stats().answers_kept, 1, "another node's request may be retried: kept");
        node77::written(&cluster, NodeId(2), key, 2).await;
    });
}

#[test]
fn a_node_handed_answers_to_its_own_settled_requests_keeps_none_of_them() {
    replay(async {
        use gobelins_adaptation::{codec, HostConfig};
        use gobelins_kvdir::KVDIR;
        use gobelins_locator::NodeId;

        let mut cluster = kvdir_cluster(3, HostConfig::default()).await;
        let keys = keys_managed_by(&cluster, NodeId(2), 200);
        let one = cluster.host(NodeId(1));
        let put = codec::encode(&Request::Put(b"v".to_vec())).expect("encode");
        // All at once: node 2 hears of none settled, and keeps every answer.
        let writes = keys.iter().map(|&key| one.request(KVDIR, key, put.clone()));
        for answer in futures::future::join_all(writes).await {
            answer.expect("put");
        }
        assert!(cluster.host(NodeId(2)).stats().answers_kept >= keys.len() as u64);
        // Node 2 leaves: its keys, and the answers it kept for them, go to nodes 1 and 3.
        cluster.evict(NodeId(2)).await;
        let table = cluster.snapshot();
        let to_one = keys.iter().filter(|k| table.locate(KVDIR, **k) == Some(NodeId(1))).count();
        let to_three = keys.len() - to_one;
        assert!(to_one > 0 && to_three > 0, "both take some of node 2's keys");
        assert_eq!(
            cluster.host(NodeId(3)).stats().answers_kept,
            to_three as u64,
            "node 3 keeps node 1's answers: it cannot know yet that node 1 settled them"
        );
        assert_eq!(
            one.stats().answers_kept,
            0,
            "node 1 knows it settled its own requests: no retry of them will come"
        );
    });
}

/// kvdir, except that node 4, once armed, cuts its backup (node 1) off as it starts copying
/// what it received on to it, and heals it 3 s later: the moment the receiver of a leave is
/// left with the only copy of what the leaver handed it, when it was the leaver's backup.
struct CutsItsBackup {
    kv: KvDir,
    armed: Arc<Mutex<Option<Faults>>>,
}

impl Service for CutsItsBackup {
    type Request = Request;
    type Response = Response;
    type Entry = Versioned;

    fn spec(&self) -> ServiceSpec {
        self.kv.spec()
    }

    fn must_retry(response: &Response) -> bool {
        KvDir::must_retry(response)
    }

    fn repeatable(request: &Request) -> bool {
        KvDir::repeatable(request)
    }

    async fn handle(&self, ctx: &Context, key: Key, request: Request) -> Response {
        self.kv.handle(ctx, key, request).await
    }

    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.kv.before_migration(ctx, change).await
    }

    async fn send_out(&self, ctx: &Context, moving: &Moving) -> Vec<(Key, Versioned)> {
        self.kv.send_out(ctx, moving).await
    }

    async fn sent(&self, ctx: &Context, entries: Vec<(Key, Versioned)>) {
        self.kv.sent(ctx, entries).await
    }

    async fn receive(&self, ctx: &Context, from: NodeId, entries: Vec<(Key, Versioned)>) {
        self.kv.receive(ctx, from, entries).await
    }

    async fn after_migration(&self, ctx: &Context, change: &ChangeInfo) {
        let armed = match ctx.node() {
            NodeId(4) => self.armed.lock().expect("armed").take(),
            _ => None,
        };
        if let Some(faults) = armed {
            faults.crash(NodeId(1));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                faults.heal(NodeId(1));
            });
        }
        self.kv.after_migration(ctx, change).await
    }

    async fn after_release(&self, ctx: &Context, change: &ChangeInfo) {
        self.kv.after_release(ctx, change).await
    }

    async fn stable(&self, ctx: &Context, epoch: u64) {
        self.kv.stable(ctx, epoch).await
    }

    async fn scan(&self, ctx: &Context, failed: NodeId, orphans: &Moving) -> Vec<(Key, Versioned)> {
        self.kv.scan(ctx, failed, orphans).await
    }
}

/// A receiver must not report a leave done before its backup holds what it received: the
/// leaver then goes, and the receiver's own failure would lose the only copy left.
#[test]
fn a_receiver_reports_a_leave_done_only_once_its_backup_holds_what_it_received() {
    replay(async {
        let armed: Arc<Mutex<Option<Faults>>> = Arc::default();
        let on_node_2 = Arc::clone(&armed);
        let mut cluster = MemCluster::start(4, HostConfig::default(), move || {
            let mut registry = Registry::new();
            let service = CutsItsBackup { kv: KvDir::new(), armed: Arc::clone(&on_node_2) };
            registry.register(plugin(service)).expect("registers");
            registry
        })
        .await;
        let keys: Vec<Key> = (0..400).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        // Node 3 leaves. Node 4, its backup, holds the only other copy of what it hands node 4,
        // until node 4 copies it on to node 1, its backup once node 3 is gone.
        *armed.lock().expect("armed") = Some(cluster.faults());
        cluster.evict(NodeId(3)).await;
        assert!(armed.lock().expect("armed").is_none(), "node 4 took part in the leave");
        // Node 4 dies: its entries are rebuilt from node 1's replicas.
        cluster.fail(NodeId(4)).await;
        let get = codec::encode(&Request::Get).expect("encode");
        for &key in &keys {
            let answer =
                cluster.host(NodeId(2)).request(KVDIR, key, get.clone()).await.expect("get");
            let value: Response = codec::decode(&answer).expect("decode");
            assert!(
                matches!(&value, Response::Value(Some(v)) if v.value[..] == key.0.to_le_bytes()),
                "{key:?}: {value:?}"
            );
        }
    });
}

#[test]
fn a_node_keeps_the_latest_changes_it_took_part_in_not_all() {
    replay(async {
        let mut cluster = kvdir_cluster(1, HostConfig::default()).await;
        for _ in 0..140 {
            let added = cluster.add().await;
            cluster.evict(added).await;
        }
        let history = cluster.host(NodeId(1)).history();
        assert_eq!(history.len(), 256, "the latest 256 of 281 changes");
        let epochs: Vec<u64> = history.iter().map(|r| r.epoch).collect();
        assert!(epochs.windows(2).all(|w| w[0] < w[1]), "oldest first");
        assert_eq!(epochs.last(), Some(&281), "the newest is kept");
    });
}

/// Every node's kvdir, in the order built.
#[derive(Clone, Default)]
struct Made(Arc<Mutex<Vec<Arc<KvDir>>>>);

impl Made {
    /// Node n's instance: the first registry is read for its declarations only, so node n's
    /// is the nth built.
    fn node(&self, n: NodeId) -> Arc<KvDir> {
        Arc::clone(&self.0.lock().expect("made")[n.0 as usize])
    }

    /// A new instance, kept.
    fn make(&self) -> Arc<KvDir> {
        let kv = Arc::new(KvDir::new());
        self.0.lock().expect("made").push(Arc::clone(&kv));
        kv
    }
}

/// `nodes` in-memory nodes hosting kvdir, with each node's instance at hand.
async fn cluster_with_instances(nodes: u64) -> (MemCluster, Made) {
    let made = Made::default();
    let kept = made.clone();
    let cluster = MemCluster::start(nodes, HostConfig::default(), move || {
        let mut registry = Registry::new();
        registry.register(plugin(kept.make())).expect("registers");
        registry
    })
    .await;
    (cluster, made)
}

/// A sender keeps what it sent until the change is stable, then lets it go unless it backs
/// that entry up: kept, every node would in time hold a replica of every entry that ever left
/// it. Nodes 1 and 2 back each other up; node 3 joins after node 2, and backs nothing up
/// that node 2 sends it. Node 2 stays node 1's backup.
#[test]
fn a_sender_lets_go_of_what_it_sent_once_the_change_is_stable() {
    replay(async {
        let (mut cluster, made) = cluster_with_instances(2).await;
        let node = |n: u64| made.node(NodeId(n));
        let keys: Vec<Key> = (0..600).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let before = cluster.snapshot();
        let of_node_1 =
            keys.iter().filter(|&&k| before.locate(KVDIR, k) == Some(NodeId(1))).count();
        assert_eq!(node(2).replicas(), of_node_1, "node 2 backs up node 1");
        cluster.add().await;
        // The hosts hear that the change is stable as `add` returns; node 2's record of the
        // change gets its time to stable once node 2 has dealt with it (services first).
        let stable =
            || cluster.host(NodeId(2)).history().last().is_some_and(|r| r.stable_ms.is_some());
        for _ in 0..1_000 {
            if stable() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(stable(), "node 2 heard that the change is stable");
        let after = cluster.snapshot();
        let sent_by_2 = keys
            .iter()
            .filter(|&&k| before.locate(KVDIR, k) == Some(NodeId(2)))
            .filter(|&&k| after.locate(KVDIR, k) != Some(NodeId(2)))
            .count();
        assert!(sent_by_2 > 0, "node 2 handed the newcomer some keys");
        // Node 1 handed the newcomer some too: their copies are on node 3's backup now.
        let still_node_1 =
            keys.iter().filter(|&&k| after.locate(KVDIR, k) == Some(NodeId(1))).count();
        assert!(still_node_1 < of_node_1, "node 1 handed the newcomer some keys");
        assert_eq!(
            node(2).replicas(),
            still_node_1,
            "node 2 keeps its replicas of what node 1 still manages, not the {sent_by_2} it sent"
        );
    });
}

/// Once a change is stable, a key has two copies: its manager's and its manager's backup's.
/// Former backups, and backups of the nodes that sent entries away, forget theirs: kept, every
/// node came in time to hold a copy of every entry that ever passed through its cell.
#[test]
fn after_each_change_every_entry_has_one_copy_besides_its_manager_s() {
    replay(async {
        let (mut cluster, made) = cluster_with_instances(3).await;
        let node = |n: NodeId| made.node(n);
        let keys = 2_000u64;
        for key in 0..keys {
            let put = codec::encode(&Request::Put(key.to_le_bytes().to_vec())).expect("encode");
            cluster.host(NodeId(1)).request(KVDIR, Key(key), put).await.expect("put");
        }
        let mut steps = vec!["start".to_string()];
        for step in 0..4 {
            match step {
                0 | 1 => steps.push(format!("{} added", cluster.add().await)),
                2 => {
                    cluster.evict(NodeId(2)).await;
                    steps.push("node 2 evicted".into());
                }
                _ => {
                    cluster.fail(NodeId(4)).await;
                    steps.push("node 4 failed".into());
                }
            }
            let nodes = cluster.nodes();
            // Each node lets go of what it sent once it hears the change is stable.
            for _ in 0..1_000 {
                if nodes.iter().all(|&n| {
                    cluster.host(n).history().last().is_some_and(|r| r.stable_ms.is_some())
                }) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let managed: usize = nodes.iter().map(|&n| node(n).managed()).sum();
            let copies: usize = nodes.iter().map(|&n| node(n).replicas()).sum();
            assert_eq!(
                (managed, copies),
                (keys as usize, keys as usize),
                "entries managed and copies held after {steps:?}"
            );
            // One copy each, then, unless a key with two hides one with none.
            for key in (0..keys).map(Key) {
                let version = nodes.iter().find_map(|&n| node(n).version_of(key));
                let held: Vec<NodeId> =
                    nodes.iter().copied().filter(|&n| node(n).copy_of(key) == version).collect();
                assert_eq!(
                    held.len(),
                    1,
                    "{key:?} at version {version:?}, copies on {held:?}, after {steps:?}"
                );
            }
        }
    });
}

/// A leaver of a cell of four dies before it hands anything over, and the change ends without
/// it: what it managed is rebuilt by its recovery, from its backup's copies. The receivers
/// end the change with slots whose entries have not reached them yet, and must not have
/// those copies forgotten meanwhile as if their backups held them.
#[test]
fn a_leaver_dead_before_it_sent_anything_loses_nothing_in_a_cell_of_four() {
    replay(leaver_dead_before_it_sent_anything(None));
}

/// The same, with a receiver that hears of the leave only with the leaver's death, and so
/// never sees the leaver among the participants (helper-54).
#[test]
fn a_leaver_dead_before_it_sent_anything_loses_nothing_though_a_receiver_never_saw_it_take_part() {
    replay(leaver_dead_before_it_sent_anything(Some(NodeId(2))));
}

/// Node 4 of a cell of four leaves and dies at once; `lagging` hears of it only then.
async fn leaver_dead_before_it_sent_anything(lagging: Option<NodeId>) {
    let mut cluster = kvdir_cluster(4, HostConfig::default()).await;
    assert!(cluster.snapshot().cell_mates(NodeId(1)).count() >= 4, "one cell of four");
    let host = cluster.host(NodeId(1));
    let keys = 2_000u64;
    for key in 0..keys {
        let put = codec::encode(&Request::Put(key.to_le_bytes().to_vec())).expect("encode");
        host.request(KVDIR, Key(key), put).await.expect("put");
    }
    let leave = gobelins_locator::Change::Evict(NodeId(4));
    match lagging {
        None => cluster.change_and_crash(leave, NodeId(4)).await,
        Some(node) => cluster.change_and_crash_unseen_by(leave, NodeId(4), node).await,
    }
    let mut lost = Vec::new();
    for key in 0..keys {
        let get = codec::encode(&Request::Get).expect("encode");
        let answer = host.request(KVDIR, Key(key), get).await.expect("get");
        let value = match codec::decode(&answer).expect("decode") {
            Response::Value(Some(v)) => u64::from_le_bytes(v.value[..].try_into().expect("8")),
            _ => u64::MAX,
        };
        if value != key {
            lost.push(key);
        }
    }
    assert!(
        lost.is_empty(),
        "{} keys lost, the first {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Four in-memory nodes hosting kvdir, in cells of two nodes at most.
async fn two_cells_of_two() -> MemCluster {
    cells_of_two(4).await
}

/// `nodes` nodes in cells of two at most.
async fn cells_of_two(nodes: u64) -> MemCluster {
    let shape = gobelins_locator::TreeConfig { cell_capacity: 2, ..Default::default() };
    MemCluster::start_shaped(nodes, shape, HostConfig::default(), || {
        let mut registry = Registry::new();
        registry.register(plugin(KvDir::new())).expect("registers");
        registry
    })
    .await
}

/// A node alone in its cell keeps its replicas on the next node of the table, in another cell.
/// That node leaves, then the lone node fails: its keys all read back. The lone node took no
/// part in the leave, never copied its entries to its next backup, and its failure lost them
/// (an audit: a zone of one node, 152 keys of 600).
#[test]
fn a_node_alone_in_its_cell_keeps_a_replica_when_its_backup_leaves() {
    replay(async {
        let mut cluster = cells_of_two(5).await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        // A lone node and the next one in the table, neither node 1, which the reads go
        // through.
        let lone_and_next = |table: &Snapshot| {
            let nodes = table.nodes().to_vec();
            (0..nodes.len()).map(|i| (nodes[i], nodes[(i + 1) % nodes.len()])).find(|&(n, next)| {
                table.cell_mates(n).eq([n]) && n != NodeId(1) && next != NodeId(1)
            })
        };
        let mut found = lone_and_next(&cluster.snapshot());
        while found.is_none() && cluster.nodes().len() < 9 {
            cluster.add().await;
            found = lone_and_next(&cluster.snapshot());
        }
        let (lone, next) = found.expect("a node alone in its cell");
        let of_lone: Vec<Key> = {
            let table = cluster.snapshot();
            keys.iter().copied().filter(|&k| table.locate(KVDIR, k) == Some(lone)).collect()
        };
        assert!(!of_lone.is_empty(), "node {lone} manages keys");
        cluster.evict(next).await;
        cluster.fail(lone).await;
        read_all(&cluster, &keys, |_| false).await;
        // And its new backup, which took part in the eviction, vouched for every slot.
        let reported: u64 = (cluster.nodes().iter())
            .map(|&n| cluster.host(n).stats().reported_lost.get("kvdir").copied().unwrap_or(0))
            .sum();
        assert_eq!(reported, 0, "slots reported lost after a single failure");
    });
}

/// A cluster of several cells (of two nodes at most). A node keeps its replicas on a node of
/// its own cell. Kept on the next node of the whole table, in another cell, they left with
/// that node when it was evicted, and the node they belonged to, no part of that change (its
/// participants are the evicted node's cell), never copied its entries to its next backup: its
/// failure then lost them.
#[test]
fn a_node_evicted_from_another_cell_takes_no_replica_away() {
    replay(async {
        let mut cluster = two_cells_of_two().await;
        let table = cluster.snapshot();
        let nodes = table.nodes().to_vec();
        // A node whose next node in the table sits in another cell.
        let (node, next) = (0..nodes.len())
            .map(|i| (nodes[i], nodes[(i + 1) % nodes.len()]))
            .find(|&(n, next)| !table.cell_mates(n).any(|m| m == next))
            .expect("two cells");
        let keys = keys_managed_by(&cluster, node, 50);
        let third = nodes.iter().copied().find(|&n| n != node && n != next).expect("a third");
        evict_then_fail_and_read_back(&mut cluster, third, &keys, next, node).await;
    });
}

/// Two zones: nodes 1 to 3 in `zone=b`, nodes 4 and 5 in `zone=a`, one cell each. Every node
/// keeps its replicas in the other zone. Zone a is lost whole, node 5 dying as node 4's
/// recovery begins: every key reads back, and no slot is reported lost. Kept in their own
/// cell, nodes 4 and 5 held each other's only replicas, and both died. The survivors then keep
/// their replicas among themselves, so a third failure loses nothing either.
#[test]
fn a_zone_lost_whole_loses_no_entry() {
    replay(async {
        let mut cluster = zoned(&["b", "b", "b", "a", "a"]).await;
        let in_a = |n: NodeId| n.0 >= 4;
        let table = cluster.snapshot();
        for &n in table.nodes() {
            let holder = table.replica_holder(n).expect("a holder");
            assert_ne!(in_a(n), in_a(holder), "node {n} keeps its replicas on {holder}");
        }
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let of_a = keys.iter().filter(|&&k| table.locate(KVDIR, k).is_some_and(in_a)).count();
        assert!(of_a > 300, "zone a manages {of_a} keys");
        cluster.fail_and_crash(NodeId(4), NodeId(5)).await;
        assert_eq!(cluster.nodes(), [NodeId(1), NodeId(2), NodeId(3)]);
        read_all(&cluster, &keys, |_| false).await;
        assert_eq!(slots_reported_lost(&cluster), 0, "slots reported lost with zone a");
        cluster.fail(NodeId(3)).await;
        read_all(&cluster, &keys, |_| false).await;
        assert_eq!(slots_reported_lost(&cluster), 0, "slots reported lost with node 3");
    });
}

/// kvdir in-memory nodes, node `i` in `zone=zones[i - 1]`.
async fn zoned(zones: &[&str]) -> MemCluster {
    let shape = TreeConfig::default().with_label_levels(["zone"]);
    let mut cluster = MemCluster::start_shaped(0, shape, HostConfig::default(), || {
        let mut registry = Registry::new();
        registry.register(plugin(KvDir::new())).expect("registers");
        registry
    })
    .await;
    for z in zones {
        cluster.add_labelled(Labels::from([("zone".to_string(), z.to_string())])).await;
    }
    cluster
}

/// Two zones, then joins to each: the last two, of nodes 8 and 9 to zone a, take node 5 part
/// and, by cells and moved holders alone, not node 3, which keeps its replicas on node 5. Then
/// node 3 fails. Node 5 vouches for every slot node 3 had: nothing is reported lost. (When a
/// holder judged by the changes it took part in itself, node 5's last two changes were joins
/// node 3 took no part in, and every slot of it was reported lost, though every key read back.)
#[test]
fn joins_in_the_other_zone_leave_a_node_s_replicas_vouched_for() {
    replay(async {
        let mut cluster = zoned(&["b", "b", "b", "a", "a"]).await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        for z in ["b", "b", "a", "a"] {
            cluster.add_labelled(Labels::from([("zone".to_string(), z.to_string())])).await;
        }
        assert_eq!(cluster.snapshot().replica_holder(NodeId(3)), Some(NodeId(5)));
        cluster.fail(NodeId(3)).await;
        read_all(&cluster, &keys, |_| false).await;
        assert_eq!(slots_reported_lost(&cluster), 0, "slots reported lost with node 3");
    });
}

/// Five nodes in zone b, two in zone a, then two joins to zone a. A node of zone b that keeps
/// its replicas in zone a, and holds no node's, takes no part in those joins, while its holder,
/// of the joiners' cell, takes part in both. Then it fails: its holder vouches for every slot
/// it had, from the changes the cluster recorded as moving something of the failed node's.
/// (When a holder judged by the changes it took part in itself, every slot was reported lost
/// here, though every key read back; before that, every node linked by holding took part in
/// both joins.)
#[test]
fn a_holder_vouches_for_a_node_that_took_no_part_in_the_holder_s_changes() {
    replay(async {
        let mut cluster = zoned(&["b", "b", "b", "b", "b", "a", "a"]).await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let joined_at = cluster.snapshot().epoch().0;
        for _ in 0..2 {
            cluster.add_labelled(Labels::from([("zone".to_string(), "a".to_string())])).await;
        }
        let table = cluster.snapshot();
        let zone_a = [6, 7, 8, 9].map(NodeId);
        let holds = |n: NodeId| table.nodes().iter().any(|&m| table.replica_holder(m) == Some(n));
        let quiet = |n: NodeId| {
            let history = cluster.host(n).history();
            history.iter().all(|r| r.epoch <= joined_at)
        };
        let failed = (1..=5)
            .map(NodeId)
            .find(|&n| !holds(n) && quiet(n))
            .expect("a node of zone b that took no part in the joins");
        let holder = table.replica_holder(failed).expect("a holder");
        assert!(zone_a.contains(&holder), "node {failed} keeps its replicas on {holder}");
        assert!(!quiet(holder), "its holder, {holder}, took part in the joins");
        cluster.fail(failed).await;
        read_all(&cluster, &keys, |_| false).await;
        assert_eq!(slots_reported_lost(&cluster), 0, "slots reported lost with node {failed}");
    });
}

/// A node and its holder die at once; the holder is declared failed first, and the node's
/// recovery, which runs first, hands slots to the holder, given up on but still in the table.
/// The node's entries had no other copy: they read `Lost`, and are reported, never answered as
/// absent. (When the holder's holder judged its copy by the changes that moved something of
/// the holder's while it took part, it vouched for those slots too, as if the holder had
/// received them: they read as absent.)
#[test]
fn slots_handed_to_a_node_given_up_on_are_not_vouched_for() {
    replay(async {
        let mut cluster = kvdir_cluster(4, HostConfig::default()).await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let table = cluster.snapshot();
        let node = NodeId(3);
        let holder = table.replica_holder(node).expect("a holder");
        cluster.fail_both(holder, node).await;
        let (mut lost, mut of_node) = (0, 0);
        for &key in &keys {
            let was = table.locate(KVDIR, key);
            match ask(&cluster, key, Request::Get).await {
                Response::Value(Some(v)) if v.value[..] == key.0.to_le_bytes() => {}
                Response::Lost => lost += 1,
                other => panic!("key {} (of node {was:?}) reads {other:?}", key.0),
            }
            of_node += usize::from(was == Some(node));
        }
        assert!(lost >= of_node && of_node > 0, "{lost} keys read Lost, {of_node} were node 3's");
    });
}

/// Writes `keys` (all managed by `failed`) through `through`, evicts `evicted`, fails
/// `failed`, and checks that every key reads back as written.
async fn evict_then_fail_and_read_back(
    cluster: &mut MemCluster,
    through: NodeId,
    keys: &[Key],
    evicted: NodeId,
    failed: NodeId,
) {
    let host = cluster.host(through);
    for (i, &key) in keys.iter().enumerate() {
        let put = codec::encode(&Request::Put((i as u64).to_le_bytes().to_vec())).expect("e");
        host.request(KVDIR, key, put).await.expect("put");
    }
    cluster.evict(evicted).await;
    cluster.fail(failed).await;
    let get = codec::encode(&Request::Get).expect("encode");
    for (i, &key) in keys.iter().enumerate() {
        let answer = host.request(KVDIR, key, get.clone()).await.expect("get");
        match codec::decode::<Response>(&answer).expect("decode") {
            Response::Value(Some(v)) => {
                assert_eq!(v.value[..], (i as u64).to_le_bytes(), "key {key:?}")
            }
            other => panic!("key {key:?} of node {failed}, lost: {other:?}"),
        }
    }
}

/// A manager whose backup is evicted copies every entry it holds to its new backup, not only
/// those the change brought it: the new backup is then the only other copy, and must rebuild
/// them all when the manager fails next.
#[test]
fn a_manager_copies_every_entry_to_a_new_backup() {
    replay(async {
        let mut cluster = kvdir_cluster(3, HostConfig::default()).await;
        let table = cluster.snapshot();
        let nodes = table.nodes().to_vec();
        let node = nodes[0];
        let backup =
            table.cell_mates(node).filter(|&m| m > node).min().expect("a cell mate after it");
        let keys = keys_managed_by(&cluster, node, 200);
        let third = nodes.iter().copied().find(|&n| n != node && n != backup).expect("a third");
        evict_then_fail_and_read_back(&mut cluster, third, &keys, backup, node).await;
    });
}

/// A write whose copy to the backup failed at every try is not acknowledged, but it stays on
/// its manager, where a read can see it. The next change copies it to the backup, though the
/// backup stays the same node: the manager's failure after that must not take back what a
/// read saw.
#[test]
fn a_write_a_read_saw_though_its_backup_missed_it_outlives_its_manager() {
    replay(async {
        use gobelins_adaptation::AdaptationError;
        let config =
            HostConfig { request_deadline: Duration::from_secs(2), ..HostConfig::default() };
        let mut cluster = kvdir_cluster(3, config).await;
        let (manager, backup) = (NodeId(1), NodeId(2));
        let key = keys_managed_by(&cluster, manager, 1)[0];
        let put = codec::encode(&Request::Put(b"seen".to_vec())).expect("encode");
        cluster.crash(backup);
        let write = cluster.host(manager).request(KVDIR, key, put).await;
        assert!(matches!(write, Err(AdaptationError::Deadline { .. })), "{write:?}");
        cluster.heal(backup);
        let get = codec::encode(&Request::Get).expect("encode");
        let read = |answer: bytes::Bytes| match codec::decode::<Response>(&answer).expect("decode")
        {
            Response::Value(v) => v.map(|v| v.value.to_vec()),
            other => panic!("{other:?}"),
        };
        let host = cluster.host(NodeId(3));
        let seen = read(host.request(KVDIR, key, get.clone()).await.expect("get"));
        assert_eq!(seen.as_deref(), Some(&b"seen"[..]), "a read sees the write");
        // A change the manager takes part in, its backup unchanged.
        cluster.add().await;
        let table = cluster.snapshot();
        assert_eq!(table.cell_mates(manager).filter(|&m| m > manager).min(), Some(backup));
        cluster.fail(manager).await;
        let after = read(host.request(KVDIR, key, get).await.expect("get"));
        assert_eq!(after, seen, "what a read saw is still there");
    });
}

/// kvdir with two hooks. The batches of entries it is sent are refused while `refusals` lasts,
/// one each, as a node of another build that cannot decode them would. Batches of answers alone
/// (an empty run) are taken: given up when refused, they would not test the entries' fate. And
/// with a `gate`, node 3's `after_release` waits until it opens.
struct Hooked {
    kv: Box<dyn Plugin>,
    refusals: Arc<AtomicU64>,
    gate: Option<Gate>,
}

/// Where node 3's `after_release` waits, and how it says it is waiting.
#[derive(Clone)]
struct Gate {
    open: tokio::sync::watch::Receiver<bool>,
    inside: tokio::sync::watch::Sender<bool>,
}

impl Hooked {
    fn kvdir() -> Hooked {
        Hooked { kv: plugin(KvDir::new()), refusals: Arc::default(), gate: None }
    }
}

#[async_trait::async_trait]
impl Plugin for Hooked {
    fn spec(&self) -> ServiceSpec {
        self.kv.spec()
    }
    async fn handle(&self, ctx: &Context, key: Key, request: &[u8]) -> Result<Answer, Error> {
        self.kv.handle(ctx, key, request).await
    }
    fn repeatable(&self, request: &[u8]) -> bool {
        self.kv.repeatable(request)
    }
    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.kv.before_migration(ctx, change).await
    }
    async fn send_out(
        &self,
        ctx: &Context,
        moving: &Moving,
        out: &mut Packer,
    ) -> Result<(), Error> {
        self.kv.send_out(ctx, moving, out).await
    }
    async fn receive(&self, ctx: &Context, from: NodeId, entries: &Run) -> Result<(), Error> {
        let refuse =
            self.refusals.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if refuse.is_ok() {
            return Err(Error::Codec("entries of another build".into()));
        }
        self.kv.receive(ctx, from, entries).await
    }
    async fn after_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.kv.after_migration(ctx, change).await
    }
    async fn after_release(&self, ctx: &Context, change: &ChangeInfo) {
        if let Some(gate) = self.gate.as_ref().filter(|_| ctx.node() == NodeId(3)) {
            gate.inside.send_replace(true);
            let _ = gate.open.clone().wait_for(|&open| open).await;
        }
        self.kv.after_release(ctx, change).await
    }
    async fn stable(&self, ctx: &Context, epoch: u64) {
        self.kv.stable(ctx, epoch).await
    }
    fn reported_lost(&self) -> u64 {
        self.kv.reported_lost()
    }
    async fn scan(
        &self,
        ctx: &Context,
        failed: NodeId,
        orphans: &Moving,
        out: &mut Packer,
    ) -> Result<(), Error> {
        self.kv.scan(ctx, failed, orphans, out).await
    }
}

/// A batch its receiver refuses is sent again until it is taken, and the change ends only
/// then. Dropped, as it was, its entries were lost: the joiner served them as absent, and the
/// sender let its copy go once the change was stable.
#[test]
fn a_batch_refused_for_a_while_is_sent_again_and_the_change_ends_only_once_it_is_taken() {
    replay(async {
        let refusals = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&refusals);
        let mut cluster = MemCluster::start(3, HostConfig::default(), move || {
            let refusing = Hooked { refusals: Arc::clone(&counter), ..Hooked::kvdir() };
            let mut registry = Registry::new();
            registry.register(Box::new(refusing)).expect("registers");
            registry
        })
        .await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        refusals.store(3, Ordering::SeqCst);
        let joiner = cluster.add().await;
        let refused: u64 =
            [1, 2, 3].map(|n| cluster.host(NodeId(n)).stats().batches_refused).iter().sum();
        assert_eq!(refused, 3, "the joiner refused three batches of entries");
        assert!(
            cluster.host(joiner).stats().entries_received > 0,
            "the joiner took entries in the end"
        );
        // Stable: the senders have let their own copies go.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let get = codec::encode(&Request::Get).expect("encode");
        let mut lost = 0;
        for &key in &keys {
            let answer = cluster.host(NodeId(1)).request(KVDIR, key, get.clone()).await;
            let value: Response = codec::decode(&answer.expect("get")).expect("decode");
            if !matches!(&value, Response::Value(Some(v)) if v.value[..] == key.0.to_le_bytes()) {
                lost += 1;
            }
        }
        assert_eq!(lost, 0, "{lost} keys lost");
    });
}

/// Only the evicted node's cell takes part in its eviction, and the new replica holder of a node
/// whose holder moved (its cell mate, left alone, now keeps its replicas on the next node of the
/// table): the other nodes of the other cell install the new table and run no adaptation period
/// (no record of the change, nothing sent or received), and their keys stay where they were.
#[test]
fn a_node_of_another_cell_takes_no_part_in_an_eviction() {
    replay(async {
        let mut cluster = two_cells_of_two().await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let before = cluster.snapshot();
        let evicted = NodeId(1);
        let (cell, other): (Vec<NodeId>, Vec<NodeId>) =
            before.nodes().iter().partition(|&&n| before.cell_mates(evicted).any(|m| m == n));
        assert!(!other.is_empty() && cell.len() >= 2, "two cells: {cell:?}, {other:?}");
        let stats = |cluster: &MemCluster, n: NodeId| cluster.host(n).stats();
        let moved_before: Vec<(u64, u64)> = other
            .iter()
            .map(|&n| (stats(&cluster, n).entries_sent, stats(&cluster, n).entries_received))
            .collect();
        let stayed: Vec<NodeId> = cell.iter().copied().filter(|&n| n != evicted).collect();
        let received_before: Vec<u64> =
            stayed.iter().map(|&n| stats(&cluster, n).entries_received).collect();
        cluster.evict(evicted).await;
        let epoch = cluster.snapshot().epoch().0;
        for &n in &stayed {
            let history = cluster.host(n).history();
            assert!(history.iter().any(|r| r.epoch == epoch), "node {n} of the cell took part");
        }
        // Each change's record counts what the node received in it (it said 0, always).
        let mut received = 0;
        for (&n, before) in stayed.iter().zip(&received_before) {
            let record = cluster.host(n).history().into_iter().find(|r| r.epoch == epoch);
            let grew = stats(&cluster, n).entries_received - before;
            assert_eq!(record.map(|r| r.entries_received), Some(grew), "node {n}");
            received += grew;
        }
        assert!(received > 0, "the evicted node's entries were received");
        let after = cluster.snapshot();
        let holders: Vec<NodeId> = (after.nodes().iter())
            .filter(|&&n| before.replica_holder(n) != after.replica_holder(n))
            .filter_map(|&n| after.replica_holder(n))
            .filter(|h| other.contains(h))
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "the evicted node's mate, left alone, keeps its replicas in the other cell"
        );
        for &n in &holders {
            let history = cluster.host(n).history();
            assert!(history.iter().any(|r| r.epoch == epoch), "new holder {n} took part");
        }
        for (&n, moved) in other.iter().zip(&moved_before).filter(|(n, _)| !holders.contains(n)) {
            let history = cluster.host(n).history();
            assert!(
                history.iter().all(|r| r.epoch != epoch),
                "node {n}, of another cell, ran the period: {history:?}"
            );
            let now = stats(&cluster, n);
            assert_eq!((now.entries_sent, now.entries_received), *moved, "node {n} moved nothing");
            assert_eq!(cluster.host(n).epoch(), epoch, "node {n} installed the new table");
        }
        for &key in &keys {
            if let Some(owner) = before.locate(KVDIR, key).filter(|o| other.contains(o)) {
                assert_eq!(after.locate(KVDIR, key), Some(owner), "key {} stays", key.0);
            }
        }
    });
}

/// The slots kvdir reported lost, over the live nodes.
fn slots_reported_lost(cluster: &MemCluster) -> u64 {
    let lost = |n: NodeId| cluster.host(n).stats().reported_lost.get("kvdir").copied();
    cluster.nodes().iter().map(|&n| lost(n).unwrap_or(0)).sum()
}

/// `request` for `key`, through node 1, or the first live node once node 1 is gone.
async fn ask(cluster: &MemCluster, key: Key, request: Request) -> Response {
    let body = codec::encode(&request).expect("encode");
    let through = cluster.nodes().first().copied().expect("a live node");
    let answer = cluster.host(through).request(KVDIR, key, body).await.expect("answer");
    codec::decode(&answer).expect("decode")
}

/// The keys `lost` names read as lost, every other key its value (each written as its own
/// bytes).
async fn read_all(cluster: &MemCluster, keys: &[Key], lost: impl Fn(Key) -> bool) {
    for &key in keys {
        let value = ask(cluster, key, Request::Get).await;
        if lost(key) {
            assert_eq!(value, Response::Lost, "key {} is lost", key.0);
        } else {
            assert!(
                matches!(&value, Response::Value(Some(v)) if v.value[..] == key.0.to_le_bytes()),
                "key {} survives: {value:?}",
                key.0
            );
        }
    }
}

/// Five nodes, 2,000 keys written, then node 5 failed alone: its backup holds all it had, and
/// nothing is reported lost.
async fn five_after_a_single_failure() -> (MemCluster, Made, Vec<Key>) {
    let (mut cluster, made) = cluster_with_instances(5).await;
    let keys: Vec<Key> = (0..2_000).map(Key).collect();
    put_own_bytes(&cluster, &keys).await;
    cluster.fail(NodeId(5)).await;
    let reported: u64 = cluster.nodes().iter().map(|&n| made.node(n).slots_lost()).sum();
    assert_eq!(reported, 0, "node 5's backup holds all it had: nothing is lost");
    (cluster, made, keys)
}

/// A node joins next to node 4 and becomes its backup in node 1's place; node 1 drops its
/// copies. Then node 4 and its new backup die together, node 5 as node 4's recovery begins,
/// with some of node 4's slots given to it: every key of node 4 reads `Lost`. Node 1 vouched
/// for them as node 4's backup before, its copies gone, and counted that word as sent to
/// node 5; in node 5's recovery its word was taken, and those keys read as never written.
#[test]
fn a_former_backup_that_dropped_its_copies_vouches_for_none_of_them() {
    replay(async {
        let (mut cluster, made) = cluster_with_instances(4).await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let of = |cluster: &MemCluster, node: u64| -> Vec<Key> {
            let table = cluster.snapshot();
            keys.iter().copied().filter(|&k| table.locate(KVDIR, k) == Some(NodeId(node))).collect()
        };
        let held_by = |node: u64, keys: &[Key]| {
            keys.iter().all(|&k| made.node(NodeId(node)).copy_of(k).is_some())
        };
        assert!(
            held_by(1, &of(&cluster, 4)),
            "node 1, next after node 4 wrapping round, backs it up"
        );
        cluster.add().await;
        let of_node_4 = of(&cluster, 4);
        assert!(!of_node_4.is_empty() && held_by(5, &of_node_4), "node 5 backs node 4 up");
        let dropped = of_node_4.iter().all(|&k| made.node(NodeId(1)).copy_of(k).is_none());
        assert!(dropped, "node 1 dropped its copies");

        cluster.fail_and_crash(NodeId(4), NodeId(5)).await;
        read_all(&cluster, &keys, |key| of_node_4.contains(&key)).await;
    });
}

/// A manager and its backup die together: nothing holds the manager's entries any more. The
/// new managers of its slots report them, each its own, once, and its keys read as `Lost`,
/// never as absent, even once their slots have moved on; a key written again reads its value.
/// A slot forgiven reads absent keys as absent again, through a move and a failure. A single
/// failure before it reports nothing.
#[test]
fn a_manager_and_its_backup_dead_together_are_reported_lost_never_invented() {
    replay(async {
        let (mut cluster, made, keys) = five_after_a_single_failure().await;
        let reported = |cluster: &MemCluster| -> u64 {
            cluster.nodes().iter().map(|&n| made.node(n).slots_lost()).sum()
        };

        // In one cell of nodes 1 to 4, node 2's backup is node 3, the next one up.
        let table = cluster.snapshot();
        let of_node_2: Vec<Key> =
            keys.iter().copied().filter(|&k| table.locate(KVDIR, k) == Some(NodeId(2))).collect();
        assert!(!of_node_2.is_empty(), "node 2 manages some keys");
        assert!(
            of_node_2.iter().all(|&k| made.node(NodeId(3)).copy_of(k).is_some()),
            "node 3 backs node 2 up"
        );
        let slots = table.table(KVDIR).expect("kvdir's table");
        let slots_of_2 = slots.owners().filter(|&owner| owner == NodeId(2)).count() as u64;

        // Node 3 dies as node 2's recovery begins, before it can hand anything over; its own
        // recovery follows, and node 4, its backup, vouches for what it managed.
        cluster.fail_and_crash(NodeId(2), NodeId(3)).await;
        assert_eq!(
            reported(&cluster),
            slots_of_2,
            "node 2's {slots_of_2} slots are reported, by their new managers, and nothing else"
        );
        let in_stats: u64 = cluster
            .nodes()
            .iter()
            .map(|&n| cluster.host(n).stats().reported_lost.get("kvdir").copied().unwrap_or(0))
            .sum();
        assert_eq!(in_stats, slots_of_2, "what `gobelins stats` shows, per service");
        let was_2s = |key: Key| of_node_2.contains(&key);
        read_all(&cluster, &keys, was_2s).await;
        // A key never written, in one of node 2's slots: nobody can tell it from a lost one.
        let unwritten = (2_000..100_000)
            .map(Key)
            .find(|&k| table.locate(KVDIR, k) == Some(NodeId(2)))
            .expect("node 2 managed keys past the written ones");
        assert_eq!(ask(&cluster, unwritten, Request::Get).await, Response::Lost);
        // The marks move with their slots.
        cluster.add().await;
        cluster.add().await;
        read_all(&cluster, &keys, was_2s).await;
        // Written again, a key reads its value; a client may not touch the marks' keys.
        let again = of_node_2[0];
        let put = Request::Put(b"again".to_vec());
        assert!(matches!(ask(&cluster, again, put).await, Response::Stored { .. }));
        let read = ask(&cluster, again, Request::Get).await;
        assert!(matches!(&read, Response::Value(Some(v)) if &v.value[..] == b"again"), "{read:?}");
        let reserved = Key(gobelins_kvdir::RESERVED + 5);
        assert_eq!(ask(&cluster, reserved, Request::Get).await, Response::Reserved);
        assert_eq!(ask(&cluster, reserved, Request::Forgive).await, Response::Reserved);

        // The program accepts one slot's loss: the keys it lacks read as absent again, those
        // of node 2's other slots still as lost; and so it stays as the slot moves, and once
        // its manager dies too.
        let spec = KvDir::declaration();
        let forgiven = of_node_2[1];
        let slot = spec.slot_of(forgiven);
        let still_lost = *(of_node_2.iter())
            .find(|&&k| spec.slot_of(k) != slot && k != again)
            .expect("another slot");
        assert_eq!(ask(&cluster, forgiven, Request::Forgive).await, Response::Forgiven);
        assert_eq!(ask(&cluster, forgiven, Request::Forgive).await, Response::Forgiven, "again");
        /// The forgiven key reads absent, the other lost.
        async fn check(cluster: &MemCluster, forgiven: Key, still_lost: Key) {
            assert_eq!(ask(cluster, forgiven, Request::Get).await, Response::Value(None));
            assert_eq!(ask(cluster, still_lost, Request::Get).await, Response::Lost);
        }
        check(&cluster, forgiven, still_lost).await;
        cluster.add().await;
        check(&cluster, forgiven, still_lost).await;
        let manager = cluster.snapshot().locate(KVDIR, forgiven).expect("a manager");
        cluster.fail(manager).await;
        check(&cluster, forgiven, still_lost).await;
    });
}

/// Node 2 fails, and node 3, its backup, dies during that recovery once every entry it
/// rebuilt for the others has been taken: it said how many it would send, and they all came.
/// Only the slots the recovery gave node 3 itself are reported (it was their last holder);
/// every other key of node 2 reads its value.
#[test]
fn a_backup_dead_once_it_handed_everything_over_is_taken_at_its_word() {
    replay(async {
        let (mut cluster, made, keys) = five_after_a_single_failure().await;
        let before = cluster.snapshot();
        // The table node 2's recovery leads to, from the same history of the locator.
        let mut tree = CellTree::new(TreeConfig::default()).expect("a valid config");
        tree.register_service(KvDir::declaration()).expect("registers");
        for node in (1..=5).map(NodeId) {
            tree.apply(&Change::Add { node, labels: Labels::new() }).expect("adds");
        }
        tree.apply(&Change::Fail(NodeId(5))).expect("fails");
        let owners = |table: &Snapshot| -> Vec<NodeId> {
            table.table(KVDIR).expect("kvdir's table").owners().collect()
        };
        let replayed = tree.snapshot(before.epoch()).expect("nodes");
        assert_eq!(owners(&replayed), owners(&before), "the same history, the same table");
        tree.apply(&Change::Fail(NodeId(2))).expect("fails");
        let after = owners(&tree.snapshot(before.epoch()).expect("nodes"));
        let given_to_3: Vec<u32> = (0..after.len() as u32)
            .filter(|&s| owners(&before)[s as usize] == NodeId(2) && after[s as usize] == NodeId(3))
            .collect();
        let slots_of_2 = owners(&before).iter().filter(|&&o| o == NodeId(2)).count();
        assert!(!given_to_3.is_empty() && given_to_3.len() < slots_of_2, "{given_to_3:?}");

        cluster.fail_and_crash_once_sent(NodeId(2), NodeId(3)).await;
        let reported: u64 = cluster.nodes().iter().map(|&n| made.node(n).slots_lost()).sum();
        assert_eq!(reported, given_to_3.len() as u64, "only what node 3 rebuilt for itself");
        let spec = KvDir::declaration();
        read_all(&cluster, &keys, |key| given_to_3.contains(&spec.slot_of(key))).await;
    });
}

/// A joiner serves the keys it received once it has merged them, before it has copied them
/// to its backup. A write it takes then is copied to the backup on its own; should the joiner
/// die before its copy of the rest, the senders' copies and that write rebuild every key,
/// each at its latest value, and nothing is reported lost.
#[test]
fn a_write_served_before_the_joiner_copied_what_it_received_outlives_the_joiner() {
    replay(async {
        let (open, open_rx) = tokio::sync::watch::channel(true);
        let (inside, mut entered) = tokio::sync::watch::channel(false);
        let mut cluster = MemCluster::start(2, HostConfig::default(), move || {
            let mut registry = Registry::new();
            let gate = Gate { open: open_rx.clone(), inside: inside.clone() };
            let service = Hooked { gate: Some(gate), ..Hooked::kvdir() };
            registry.register(Box::new(service)).expect("registers");
            registry
        })
        .await;
        let keys: Vec<Key> = (0..400).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let (faults, first) = (cluster.faults(), cluster.host(NodeId(1)));
        let later = |key: Key| (key.0 + 1_000_000).to_le_bytes().to_vec();
        open.send_replace(false);
        let written = async {
            let all_in = entered.wait_for(|&inside| inside);
            tokio::time::timeout(Duration::from_secs(60), all_in)
                .await
                .expect("node 3 reaches after_release")
                .expect("node 3 lives");
            for &key in &keys {
                let put = codec::encode(&Request::Put(later(key))).expect("encode");
                first.request(KVDIR, key, put).await.expect("written during the copy");
            }
            // Node 3 dies before it copies what it received to its backup.
            faults.crash(NodeId(3));
            open.send_replace(true);
        };
        let (joined, ()) = tokio::join!(cluster.add(), written);
        assert_eq!(joined, NodeId(3));
        let moved = keys
            .iter()
            .filter(|&&k| cluster.snapshot().locate(KVDIR, k) == Some(NodeId(3)))
            .count();
        assert!(moved > 0, "the join gave node 3 some of the keys");
        cluster.fail(NodeId(3)).await;
        for &key in &keys {
            match ask(&cluster, key, Request::Get).await {
                Response::Value(Some(v)) => assert_eq!(v.value[..], later(key), "{key:?}"),
                other => panic!("{key:?}: {other:?}"),
            }
        }
    });
}

/// A joiner's values arrive as slices of the batches they came in, which saves it a copy
/// while requests wait. Once the change is stable, each still held is copied into memory of its
/// own: otherwise the few values of a batch that later writes did not replace would keep the
/// whole batch, 256 times the size of a 1 KiB value.
#[test]
fn a_joiners_values_stop_sharing_their_batches_once_the_change_is_stable() {
    replay(async {
        let (mut cluster, made) = cluster_with_instances(2).await;
        let keys: Vec<Key> = (0..2_000).map(Key).collect();
        put_own_bytes(&cluster, &keys).await;
        let joiner = cluster.add().await;
        let kv = made.node(joiner);
        assert!(kv.managed() > 200, "the joiner took its share: {}", kv.managed());
        // As `add` returns, the joiner has not heard yet that the change is stable.
        assert!(kv.shared_values() > 200, "received as slices: {}", kv.shared_values());
        // Copied in the background once the joiner hears the change is stable.
        for _ in 0..1_000 {
            if kv.shared_values() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(kv.shared_values(), 0, "values still share the batches they came in");
        // Copies of the same bytes: every key reads what was written.
        let get = codec::encode(&Request::Get).expect("encode");
        for &key in &keys {
            let answer = cluster.host(joiner).request(KVDIR, key, get.clone()).await.expect("get");
            match codec::decode::<Response>(&answer).expect("decode") {
                Response::Value(Some(v)) if v.value[..] == key.0.to_le_bytes() => {}
                other => panic!("{key:?}: {other:?}"),
            }
        }
    });
}
