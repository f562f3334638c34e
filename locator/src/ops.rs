//! The changes themselves: register, add, evict or fail, rebalance.
//!
//! Every change works on a copy of the tree and replaces the tree only on success, so an error
//! leaves the configuration exactly as it was.

use crate::balance::{deposit, withdraw};
use crate::cell::{Cell, CellKind};
use crate::change::{Change, ChangeReport};
use crate::config::Labels;
use crate::error::{LocatorError, Result};
use crate::hash::mix;
use crate::ids::{CellId, NodeId, ServiceId};
use crate::service::{ServiceSize, ServiceSpec};
use crate::tree::{is_within, CellTree, Member, ServiceState, ROOT};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

impl CellTree {
    /// Applies one change. On error the tree is unchanged.
    pub fn apply(&mut self, change: &Change) -> Result<ChangeReport> {
        let mut next = self.clone();
        let mut report = match change {
            Change::Register(spec) => next.register(spec.clone())?,
            Change::Add { node, labels } => next.add(*node, labels)?,
            Change::Evict(node) | Change::Fail(node) => next.remove(*node)?,
            Change::Rebalance { max_over_avg_permille } => next.rebalance(*max_over_avg_permille),
            Change::Recover(_) => ChangeReport::default(),
        };
        // A node whose replica holder (`CellTree::replica_holder`) changes takes part, to copy
        // its entries to the new one, and so does the new one, which then vouches for them.
        // Left out, a node alone in its cell whose next node in the table left, or one whose
        // cell split or merged, never copied them, and its failure then lost them. A joiner's
        // holder is new too: one in another cell or zone, no part of the join, could not vouch
        // for the joiner's slots, and they were reported lost with it.
        //
        // And the holder, as the change begins, of each node the change may move something of
        // (the participants, whose slots may move, and the nodes whose holder moves: a superset
        // of `MigrationPlan::touched`, which needs the tables) takes part too. Should that node
        // die during the change, before it copies its entries to its holder after it, the
        // holder before holds them as they were when the change began, and vouches for them
        // (kvdir's "backup before"): it needs the table the change began from, which a node
        // learns by taking part. One hop, not more: a holder tells whether its copy of a
        // failed node is current from the changes that moved something of that node's, which
        // the cluster records (`ChangeInfo::failed_moved_in`), not from those it took part in
        // itself. A new holder, which takes part to receive copies, moves nothing of its own.
        let moves_holders =
            matches!(change, Change::Add { .. } | Change::Evict(_) | Change::Fail(_));
        if moves_holders || !report.participants.is_empty() {
            let before: BTreeMap<NodeId, Option<NodeId>> =
                self.replica_holders().into_iter().collect();
            let mut touched = report.participants.clone();
            let mut new_holders = BTreeSet::new();
            if moves_holders {
                for (node, holder) in next.replica_holders() {
                    if before.get(&node) != Some(&holder) {
                        touched.insert(node);
                        new_holders.extend(holder);
                    }
                }
            }
            let held_by = (touched.iter()).filter_map(|n| before.get(n).copied().flatten());
            let held_by: Vec<NodeId> = held_by.collect();
            report.participants.extend(touched.into_iter().chain(new_holders).chain(held_by));
        }
        *self = next;
        Ok(report)
    }

