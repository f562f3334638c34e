//! What a service declares about its directory when it registers: how many slots its keys map
//! onto, whether neighbouring keys stay together, and how much of the cluster it wants.

use crate::error::{LocatorError, Result};
use crate::hash::mix;
use crate::ids::{Key, ServiceId};
use serde::{Deserialize, Serialize};

/// Slots per service unless it asks otherwise: enough that 1,024 nodes get 64 each.
pub const DEFAULT_SLOTS: u32 = 1 << 16;

/// The most slots a service may have; keeps a flat table under 128 MiB.
pub const MAX_SLOTS: u32 = 1 << 24;

/// How a service's keys map onto its slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// `slot = mix(key) % slots`: keys spread evenly whatever their pattern.
    Hashed,
    /// `slot = (key / run) % slots`: runs of neighbouring keys share a manager, as DSM pages of
    /// one region do.
    Runs {
        /// Keys per run, a power of two so that the division is a shift.
        run: u64,
    },
}

/// How much of the cluster a service spreads over (report §3.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceSize {
    /// Every node manages some of its entries.
    Whole,
    /// The service is confined to the smallest subtree holding at least this many nodes, so that
    /// small services live on different nodes instead of all spreading everywhere.
    Nodes(u32),
}

/// The declaration a service makes when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Dense id; snapshots index their tables by it.
    pub id: ServiceId,
    /// Name shown to operators.
    pub name: String,
    /// Number of slots, a power of two.
    pub slots: u32,
    /// How keys map onto slots.
    pub placement: Placement,
    /// How much of the cluster the service wants.
    pub size: ServiceSize,
}

impl ServiceSpec {
    /// A service with hashed keys over the whole cluster and [`DEFAULT_SLOTS`] slots.
    pub fn new(id: ServiceId, name: impl Into<String>) -> Self {
        ServiceSpec {
            id,
            name: name.into(),
            slots: DEFAULT_SLOTS,
            placement: Placement::Hashed,
            size: ServiceSize::Whole,
        }
    }

    /// Uses `slots` slots (a power of two) instead of the default.
    pub fn with_slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Keeps runs of `run` neighbouring keys (a power of two) on one manager.
    pub fn with_runs(mut self, run: u64) -> Self {
        self.placement = Placement::Runs { run };
        self
    }

    /// Confines the service to a subtree of at least `nodes` nodes.
    pub fn with_size(mut self, nodes: u32) -> Self {
        self.size = ServiceSize::Nodes(nodes);
        self
    }

    /// Checks the declaration; the tree refuses a service that fails it.
    pub fn validate(&self) -> Result<()> {
        if !self.slots.is_power_of_two() || self.slots > MAX_SLOTS {
            return Err(LocatorError::InvalidSlots { service: self.id, slots: self.slots });
        }
        if let Placement::Runs { run } = self.placement {
            if !run.is_power_of_two() {
                return Err(LocatorError::InvalidRun { service: self.id, run });
            }
        }
        Ok(())
    }

    /// The slot a key falls in.
    #[inline]
    pub fn slot_of(&self, key: Key) -> u32 {
        let mask = u64::from(self.slots - 1);
        match self.placement {
            Placement::Hashed => (mix(key.0) & mask) as u32,
            Placement::Runs { run } => ((key.0 >> run.trailing_zeros()) & mask) as u32,
        }
    }

    /// Weight that puts services with different slot counts on one scale when cells are compared
    /// by load: every service counts as [`MAX_SLOTS`] units in all.
    pub(crate) fn weight(&self) -> u64 {
        u64::from(MAX_SLOTS / self.slots)
    }
}
