//! The immutable per-epoch lookup table, and the cell that swaps it atomically.
//!
//! ```text
//!   supervisor thread                      request threads (many)
//!   tree.snapshot(e+1) ──install──▶ SnapshotCell ──load()──▶ snapshot.locate(service, key)
//!                                   (one atomic pointer)     = hash + mask + index
//! ```

use crate::error::{LocatorError, Result};
use crate::hash::mix;
use crate::ids::{Epoch, Key, NodeId, ServiceId};
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
    owners: Box<[NodeId]>,
}

impl ServiceTable {
    fn new(state: &ServiceState) -> Self {
        let (hashed, shift) = match state.spec.placement {
            Placement::Hashed => (true, 0),
            Placement::Runs { run } => (false, run.trailing_zeros()),
        };
        ServiceTable {
            spec: state.spec.clone(),
            mask: u64::from(state.spec.slots - 1),
            shift,
            hashed,
            owners: state.owners.clone().into_boxed_slice(),
        }
    }

    /// The slot `key` falls in.
    #[inline(always)]
    pub fn slot_of(&self, key: Key) -> u32 {
        let spread = if self.hashed { mix(key.0) } else { key.0 >> self.shift };
        (spread & self.mask) as u32
    }

    /// The manager of `key`: a hash, a mask and an index.
    #[inline(always)]
    pub fn locate(&self, key: Key) -> NodeId {
        self.owners[self.slot_of(key) as usize]
    }

    /// The manager of `slot`.
    pub fn owner(&self, slot: u32) -> Option<NodeId> {
        self.owners.get(slot as usize).copied()
    }

    /// Every slot's manager, indexed by slot.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
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
    /// Indexed by service id; `None` where no service has that id.
    tables: Vec<Option<ServiceTable>>,
}

impl Snapshot {
    pub(crate) fn build<'a>(
        epoch: Epoch,
        nodes: Vec<NodeId>,
        services: impl Iterator<Item = &'a ServiceState>,
    ) -> Snapshot {
        let mut tables: Vec<Option<ServiceTable>> = Vec::new();
        for state in services.filter(|s| !s.owners.is_empty()) {
            let at = usize::from(state.spec.id.0);
            if tables.len() <= at {
                tables.resize(at + 1, None);
            }
            tables[at] = Some(ServiceTable::new(state));
        }
        Snapshot { epoch, nodes, tables }
    }

    /// The epoch this snapshot belongs to.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The member nodes, ascending.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
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