    /// Where `node` keeps what it replicates. A service that keeps one replica per entry
    /// (kvdir) keeps it there; a change that moves it takes part `node` and the new holder
    /// (see [`CellTree::apply`]). `None` for a node alone in the cluster.
    ///
    /// Under label levels, in another failure domain: the first labelled subtree above the
    /// node, from the top, with nodes outside it (under the same parent) gives the candidates,
    /// so a node of `zone=a` keeps its replicas in another zone, or, all nodes in one zone,
    /// in another rack of it. A whole zone cut off then takes no entry's every copy with it.
    /// Among the candidates, the one that ranks `node` highest, unless it holds for
    /// [`HOLDER_CAP`] nodes already (see [`CellTree::replica_holders`]): a join or a removal
    /// moves few holders besides those it must. A zone of few nodes holds the replicas of the
    /// other zones' many, as keeping a copy outside each zone requires.
    ///
    /// Without labels, or all nodes in one labelled subtree: the next node of its leaf cell,
    /// wrapping round, or, alone in its cell, the next node of the whole table.
    pub fn replica_holder(&self, node: NodeId) -> Option<NodeId> {
        let leaf = self.nodes.get(&node)?.leaf;
        if self.labelled_path(leaf).is_empty() {
            return self.unlabelled_holder(node, leaf);
        }
        self.replica_holders().into_iter().find(|(n, _)| *n == node).and_then(|(_, h)| h)
    }

    /// Every member's [`CellTree::replica_holder`], ascending by node.
    ///
    /// Choices in another failure domain are made in node order, each the candidate that
    /// ranks the node highest among those that hold for fewer than [`HOLDER_CAP`] nodes
    /// already (any candidate, when all do). Ranked alone, 9 nodes in 3 zones put 4 nodes'
    /// replicas on one of them and none on 4 others: that node held 4 times its share.
    pub fn replica_holders(&self) -> Vec<(NodeId, Option<NodeId>)> {
        let paths = self.labelled_paths();
        // How many nodes keep their replicas on each, in the order of `paths`.
        let mut load = vec![0u32; paths.len()];
        let mut holders = Vec::with_capacity(paths.len());
        for (node, path) in &paths {
            let holder = match candidates(path, &paths) {
                Some(candidates) => {
                    // The best ranked with room, else the best.
                    let (mut best, mut best_free) = (None, None);
                    let mixed = mix(node.0);
                    for (at, c) in candidates {
                        let rank = (holder_rank(mixed, c), c, at);
                        best = best.max(Some(rank));
                        if load[at] < HOLDER_CAP {
                            best_free = best_free.max(Some(rank));
                        }
                    }
                    best_free.or(best).map(|(_, c, at)| {
                        load[at] += 1;
                        c
                    })
                }
                None => self.unlabelled_holder(*node, self.nodes[node].leaf),
            };
            holders.push((*node, holder));
        }
        holders
    }

    /// Each member with its `labelled_path`, ascending by node.
    pub(crate) fn labelled_paths(&self) -> Vec<(NodeId, Vec<CellId>)> {
        self.nodes.iter().map(|(&n, m)| (n, self.labelled_path(m.leaf))).collect()
    }

    /// The holder without another failure domain to choose from: the next node of `leaf`,
    /// wrapping round, or, `node` alone in it, the next node of the table.
    fn unlabelled_holder(&self, node: NodeId, leaf: CellId) -> Option<NodeId> {
        let mates = || self.cells[&leaf].members().iter().copied().filter(|&m| m != node);
        if let Some(holder) = mates().filter(|&m| m > node).min().or_else(|| mates().min()) {
            return Some(holder);
        }
        let after = self.nodes.range(node..).map(|(&n, _)| n).find(|&n| n != node);
        after.or_else(|| self.nodes.keys().next().copied()).filter(|&n| n != node)
    }

    /// The labelled cells above `leaf` (itself included), from the top.
    fn labelled_path(&self, leaf: CellId) -> Vec<CellId> {
        let mut path = Vec::new();
        let mut at = Some(leaf);
        while let Some(id) = at {
            let cell = &self.cells[&id];
            if cell.label.is_some() {
                path.push(id);
            }
            at = cell.parent;
        }
        path.reverse();
        path
    }

    /// Registers a service (see [`Change::Register`]).
    pub fn register_service(&mut self, spec: ServiceSpec) -> Result<ChangeReport> {
        self.apply(&Change::Register(spec))
    }

    /// Adds a node (see [`Change::Add`]).
    pub fn add_node(&mut self, node: NodeId, labels: Labels) -> Result<ChangeReport> {
        self.apply(&Change::Add { node, labels })
    }

