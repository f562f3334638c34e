//! A change's stable epoch reaches every node's services once: those that took part in it, and
//! those that saw it go by in another cell, which no other callback of that change reaches;
//! never a node the change was meant for and went on without.

use async_trait::async_trait;
use bytes::Bytes;
use gobelins_adaptation::testing::{replay, MemCluster};
use gobelins_adaptation::{
    plugin, AdaptationError, ChangeInfo, Context, Host, HostConfig, Link, Moving, Progress,
    Registry, Service, Update,
};
use gobelins_locator::{
    CellTree, Change, Epoch, Key, Labels, MigrationPlan, NodeId, ServiceId, ServiceSpec, TreeConfig,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WITNESS: ServiceId = ServiceId(9);

/// What each node's service heard, in order: (node, callback, epoch).
type Heard = Arc<Mutex<Vec<(NodeId, &'static str, u64)>>>;

/// How many times `node` heard `what` of `epoch`.
fn times(heard: &Heard, node: NodeId, what: &str, epoch: u64) -> usize {
    let heard = heard.lock().expect("heard");
    heard.iter().filter(|&&h| h == (node, what, epoch)).count()
}

/// A service with no entries that notes its `before_migration` and `stable` calls.
struct Witness {
    heard: Heard,
}

impl Witness {
    fn note(&self, ctx: &Context, what: &'static str, epoch: u64) {
        self.heard.lock().expect("heard").push((ctx.node(), what, epoch));
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
        let took_part: BTreeSet<NodeId> =
            (1..=6).map(NodeId).filter(|&n| times(&heard, n, "before", epoch) > 0).collect();
        let bystanders: Vec<NodeId> =
            (1..=6).map(NodeId).filter(|n| !took_part.contains(n)).collect();
        assert!(!bystanders.is_empty(), "a node outside the addition's cell: {took_part:?}");
        // The hosts take the update that ends the change in their own time.
        for node in took_part.iter().chain(&bystanders) {
            let mut waited = 0;
            while times(&heard, *node, "stable", epoch) == 0 {
                assert!(waited < 1000, "node {node} heard {epoch} stable");
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += 1;
            }
        }
        // Another change, then: nobody hears the first one's stable epoch twice.
        cluster.add().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        for node in took_part.iter().chain(&bystanders) {
            assert_eq!(times(&heard, *node, "stable", epoch), 1, "node {node}, epoch {epoch}");
        }
    })
}

/// A link to nowhere: the host under test only hears updates.
struct Nowhere;

#[async_trait]
impl Link for Nowhere {
    async fn call(
        &self,
        to: NodeId,
        _message: Bytes,
        _deadline: Duration,
    ) -> Result<Bytes, AdaptationError> {
        Err(AdaptationError::Unreachable { node: to.0, reason: "nowhere".into() })
    }
}

/// Node 5 joins a cluster of four in cells of two. `node`'s host hears the join in progress
/// without being a participant, `departed` as given, then the cluster stable: whether its
/// service heard the join's epoch stable.
async fn hears_stable(node: NodeId, departed: BTreeSet<NodeId>) -> (bool, MigrationPlan) {
    let heard = Heard::default();
    let mut registry = Registry::new();
    registry.register(plugin(Witness { heard: Arc::clone(&heard) })).expect("registers");
    let spec = registry.specs()[0].clone();
    let mut tree = CellTree::new(TreeConfig::default().with_cell_capacity(2)).expect("shape");
    tree.register_service(spec).expect("registers");
    for n in 1..=4 {
        tree.apply(&Change::Add { node: NodeId(n), labels: Labels::new() }).expect("joins");
    }
    let before = Arc::new(tree.snapshot(Epoch(4)).expect("nodes"));
    let join = Change::Add { node: NodeId(5), labels: Labels::new() };
    let report = tree.apply(&join).expect("joins");
    let after = Arc::new(tree.snapshot(Epoch(5)).expect("nodes"));
    let plan = MigrationPlan::between(&before, &after);
    let mut participants = report.participants.clone();
    participants.remove(&node);
    let host = Host::start(node, registry, Arc::new(Nowhere), HostConfig::default());
    let update = |epoch, snapshot: &Arc<_>, change| Update {
        epoch,
        snapshot: Some(Arc::clone(snapshot)),
        change,
        departed: departed.clone(),
    };
    host.update(update(4, &before, None));
    let progress = Progress {
        epoch: 5,
        change: join,
        participants,
        plan: plan.clone(),
        failed_moved_in: [None, None],
        failed_kept_since: None,
        leave: false,
    };
    host.update(update(5, &after, Some(progress)));
    host.update(update(5, &after, None));
    tokio::time::sleep(Duration::from_millis(100)).await;
    host.shutdown();
    (times(&heard, node, "stable", 5) == 1, plan)
}

#[test]
fn a_change_is_not_stable_for_a_node_it_was_meant_for_or_that_the_cluster_gave_up_on() {
    replay(async {
        let (_, plan) = hears_stable(NodeId(1), BTreeSet::new()).await;
        let moves: Vec<_> = plan.services.iter().flat_map(|s| &s.moves).collect();
        let moved = |n: NodeId| moves.iter().any(|m| m.from == n || m.to == n);
        let bystander = (1..=4).map(NodeId).find(|&n| !moved(n)).expect("a node outside the join");
        let dropped = (1..=4).map(NodeId).find(|&n| moved(n)).expect("a node the join moves");
        assert!(hears_stable(bystander, BTreeSet::new()).await.0, "a bystander");
        let gone = BTreeSet::from([bystander]);
        assert!(!hears_stable(bystander, gone).await.0, "a bystander the cluster gave up on");
        assert!(!hears_stable(dropped, BTreeSet::new()).await.0, "a participant left out");
    })
}
