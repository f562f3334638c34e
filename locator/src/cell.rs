//! One cell of the tree: an inner cell groups cells, a leaf cell holds nodes.

use crate::ids::{CellId, NodeId};
use serde::{Deserialize, Serialize};

/// A cell and its place in the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// `None` only for the root.
    pub parent: Option<CellId>,
    /// The `(key, value)` label this subtree stands for; `None` for cells made by splitting.
    pub label: Option<(String, String)>,
    /// Children or members.
    pub kind: CellKind,
}

/// What a cell contains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellKind {
    /// Child cells, in creation order.
    Inner(Vec<CellId>),
    /// Member nodes, sorted by id so that every node derives the same order.
    Leaf(Vec<NodeId>),
}

impl Cell {
    /// The members of a leaf cell; empty for an inner cell.
    pub fn members(&self) -> &[NodeId] {
        match &self.kind {
            CellKind::Leaf(members) => members,
            CellKind::Inner(_) => &[],
        }
    }

    /// The children of an inner cell; empty for a leaf.
    pub fn children(&self) -> &[CellId] {
        match &self.kind {
            CellKind::Inner(children) => children,
            CellKind::Leaf(_) => &[],
        }
    }

    /// Whether this cell holds nodes rather than cells.
    pub fn is_leaf(&self) -> bool {
        matches!(self.kind, CellKind::Leaf(_))
    }
}
