//! A small key-value service through the plug-in API: requests in bytes, entries moving with a
//! real migration plan, bad bytes refused, the registry's order.

use gobelins_adaptation::wire::Reply;
use gobelins_adaptation::{
    codec, plugin, AdaptationError, ChangeInfo, Context, Moving, Packed, Packer, Registry, Service,
};
use gobelins_locator::{
    CellTree, Change, Epoch, Key, Labels, MigrationPlan, NodeId, ServiceId, ServiceSpec, TreeConfig,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

const KV: ServiceId = ServiceId(7);

#[derive(Serialize, Deserialize)]
enum Request {
    Put(String),
    Get,
}

/// A directory of strings: entries live in `live`; arrivals wait in `staged` until merged.
#[derive(Default)]
struct Kv {
    live: Mutex<BTreeMap<Key, String>>,
    staged: Mutex<Vec<(Key, String)>>,
}

impl Service for Kv {
    type Request = Request;
    type Response = Option<String>;
    type Entry = String;

    fn spec(&self) -> ServiceSpec {
        ServiceSpec::new(KV, "kv").with_slots(64)
    }

    fn repeatable(request: &Request) -> bool {
        matches!(request, Request::Get)
    }

    async fn handle(&self, _ctx: &Context, key: Key, request: Request) -> Option<String> {
        let mut live = self.live.lock().expect("lock");
        match request {
            Request::Put(value) => live.insert(key, value),
            Request::Get => live.get(&key).cloned(),
        }
    }

    async fn before_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn send_out(&self, _ctx: &Context, moving: &Moving) -> Vec<(Key, String)> {
        let live = self.live.lock().expect("lock");
        live.iter()
            .filter(|(k, _)| moving.destination(**k).is_some())
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, entries: Vec<(Key, String)>) {
        self.staged.lock().expect("lock").extend(entries);
    }

    async fn after_migration(&self, _ctx: &Context, _change: &ChangeInfo) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("lock"));
        self.live.lock().expect("lock").extend(staged);
    }

    async fn scan(&self, _ctx: &Context, _failed: NodeId, _orphans: &Moving) -> Vec<(Key, String)> {
        // No replicas: nothing can be rebuilt, and nothing is invented.
        Vec::new()
    }
}

fn ctx() -> Context {
    Context::detached(NodeId(1), 1, None)
}

fn info(epoch: u64) -> ChangeInfo {
    ChangeInfo {
        epoch,
        change: Change::Evict(NodeId(9)),
        participants: BTreeSet::new(),
        acked: BTreeSet::new(),
        failed_moved_in: [None, None],
        failed_kept_since: None,
    }
}

#[tokio::test]
async fn requests_and_answers_cross_the_plugin_in_bytes() {
    let kv = plugin(Kv::default());
    let put = codec::encode(&Request::Put("hello".into())).expect("encode");
    let stored = kv.handle(&ctx(), Key(3), &put).await.expect("put");
    assert!(stored.keep, "a write's answer is remembered for its retries");
    let answer: Option<String> = codec::decode(&stored.response).expect("decode");
    assert_eq!(answer, None);
    let get = codec::encode(&Request::Get).expect("encode");
    let read = kv.handle(&ctx(), Key(3), &get).await.expect("get");
    assert!(!read.keep, "a read may simply run again");
    let answer: Option<String> = codec::decode(&read.response).expect("decode");
    assert_eq!(answer.as_deref(), Some("hello"));
}

/// An answer crosses the wire as the service encoded it: made a `Done` reply and sealed by a
/// link, it stays in the buffer it was encoded in, and fills it (a `Bytes` made of a full
/// buffer needs no allocation of its own).
#[tokio::test]
async fn an_answer_is_sealed_for_the_wire_in_the_buffer_it_was_encoded_in() {
    let kv = plugin(Kv::default());
    let put = codec::encode(&Request::Put("x".repeat(300))).expect("encode");
    kv.handle(&ctx(), Key(3), &put).await.expect("put");
    let get = codec::encode(&Request::Get).expect("encode");
    let answer = kv.handle(&ctx(), Key(3), &get).await.expect("get").response;
    let at = answer.as_ptr();
    let mut sealed = Reply::Done(answer.into()).encode().expect("encode");
    sealed.extend_from_slice(&[1; codec::SPARE]);
    assert_eq!(sealed.as_ptr(), at, "not copied");
    assert_eq!(sealed.len(), sealed.capacity(), "no room left over, none missing");
}

#[tokio::test]
async fn malformed_requests_are_refused_and_change_nothing() {
    let kv = plugin(Kv::default());
    let err = kv.handle(&ctx(), Key(3), &[0xff, 0xff, 0xff]).await.unwrap_err();
    assert!(matches!(err, AdaptationError::Codec(_)), "{err}");
    let get = codec::encode(&Request::Get).expect("encode");
    let answer: Option<String> =
        codec::decode(&kv.handle(&ctx(), Key(3), &get).await.expect("get").response)
            .expect("decode");
    assert_eq!(answer, None);
}

