//! The immutable per-epoch lookup table, and the cell that swaps it atomically.
//!
//! ```text
//!   supervisor thread                      request threads (many)
//!   tree.snapshot(e+1) ──install──▶ SnapshotCell ──load()──▶ snapshot.locate(service, key)
//!                                   (one atomic pointer)     = hash + mask + index
//! ```

use crate::error::{LocatorError, Result};
use crate::hash::mix;
use crate::ids::{CellId, Epoch, Key, NodeId, ServiceId};
use crate::service::{Placement, ServiceSpec};
use crate::tree::ServiceState;
use arc_swap::{ArcSwap, Cache, Guard};
use std::sync::Arc;

/// One service's flat `slot → manager` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTable {
    spec: ServiceSpec,
    mask: u64,
    /// 0 for hashed keys; otherwise log2 of the run length.
    shift: u32,
    hashed: bool,
    /// Each slot's manager, as its place in `managers`.
    slots: Slots,
    /// The service's managers, ascending.
    managers: Box<[NodeId]>,
}

/// Each slot's manager as a small number rather than a node id: one byte a slot while a
/// service has at most 256 managers, four beyond. Every request looks its key up (at its
/// sender, and again at its manager), and a DSM's 4,096 slots took 32 KiB as ids, which the
/// program's own data pushed out of the cache between requests: under MGS, a third of the
/// samples in the sender's request function fell on that one load.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slots {
    Narrow(Box<[u8]>),
    Wide(Box<[u32]>),
}

/// The nodes of `owners`, ascending, once each. Every node builds each epoch's tables, up to
/// three times a change: with a copy and a sort of each table's 65,536 owners, for a handful
/// of distinct nodes, a build took 1.44 ms; without, 0.36 ms (`cargo bench -p
/// gobelins-locator -- epoch`).
fn distinct(owners: &[NodeId]) -> Box<[NodeId]> {
    let mut out: Vec<NodeId> = Vec::new();
    let mut last = None;
    for &owner in owners {
        if last != Some(owner) {
            if let Err(at) = out.binary_search(&owner) {
                out.insert(at, owner);
            }
            last = Some(owner);
        }
    }
    out.into_boxed_slice()
}

impl ServiceTable {
    fn new(state: &ServiceState) -> Self {
        let (hashed, shift) = match state.spec.placement {
            Placement::Hashed => (true, 0),
            Placement::Runs { run } => (false, run.trailing_zeros()),
        };
        let managers = distinct(&state.owners);
        // Neighbouring slots mostly share a manager: the last one found is asked first.
        let mut last = None;
        let mut place = |owner: &NodeId| match last {
            Some((seen, at)) if seen == *owner => at,
            _ => {
                let at = managers.binary_search(owner).expect("a manager of a slot");
                last = Some((*owner, at));
                at
            }
        };
        let slots = if managers.len() <= 1 << u8::BITS {
            Slots::Narrow(state.owners.iter().map(|o| place(o) as u8).collect())
        } else {
            // At most one manager per slot, and slots are at most `MAX_SLOTS`.
            Slots::Wide(state.owners.iter().map(|o| place(o) as u32).collect())
        };
        ServiceTable {
            spec: state.spec.clone(),
            mask: u64::from(state.spec.slots - 1),
            shift,
            hashed,
            slots,
            managers,
        }
    }

    /// The slot `key` falls in.
    #[inline(always)]
    pub fn slot_of(&self, key: Key) -> u32 {
        let spread = if self.hashed { mix(key.0) } else { key.0 >> self.shift };
        (spread & self.mask) as u32
    }

    /// The manager of `key`: a hash, a mask and two indexes.
    #[inline(always)]
    pub fn locate(&self, key: Key) -> NodeId {
        let slot = self.slot_of(key) as usize;
        let place = match &self.slots {
            Slots::Narrow(places) => usize::from(places[slot]),
            Slots::Wide(places) => places[slot] as usize,
        };
        self.managers[place]
    }

    /// The manager of `slot`.
    pub fn owner(&self, slot: u32) -> Option<NodeId> {
        let slot = slot as usize;
        let place = match &self.slots {
            Slots::Narrow(places) => usize::from(*places.get(slot)?),
            Slots::Wide(places) => *places.get(slot)? as usize,
        };
        Some(self.managers[place])
    }

