//! The gobelins locator: which node manages each directory entry, in constant time, and what
//! moves when the cluster changes (DESIGN.md, "Locator").
//!
//! Pure code: no async, no I/O, no clock. The supervisor replicates [`Change`]s through
//! consensus; every node applies them to its own [`CellTree`] and derives the same [`Snapshot`].
//!
//! ```text
//!  Change ──apply──▶ CellTree ──snapshot(epoch)──▶ Snapshot ──install──▶ SnapshotCell
//!  (replicated)      cells, nodes,                 flat slot→node         lock-free reads:
//!                    slot owners                   table per service      locate(service, key)
//!                                  MigrationPlan::between(old, new): what moves, from whom, to whom
//! ```
//!
//! ```
//! use gobelins_locator::{
//!     CellTree, Epoch, Key, Labels, MigrationPlan, NodeId, ServiceId, ServiceSpec, TreeConfig,
//! };
//!
//! let mut tree = CellTree::new(TreeConfig::default())?;
//! tree.register_service(ServiceSpec::new(ServiceId(1), "kv"))?;
//! for n in 1..=4 {
//!     tree.add_node(NodeId(n), Labels::new())?;
//! }
//! let before = tree.snapshot(Epoch(1))?;
//! tree.evict_node(NodeId(2))?;
//! let after = tree.snapshot(Epoch(2))?;
//! let plan = MigrationPlan::between(&before, &after);
//! assert_eq!(plan.senders().into_iter().collect::<Vec<_>>(), vec![NodeId(2)]);
//! assert_ne!(after.locate(ServiceId(1), Key(42)), Some(NodeId(2)));
//! # Ok::<(), gobelins_locator::LocatorError>(())
//! ```
//!
//! Modules:
//! - [`ids`]: `NodeId`, `ServiceId`, `Key`, `CellId`, `Epoch`.
//! - [`service`]: what a service declares (slots, hashed keys or runs, size).
//! - [`config`]: the tree's shape (cell capacity, label levels) and node labels.
//! - [`cell`]: inner and leaf cells.
//! - `tree` and `ops`: the [`CellTree`] and its changes; `balance`: moving slots within a cell.
//! - [`change`]: [`Change`], the replicated unit, and [`ChangeReport`].
//! - [`snapshot`]: [`Snapshot`] and [`SnapshotCell`].
//! - [`plan`]: what moves between two snapshots, [`MigrationPlan`].
//! - `kept`: [`KeptSince`], since when what a node says of its entries still holds.
//! - [`baseline`]: modulo, jump and rendezvous hashing, to measure against.
//! - [`error`]: the one error type, [`LocatorError`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod balance;
pub mod baseline;
pub mod cell;
pub mod change;
pub mod config;
pub mod error;
mod hash;
pub mod ids;
mod kept;
mod ops;
pub mod plan;
pub mod service;
pub mod snapshot;
mod tree;

pub use change::{Change, ChangeReport};
pub use config::{
    check_label_text, parse_label, Labels, TreeConfig, DEFAULT_CELL_CAPACITY, MAX_LABEL,
};
pub use error::{LocatorError, Result};
pub use hash::mix;
pub use ids::{CellId, Epoch, Key, NodeId, ServiceId};
pub use kept::KeptSince;
pub use ops::HOLDER_CAP;
pub use plan::{MigrationPlan, ServicePlan, SlotMove};
pub use service::{Placement, ServiceSize, ServiceSpec, DEFAULT_SLOTS, MAX_SLOTS};
pub use snapshot::{ServiceTable, Snapshot, SnapshotCell, SnapshotReader};
pub use tree::{CellTree, ROOT};
