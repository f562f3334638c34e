//! Since when what a node says of the entries it manages still holds.
//!
//! A service may have each manager vouch, at a stable epoch, that every entry it manages has a
//! copy on another node (the DSM's word to its replica holder). Once the manager dies, that
//! word tells a page never written from one lost with every copy, but only if nothing since
//! has taken a copy away without the manager, or handed it slots its word did not look at.
//! Those are the changes recorded here:
//!
//! - a removal of any other node (`Evict`, `Fail`, `Recover`): its copies go, or travel to
//!   nodes that may be dead already;
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

    /// Records `change`, begun at `epoch`, which moves what `plan` says. Read a dead node's
    /// [`KeptSince::of`] before its recovery is recorded: that drops the node.
    pub fn record(&mut self, epoch: u64, change: &Change, plan: &MigrationPlan) {
        match change {
            Change::Evict(gone) | Change::Fail(gone) | Change::Recover(gone) => {
                for (_, since) in self.0.iter_mut().filter(|(n, _)| *n != gone) {
                    *since = epoch;
                }
            }
            Change::Add { node, .. } => {
                self.0.insert(*node, epoch);
            }
            Change::Register(_) | Change::Rebalance { .. } => {}
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
        let mut tree = CellTree::new(TreeConfig::default()).expect("tree");
        tree.register_service(ServiceSpec::new(ServiceId(1), "kv")).expect("registered");
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