    /// Evicts a live node (see [`Change::Evict`]).
    pub fn evict_node(&mut self, node: NodeId) -> Result<ChangeReport> {
        self.apply(&Change::Evict(node))
    }

    /// Removes a failed node (see [`Change::Fail`]).
    pub fn fail_node(&mut self, node: NodeId) -> Result<ChangeReport> {
        self.apply(&Change::Fail(node))
    }

    fn register(&mut self, spec: ServiceSpec) -> Result<ChangeReport> {
        spec.validate()?;
        if self.services.contains_key(&spec.id) {
            return Err(LocatorError::DuplicateService(spec.id));
        }
        let scope = match spec.size {
            ServiceSize::Whole => ROOT,
            ServiceSize::Nodes(n) => self.pick_scope(n as usize),
        };
        // A new service has no entries yet, so its slots may be dealt out freely: in equal
        // contiguous shares, which keeps every cell within one slot.
        let members: Vec<NodeId> = self
            .leaves_under(scope)
            .into_iter()
            .flat_map(|leaf| self.cells[&leaf].members().to_vec())
            .collect();
        let slots = spec.slots as usize;
        let owners = if members.is_empty() {
            Vec::new()
        } else {
            (0..slots).map(|s| members[s * members.len() / slots]).collect()
        };
        self.services.insert(spec.id, ServiceState { spec, scope, owners });
        Ok(ChangeReport::default())
    }

    /// The smallest subtree with at least `nodes` nodes, preferring one that hosts fewer
    /// confined services; the whole tree if none is large enough.
    fn pick_scope(&self, nodes: usize) -> CellId {
        let mut hosted: BTreeMap<CellId, usize> = BTreeMap::new();
        for state in self.services.values() {
            *hosted.entry(state.scope).or_insert(0) += 1;
        }
        self.cells
            .keys()
            .map(|&id| (id, self.nodes_under(id)))
            .filter(|&(_, n)| n >= nodes && n > 0)
            .min_by_key(|&(id, n)| (n, hosted.get(&id).copied().unwrap_or(0), id))
            .map_or(ROOT, |(id, _)| id)
    }

    fn add(&mut self, node: NodeId, labels: &Labels) -> Result<ChangeReport> {
        if self.nodes.contains_key(&node) {
            return Err(LocatorError::DuplicateNode(node));
        }
        let path = self.config.label_path(labels)?;
        let mut anchor = ROOT;
        let mut depth = 0;
        while let Some(child) = path.get(depth).and_then(|label| self.label_child(anchor, label)) {
            anchor = child;
            depth += 1;
        }

        if self.nodes.is_empty() {
            let parent = self.make_label_cells(anchor, &path[depth..]);
            let leaf = self.new_leaf(parent);
            self.join_leaf(leaf, node, labels);
            for state in self.services.values_mut() {
                state.owners = vec![node; state.spec.slots as usize];
            }
            return Ok(ChangeReport { cells: vec![leaf], participants: BTreeSet::from([node]) });
        }

        let loads = self.leaf_loads();
        let donor = self
            .leaves_under(anchor)
            .into_iter()
            .max_by(|a, b| by_load(&loads, *a, *b).then(b.cmp(a)))
            .ok_or(LocatorError::EmptyCluster)?;
        let (donor, target) = if depth < path.len() {
            // A new label value: the node opens its own subtree and takes its share from the
            // most loaded cell of the nearest existing one.
            let parent = self.make_label_cells(anchor, &path[depth..]);
            (donor, self.new_leaf(parent))
        } else if self.cells[&donor].members().len() < self.config.cell_capacity as usize {
            (donor, donor)
        } else if self.cells[&donor].members().len() >= 2 {
            let (a, b) = self.split(donor);
            let loads = self.leaf_loads();
            let half = if by_load(&loads, b, a) == Ordering::Greater { b } else { a };
            (half, half)
        } else {
            // Cells of one node cannot split: the newcomer gets a sibling cell.
            let parent = self.cells[&donor].parent.unwrap_or(ROOT);
            (donor, self.new_leaf(parent))
        };

        let ids: Vec<ServiceId> = self.services.keys().copied().collect();
        for id in ids {
            let state = &self.services[&id];
            if !self.is_within(donor, state.scope) || !self.is_within(target, state.scope) {
                continue;
            }
            let mut holdings = self.holdings(state, donor);
            let mass: usize = holdings.iter().map(|h| h.slots.len()).sum();
            let quota = mass / (holdings.len() + 1);
            if quota == 0 && state.spec.size == ServiceSize::Whole {
                return Err(LocatorError::NoRoom {
                    node,
                    cell: donor,
                    service: id,
                    slots: mass as u32,
                    members: holdings.len() as u32,
                });
            }
            let taken = withdraw(&mut holdings, quota);
            let owners = &mut self.services.get_mut(&id).expect("service listed above").owners;
            for slot in taken {
                owners[slot as usize] = node;
            }
        }
        self.join_leaf(target, node, labels);

        let mut participants: BTreeSet<NodeId> =
            self.cells[&donor].members().iter().copied().collect();
        participants.extend(self.cells[&target].members());
        let mut cells = vec![donor];
        if target != donor {
            cells.push(target);
        }
        Ok(ChangeReport { cells, participants })
    }

