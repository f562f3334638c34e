//! The cell tree: cells, the nodes in them, and which node manages each slot of each service.

use crate::balance::Holding;
use crate::cell::{Cell, CellKind};
use crate::config::{Labels, TreeConfig};
use crate::error::{LocatorError, Result};
use crate::ids::{CellId, Epoch, NodeId, ServiceId};
use crate::service::ServiceSpec;
use crate::snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The root cell; it always exists, even in an empty cluster.
pub const ROOT: CellId = CellId(0);

/// Where a member node sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    pub(crate) leaf: CellId,
    pub(crate) labels: Labels,
}

/// A registered service and who manages each of its slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServiceState {
    pub(crate) spec: ServiceSpec,
    /// The subtree the service is confined to ([`ROOT`] for the whole cluster).
    pub(crate) scope: CellId,
    /// Manager of each slot; empty while the cluster has no node.
    pub(crate) owners: Vec<NodeId>,
}

/// The cluster configuration as the locator sees it. It is plain data: serialisable, comparable,
/// and changed only through [`CellTree::apply`] and friends, so that every node that applies the
/// same changes holds an identical tree.
///
/// Invariants kept by every operation: each slot of each service has one live manager inside the
/// service's scope; inside a leaf cell, per-service slot counts differ by at most one; leaf cells
/// hold between 1 and `cell_capacity` nodes; no inner cell but the root is empty, and no cell made
/// by splitting is left with a single child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellTree {
    pub(crate) config: TreeConfig,
    pub(crate) cells: BTreeMap<CellId, Cell>,
    pub(crate) next_cell: u32,
    pub(crate) nodes: BTreeMap<NodeId, Member>,
    pub(crate) services: BTreeMap<ServiceId, ServiceState>,
}

impl CellTree {
    /// An empty cluster with this shape.
    pub fn new(config: TreeConfig) -> Result<Self> {
        config.validate()?;
        let root = Cell { parent: None, label: None, kind: CellKind::Inner(Vec::new()) };
        Ok(CellTree {
            config,
            cells: BTreeMap::from([(ROOT, root)]),
            next_cell: 1,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
        })
    }

    /// The shape this tree was made with.
    pub fn config(&self) -> &TreeConfig {
        &self.config
    }

