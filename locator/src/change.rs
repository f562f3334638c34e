//! The configuration changes a tree accepts, and what each one touched.

use crate::config::Labels;
use crate::ids::{CellId, NodeId};
use crate::service::ServiceSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// One configuration change. This is what consensus replicates: every node applies the same
/// changes in the same order with [`crate::CellTree::apply`] and derives identical trees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Register a service; its entries do not exist yet, so nothing moves.
    Register(ServiceSpec),
    /// A node joins with its labels.
    Add {
        /// The joining node.
        node: NodeId,
        /// Labels that choose its subtree.
        labels: Labels,
    },
    /// A live node leaves; it sends its entries out itself.
    Evict(NodeId),
    /// A node died; the others rebuild its entries.
    Fail(NodeId),
    /// A node died in the middle of a change after it had left the tree (an evicted node
    /// dying while it sends its entries out). The tree does not change; the survivors rebuild
    /// what it had not handed over.
    Recover(NodeId),
    /// Move slots from the most to the least loaded leaf cell if the most loaded one is above
    /// `max_over_avg_permille` thousandths of the average load per node. Evictions and failures
    /// only ever burden their own cell, so a cluster that shrinks unevenly needs this now and
    /// then; it is a change of its own so that operators see and schedule it.
    Rebalance {
        /// Threshold in thousandths: 1200 means 1.2 times the average.
        max_over_avg_permille: u32,
    },
}

impl Change {
    /// The node being added or removed, if any (the report's requesting node).
    pub fn node(&self) -> Option<NodeId> {
        match self {
            Change::Add { node, .. }
            | Change::Evict(node)
            | Change::Fail(node)
            | Change::Recover(node) => Some(*node),
            Change::Register(_) | Change::Rebalance { .. } => None,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Register(spec) => write!(f, "register {} ({})", spec.id, spec.name),
            Change::Add { node, labels } if labels.is_empty() => write!(f, "add {node}"),
            Change::Add { node, labels } => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "add {node} [{}]", labels.join(" "))
            }
            Change::Evict(node) => write!(f, "evict {node}"),
            Change::Fail(node) => write!(f, "fail {node}"),
            Change::Recover(node) => write!(f, "recover {node}"),
            Change::Rebalance { max_over_avg_permille } => {
                write!(f, "rebalance above {:.3}x", f64::from(*max_over_avg_permille) / 1000.0)
            }
        }
    }
}

/// What a change touched: the leaf cells whose slots changed hands and the nodes that take part
/// in the migration (the affected cells' members, the requesting node, and every node whose
/// replica holder changes with the new holder: see [`crate::CellTree::replica_holder`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeReport {
    /// Leaf cells whose members gave or received slots.
    pub cells: Vec<CellId>,
    /// Nodes that take part in migrating entries for this change.
    pub participants: BTreeSet<NodeId>,
}