    fn remove(&mut self, node: NodeId) -> Result<ChangeReport> {
        let leaf = self.nodes.get(&node).ok_or(LocatorError::UnknownNode(node))?.leaf;
        if self.nodes.len() == 1 {
            return Err(LocatorError::LastNode(node));
        }
        self.nodes.remove(&node);
        if let CellKind::Leaf(members) = &mut self.cells.get_mut(&leaf).expect("member's leaf").kind
        {
            members.retain(|&m| m != node);
        }

        let recipient =
            if self.cells[&leaf].members().is_empty() { self.drop_empty_leaf(leaf) } else { leaf };

        let ids: Vec<ServiceId> = self.services.keys().copied().collect();
        for id in ids {
            let state = &self.services[&id];
            if !self.is_within(recipient, state.scope) {
                continue;
            }
            let incoming: Vec<u32> = state
                .owners
                .iter()
                .enumerate()
                .filter(|(_, &owner)| owner == node)
                .map(|(slot, _)| slot as u32)
                .collect();
            if incoming.is_empty() {
                continue;
            }
            let given = deposit(&self.holdings(state, recipient), &incoming);
            let owners = &mut self.services.get_mut(&id).expect("service listed above").owners;
            for (to, slot) in given {
                owners[slot as usize] = to;
            }
        }

        let members = self.cells[&recipient].members().to_vec();
        let mut participants: BTreeSet<NodeId> = members.iter().copied().collect();
        participants.insert(node);
        self.merge_with_sibling(recipient);
        self.collapse_single_children();
        // Merging or collapsing may have renamed the recipient: report the cell it lives on in.
        let survivor = members.first().map_or(recipient, |m| self.nodes[m].leaf);
        Ok(ChangeReport { cells: vec![survivor], participants })
    }

    /// Replaces every split cell left with a single child by that child, so that add and evict
    /// at capacity cannot deepen the tree without bound. Labelled cells stay: they stand for a
    /// label, however many children they have.
    fn collapse_single_children(&mut self) {
        loop {
            let lone = self
                .cells
                .iter()
                .find(|(&id, c)| id != ROOT && c.label.is_none() && c.children().len() == 1)
                .map(|(&id, c)| (id, c.children()[0]));
            let Some((cell, child)) = lone else { return };
            let Some(Cell { kind, .. }) = self.cells.remove(&child) else { return };
            match &kind {
                CellKind::Leaf(members) => {
                    for member in members {
                        self.nodes.get_mut(member).expect("member").leaf = cell;
                    }
                }
                CellKind::Inner(children) => {
                    for grandchild in children {
                        self.cells.get_mut(grandchild).expect("child").parent = Some(cell);
                    }
                }
            }
            self.cells.get_mut(&cell).expect("cell").kind = kind;
            for state in self.services.values_mut() {
                if state.scope == child {
                    state.scope = cell;
                }
            }
        }
    }

