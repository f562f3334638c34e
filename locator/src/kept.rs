//! Since when what a node says of the entries it manages still holds.
//!
//! A service may have each manager vouch, at a stable epoch, that every entry it manages has a
//! copy on another node (the DSM's word to its replica holder). Once the manager dies, that
//! word tells a page never written from one lost with every copy, but only if nothing since
//! has taken a copy away without the manager, or handed it slots its word did not look at.
//! Those are the changes recorded here:
//!
//! - a removal of any other node (`Fail`, `Recover`): its copies go, or travel to nodes that
//!   may be dead already;
//! - an eviction of another node whose leaver took a copy away that no manager knows of (its
//!   hand-over could place it nowhere), or died before it said it had placed them all. A
//!   leaver's copies of a live manager's entries go through that manager, which keeps its
//!   word true as they do; those of a manager dead, as yet unnoticed, are left on live
//!   nodes, where its recovery finds them. Before, every eviction counted, and a node killed
//!   just before an operator evicted another had a third of its slots tainted (helpers'
//!   black-box runs: 683 to 1,365 of 4,096);
//! - a leave that took away the latest of what the node said (its word, kept on the leaver
//!   as its replica holder, or its taking back), when the leaver does not stay for its
//!   recovery: an older word kept on an earlier holder could then count;
//! - a change that moves slots to the node: a join (the joiner's, and a new life of an id
//!   says nothing of the last), a rebalance, the slots a recovery hands it.
//!
//! A join of another node, a rebalance that takes slots away, a registration: none of these
//! removes a copy, and what they move out of the node's slots leaves its word true of what it
//! still manages. Before, only a word of the epoch right before the failure counted, so a node
//! killed as another joined had every slot it managed tainted (a helper's black-box run, 3
//! runs of 3). A node's own eviction is not recorded against it either: what it sends only
//! adds copies elsewhere or moves ownership, and should it die during it, the recovery that
//! follows counts its word of before.