#[tokio::test]
async fn a_migration_hands_over_exactly_the_entries_the_plan_moves() {
    let mut tree = CellTree::new(TreeConfig::default()).expect("config");
    tree.register_service(Kv::default().spec()).expect("register");
    for n in 1..=2 {
        tree.add_node(NodeId(n), Labels::new()).expect("add");
    }
    let old = tree.snapshot(Epoch(1)).expect("snapshot");
    tree.add_node(NodeId(3), Labels::new()).expect("add");
    let new = tree.snapshot(Epoch(2)).expect("snapshot");
    let plan = MigrationPlan::between(&old, &new);

    // Node 1 manages its share of 200 keys.
    let (one, three) = (plugin(Kv::default()), plugin(Kv::default()));
    let put = |v: u64| codec::encode(&Request::Put(format!("v{v}"))).expect("encode");
    let mine: Vec<Key> =
        (0..200).map(Key).filter(|&k| old.locate(KV, k) == Some(NodeId(1))).collect();
    for &k in &mine {
        one.handle(&ctx(), k, &put(k.0)).await.expect("put");
    }

    let moves = plan.outgoing(NodeId(1)).map(|(_, m)| m.clone()).collect();
    let target = Arc::new(new.clone());
    let locate = move |k| target.locate(KV, k).expect("kv's table");
    let mut packer = Packer::new(locate, 1 << 20);
    one.send_out(&ctx(), &Moving::new(Kv::default().spec(), moves), &mut packer)
        .await
        .expect("send out");
    let expected: Vec<Key> =
        mine.iter().copied().filter(|&k| new.locate(KV, k) == Some(NodeId(3))).collect();
    assert!(!expected.is_empty(), "node 1 gives node 3 some keys");
    let mut runs = packer.finish();
    assert_eq!(runs.len(), 1, "one batch, for node 3: {runs:?}");
    let (to, sent) = runs.pop().expect("a run");
    assert_eq!(to, NodeId(3));
    let sent = sent.into_run();
    let keys: Vec<Key> = sent.entries().map(|(key, _)| key).collect();
    assert_eq!(keys, expected);

    three.receive(&ctx(), NodeId(1), &sent).await.expect("receive");
    let get = codec::encode(&Request::Get).expect("encode");
    let before: Option<String> =
        codec::decode(&three.handle(&ctx(), expected[0], &get).await.expect("get").response)
            .expect("decode");
    assert_eq!(before, None, "staged entries are not visible before after_migration");
    three.after_migration(&ctx(), &info(2)).await;
    for &k in &expected {
        let value: Option<String> =
            codec::decode(&three.handle(&ctx(), k, &get).await.expect("get").response)
                .expect("decode");
        assert_eq!(value, Some(format!("v{}", k.0)));
    }
}

#[tokio::test]
async fn a_batch_that_does_not_decode_is_refused_whole() {
    let kv = plugin(Kv::default());
    let mut batch = Packed::with_capacity(0);
    batch.push_encoded(Key(1), &"fine".to_string()).expect("encode");
    batch.push(Key(2), &[0xff; 3]).expect("push");
    let err = kv.receive(&ctx(), NodeId(2), &batch.into_run()).await.unwrap_err();
    assert!(matches!(err, AdaptationError::Codec(_)), "{err}");
    kv.after_migration(&ctx(), &info(2)).await;
    let get = codec::encode(&Request::Get).expect("encode");
    let value: Option<String> =
        codec::decode(&kv.handle(&ctx(), Key(1), &get).await.expect("get").response)
            .expect("decode");
    assert_eq!(value, None, "no half batch was staged");
    let mut packer = Packer::new(|_| NodeId(1), 1 << 20);
    kv.scan(&ctx(), NodeId(2), &Moving::new(Kv::default().spec(), Vec::new()), &mut packer)
        .await
        .expect("scan");
    assert_eq!(packer.count(), 0, "nothing invented");
}

struct Named(ServiceSpec);

impl Service for Named {
    type Request = ();
    type Response = ();
    type Entry = ();
    fn spec(&self) -> ServiceSpec {
        self.0.clone()
    }
    async fn handle(&self, _: &Context, _: Key, _: ()) {}
    async fn before_migration(&self, _: &Context, _: &ChangeInfo) {}
    async fn send_out(&self, _: &Context, _: &Moving) -> Vec<(Key, ())> {
        Vec::new()
    }
    async fn receive(&self, _: &Context, _: NodeId, _: Vec<(Key, ())>) {}
    async fn after_migration(&self, _: &Context, _: &ChangeInfo) {}
    async fn scan(&self, _: &Context, _: NodeId, _: &Moving) -> Vec<(Key, ())> {
        Vec::new()
    }
}

#[test]
fn the_registry_keeps_registration_order_and_refuses_clashes() {
    let mut registry = Registry::new();
    for id in [5u16, 2, 9] {
        registry
            .register(plugin(Named(ServiceSpec::new(ServiceId(id), format!("s{id}")))))
            .expect("register");
    }
    assert_eq!(registry.ids(), vec![ServiceId(5), ServiceId(2), ServiceId(9)]);
    let again = registry.register(plugin(Named(ServiceSpec::new(ServiceId(2), "again"))));
    assert!(matches!(again, Err(AdaptationError::Registration(_))));
    let odd =
        registry.register(plugin(Named(ServiceSpec::new(ServiceId(3), "odd").with_slots(1000))));
    assert!(matches!(odd, Err(AdaptationError::Registration(_))));
    assert_eq!(registry.ids().len(), 3);
    assert_eq!(registry.get(ServiceId(9)).map(|p| p.spec().name), Some("s9".to_string()));
}