    /// Merges `leaf` with a sibling leaf when both fit in one cell and no slot has to move for
    /// it: every service's counts are already within one over the two, and no service is
    /// confined to just one of them. Small cells are the ones a removal burdens most, so merging
    /// them for free keeps later removals cheap.
    fn merge_with_sibling(&mut self, leaf: CellId) {
        let Some(parent) = self.cells[&leaf].parent else { return };
        let capacity = self.config.cell_capacity as usize;
        let size = self.cells[&leaf].members().len();
        let sibling = self.cells[&parent].children().iter().copied().find(|&s| {
            s != leaf
                && self.cells[&s].is_leaf()
                && size + self.cells[&s].members().len() <= capacity
                && self.merges_for_free(leaf, s)
        });
        let Some(sibling) = sibling else { return };
        let Some(Cell { kind: CellKind::Leaf(moving), .. }) = self.cells.remove(&sibling) else {
            return;
        };
        if let CellKind::Inner(children) = &mut self.cells.get_mut(&parent).expect("parent").kind {
            children.retain(|&c| c != sibling);
        }
        for &node in &moving {
            self.nodes.get_mut(&node).expect("member").leaf = leaf;
        }
        if let CellKind::Leaf(members) = &mut self.cells.get_mut(&leaf).expect("leaf").kind {
            members.extend(moving);
            members.sort_unstable();
        }
    }

    fn merges_for_free(&self, a: CellId, b: CellId) -> bool {
        self.services.values().all(|state| {
            if state.scope == a || state.scope == b {
                return false;
            }
            let counts = self
                .holdings(state, a)
                .into_iter()
                .chain(self.holdings(state, b))
                .map(|h| h.slots.len());
            let (lo, hi) = counts.fold((usize::MAX, 0), |(lo, hi), c| (lo.min(c), hi.max(c)));
            hi <= lo + 1
        })
    }

    /// Removes a leaf that lost its last node and returns the leaf that takes over its slots: the
    /// least loaded leaf of the nearest ancestor that still holds nodes. Services confined to the
    /// subtree that emptied widen to that ancestor.
    fn drop_empty_leaf(&mut self, leaf: CellId) -> CellId {
        let loads = self.leaf_loads();
        let mut ancestor = self.cells[&leaf].parent.unwrap_or(ROOT);
        let recipient = loop {
            let best = self
                .leaves_under(ancestor)
                .into_iter()
                .filter(|l| *l != leaf)
                .min_by(|a, b| by_load(&loads, *a, *b).then(a.cmp(b)));
            match (best, self.cells[&ancestor].parent) {
                (Some(best), _) => break best,
                (None, Some(parent)) => ancestor = parent,
                // Unreachable while another node exists, which `remove` checked.
                (None, None) => break leaf,
            }
        };
        for state in self.services.values_mut() {
            if state.scope != ancestor
                && is_within(&self.cells, leaf, state.scope)
                && is_within(&self.cells, state.scope, ancestor)
            {
                state.scope = ancestor;
            }
        }
        // Prune the leaf and every ancestor it leaves empty, up to the one that took over.
        let mut gone = leaf;
        while gone != ancestor && gone != ROOT {
            let parent = self.cells[&gone].parent.unwrap_or(ROOT);
            self.cells.remove(&gone);
            if let CellKind::Inner(children) =
                &mut self.cells.get_mut(&parent).expect("parent").kind
            {
                children.retain(|&c| c != gone);
                if !children.is_empty() {
                    break;
                }
            }
            gone = parent;
        }
        recipient
    }