    /// Every slot's manager, in slot order.
    pub fn owners(&self) -> impl ExactSizeIterator<Item = NodeId> + '_ {
        (0..self.spec.slots).map(|slot| self.owner(slot).expect("a slot of the table"))
    }

    /// The declaration this table was built from.
    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }
}

/// Where every entry of every service lives in one epoch. Immutable: a new epoch gets a new
/// snapshot, so readers never see a half-installed configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    epoch: Epoch,
    nodes: Vec<NodeId>,
    /// The leaf cell of each node, in the order of `nodes`.
    leaves: Vec<CellId>,
    /// Where each node keeps its replicas, in the order of `nodes`: the tree's
    /// [`crate::CellTree::replica_holder`], which needs the labels to compute.
    holders: Vec<Option<NodeId>>,
    /// The labelled cells above each node, from the top, in the order of `nodes`: its failure
    /// domains, for [`Snapshot::apart_at`].
    domains: Vec<Box<[CellId]>>,
    /// Indexed by service id; `None` where no service has that id.
    tables: Vec<Option<ServiceTable>>,
}

impl Snapshot {
    /// `members`: every node with its leaf cell, replica holder and labelled cells (from the
    /// top), ascending by node.
    pub(crate) fn build<'a>(
        epoch: Epoch,
        members: impl Iterator<Item = (NodeId, CellId, Option<NodeId>, Box<[CellId]>)>,
        services: impl Iterator<Item = &'a ServiceState>,
    ) -> Snapshot {
        let (mut nodes, mut leaves, mut holders, mut domains) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (node, leaf, holder, path) in members {
            nodes.push(node);
            leaves.push(leaf);
            holders.push(holder);
            domains.push(path);
        }
        let mut tables: Vec<Option<ServiceTable>> = Vec::new();
        for state in services.filter(|s| !s.owners.is_empty()) {
            let at = usize::from(state.spec.id.0);
            if tables.len() <= at {
                tables.resize(at + 1, None);
            }
            tables[at] = Some(ServiceTable::new(state));
        }
        Snapshot { epoch, nodes, leaves, holders, domains, tables }
    }

    /// The epoch this snapshot belongs to.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The member nodes, ascending.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The nodes of `node`'s leaf cell, itself included, ascending; none if it is not a
    /// member. A change takes part every node of the cells it touches, so what a node keeps
    /// on its cell mates (a replica, say) is looked after in every change that moves them.
    pub fn cell_mates(&self, node: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let leaf = self.nodes.binary_search(&node).ok().map(|at| self.leaves[at]);
        self.nodes.iter().zip(&self.leaves).filter(move |(_, l)| Some(**l) == leaf).map(|(n, _)| *n)
    }

    /// Where `node` keeps what it replicates, as [`crate::CellTree::replica_holder`] says: in
    /// another zone under label levels, else the next node of its leaf cell, or, alone in its
    /// cell, the next node of the table. Every change that moves it takes part `node` and the
    /// new holder. `None` for a node alone in the cluster, or not a member.
    pub fn replica_holder(&self, node: NodeId) -> Option<NodeId> {
        let at = self.nodes.binary_search(&node).ok()?;
        self.holders[at]
    }

    /// The label level (0 the top) at which `a` and `b` part, if they lie in different
    /// failure domains: labelled subtrees neither of which holds the other (`zone=a` and
    /// `zone=b`, or two racks of one zone). The lower, the farther apart (another zone before
    /// another rack of the same zone). A service that keeps a copy apart from its node
    /// survives that node's whole zone going. `None` for a cluster without label levels, for
    /// a node that is not a member, and for two nodes of one domain.
    pub fn apart_at(&self, a: NodeId, b: NodeId) -> Option<usize> {
        let domain = |n: NodeId| self.nodes.binary_search(&n).ok().map(|at| &self.domains[at]);
        let (a, b) = (domain(a)?, domain(b)?);
        a.iter().zip(b.iter()).position(|(x, y)| x != y)
    }

    /// The manager of `(service, key)`, or `None` for a service that is not registered.
    #[inline(always)]
    pub fn locate(&self, service: ServiceId, key: Key) -> Option<NodeId> {
        match self.tables.get(usize::from(service.0)) {
            Some(Some(table)) => Some(table.locate(key)),
            _ => None,
        }
    }

    /// One service's table, for callers that look up many keys of it.
    pub fn table(&self, service: ServiceId) -> Option<&ServiceTable> {
        self.tables.get(usize::from(service.0)).and_then(Option::as_ref)
    }

    /// All tables, ascending by service id.
    pub fn tables(&self) -> impl Iterator<Item = &ServiceTable> + '_ {
        self.tables.iter().flatten()
    }
}

