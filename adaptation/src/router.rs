//! Where a request goes: the pure decision the request router makes for each arrival.
//!
//! ```text
//!  request(service, key, sender's epoch)
//!    sender ahead of us        ─▶ Wait(epoch)   (install that epoch first)
//!    key moving right now      ─▶ Hold          (released after the adaptation period)
//!    another node manages it   ─▶ Moved(epoch)  (the sender installs our epoch and retries)
//!    no such service           ─▶ Unknown       (or Moved, if the sender is behind us)
//!    otherwise                 ─▶ Serve
//! ```
//!
//! Requests are delayed, never dropped, by foreseeable changes: a key that is moving is held,
//! not refused.

use gobelins_locator::{Key, MigrationPlan, NodeId, ServiceId, Snapshot};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

/// What to do with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// This node manages the key: handle it.
    Serve,
    /// The key is moving in the current adaptation period: keep the request until it ends.
    Hold,
    /// Another node manages the key in our epoch; the sender should catch up and retry.
    Moved {
        /// Our epoch.
        epoch: u64,
    },
    /// No such service in our epoch, and the sender is not behind: a typed error for the
    /// caller rather than a retry that cannot succeed.
    Unknown,
    /// The sender knows a newer epoch than ours: wait until we have installed it.
    Wait {
        /// The sender's epoch.
        epoch: u64,
    },
}

/// The router's view of one node: its snapshot and the slots moving right now.
#[derive(Clone, Debug)]
pub struct Router {
    me: NodeId,
    snapshot: Arc<Snapshot>,
    /// Per service, the slot ranges whose manager changes in the period under way.
    moving: Slots,
    /// Slots a node died before handing over, per dead node, with the epoch of the change
    /// they were to move in: held past the period's end, until the change that recovers the
    /// node has rebuilt them.
    orphaned: BTreeMap<NodeId, (u64, Slots)>,
}

/// Slot ranges, per service.
type Slots = BTreeMap<ServiceId, Vec<Range<u32>>>;

impl Router {
    /// A router for node `me` at `snapshot`'s epoch.
    pub fn new(me: NodeId, snapshot: Arc<Snapshot>) -> Self {
        Router { me, snapshot, moving: BTreeMap::new(), orphaned: BTreeMap::new() }
    }

    /// The epoch requests are routed by.
    pub fn epoch(&self) -> u64 {
        self.snapshot.epoch().0
    }

    /// The snapshot requests are routed by.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Starts holding the keys that `plan` moves (the period's first phase).
    pub fn hold(&mut self, plan: &MigrationPlan) {
        self.moving = plan
            .services
            .iter()
            .filter(|s| !s.moves.is_empty())
            .map(|s| (s.service, s.moves.iter().map(|m| m.slots.clone()).collect()))
            .collect();
    }

    /// Routes by a newer snapshot; held keys stay held until [`Router::release`].
    pub fn install(&mut self, snapshot: Arc<Snapshot>) {
        if snapshot.epoch() > self.snapshot.epoch() {
            self.snapshot = snapshot;
        }
    }

    /// Ends the period: what it held is released (not what dead senders left orphaned).
    pub fn release(&mut self) {
        self.moving.clear();
    }

    /// `dead` died before handing over its moves in `plan`: keep holding the slots it was to
    /// send here after the period ends, until [`Router::recovered`].
    pub fn keep_orphans(&mut self, dead: NodeId, plan: &MigrationPlan) {
        let (epoch, mine) = self.orphaned.entry(dead).or_default();
        *epoch = (*epoch).max(plan.to.0);
        for service in &plan.services {
            let slots = service.moves.iter().filter(|m| m.from == dead && m.to == self.me);
            mine.entry(service.service).or_default().extend(slots.map(|m| m.slots.clone()));
        }
    }

    /// The change that recovers `dead` is over: its orphans have been rebuilt.
    pub fn recovered(&mut self, dead: NodeId) {
        self.orphaned.remove(&dead);
    }

    /// A change at `epoch` that recovers nobody is over. Recoveries go before every other
    /// change, so none is coming for the orphans kept before it: their sender left rather
    /// than failed (this node saw the change it left in only after the cluster was done with
    /// it, as a new life catching up does), and what it sent was rebuilt, or delivered, by
    /// then. Held longer, they would be held for ever.
    pub fn outlived(&mut self, epoch: u64) {
        self.orphaned.retain(|_, (kept, _)| *kept >= epoch);
    }