    fn rebalance(&mut self, max_over_avg_permille: u32) -> ChangeReport {
        let loads = self.leaf_loads();
        let (mass, nodes) = loads
            .values()
            .fold((0u128, 0u128), |(m, n), &(lm, ln)| (m + u128::from(lm), n + u128::from(ln)));
        let hot = loads.keys().copied().max_by(|a, b| by_load(&loads, *a, *b).then(b.cmp(a)));
        let cold = loads.keys().copied().min_by(|a, b| by_load(&loads, *a, *b).then(a.cmp(b)));
        let (Some(hot), Some(cold)) = (hot, cold) else { return ChangeReport::default() };
        let (hot_mass, hot_nodes) = loads[&hot];
        let over = u128::from(hot_mass) * 1000 * nodes
            > u128::from(max_over_avg_permille) * mass * u128::from(hot_nodes);
        if hot == cold || !over {
            return ChangeReport::default();
        }

        // Kept to undo a move that would not lower the hottest load: moving the one slot of a
        // tiny service back and forth would otherwise start a new epoch forever.
        let before: BTreeMap<ServiceId, Vec<NodeId>> =
            self.services.iter().map(|(&id, state)| (id, state.owners.clone())).collect();
        let ids: Vec<ServiceId> = self.services.keys().copied().collect();
        for id in ids {
            let state = &self.services[&id];
            if !self.is_within(hot, state.scope) || !self.is_within(cold, state.scope) {
                continue;
            }
            let mut from = self.holdings(state, hot);
            let to = self.holdings(state, cold);
            let (from_mass, to_mass): (usize, usize) =
                (from.iter().map(|h| h.slots.len()).sum(), to.iter().map(|h| h.slots.len()).sum());
            let keep = (from_mass + to_mass) * from.len() / (from.len() + to.len());
            let taken = withdraw(&mut from, from_mass.saturating_sub(keep));
            let given = deposit(&to, &taken);
            let owners = &mut self.services.get_mut(&id).expect("service listed above").owners;
            for (node, slot) in given {
                owners[slot as usize] = node;
            }
        }
        let after = self.leaf_loads();
        let improved = by_load_against(&after, hot, hot_mass, hot_nodes) == Ordering::Less
            && by_load_against(&after, cold, hot_mass, hot_nodes) == Ordering::Less;
        if !improved {
            for (id, owners) in before {
                if let Some(state) = self.services.get_mut(&id) {
                    state.owners = owners;
                }
            }
            return ChangeReport::default();
        }
        let participants =
            self.cells[&hot].members().iter().chain(self.cells[&cold].members()).copied().collect();
        ChangeReport { cells: vec![hot, cold], participants }
    }

    fn label_child(&self, parent: CellId, label: &(String, String)) -> Option<CellId> {
        self.cells[&parent]
            .children()
            .iter()
            .copied()
            .find(|c| self.cells[c].label.as_ref() == Some(label))
    }

    fn make_label_cells(&mut self, mut parent: CellId, path: &[(String, String)]) -> CellId {
        for label in path {
            parent = self.push_cell(parent, Some(label.clone()), CellKind::Inner(Vec::new()));
        }
        parent
    }

    fn new_leaf(&mut self, parent: CellId) -> CellId {
        self.push_cell(parent, None, CellKind::Leaf(Vec::new()))
    }

    fn push_cell(
        &mut self,
        parent: CellId,
        label: Option<(String, String)>,
        kind: CellKind,
    ) -> CellId {
        let id = CellId(self.next_cell);
        self.next_cell += 1;
        self.cells.insert(id, Cell { parent: Some(parent), label, kind });
        if let CellKind::Inner(children) = &mut self.cells.get_mut(&parent).expect("parent").kind {
            children.push(id);
        }
        id
    }