    /// Member nodes, ascending.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied()
    }

    /// Number of member nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether `node` is a member.
    pub fn contains(&self, node: NodeId) -> bool {
        self.nodes.contains_key(&node)
    }

    /// The leaf cell a member sits in.
    pub fn leaf_of(&self, node: NodeId) -> Option<CellId> {
        self.nodes.get(&node).map(|m| m.leaf)
    }

    /// A cell by id.
    pub fn cell(&self, id: CellId) -> Option<&Cell> {
        self.cells.get(&id)
    }

    /// Every cell, ascending by id.
    pub fn cells(&self) -> impl Iterator<Item = (CellId, &Cell)> + '_ {
        self.cells.iter().map(|(&id, c)| (id, c))
    }

    /// Leaf cells, ascending by id.
    pub fn leaves(&self) -> impl Iterator<Item = (CellId, &Cell)> + '_ {
        self.cells.iter().filter(|(_, c)| c.is_leaf()).map(|(&id, c)| (id, c))
    }

    /// Registered services, ascending by id.
    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> + '_ {
        self.services.values().map(|s| &s.spec)
    }

    /// The subtree a service is confined to.
    pub fn scope_of(&self, service: ServiceId) -> Option<CellId> {
        self.services.get(&service).map(|s| s.scope)
    }

    /// Slots each node manages for `service` (nodes with none are absent).
    pub fn slot_counts(&self, service: ServiceId) -> BTreeMap<NodeId, u32> {
        let mut counts = BTreeMap::new();
        if let Some(state) = self.services.get(&service) {
            for &node in &state.owners {
                *counts.entry(node).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The immutable lookup table for this configuration, tagged with `epoch`.
    pub fn snapshot(&self, epoch: Epoch) -> Result<Snapshot> {
        if self.nodes.is_empty() {
            return Err(LocatorError::EmptyCluster);
        }
        let holders = self.replica_holders().into_iter();
        let paths = self.labelled_paths().into_iter();
        let members = (self.nodes.iter().zip(holders).zip(paths))
            .map(|(((&id, m), (_, h)), (_, path))| (id, m.leaf, h, path.into_boxed_slice()));
        Ok(Snapshot::build(epoch, members, self.services.values()))
    }

    /// Whether `cell` is `ancestor` or lies below it.
    pub(crate) fn is_within(&self, cell: CellId, ancestor: CellId) -> bool {
        is_within(&self.cells, cell, ancestor)
    }

    /// Leaf cells in the subtree of `top`, in depth-first order.
    pub(crate) fn leaves_under(&self, top: CellId) -> Vec<CellId> {
        let mut out = Vec::new();
        let mut stack = vec![top];
        while let Some(id) = stack.pop() {
            match &self.cells[&id].kind {
                CellKind::Leaf(_) => out.push(id),
                CellKind::Inner(children) => stack.extend(children.iter().rev()),
            }
        }
        out
    }

    /// Number of nodes in the subtree of `top`.
    pub(crate) fn nodes_under(&self, top: CellId) -> usize {
        self.leaves_under(top).iter().map(|l| self.cells[l].members().len()).sum()
    }

    /// The slots each member of `leaf` manages for one service, ascending.
    pub(crate) fn holdings(&self, state: &ServiceState, leaf: CellId) -> Vec<Holding> {
        let members = self.cells[&leaf].members();
        let mut holdings: Vec<Holding> =
            members.iter().map(|&node| Holding { node, slots: Vec::new() }).collect();
        // Runs of slots share an owner: one search a run, not one a slot.
        let mut slot = 0u32;
        for run in state.owners.chunk_by(|a, b| a == b) {
            let end = slot + run.len() as u32;
            if let Ok(i) = members.binary_search(&run[0]) {
                holdings[i].slots.extend(slot..end);
            }
            slot = end;
        }
        holdings
    }

    /// Load of every leaf cell as `(weighted slots, members)`: slots of every service in scope,
    /// each service scaled to the same total so that none dominates.
    pub(crate) fn leaf_loads(&self) -> BTreeMap<CellId, (u64, u64)> {
        let mut per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
        for state in self.services.values() {
            let weight = state.spec.weight();
            // A map update a run of slots with one owner, not one a slot: every node plans
            // every change, over 65,536 slots a service (`cargo bench -p gobelins-locator --
            // epoch`: a node added, 3.12 ms before, 0.67 ms with this and `holdings`'s runs).
            for run in state.owners.chunk_by(|a, b| a == b) {
                *per_node.entry(run[0]).or_insert(0) += weight * run.len() as u64;
            }
        }
        self.leaves()
            .map(|(id, cell)| {
                let mass =
                    cell.members().iter().map(|n| per_node.get(n).copied().unwrap_or(0)).sum();
                (id, (mass, cell.members().len() as u64))
            })
            .collect()
    }

    /// Draws the tree for an operator: one line a cell, members with their slot counts.
    pub fn render(&self) -> String {
        let mut per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
        for state in self.services.values() {
            for owner in &state.owners {
                *per_node.entry(*owner).or_insert(0) += 1;
            }
        }
        let mut out = String::new();
        self.render_cell(ROOT, "", true, &per_node, &mut out);
        out
    }

    fn render_cell(
        &self,
        id: CellId,
        prefix: &str,
        last: bool,
        per_node: &BTreeMap<NodeId, u64>,
        out: &mut String,
    ) {
        let cell = &self.cells[&id];
        let (branch, indent) = match cell.parent {
            None => ("", String::new()),
            Some(_) if last => ("└─ ", format!("{prefix}   ")),
            Some(_) => ("├─ ", format!("{prefix}│  ")),
        };
        let name = match &cell.label {
            Some((k, v)) => format!("{id} {k}={v}"),
            None if id == ROOT => format!("{id} root ({} nodes)", self.nodes.len()),
            None => id.to_string(),
        };
        let _ = write!(out, "{prefix}{branch}{name}");
        match &cell.kind {
            CellKind::Leaf(members) => {
                let list: Vec<String> = members
                    .iter()
                    .map(|n| format!("{n}:{}", per_node.get(n).copied().unwrap_or(0)))
                    .collect();
                let _ = writeln!(out, " [{}]", list.join(" "));
            }
            CellKind::Inner(children) => {
                let _ = writeln!(out);
                for (i, &child) in children.iter().enumerate() {
                    self.render_cell(child, &indent, i + 1 == children.len(), per_node, out);
                }
            }
        }
    }
}

/// Whether `cell` is `ancestor` or lies below it. A free function so that it can run while
/// another part of the tree is borrowed mutably.
pub(crate) fn is_within(
    cells: &BTreeMap<CellId, Cell>,
    mut cell: CellId,
    ancestor: CellId,
) -> bool {
    loop {
        if cell == ancestor {
            return true;
        }
        match cells.get(&cell).and_then(|c| c.parent) {
            Some(parent) => cell = parent,
            None => return false,
        }
    }
}