    /// Decides what to do with a request for `key` of `service` from a sender at `epoch`.
    pub fn route(&self, service: ServiceId, key: Key, epoch: u64) -> Verdict {
        if epoch > self.epoch() {
            return Verdict::Wait { epoch };
        }
        let Some(table) = self.snapshot.table(service) else {
            // A sender behind us may learn of the service by catching up; one that is not
            // would retry for ever.
            return if epoch < self.epoch() {
                Verdict::Moved { epoch: self.epoch() }
            } else {
                Verdict::Unknown
            };
        };
        let slot = table.slot_of(key);
        let held = |ranges: &Slots| {
            ranges.get(&service).is_some_and(|r| r.iter().any(|r| r.contains(&slot)))
        };
        if held(&self.moving) || self.orphaned.values().any(|(_, slots)| held(slots)) {
            return Verdict::Hold;
        }
        if table.locate(key) == self.me {
            Verdict::Serve
        } else {
            Verdict::Moved { epoch: self.epoch() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_locator::{CellTree, Epoch, Labels, ServiceSpec, TreeConfig};

    const KV: ServiceId = ServiceId(1);

    fn tree(nodes: u64) -> CellTree {
        let mut tree = CellTree::new(TreeConfig::default()).expect("config");
        tree.register_service(ServiceSpec::new(KV, "kv").with_slots(1024)).expect("register");
        for n in 1..=nodes {
            tree.add_node(NodeId(n), Labels::new()).expect("add");
        }
        tree
    }

    fn key_managed_by(snapshot: &Snapshot, node: NodeId) -> Key {
        (0..).map(Key).find(|&k| snapshot.locate(KV, k) == Some(node)).expect("some key")
    }

    #[test]
    fn a_manager_serves_and_others_are_told_it_moved() {
        let snapshot = Arc::new(tree(3).snapshot(Epoch(4)).expect("snapshot"));
        let router = Router::new(NodeId(1), Arc::clone(&snapshot));
        assert_eq!(router.route(KV, key_managed_by(&snapshot, NodeId(1)), 4), Verdict::Serve);
        assert_eq!(
            router.route(KV, key_managed_by(&snapshot, NodeId(2)), 4),
            Verdict::Moved { epoch: 4 }
        );
        assert_eq!(router.route(ServiceId(9), Key(1), 4), Verdict::Unknown);
        assert_eq!(router.route(ServiceId(9), Key(1), 3), Verdict::Moved { epoch: 4 });
    }

    #[test]
    fn a_sender_ahead_of_us_waits_and_a_stale_one_is_still_served() {
        let snapshot = Arc::new(tree(3).snapshot(Epoch(4)).expect("snapshot"));
        let router = Router::new(NodeId(1), Arc::clone(&snapshot));
        let mine = key_managed_by(&snapshot, NodeId(1));
        assert_eq!(router.route(KV, mine, 5), Verdict::Wait { epoch: 5 });
        assert_eq!(
            router.route(KV, mine, 2),
            Verdict::Serve,
            "an old sender is right about this key"
        );
    }

    #[test]
    fn moving_keys_are_held_through_the_period_and_then_routed_by_the_new_epoch() {
        let mut t = tree(3);
        let old = Arc::new(t.snapshot(Epoch(4)).expect("snapshot"));
        t.add_node(NodeId(4), Labels::new()).expect("add");
        let new = Arc::new(t.snapshot(Epoch(5)).expect("snapshot"));
        let plan = MigrationPlan::between(&old, &new);
        let leaving = (0..)
            .map(Key)
            .find(|&k| old.locate(KV, k) == Some(NodeId(1)) && new.locate(KV, k) == Some(NodeId(4)))
            .expect("node 1 gives node 4 some keys");
        let staying = key_managed_by(&new, NodeId(1));
        assert_eq!(old.locate(KV, staying), Some(NodeId(1)));

        let mut router = Router::new(NodeId(1), Arc::clone(&old));
        router.hold(&plan);
        assert_eq!(router.route(KV, leaving, 4), Verdict::Hold);
        assert_eq!(
            router.route(KV, staying, 4),
            Verdict::Serve,
            "keys that stay are not disturbed"
        );
        router.install(Arc::clone(&new));
        assert_eq!(router.route(KV, leaving, 5), Verdict::Hold, "still held until the period ends");
        router.release();
        assert_eq!(router.route(KV, leaving, 5), Verdict::Moved { epoch: 5 });
        router.install(old);
        assert_eq!(router.epoch(), 5, "epochs never go back");
    }

    #[test]
    fn orphans_are_held_until_their_sender_is_recovered_or_a_later_change_ends() {
        let mut t = tree(3);
        let old = Arc::new(t.snapshot(Epoch(4)).expect("snapshot"));
        t.add_node(NodeId(4), Labels::new()).expect("add");
        let new = Arc::new(t.snapshot(Epoch(5)).expect("snapshot"));
        let plan = MigrationPlan::between(&old, &new);
        // Node 4 receives; node 1 is the sender that dies before it has handed its keys over.
        let orphan = (0..)
            .map(Key)
            .find(|&k| old.locate(KV, k) == Some(NodeId(1)) && new.locate(KV, k) == Some(NodeId(4)))
            .expect("node 1 gives node 4 some keys");
        let fresh = || {
            let mut router = Router::new(NodeId(4), Arc::clone(&new));
            router.keep_orphans(NodeId(1), &plan);
            router
        };

        let mut router = fresh();
        assert_eq!(router.route(KV, orphan, 5), Verdict::Hold);
        router.outlived(5);
        assert_eq!(router.route(KV, orphan, 5), Verdict::Hold, "the change it died in ends");
        router.recovered(NodeId(1));
        assert_eq!(router.route(KV, orphan, 5), Verdict::Serve, "its recovery rebuilt them");

        // Its sender left instead, and no recovery will come: a later change releases them.
        let mut router = fresh();
        router.outlived(6);
        assert_eq!(router.route(KV, orphan, 5), Verdict::Serve);
    }
}