/// The installed snapshot, shared by every thread of a node. Reads are lock-free; installing a
/// new epoch is one atomic pointer swap.
#[derive(Debug)]
pub struct SnapshotCell {
    current: ArcSwap<Snapshot>,
}

impl SnapshotCell {
    /// A cell holding `first`.
    pub fn new(first: Snapshot) -> Self {
        SnapshotCell { current: ArcSwap::from_pointee(first) }
    }

    /// The installed snapshot; cheap enough to call per request.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// A per-thread reader that only touches the shared pointer when a new epoch is installed:
    /// for request loops where even [`SnapshotCell::load`] shows.
    pub fn reader(&self) -> SnapshotReader<'_> {
        SnapshotReader { cache: Cache::new(&self.current) }
    }

    /// The installed snapshot as an owned handle, for holding across a long operation.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Installs `next` if it is newer than the installed snapshot and returns the one it replaced.
    /// An older or equal epoch is refused: epochs never go backwards.
    pub fn install(&self, next: Snapshot) -> Result<Arc<Snapshot>> {
        let next = Arc::new(next);
        let mut refused = None;
        let previous = self.current.rcu(|current| {
            if next.epoch > current.epoch {
                refused = None;
                Arc::clone(&next)
            } else {
                refused = Some(current.epoch);
                Arc::clone(current)
            }
        });
        match refused {
            Some(installed) => Err(LocatorError::StaleEpoch { installed, offered: next.epoch }),
            None => Ok(previous),
        }
    }
}

/// One thread's cached view of a [`SnapshotCell`]. Each `load` checks whether the installed
/// snapshot changed and, if not, returns the one it holds.
pub struct SnapshotReader<'a> {
    cache: Cache<&'a ArcSwap<Snapshot>, Arc<Snapshot>>,
}

impl SnapshotReader<'_> {
    /// The installed snapshot, never older than the last one seen by this reader.
    #[inline]
    pub fn load(&mut self) -> &Arc<Snapshot> {
        self.cache.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::ROOT;

    /// A table over `nodes` managers, slot `s` managed by the `(s * 7) % nodes`-th, and the ids
    /// it was built from.
    fn table(nodes: u64, slots: u32) -> (ServiceTable, Vec<NodeId>) {
        let spec = ServiceSpec::new(ServiceId(1), "s").with_slots(slots).with_runs(1);
        let owners: Vec<NodeId> =
            (0..u64::from(slots)).map(|s| NodeId(1_000 + (s * 7) % nodes)).collect();
        let state = ServiceState { spec, scope: ROOT, owners: owners.clone() };
        (ServiceTable::new(&state), owners)
    }

    #[test]
    fn a_table_gives_each_slot_the_manager_it_was_built_with_however_many_managers_there_are() {
        for nodes in [1, 3, 256, 257, 1_000] {
            let (table, owners) = table(nodes, 4_096);
            let narrow = matches!(table.slots, Slots::Narrow(_));
            assert_eq!(narrow, nodes <= 256, "{nodes} managers: one byte a slot up to 256");
            assert_eq!(table.owners().collect::<Vec<_>>(), owners, "{nodes} managers");
            for (slot, &owner) in owners.iter().enumerate() {
                assert_eq!(table.locate(Key(slot as u64)), owner, "slot {slot} of {nodes}");
                assert_eq!(table.owner(slot as u32), Some(owner));
            }
            assert_eq!(table.owner(4_096), None, "past the last slot");
        }
    }
}