    fn join_leaf(&mut self, leaf: CellId, node: NodeId, labels: &Labels) {
        if let CellKind::Leaf(members) = &mut self.cells.get_mut(&leaf).expect("leaf").kind {
            let at = members.binary_search(&node).unwrap_or_else(|at| at);
            members.insert(at, node);
        }
        self.nodes.insert(node, Member { leaf, labels: labels.clone() });
    }

    /// Splits a full leaf into two halves under it. Nothing moves: each half keeps the slots its
    /// members already manage, and the leaf's id now names the pair, so scopes stay valid.
    fn split(&mut self, leaf: CellId) -> (CellId, CellId) {
        let mut first = self.cells[&leaf].members().to_vec();
        let second = first.split_off(first.len() - first.len() / 2);
        self.cells.get_mut(&leaf).expect("leaf").kind = CellKind::Inner(Vec::new());
        let (a, b) = (self.new_leaf(leaf), self.new_leaf(leaf));
        for (half, members) in [(a, first), (b, second)] {
            for &node in &members {
                self.nodes.get_mut(&node).expect("member").leaf = half;
            }
            self.cells.get_mut(&half).expect("half").kind = CellKind::Leaf(members);
        }
        (a, b)
    }
}

/// Compares a leaf's load per node with `mass / nodes`.
fn by_load_against(
    loads: &BTreeMap<CellId, (u64, u64)>,
    cell: CellId,
    mass: u64,
    nodes: u64,
) -> Ordering {
    let (m, n) = loads.get(&cell).copied().unwrap_or((0, 0));
    (u128::from(m) * u128::from(nodes)).cmp(&(u128::from(mass) * u128::from(n)))
}

/// Orders two leaves by load per node, then prefers the one with fewer members as "more loaded"
/// (a newcomer is better placed in the smaller cell).
fn by_load(loads: &BTreeMap<CellId, (u64, u64)>, a: CellId, b: CellId) -> Ordering {
    let (am, an) = loads.get(&a).copied().unwrap_or((0, 0));
    let (bm, bn) = loads.get(&b).copied().unwrap_or((0, 0));
    (u128::from(am) * u128::from(bn)).cmp(&(u128::from(bm) * u128::from(an))).then(bn.cmp(&an))
}

/// Most nodes one node holds replicas for, while another candidate has room: twice the
/// average (each node keeps its replicas on one other).
pub const HOLDER_CAP: u32 = 2;

/// The nodes of the first failure domain, from the top of a node's labelled `path`, with
/// members outside it: those under the same parent cell and under another labelled cell at
/// that depth. A labelled cell's parent is labelled or the root (`add` makes label cells under
/// label cells), so a node lies under the `depth`-th cell of `path` exactly when its own path
/// has that cell there. A node whose path stops above that depth (its leaf sits right under
/// the parent) is no candidate: it may share the rack, as `Snapshot::apart_at` also says.
/// `None` when no member is apart from the node at any depth.
fn candidates<'a>(
    path: &'a [CellId],
    paths: &'a [(NodeId, Vec<CellId>)],
) -> Option<impl Iterator<Item = (usize, NodeId)> + 'a> {
    let outside = move |depth: usize| {
        let under = move |(_, (_, p)): &(usize, &(NodeId, Vec<CellId>))| {
            p.len() > depth && p[..depth] == path[..depth] && p[depth] != path[depth]
        };
        paths.iter().enumerate().filter(under).map(|(at, (n, _))| (at, *n))
    };
    let depth = (0..path.len()).find(|&depth| outside(depth).next().is_some())?;
    Some(outside(depth))
}

/// How much a node (its id through [`mix`]: `mixed`) wants `candidate` to hold its replicas
/// (highest-random-weight): fixed, so every node picks the same holder, and independent for
/// each pair, so a candidate added or removed takes or gives back only the nodes that rank it
/// first, and those [`HOLDER_CAP`] turns away from it or back to it.
fn holder_rank(mixed: u64, candidate: NodeId) -> u64 {
    mix(mixed ^ candidate.0)
}
