//! A change's stable epoch reaches every node's services: those that took part in it, and
//! those that saw it go by in another cell, which no other callback of that change reaches.

use gobelins_adaptation::testing::{replay, MemCluster};
use gobelins_adaptation::{plugin, ChangeInfo, Context, HostConfig, Moving, Registry, Service};
use gobelins_locator::{Key, NodeId, ServiceId, ServiceSpec, TreeConfig};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WITNESS: ServiceId = ServiceId(9);

/// What each node's service heard: (node, callback, epoch).
type Heard = Arc<Mutex<BTreeSet<(NodeId, &'static str, u64)>>>;

/// A service with no entries that notes its `before_migration` and `stable` calls.
struct Witness {
    heard: Heard,
}

impl Witness {
    fn note(&self, ctx: &Context, what: &'static str, epoch: u64) {
        self.heard.lock().expect("heard").insert((ctx.node(), what, epoch));
    }
}

impl Service for Witness {
    type Request = ();
    type Response = ();
    type Entry = ();

    fn spec(&self) -> ServiceSpec {
        ServiceSpec::new(WITNESS, "witness").with_slots(64)
    }

    async fn handle(&self, _ctx: &Context, _key: Key, _request: ()) {}

    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.note(ctx, "before", change.epoch);
    }

    async fn send_out(&self, _ctx: &Context, _moving: &Moving) -> Vec<(Key, ())> {
        Vec::new()
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, _entries: Vec<(Key, ())>) {}

    async fn after_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn stable(&self, ctx: &Context, epoch: u64) {
        self.note(ctx, "stable", epoch);
    }

    async fn scan(&self, _ctx: &Context, _failed: NodeId, _orphans: &Moving) -> Vec<(Key, ())> {
        Vec::new()
    }
}

#[test]
fn a_change_in_another_cell_is_stable_for_the_nodes_that_took_no_part_in_it() {
    replay(async {
        let heard = Heard::default();
        let h = Arc::clone(&heard);
        let services = move || {
            let mut registry = Registry::new();
            registry.register(plugin(Witness { heard: Arc::clone(&h) })).expect("registers");
            registry
        };
        let shape = TreeConfig::default().with_cell_capacity(2);
        let mut cluster = MemCluster::start_shaped(6, shape, HostConfig::default(), services).await;
        let added = cluster.add().await;
        let epoch = cluster.host(added).history().first().expect("the joiner's change").epoch;
        let took_part: BTreeSet<NodeId> = heard
            .lock()
            .expect("heard")
            .iter()
            .filter(|&&(_, what, e)| what == "before" && e == epoch)
            .map(|&(n, _, _)| n)
            .collect();
        let bystanders: Vec<NodeId> =
            (1..=6).map(NodeId).filter(|n| !took_part.contains(n)).collect();
        assert!(!bystanders.is_empty(), "a node outside the addition's cell: {took_part:?}");
        // The hosts take the update that ends the change in their own time.
        for node in took_part.iter().chain(&bystanders) {
            let mut waited = 0;
            while !heard.lock().expect("heard").contains(&(*node, "stable", epoch)) {
                assert!(waited < 1000, "node {node} heard {epoch} stable");
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += 1;
            }
        }
    })
}
