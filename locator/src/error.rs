//! The locator's one error type. Every operation that returns an error leaves the tree exactly as
//! it was, so a caller may report the error and carry on.

use crate::ids::{CellId, Epoch, NodeId, ServiceId};

/// Why a locator operation was refused. None of these is retryable as such: each one names an
/// input the caller must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocatorError {
    /// The tree configuration asks for cells of zero nodes.
    #[error("cell capacity must be at least 1 node")]
    ZeroCapacity,
    /// A service asked for a slot count the flat tables cannot index with a mask.
    #[error("service {service}: {slots} slots is not a power of two between 1 and 2^24")]
    InvalidSlots {
        /// The service being registered.
        service: ServiceId,
        /// The slot count it asked for.
        slots: u32,
    },
    /// A service asked for runs of neighbouring keys whose length is not a power of two.
    #[error("service {service}: a run of {run} keys is not a power of two")]
    InvalidRun {
        /// The service being registered.
        service: ServiceId,
        /// The run length it asked for.
        run: u64,
    },
    /// The service id is already registered.
    #[error("service {0} is already registered")]
    DuplicateService(ServiceId),
    /// The node is already a member; a rejoining node must first be evicted or declared failed.
    #[error("node {0} is already in the cluster")]
    DuplicateNode(NodeId),
    /// The node is not a member of the cluster.
    #[error("node {0} is not in the cluster")]
    UnknownNode(NodeId),
    /// A label key that is not one of the tree's label levels.
    #[error("label key `{key}` is not a level of this tree (levels: [{levels}])")]
    UnknownLabel {
        /// The key the node carried.
        key: String,
        /// The levels the tree was configured with, comma separated.
        levels: String,
    },
    /// A label for a level below one the node has no label for: the node's place in the
    /// tree would ignore it.
    #[error(
        "label `{given}` is set but level `{missing}` above it is not: a node carries every level above its lowest (levels: [{levels}])"
    )]
    LabelGap {
        /// A lower level the node carried.
        given: String,
        /// The first level from the top it lacks.
        missing: String,
        /// The levels the tree was configured with, comma separated.
        levels: String,
    },
    /// A label level named twice in the tree's configuration.
    #[error("label level `{level}` is named twice (again at position {at}); name each level once")]
    DuplicateLevel {
        /// The level.
        level: String,
        /// Where it appears the second time, from 0.
        at: usize,
    },
    /// A label that is not written `key=value`.
    #[error("label `{0}` is not of the form key=value")]
    BadLabel(String),
    /// A label key, value or level name that is empty, longer than [`crate::MAX_LABEL`] bytes,
    /// or holds other than ASCII letters, digits, `-`, `_` and `.`: `status` prints labels as
    /// they are, and a newline or a terminal escape in one forged rows of its table.
    #[error(
        "label text {0} is not 1 to 63 ASCII letters, digits, `-`, `_` or `.` (as zone names \
         such as eu-west-1a are)"
    )]
    LabelText(String),
    /// The cell chosen for a new node cannot give it a single slot of some service: the node's
    /// label subtree has more nodes than that service has slots.
    #[error(
        "no room for node {node} in cell {cell}: service {service} has {slots} slots there for \
         {members} nodes already; give the service more slots or the node another label"
    )]
    NoRoom {
        /// The node being added.
        node: NodeId,
        /// The cell that would have given it slots.
        cell: CellId,
        /// The service that has too few slots.
        service: ServiceId,
        /// That service's slots in the cell.
        slots: u32,
        /// The nodes already in the cell.
        members: u32,
    },
    /// The operation needs at least one node.
    #[error("the cluster has no nodes")]
    EmptyCluster,
    /// Removing this node would leave no node to manage the entries.
    #[error("node {0} is the last node of the cluster and cannot be removed")]
    LastNode(NodeId),
    /// A snapshot older than (or as old as) the installed one; epochs never go backwards.
    #[error("snapshot of epoch {offered} is not newer than the installed epoch {installed}")]
    StaleEpoch {
        /// The epoch already installed.
        installed: Epoch,
        /// The epoch that was offered.
        offered: Epoch,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = LocatorError> = std::result::Result<T, E>;
