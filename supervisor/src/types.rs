//! The types openraft is instantiated with.

use crate::runtime::SeededRuntime;
use crate::state::{Command, Outcome};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// What applying one raft entry returned: `None` for entries that carry no command (blank and
/// membership entries), which openraft also asks a response for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(pub Option<Outcome>);

openraft::declare_raft_types!(
    /// gobelins' raft: commands on the cluster state, nodes known by id and address.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = SeededRuntime,
);

/// The raft handle of one node.
pub type Raft = openraft::Raft<TypeConfig>;
