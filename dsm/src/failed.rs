//! The nodes whose failure the cluster confirmed, each until its id comes back as a new life.
//!
//! A node restarted from its data directory comes back under the same id, holding nothing of
//! its last life. Only the nodes that take part in its return hear of it as a change of their
//! own (`before_migration`); in a cluster of several cells, the others did not, and went on
//! counting the new life as failed: a manager of another cell took the pages it owned from
//! their backups at the next fault, and the writes it made after were never seen again. So a
//! failure is kept with the epoch of its change, and a table of a later epoch that holds the
//! node again says that this is a new life.

use gobelins_adaptation::Context;
use gobelins_locator::NodeId;
use std::collections::BTreeMap;

/// Each failed node with the epoch of the change that recovered it (the failure, or the
/// recovery of a node that died during its own eviction): the node is out of that epoch's
/// table, and in a later one only as a new life.
#[derive(Debug, Default)]
pub(crate) struct Failed {
    at: BTreeMap<NodeId, u64>,
}

impl Failed {
    /// `node` failed, and the change to `epoch` recovers it.
    pub(crate) fn insert(&mut self, node: NodeId, epoch: u64) {
        let at = self.at.entry(node).or_insert(epoch);
        *at = (*at).max(epoch);
    }

    /// `node` is back as a new life: a change this node takes part in adds it.
    pub(crate) fn remove(&mut self, node: &NodeId) {
        self.at.remove(node);
    }

    /// Whether, as `ctx` sees the cluster, `node` is a failed life: it failed, and `ctx`'s
    /// table is not one of a later epoch that holds it again.
    pub(crate) fn holds(&self, ctx: &Context, node: NodeId) -> bool {
        self.at.get(&node).is_some_and(|&epoch| {
            let back = ctx.epoch() > epoch
                && ctx.snapshot().is_some_and(|table| table.nodes().contains(&node));
            !back
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_locator::{CellTree, Change, Labels, TreeConfig};
    use std::sync::Arc;

    /// The table at `epoch` of a tree holding `nodes`.
    fn context(epoch: u64, nodes: &[u64]) -> Context {
        let mut tree = CellTree::new(TreeConfig::default()).expect("tree");
        for &n in nodes {
            tree.apply(&Change::Add { node: NodeId(n), labels: Labels::new() }).expect("add");
        }
        let table = tree.snapshot(gobelins_locator::Epoch(epoch)).expect("snapshot");
        Context::detached(NodeId(1), epoch, Some(Arc::new(table)))
    }

    #[test]
    fn a_failed_node_is_failed_until_a_later_table_holds_it_again() {
        let mut failed = Failed::default();
        failed.insert(NodeId(3), 7);
        // The table the recovery began from still holds the failed life.
        assert!(failed.holds(&context(6, &[1, 2, 3]), NodeId(3)));
        assert!(failed.holds(&context(7, &[1, 2]), NodeId(3)));
        assert!(failed.holds(&context(8, &[1, 2]), NodeId(3)), "not back yet");
        assert!(!failed.holds(&context(9, &[1, 2, 3]), NodeId(3)), "back as a new life");
        assert!(!failed.holds(&context(9, &[1, 2, 3]), NodeId(2)), "never failed");
        // It fails again: failed until it is back once more.
        failed.insert(NodeId(3), 12);
        assert!(failed.holds(&context(11, &[1, 2, 3]), NodeId(3)));
        assert!(!failed.holds(&context(13, &[1, 2, 3]), NodeId(3)));
        failed.insert(NodeId(3), 10);
        assert!(failed.holds(&context(11, &[1, 2, 3]), NodeId(3)), "the later failure counts");
        failed.remove(&NodeId(3));
        assert!(!failed.holds(&context(11, &[1, 2, 3]), NodeId(3)));
    }
}
