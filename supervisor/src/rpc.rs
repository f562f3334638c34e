//! The requests supervisors send each other, and their answers.

use crate::state::{ClusterState, Command, Outcome};
use crate::types::TypeConfig;
use gobelins_locator::Labels;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A node asking to join, sent to any member and forwarded to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The joining node.
    pub node: u64,
    /// Where it listens.
    pub addr: String,
    /// Its labels.
    pub labels: Labels,
    /// Its incarnation.
    pub incarnation: u64,
}

/// A request between supervisors.
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Raft log replication.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<u64>),
    /// Raft snapshot transfer.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Propose a command; a follower forwards it to the leader.
    Propose(Command),
    /// Admit a new node: the leader makes it a raft learner, then proposes its `Join`.
    Join(JoinRequest),
    /// Are you alive? Answered at once.
    Ping,
    /// Ask the receiver whether it can reach `target`: confirms a suspicion from elsewhere.
    Probe {
        /// The suspected node.
        target: u64,
    },
    /// Send your view of the cluster.
    State,
    /// May I go on serving as a manager? Asked of the leader by every other member each ping
    /// interval; the asker's lease runs from when it asked, so a reply that comes late (or a
    /// process that was frozen) cannot stretch it.
    Lease {
        /// The asker's incarnation: an old life is not granted one.
        incarnation: u64,
    },
    /// The leader applied the state that began a change the receiver takes part in. The
    /// receiver may begin its part from it: its own log would show the change one replication
    /// round later, and on a loaded machine the other participants spend that round waiting
    /// for it. After the others, so that a node of protocol version 14 to 22 that does not
    /// know it answered `Malformed` and only missed the head start.
    Begun(Box<ClusterState>),
    /// An operator lifts the hold on a node that kept failing (`gobelins unhold`): forget its
    /// short lives in a row, so that its next rejoin is admitted.
    Unhold(u64),
    /// The sender's life (this incarnation) is stopping on purpose (SIGTERM, SIGINT): when the
    /// cluster declares it failed, it is not counted as a short life, so that an operator who
    /// restarts a node a few times in a row does not get it held out. Answered `Heard`.
    Stopping(u64),
    /// Which life of yours answers, and has the cluster admitted it? Asked of every member
    /// before a leave or an eviction is proposed (the control socket's roll call): a process
    /// restarted after a kill answers pings while its last life, which the cluster has yet to
    /// end, counts as live, and a removal that went first had that life's DSM slots tainted.
    /// After the others: a node of an earlier build answers `Malformed`, and is asked again
    /// with a ping, which a process still starting does not answer `Pong` either.
    Life,
}

/// Why a proposal did not produce an outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known right now; try again shortly.
    #[error("no leader is known yet")]
    NoLeader,
    /// The leader could not be reached.
    #[error("leader unreachable: {0}")]
    Unreachable(String),
    /// Raft refused or failed.
    #[error("raft: {0}")]
    Raft(String),
}

/// A node's view of the cluster, as sent in answer to [`Request::State`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct View {
    /// Who answered.
    pub node: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Raft voters.
    pub voters: Vec<u64>,
    /// Its applied cluster state.
    pub state: ClusterState,
    /// When it leads and has heard from no majority of the voters for longer than the failure
    /// timeout: for how long, in milliseconds. Nothing commits meanwhile.
    pub quorum_lost_ms: Option<u64>,
    /// When it leads: the members it has not heard from for half the failure timeout or more,
    /// with for how long in milliseconds, and whether witnesses are being asked about them (the
    /// node is suspected, and declared failed if they cannot reach it either).
    pub silent: BTreeMap<u64, (u64, bool)>,
    /// The nodes whose lives keep failing soon after they began (see
    /// `SupervisorConfig::rejoin_hold`): how many in a row, and how much longer each is held
    /// out, in milliseconds (zero when it is not); the node that answers too, while a refusal
    /// of its rejoin holds it.
    pub held: BTreeMap<u64, (u32, u64)>,
}

/// The answer to a [`Request`].
#[derive(Serialize, Deserialize)]
pub enum Response {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To `InstallSnapshot`.
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// To `Propose`.
    Proposed(Result<Outcome, ProposeError>),
    /// To `Join`: the outcome, and the leader's state once the join began a change. The joiner
    /// begins its part from that state: its own log, new, would catch up with the entry that
    /// began the change only after the other participants had begun sending to it.
    Admitted {
        /// What proposing the join gave.
        outcome: Result<Outcome, ProposeError>,
        /// The leader's applied state, the change begun, when the outcome is `Began`.
        state: Option<Box<ClusterState>>,
    },
    /// To `Ping`.
    Pong,
    /// To `Probe`: whether the target answered.
    Probed(bool),
    /// To `State`.
    View(Box<View>),
    /// To `Lease`: whether this leader, in touch with a quorum, counts the asker as a member.
    Leased(bool),
    /// The request could not be decoded.
    Malformed(String),
    /// This node stopped on an error it cannot recover from (its store failed): it answers
    /// nothing any more, so that the cluster declares it failed.
    Stopped(String),
    /// To `Begun`: whether the receiver begins from the state told.
    Heard(bool),
    /// To `Unhold`.
    Unheld {
        /// Whether this node held the node out.
        held: bool,
        /// Whether it had counted short lives of it.
        counted: bool,
    },
    /// To `Life`.
    Life {
        /// The answering process's incarnation.
        incarnation: u64,
        /// Whether the cluster admitted that life (a restarted process has not, until the
        /// cluster ended its last life and took it back as a new one).
        admitted: bool,
    },
}