use crate::{Change, MigrationPlan, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// For each node with a life under these rules, the epoch of the last change that may have
/// made a word it gave before untrue (see the module's documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptSince(BTreeMap<NodeId, u64>);

impl KeptSince {
    /// The epoch from which a word of `node`'s still holds: one it gave at a stable epoch at or
    /// after it. `None` for a node whose life began before these were recorded.
    pub fn of(&self, node: NodeId) -> Option<u64> {
        self.0.get(&node).copied()
    }

    /// Starts recording for `nodes`, from `epoch`: a word of theirs given before counts for
    /// nothing, since nobody recorded what happened then.
    pub fn start(&mut self, nodes: impl IntoIterator<Item = NodeId>, epoch: u64) {
        self.0.extend(nodes.into_iter().map(|n| (n, epoch)));
    }

    /// Records `change`, begun at `epoch`, which moves what `plan` says, an eviction counted
    /// at once as a removal (what clusters did before a leaver said whether it took a copy
    /// away). Read a dead node's [`KeptSince::of`] before its recovery is recorded: that
    /// drops the node.
    pub fn record(&mut self, epoch: u64, change: &Change, plan: &MigrationPlan) {
        self.begin(epoch, change, plan);
        if let Change::Evict(leaver) = change {
            self.removed(epoch, *leaver);
        }
    }

    /// Records `change`, begun at `epoch`, which moves what `plan` says; an eviction's removal
    /// is left to [`KeptSince::removed`], once its leaver said it took a copy away, or died
    /// before it said otherwise.
    pub fn begin(&mut self, epoch: u64, change: &Change, plan: &MigrationPlan) {
        match change {
            Change::Fail(gone) | Change::Recover(gone) => self.removed(epoch, *gone),
            Change::Add { node, .. } => {
                self.0.insert(*node, epoch);
            }
            Change::Evict(_) | Change::Register(_) | Change::Rebalance { .. } => {}
        }
        for node in plan.receivers() {
            if let Some(since) = self.0.get_mut(&node) {
                *since = epoch;
            }
        }
        if let Change::Fail(dead) | Change::Recover(dead) = change {
            self.0.remove(dead);
        }
    }

    /// `gone`, removed by the change begun at `epoch`, took copies away that no manager knows
    /// of: every other node's earlier word may be untrue.
    pub fn removed(&mut self, epoch: u64, gone: NodeId) {
        for (_, since) in self.0.iter_mut().filter(|(n, _)| **n != gone) {
            *since = (*since).max(epoch);
        }
    }

    /// A word `node` gave before the change begun at `epoch` may no longer be told true from
    /// untrue: a leaver took away the latest of what it said (its word, or its taking back),
    /// and an older one may still be kept elsewhere.
    pub fn void(&mut self, epoch: u64, node: NodeId) {
        if let Some(since) = self.0.get_mut(&node) {
            *since = (*since).max(epoch);
        }
    }

    /// `node` is gone for good: no recovery of it will ask.
    pub fn forget(&mut self, node: NodeId) {
        self.0.remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CellTree, Epoch, Labels, ServiceId, ServiceSpec, Snapshot, TreeConfig};

    fn n(id: u64) -> NodeId {
        NodeId(id)
    }

    /// A tree of `nodes` nodes, each recorded from its join, as a cluster records them.
    fn cluster(nodes: u64) -> (CellTree, KeptSince, u64) {
        cluster_of(nodes, ServiceSpec::new(ServiceId(1), "kv"))
    }

    /// As [`cluster`], with the service `spec`.
    fn cluster_of(nodes: u64, spec: ServiceSpec) -> (CellTree, KeptSince, u64) {
        let mut tree = CellTree::new(TreeConfig::default()).expect("tree");
        tree.register_service(spec).expect("registered");
        let (mut kept, mut epoch) = (KeptSince::default(), 0);
        for id in 1..=nodes {
            apply(
                &mut tree,
                &mut kept,
                &mut epoch,
                Change::Add { node: n(id), labels: Labels::new() },
            );
        }
        (tree, kept, epoch)
    }

    fn apply(tree: &mut CellTree, kept: &mut KeptSince, epoch: &mut u64, change: Change) {
        let before: Option<Snapshot> = tree.snapshot(Epoch(*epoch)).ok();
        tree.apply(&change).expect("applied");
        *epoch += 1;
        let after = tree.snapshot(Epoch(*epoch)).expect("nodes");
        let plan = match &before {
            Some(old) => MigrationPlan::between(old, &after),
            None => MigrationPlan::nothing(Epoch(*epoch - 1), Epoch(*epoch)),
        };
        kept.record(*epoch, &change, &plan);
    }

    #[test]
    fn a_join_of_another_node_leaves_a_word_true_and_the_joiner_s_starts_at_its_join() {
        let (mut tree, mut kept, mut epoch) = cluster(3);
        let before = kept.of(n(2)).expect("recorded");
        apply(&mut tree, &mut kept, &mut epoch, Change::Add { node: n(4), labels: Labels::new() });
        assert_eq!(kept.of(n(2)), Some(before), "node 2 gave slots away, took none");
        assert_eq!(kept.of(n(4)), Some(epoch), "the joiner took slots");
    }

    #[test]
    fn a_removal_of_any_other_node_makes_every_earlier_word_untrue_but_not_the_removed_s() {
        for removal in [Change::Evict(n(3)), Change::Fail(n(3))] {
            let (mut tree, mut kept, mut epoch) = cluster(4);
            let of_3 = kept.of(n(3));
            apply(&mut tree, &mut kept, &mut epoch, removal.clone());
            for other in [1, 2, 4] {
                assert_eq!(kept.of(n(other)), Some(epoch), "node {other} after {removal}");
            }
            match removal {
                // Its own eviction leaves its word as it was, for a recovery should it die.
                Change::Evict(_) => assert_eq!(kept.of(n(3)), of_3),
                _ => assert_eq!(kept.of(n(3)), None, "recovered: dropped"),
            }
        }
    }

    #[test]
    fn an_eviction_begun_counts_only_once_its_leaver_took_a_copy_away() {
        // Few slots, so that the leaver's go to few nodes.
        let spec = ServiceSpec::new(ServiceId(1), "kv").with_slots(8);
        let (mut tree, mut kept, mut epoch) = cluster_of(6, spec);
        let others = [1, 2, 4, 5, 6];
        let before = others.map(|o| kept.of(n(o)));
        let old = tree.snapshot(Epoch(epoch)).expect("nodes");
        tree.apply(&Change::Evict(n(3))).expect("evicted");
        epoch += 1;
        let plan = MigrationPlan::between(&old, &tree.snapshot(Epoch(epoch)).expect("nodes"));
        kept.begin(epoch, &Change::Evict(n(3)), &plan);
        // The receivers took slots: their words are untrue, the others' still hold.
        let receivers = plan.receivers();
        assert!(!receivers.is_empty());
        assert!(others.iter().any(|&o| !receivers.contains(&n(o))), "a node takes nothing");
        for (other, was) in others.into_iter().zip(before) {
            let want = if receivers.contains(&n(other)) { Some(epoch) } else { was };
            assert_ne!(want, None);
            assert_eq!(kept.of(n(other)), want, "node {other} as the eviction began");
        }
        let of_3 = kept.of(n(3));
        kept.removed(epoch, n(3));
        for other in others {
            assert_eq!(kept.of(n(other)), Some(epoch), "node {other} once the leaver took a copy");
        }
        assert_eq!(kept.of(n(3)), of_3, "the leaver's own");
        // A later epoch recorded meanwhile is never set back.
        kept.removed(epoch - 1, n(3));
        assert_eq!(kept.of(n(1)), Some(epoch));
    }

    #[test]
    fn a_recovery_reads_the_dead_node_s_before_recording_itself() {
        let (mut tree, mut kept, mut epoch) = cluster(4);
        let joined = kept.of(n(2)).expect("recorded");
        apply(&mut tree, &mut kept, &mut epoch, Change::Add { node: n(5), labels: Labels::new() });
        // The dead node's, as the recovery reads it as it begins: the join did not touch it.
        assert_eq!(kept.of(n(2)), Some(joined));
        apply(&mut tree, &mut kept, &mut epoch, Change::Fail(n(2)));
        assert_eq!(kept.of(n(2)), None);
        assert_eq!(kept.of(n(1)), Some(epoch));
    }

    #[test]
    fn slots_moved_to_a_node_make_its_word_untrue() {
        let (_, mut kept, _) = cluster(3);
        let mut plan = MigrationPlan::nothing(Epoch(7), Epoch(8));
        plan.services.push(crate::ServicePlan {
            service: ServiceId(1),
            name: "kv".into(),
            moves: vec![crate::SlotMove { slots: 0..4, from: n(1), to: n(2) }],
        });
        let from_1 = kept.of(n(1));
        kept.record(8, &Change::Rebalance { max_over_avg_permille: 1200 }, &plan);
        assert_eq!(kept.of(n(2)), Some(8), "it took slots");
        assert_eq!(kept.of(n(1)), from_1, "it gave slots away");
    }

    #[test]
    fn a_node_recorded_from_an_epoch_or_forgotten() {
        let mut kept = KeptSince::default();
        assert_eq!(kept.of(n(1)), None, "not recorded");
        kept.start([n(1), n(2)], 9);
        assert_eq!(kept.of(n(1)), Some(9));
        kept.forget(n(1));
        assert_eq!((kept.of(n(1)), kept.of(n(2))), (None, Some(9)));
        // A change about nobody recorded touches only the recorded.
        kept.record(10, &Change::Evict(n(3)), &MigrationPlan::nothing(Epoch(9), Epoch(10)));
        assert_eq!((kept.of(n(1)), kept.of(n(2))), (None, Some(10)));
    }
}
