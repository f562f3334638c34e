//! Requests for the keys a change moves wait for their new manager's merge, not for the rest of
//! its after-migration work: a service's `after_release` runs with them flowing again, and the
//! change is reported done only once it ends.

use gobelins_adaptation::testing::MemCluster;
use gobelins_adaptation::{plugin, ChangeInfo, Context, HostConfig, Moving, Registry, Service};
use gobelins_locator::{Key, NodeId, ServiceId, ServiceSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const KV: ServiceId = ServiceId(7);

#[derive(Serialize, Deserialize)]
enum Request {
    Put(u64),
    Get,
}

/// A directory of numbers whose `after_release` waits until the test opens `gate`, counting
/// in `inside` the nodes waiting there.
struct Slow {
    live: Mutex<BTreeMap<Key, u64>>,
    staged: Mutex<Vec<(Key, u64)>>,
    gate: watch::Receiver<bool>,
    inside: watch::Sender<usize>,
}

impl Service for Slow {
    type Request = Request;
    type Response = Option<u64>;
    type Entry = u64;

    fn spec(&self) -> ServiceSpec {
        ServiceSpec::new(KV, "slow").with_slots(64)
    }

    async fn handle(&self, _ctx: &Context, key: Key, request: Request) -> Option<u64> {
        let mut live = self.live.lock().expect("live");
        match request {
            Request::Put(value) => live.insert(key, value),
            Request::Get => live.get(&key).copied(),
        }
    }

    async fn before_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn send_out(&self, _ctx: &Context, moving: &Moving) -> Vec<(Key, u64)> {
        let mut live = self.live.lock().expect("live");
        let leaving: Vec<Key> =
            live.keys().copied().filter(|&k| moving.destination(k).is_some()).collect();
        leaving.into_iter().filter_map(|k| live.remove(&k).map(|v| (k, v))).collect()
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, entries: Vec<(Key, u64)>) {
        self.staged.lock().expect("staged").extend(entries);
    }

    async fn after_migration(&self, _ctx: &Context, _change: &ChangeInfo) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("staged"));
        self.live.lock().expect("live").extend(staged);
    }

    async fn after_release(&self, _ctx: &Context, _change: &ChangeInfo) {
        self.inside.send_modify(|n| *n += 1);
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|&open| open).await;
        self.inside.send_modify(|n| *n -= 1);
    }

    async fn scan(&self, _ctx: &Context, _failed: NodeId, _orphans: &Moving) -> Vec<(Key, u64)> {
        Vec::new()
    }
}

#[tokio::test(start_paused = true)]
async fn moved_keys_are_served_while_after_release_runs_and_the_change_waits_for_it() {
    let (open, gate) = watch::channel(true);
    let (inside, mut entered) = watch::channel(0usize);
    let services = move || {
        let slow = Slow {
            live: Mutex::default(),
            staged: Mutex::default(),
            gate: gate.clone(),
            inside: inside.clone(),
        };
        let mut registry = Registry::new();
        registry.register(plugin(Arc::new(slow))).expect("registers");
        registry
    };
    let mut cluster = MemCluster::start(2, HostConfig::default(), services).await;
    let first = cluster.host(NodeId(1));
    let keys: Vec<Key> = (0..200).map(Key).collect();
    for &key in &keys {
        let put = gobelins_adaptation::codec::encode(&Request::Put(key.0 * 10)).expect("encodes");
        first.request(KV, key, put).await.expect("stored");
    }
    let before = cluster.snapshot();
    let done_before = *first.done().borrow();
    open.send_replace(false);

    let checked = async {
        // Every participant of the join (nodes 1, 2 and 3) is in `after_release`.
        let all_in = entered.wait_for(|&n| n == 3);
        tokio::time::timeout(Duration::from_secs(60), all_in)
            .await
            .expect("the three participants reach after_release")
            .expect("the services live");
        let get = gobelins_adaptation::codec::encode(&Request::Get).expect("encodes");
        for &key in &keys {
            let answer = first.request(KV, key, get.clone()).await.expect("answered, not held");
            let value: Option<u64> = gobelins_adaptation::codec::decode(&answer).expect("decodes");
            assert_eq!(value, Some(key.0 * 10), "key {}", key.0);
        }
        assert_eq!(*first.done().borrow(), done_before, "not reported done before it ends");
        open.send_replace(true);
    };
    let (joined, ()) = tokio::join!(cluster.add(), checked);
    assert_eq!(joined, NodeId(3));
    assert!(*first.done().borrow() > done_before, "reported done once it ended");
    let after = cluster.snapshot();
    let moved = keys.iter().filter(|&&k| before.locate(KV, k) != after.locate(KV, k)).count();
    assert!(moved > 0, "the join moved some of the keys read during it");
}
