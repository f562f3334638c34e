//! The replicated cluster state and its one transition function.
//!
//! `apply` is pure: the same commands in the same order give the same state on every node. It is
//! what the raft state machine runs for each committed entry.
//!
//! ```text
//!  Join/Leave/Evict/Fail ──▶ queue ──(nothing in progress)──▶ Begin(e+1): tree changes,
//!                                                             participants listed
//!  MigrationDone(node, e+1) from every participant ──▶ Stable(e+1) ──▶ next queued change
//! ```

use gobelins_locator::{
    CellTree, Change, Epoch, KeptSince, Labels, LocatorError, MigrationPlan, NodeId, ServiceId,
    ServicePlan, ServiceSpec, TreeConfig,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// Load above which a stable cluster queues a rebalance of its cells.
pub const REBALANCE_PERMILLE: u32 = 1200;

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Accepted; waiting for or going through its addition.
    Joining,
    /// A full member.
    Active,
    /// Going out gracefully; still sends its entries.
    Leaving,
    /// Out after leaving or eviction.
    Left,
    /// Declared failed; fenced until it rejoins with a higher incarnation.
    Failed,
}

impl NodeStatus {
    /// A member of the cluster: joining, active or leaving (not left, not failed).
    pub fn is_live(self) -> bool {
        matches!(self, NodeStatus::Joining | NodeStatus::Active | NodeStatus::Leaving)
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeStatus::Joining => "joining",
            NodeStatus::Active => "active",
            NodeStatus::Leaving => "leaving",
            NodeStatus::Left => "left",
            NodeStatus::Failed => "failed",
        })
    }
}

/// What the cluster knows of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Where the node listens.
    pub addr: String,
    /// Its labels, which place it in the cell tree.
    pub labels: Labels,
    /// Where it is in its life.
    pub status: NodeStatus,
    /// Which life: a node that failed must come back with a higher one.
    pub incarnation: u64,
    /// The operator asked this life out, and it failed before it was: in the middle of its
    /// leave or eviction, or evicted once failed. A start of its data directory then ends as
    /// left rather than rejoin: a node killed, evicted while dead, and started again by its
    /// unit came back as a member, against the eviction its operator was told had ended.
    /// `--join` brings it back.
    #[serde(default, with = "crate::layout::since_28")]
    pub kept_out: bool,
    /// Who asked this life out: itself (`gobelins leave`) or another node (`evict`). What
    /// `status` and `stats` say of its removal, which the cluster otherwise carries out alike.
    /// Recorded from the rules of 30 on (`None` before), kept should the node fail on its way
    /// out, and dropped should the locator refuse the change (the node is active again).
    #[serde(default, with = "crate::layout::since_30")]
    pub removed_by: Option<RemovedBy>,
}

/// Who asked a node out ([`NodeRecord::removed_by`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemovedBy {
    /// The node itself: `gobelins leave`.
    Leave,
    /// Another node: `gobelins evict`.
    Evict,
}

/// A command replicated through raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A node asks to join (or rejoin with a higher incarnation).
    Join {
        /// The node.
        node: u64,
        /// Where it listens.
        addr: String,
        /// Its labels.
        labels: Labels,
        /// Its incarnation.
        incarnation: u64,
    },
    /// A node leaves gracefully.
    Leave {
        /// The node.
        node: u64,
    },
    /// An operator removes a live node.
    Evict {
        /// The node.
        node: u64,
    },
    /// The failure detector confirmed a node dead.
    Fail {
        /// The node.
        node: u64,
        /// The incarnation that was seen failing; a stale report about an earlier life is refused.
        incarnation: u64,
    },
    /// A participant finished its part of the change to `epoch`.
    MigrationDone {
        /// The participant.
        node: u64,
        /// The epoch it reached.
        epoch: u64,
    },
    /// A service registers on the locator.
    Register(ServiceSpec),
    /// The leader's failure detector confirmed a node dead. Unlike [`Command::Fail`], which a
    /// restarted node proposes to end its own last life and which is refused for the last
    /// live node (that node then carries on alone), it ends the life of the last live node
    /// too: after a whole cluster stopped, the voters that came back may find the only life
    /// left counted live to be one that never returns, and every change waits for it. Last in
    /// the enum, so that the log's older entries decode as they did.
    Dead {
        /// The node.
        node: u64,
        /// The incarnation that was seen failing; a stale report about an earlier life is refused.
        incarnation: u64,
    },
    /// The bootstrap gives the cell tree its label levels, top first (`--levels zone,rack`),
    /// before any node or service is in it: they decide where every entry goes, so they never
    /// change afterwards. After [`Command::Dead`], for the log's older entries.
    Shape {
        /// The label keys from the top of the tree down.
        levels: Vec<String>,
    },
    /// A leader raises the rules commands apply by ([`ClusterState::rules`]) to its build's,
    /// [`RULES`]. Last in the enum, for the log's older entries.
    Rules {
        /// The rules from this entry on.
        version: u8,
    },
}

/// Why a command changed nothing. Sent back to whoever proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The node is already a member (or on its way in).
    #[error(
        "node {0} is already a member: if another machine holds that id, start this one with \
         another --node-id (or none, to draw one); evict node {0} only if it is this machine's \
         own last life, gone without the cluster noticing"
    )]
    AlreadyMember(u64),
    /// A failed or departed node came back without a newer incarnation.
    #[error("node {node} must rejoin with an incarnation above {last}")]
    StaleIncarnation {
        /// The node.
        node: u64,
        /// The last incarnation the cluster saw.
        last: u64,
    },
    /// The node is not a member.
    #[error("node {0} is not a member of this cluster")]
    UnknownNode(u64),
    /// The node is already on its way out.
    #[error("node {0} is already leaving")]
    AlreadyLeaving(u64),
    /// The node is still joining; it can leave once active.
    #[error("node {0} is still joining; try again once it is active")]
    StillJoining(u64),
    /// The last active node cannot leave.
    #[error("node {0} is the last active node and cannot leave: there is no node to hand its entries to. Add a node first, or stop its agent to stop the cluster (started again with the same --data-dir, it comes back)")]
    LastNode(u64),
    /// A report for an epoch that is not in progress.
    #[error("epoch {got} is not in progress (current epoch {current})")]
    NotInProgress {
        /// Epoch reported.
        got: u64,
        /// Current epoch.
        current: u64,
    },
    /// The node is not a participant of the change in progress.
    #[error("node {node} does not take part in epoch {epoch}")]
    NotParticipant {
        /// The node.
        node: u64,
        /// The epoch.
        epoch: u64,
    },
    /// A report about an incarnation that is not the current one.
    #[error("node {node} is in incarnation {current}, not {got}")]
    WrongIncarnation {
        /// The node.
        node: u64,
        /// Incarnation in the report.
        got: u64,
        /// Current incarnation.
        current: u64,
    },
    /// The locator refused the change.
    #[error("locator: {0}")]
    Locator(String),
    /// A new life of a node whose last life is still named by a change in progress or
    /// waiting (its failure being recovered, say). Retryable: the cluster admits the new life
    /// once it is done with the old one, so that nobody keeps sending the old life's entries
    /// to the new one.
    #[error("node {0}'s last life is still being dealt with; try again once that change is done")]
    Recovering(u64),
    /// A service whose slots, with those of the services registered already, would pass
    /// [`MAX_CLUSTER_SLOTS`].
    #[error(
        "service {id} asks for {slots} slots, and the cluster's services hold {held} already, \
         of {max} at most (the cluster's state names every slot's manager, and must fit a \
         snapshot and a frame): declare fewer slots",
        max = MAX_CLUSTER_SLOTS
    )]
    TooManySlots {
        /// The service's id.
        id: u16,
        /// The slots it asks for.
        slots: u32,
        /// The slots registered or queued before it.
        held: u64,
    },
    /// A service registered again under its id with another declaration (slots, placement,
    /// size): the two would map keys to different slots, and entries would go astray.
    #[error(
        "service {id} is registered in this cluster as {registered}, and this node declares it \
         as {declared}: a service's declaration cannot change in a running cluster; run one \
         build of it on every node"
    )]
    ServiceDeclaredOtherwise {
        /// The service's id.
        id: u16,
        /// The declaration the cluster holds.
        registered: String,
        /// The one proposed.
        declared: String,
    },
    /// The node's labels do not fit the tree's levels: asked again, they never will.
    #[error("labels: {0}")]
    Labels(String),
    /// Label levels given to a cell tree that holds nodes or services already, or other
    /// levels than it has: they are set once, by the bootstrap.
    #[error(
        "the cell tree's label levels are [{held}], set when the cluster was bootstrapped; they \
         cannot change in a running cluster"
    )]
    Shaped {
        /// The levels the tree has, comma separated.
        held: String,
    },
    /// A node that keeps failing asks to rejoin before its hold is over (see
    /// `SupervisorConfig::rejoin_hold`). Decided by the leader from the failures it saw, not
    /// by the replicated state, which has no clock. Retryable: asked again once the hold ends,
    /// the join goes through.
    #[error(
        "node {node} keeps failing: {failures} short lives in a row, {within:.1} s from the \
         first failure to the last, each declared failed soon after it began. The cluster holds \
         it out for {left:.1} s more, and longer at each such failure, so that its entries stop \
         moving out and back; ask again then (a node declared failed rejoins by itself). {advice}",
        within = *within_ms as f64 / 1e3,
        left = (*left_ms).max(100) as f64 / 1e3,
        advice = crate::flaps::advice(*node)
    )]
    Held {
        /// The node.
        node: u64,
        /// Its short lives failed in a row.
        failures: u32,
        /// From the first of them to the last, in milliseconds.
        within_ms: u64,
        /// How much longer it is held, in milliseconds.
        left_ms: u64,
    },
}

/// Slots of all services together. The cluster's state names each slot's manager, and it
/// must fit a snapshot (read back with a 64 MiB limit, 8 bytes a slot) and a state view sent
/// whole in a 16 MiB frame (up to 9 bytes a slot): about 9 MiB at this many. Past it, nodes
/// could not restart nor newcomers catch up. Sixteen services of the default 65,536 slots.
pub const MAX_CLUSTER_SLOTS: u64 = 1 << 20;

/// [`Refusal::ServiceDeclaredOtherwise`] if the cluster holds `spec`'s id with another
/// declaration; the name shown to operators may differ.
pub fn check_declaration(state: &ClusterState, spec: &ServiceSpec) -> Result<(), Refusal> {
    let Some(registered) = state.declared(spec.id) else { return Ok(()) };
    let same = |s: &ServiceSpec| (s.slots, s.placement, s.size);
    if same(registered) == same(spec) {
        return Ok(());
    }
    let show = |s: &ServiceSpec| {
        format!("{} ({} slots, {:?}, {:?})", s.name, s.slots, s.placement, s.size)
    };
    Err(Refusal::ServiceDeclaredOtherwise {
        id: spec.id.0,
        registered: show(registered),
        declared: show(spec),
    })
}

/// What a successful command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The change waits behind others; `position` 0 means it starts next.
    Queued {
        /// Place in the queue.
        position: usize,
    },
    /// A change began: its epoch.
    Began {
        /// The new epoch.
        epoch: u64,
    },
    /// The participant's report was recorded; `stable` says whether the epoch completed.
    Recorded {
        /// Whether the cluster is now stable at this epoch.
        stable: bool,
    },
    /// The service was registered.
    Registered,
    /// The cell tree has the label levels asked for.
    Shaped,
    /// A node evicted once it had failed stays out: a start of its data directory ends as left.
    KeptOut,
    /// Commands apply by these rules from here on.
    Ruled,
}

impl fmt::Display for Applied {
    /// As an operator reads it after `gobelins join`, `leave` or `evict`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Applied::Queued { position: 0 } => f.write_str("queued; it starts next"),
            Applied::Queued { position } => {
                write!(f, "queued behind {position} other change(s)")
            }
            Applied::Began { epoch } => write!(f, "began, leading to epoch {epoch}"),
            Applied::Recorded { stable: true } => f.write_str("recorded; the cluster is stable"),
            Applied::Recorded { stable: false } => f.write_str("recorded"),
            Applied::Registered => f.write_str("registered"),
            Applied::Shaped => f.write_str("the cell tree's label levels are set"),
            Applied::KeptOut => f.write_str("kept out: it had failed already"),
            Applied::Ruled => f.write_str("the cluster's rules are raised"),
        }
    }
}

/// The answer to a command, as raft returns it to the proposer.
pub type Outcome = Result<Applied, Refusal>;

/// A change being carried out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// The epoch it leads to.
    pub epoch: u64,
    /// The change.
    pub change: Change,
    /// Nodes that must report `MigrationDone`.
    pub participants: BTreeSet<u64>,
    /// Those that have.
    pub done: BTreeSet<u64>,
    /// What moves, so that every node holds, sends and receives the same slots, even one that
    /// never saw the epoch before.
    pub plan: MigrationPlan,
    /// For a `Fail` or `Recover`: the last two changes that moved something of the dead
    /// node's, latest first (`ChangeInfo::failed_moved_in`).
    #[serde(default)]
    pub failed_moved_in: [Option<u64>; 2],
    /// For an `Evict`: the nodes whose replica holder the leaver was as the change began.
    #[serde(default)]
    pub held_by_leaver: BTreeSet<u64>,
    /// For a `Fail` or `Recover`: since when a word the dead node gave of its entries still
    /// holds ([`KeptSince`]; `ChangeInfo::failed_kept_since`).
    #[serde(default, with = "crate::layout::since_29")]
    pub failed_kept_since: Option<u64>,
}

/// Everything consensus replicates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Every node the cluster has known, with its status.
    pub nodes: BTreeMap<u64, NodeRecord>,
    /// The locator's cell tree; holds only joining-complete, not yet removed nodes.
    pub tree: CellTree,
    /// The current epoch: the last one begun.
    pub epoch: u64,
    /// The change being carried out, if any.
    pub in_progress: Option<InProgress>,
    /// Changes waiting their turn, oldest first.
    pub queue: VecDeque<Change>,
    /// Moves a node had not finished when it died in the middle of a change, kept until the
    /// change that recovers it (its `Fail`, or `Recover` if it had left the tree) rebuilds
    /// them from the survivors.
    #[serde(default)]
    pub interrupted: BTreeMap<u64, Vec<ServicePlan>>,
    /// Leavers kept until the recoveries of these nodes end. A node that received a leaver's
    /// entries and died before it reported the leave done may not have copied them on: the
    /// leaver still holds them, so it stays (leaving, out of the tree) and takes part in the
    /// recovery, where its copies rebuild them, rather than take them away with it. So does a
    /// leaver that held a node's replicas as the change began, should that node die during
    /// it: it may not have copied them to its new holder yet.
    #[serde(default)]
    pub lingering: BTreeMap<u64, BTreeSet<u64>>,
    /// For each node, the last two changes that moved something of its own (slots to or from
    /// it, or its replica holder: `MigrationPlan::touched`), latest first, recorded as each
    /// began. A node's replica holder tells from them, after the node's failure, whether its
    /// copy is current, without taking part in every change the node does.
    #[serde(default)]
    pub moved_in: BTreeMap<u64, [Option<u64>; 2]>,
    /// The rules commands apply by: the protocol version whose `apply` they follow, raised
    /// through the log ([`Command::Rules`]) once a leader of a newer build leads. A command
    /// does what the rules in force where it sits in the log say, on every replica: replayed
    /// after an upgrade, an entry an older build applied must do what it did then, or a
    /// replica that applies it again would part from one whose snapshot already held it. 0
    /// before protocol 28: the rules of 27.
    #[serde(default, with = "crate::layout::since_28")]
    pub rules: u8,
    /// Since when what each node says of the entries it manages still holds: recorded from
    /// the rules of 29 on, for nodes alive then and each life after.
    #[serde(default, with = "crate::layout::since_29")]
    pub kept_since: KeptSince,
}

/// The rules this build's leaders raise a cluster's to (see [`ClusterState::rules`]): 30, a
/// node's record says who asked it out ([`NodeRecord::removed_by`]); 29, the
/// cluster records since when each node's word of its entries holds ([`KeptSince`]); 28, an
/// operator's eviction of a node that failed in it, or once failed, keeps it out.
pub const RULES: u8 = 30;

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState::new(TreeConfig::default()).expect("the default tree configuration is valid")
    }
}

impl ClusterState {
    /// An empty cluster whose cells follow `config`.
    pub fn new(config: TreeConfig) -> Result<Self, LocatorError> {
        Ok(ClusterState {
            nodes: BTreeMap::new(),
            tree: CellTree::new(config)?,
            epoch: 0,
            in_progress: None,
            queue: VecDeque::new(),
            interrupted: BTreeMap::new(),
            lingering: BTreeMap::new(),
            moved_in: BTreeMap::new(),
            rules: 0,
            kept_since: KeptSince::default(),
        })
    }

    /// Whether no change is in progress or queued.
    pub fn is_stable(&self) -> bool {
        self.in_progress.is_none() && self.queue.is_empty()
    }

    /// Nodes whose status is `status`.
    pub fn with_status(&self, status: NodeStatus) -> impl Iterator<Item = u64> + '_ {
        self.nodes.iter().filter(move |(_, r)| r.status == status).map(|(&id, _)| id)
    }

    /// Nodes that are members in any live sense: joining, active or leaving.
    pub fn live(&self) -> BTreeSet<u64> {
        self.nodes.iter().filter(|(_, r)| r.status.is_live()).map(|(&id, _)| id).collect()
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        match command {
            Command::Join { node, addr, labels, incarnation } => {
                self.join(*node, addr, labels, *incarnation)
            }
            Command::Leave { node } => self.remove(*node, RemovedBy::Leave),
            Command::Evict { node } => match self.nodes.get_mut(node) {
                // Nothing to hand over, but its operator wants it out: kept so, as when it
                // fails in the middle of its eviction.
                Some(record)
                    if self.rules >= 28
                        && record.status == NodeStatus::Failed
                        && !record.kept_out =>
                {
                    record.kept_out = true;
                    Ok(Applied::KeptOut)
                }
                _ => self.remove(*node, RemovedBy::Evict),
            },
            Command::Fail { node, incarnation } => self.fail(*node, *incarnation, false),
            Command::Dead { node, incarnation } => self.fail(*node, *incarnation, true),
            Command::MigrationDone { node, epoch } => self.done(*node, *epoch),
            Command::Shape { levels } => self.shape(levels),
            Command::Rules { version } => {
                if self.rules < 29 && *version >= 29 {
                    // What happened before went unrecorded: only words given from here on.
                    let alive = self.nodes.iter().filter(|(_, r)| {
                        !matches!(r.status, NodeStatus::Left | NodeStatus::Failed)
                    });
                    let alive: Vec<NodeId> = alive.map(|(&n, _)| NodeId(n)).collect();
                    self.kept_since.start(alive, self.epoch);
                }
                self.rules = self.rules.max(*version);
                Ok(Applied::Ruled)
            }
            Command::Register(spec) => {
                if self.declared(spec.id).is_some() {
                    // Every agent registers what it hosts; the first one wins (registered, or
                    // queued to be), and the others must declare it alike.
                    check_declaration(self, spec)?;
                    return Ok(Applied::Registered);
                }
                let queued = self.queue.iter().filter_map(|c| match c {
                    Change::Register(s) => Some(u64::from(s.slots)),
                    _ => None,
                });
                let held: u64 = self.tree.services().map(|s| u64::from(s.slots)).sum();
                let held = held + queued.sum::<u64>();
                if held + u64::from(spec.slots) > MAX_CLUSTER_SLOTS {
                    return Err(Refusal::TooManySlots { id: spec.id.0, slots: spec.slots, held });
                }
                // Checked now so that the proposer hears why; applied in its turn, as an
                // epoch of its own, so that snapshots of one epoch never differ.
                CellTree::new(self.tree.config().clone())
                    .and_then(|mut t| t.register_service(spec.clone()))
                    .map_err(|e| Refusal::Locator(e.to_string()))?;
                self.enqueue(Change::Register(spec.clone()))?;
                Ok(Applied::Registered)
            }
        }
    }

    /// How service `id` is declared: registered, or queued to be.
    pub fn declared(&self, id: ServiceId) -> Option<&ServiceSpec> {
        self.tree.services().find(|s| s.id == id).or_else(|| {
            self.queue.iter().find_map(|c| match c {
                Change::Register(s) if s.id == id => Some(s),
                _ => None,
            })
        })
    }

    /// Gives the empty tree `levels`. The same levels again (a bootstrap finished by a
    /// restart) change nothing.
    fn shape(&mut self, levels: &[String]) -> Outcome {
        let held = &self.tree.config().label_levels;
        if held == levels {
            return Ok(Applied::Shaped);
        }
        if !self.nodes.is_empty() {
            return Err(Refusal::Shaped { held: held.join(",") });
        }
        // Services registered with no node (a directory of a build that took a refused
        // bootstrap for done) hold no slot yet: they carry over as they are.
        let config = self.tree.config().clone().with_label_levels(levels.iter().cloned());
        let mut tree = CellTree::new(config).map_err(|e| Refusal::Locator(e.to_string()))?;
        for spec in self.tree.services() {
            tree.register_service(spec.clone()).map_err(|e| Refusal::Locator(e.to_string()))?;
        }
        self.tree = tree;
        Ok(Applied::Shaped)
    }

    fn join(&mut self, node: u64, addr: &str, labels: &Labels, incarnation: u64) -> Outcome {
        if let Some(record) = self.nodes.get(&node) {
            match record.status {
                // The same life asking again (its first answer was lost): where its join stands.
                NodeStatus::Joining | NodeStatus::Active
                    if record.incarnation == incarnation && record.addr == addr =>
                {
                    return Ok(self.whereabouts(node));
                }
                NodeStatus::Joining | NodeStatus::Active | NodeStatus::Leaving => {
                    return Err(Refusal::AlreadyMember(node));
                }
                NodeStatus::Left | NodeStatus::Failed if incarnation <= record.incarnation => {
                    return Err(Refusal::StaleIncarnation { node, last: record.incarnation });
                }
                NodeStatus::Left | NodeStatus::Failed => {
                    let names = |c: &Change| c.node() == Some(NodeId(node));
                    let pending = self.in_progress.as_ref().is_some_and(|p| names(&p.change))
                        || self.queue.iter().any(names)
                        || self.interrupted.contains_key(&node);
                    if pending {
                        return Err(Refusal::Recovering(node));
                    }
                }
            }
        }
        // Checked now so that the joiner hears why; the locator would refuse the change only
        // when its turn came, and the joiner would wait for a membership that never comes.
        self.tree.config().check_labels(labels).map_err(|e| {
            let how = if self.tree.config().label_levels.is_empty() {
                "this cluster was bootstrapped without label levels (`--levels`), so its nodes \
                 take no --label"
            } else {
                "give this node a --label of each of those levels, from the top (a cluster's \
                 levels are set once, by its bootstrap's --levels, and do not change)"
            };
            Refusal::Labels(format!("{e}; {how}"))
        })?;
        // So is a join the locator would refuse in its turn: no room for another node in a
        // service of too few slots, say. Refused then, it was waited on by its node for ever,
        // and the record of that node's last life, which fences the older ones, was gone with
        // it. Its turn comes after the changes queued, which are tried first, as they will be.
        let mut probe = self.tree.clone();
        for queued in &self.queue {
            let _ = probe.apply(queued);
        }
        let add = Change::Add { node: NodeId(node), labels: labels.clone() };
        probe.apply(&add).map_err(|e| Refusal::Locator(e.to_string()))?;
        let record = NodeRecord {
            addr: addr.to_string(),
            labels: labels.clone(),
            status: NodeStatus::Joining,
            incarnation,
            kept_out: false,
            removed_by: None,
        };
        self.nodes.insert(node, record);
        self.enqueue(Change::Add { node: NodeId(node), labels: labels.clone() })
    }

    /// Takes `node` out, as asked `by` itself or another node (recorded from the rules of 30
    /// on, before the change may begin: a refusal then drops it).
    fn remove(&mut self, node: u64, by: RemovedBy) -> Outcome {
        let record = self.nodes.get(&node).ok_or(Refusal::UnknownNode(node))?;
        match record.status {
            NodeStatus::Active => {}
            NodeStatus::Leaving => return Err(Refusal::AlreadyLeaving(node)),
            NodeStatus::Joining => return Err(Refusal::StillJoining(node)),
            NodeStatus::Left | NodeStatus::Failed => return Err(Refusal::UnknownNode(node)),
        }
        if self.with_status(NodeStatus::Active).count() == 1 {
            return Err(Refusal::LastNode(node));
        }
        self.set_status(node, NodeStatus::Leaving);
        let rules = self.rules;
        if let Some(record) = self.nodes.get_mut(&node).filter(|_| rules >= 30) {
            record.removed_by = Some(by);
        }
        self.enqueue(Change::Evict(NodeId(node)))
    }

    /// Ends `node`'s life `incarnation`; `even_last` when it may be the last live one.
    fn fail(&mut self, node: u64, incarnation: u64, even_last: bool) -> Outcome {
        let record = self.nodes.get(&node).ok_or(Refusal::UnknownNode(node))?;
        if record.incarnation != incarnation {
            return Err(Refusal::WrongIncarnation {
                node,
                got: incarnation,
                current: record.incarnation,
            });
        }
        if matches!(record.status, NodeStatus::Left | NodeStatus::Failed) {
            return Err(Refusal::UnknownNode(node));
        }
        if self.live().len() == 1 && !even_last {
            return Err(Refusal::LastNode(node));
        }
        let leaving = record.status == NodeStatus::Leaving;
        self.set_status(node, NodeStatus::Failed);
        if let Some(record) = self.nodes.get_mut(&node) {
            record.kept_out = leaving && self.rules >= 28;
        }
        // Whatever the dead node had asked for is void; its entries must be rebuilt.
        self.queue.retain(|c| c.node() != Some(NodeId(node)));
        if let Some(moves) = self.in_progress.as_ref().map(|p| unfinished(p, NodeId(node))) {
            if !moves.is_empty() {
                self.interrupted.insert(node, moves);
                if !self.tree.contains(NodeId(node)) {
                    self.queue.push_front(Change::Recover(NodeId(node)));
                }
            }
        }
        if self.tree.contains(NodeId(node)) {
            // Recovery goes before voluntary changes: its entries have no manager meanwhile.
            self.queue.push_front(Change::Fail(NodeId(node)));
        }
        // A dead leaver takes nothing away that anyone waits for.
        self.lingering.remove(&node);
        let recovery =
            |c: &Change| matches!(c, Change::Fail(n) | Change::Recover(n) if n.0 == node);
        if !self.queue.iter().any(recovery) {
            // No recovery of it will ask (a leaver that had handed everything over).
            self.kept_since.forget(NodeId(node));
        }
        if let Some(progress) = &self.in_progress {
            let recovered = self
                .queue
                .iter()
                .any(|c| matches!(c, Change::Fail(n) | Change::Recover(n) if n.0 == node));
            // A leaver stays for a node that died before reporting its part done, if it sent
            // that node entries, or held its replicas as the change began: until the node
            // reports done it may not have copied them to its new holder, and the leaver's
            // are then the only other copies.
            let held = progress.held_by_leaver.contains(&node);
            match progress.change {
                Change::Evict(leaver)
                    if leaver.0 != node
                        && recovered
                        && !progress.done.contains(&node)
                        && (held
                            || progress.plan.outgoing(leaver).any(|(_, m)| m.to.0 == node)) =>
                {
                    self.lingering.entry(leaver.0).or_default().insert(node);
                }
                _ => {}
            }
        }
        match &mut self.in_progress {
            // A dead node reports nothing: stop waiting for it.
            Some(progress) => {
                progress.participants.remove(&node);
                if progress.done.is_superset(&progress.participants) {
                    self.finish();
                }
            }
            None => {
                self.start_next();
            }
        }
        Ok(self.whereabouts(node))
    }

    fn done(&mut self, node: u64, epoch: u64) -> Outcome {
        let current = self.epoch;
        let progress =
            self.in_progress.as_mut().ok_or(Refusal::NotInProgress { got: epoch, current })?;
        if progress.epoch != epoch {
            return Err(Refusal::NotInProgress { got: epoch, current });
        }
        if !progress.participants.contains(&node) {
            return Err(Refusal::NotParticipant { node, epoch });
        }
        progress.done.insert(node);
        if progress.done.is_superset(&progress.participants) {
            self.finish();
            return Ok(Applied::Recorded { stable: true });
        }
        Ok(Applied::Recorded { stable: false })
    }

    fn set_status(&mut self, node: u64, status: NodeStatus) {
        if let Some(record) = self.nodes.get_mut(&node) {
            record.status = status;
        }
        if status == NodeStatus::Left {
            // Gone for good: no recovery of it will ask.
            self.moved_in.remove(&node);
            self.kept_since.forget(NodeId(node));
        }
    }

    /// Queues a change, starting it at once if nothing is in progress.
    fn enqueue(&mut self, change: Change) -> Outcome {
        let node = change.node().map(|n| n.0);
        self.queue.push_back(change);
        if self.in_progress.is_none() {
            self.start_next();
        }
        Ok(node.map_or(Applied::Queued { position: self.queue.len() }, |n| self.whereabouts(n)))
    }

    /// Where `node`'s change stands: begun, or its place in the queue.
    fn whereabouts(&self, node: u64) -> Applied {
        let mine = |c: &Change| c.node() == Some(NodeId(node));
        match &self.in_progress {
            Some(progress) if mine(&progress.change) => Applied::Began { epoch: progress.epoch },
            _ => match self.queue.iter().position(mine) {
                Some(position) => Applied::Queued { position },
                None => Applied::Recorded { stable: self.is_stable() },
            },
        }
    }

    /// Ends the change in progress and starts the next one; returns the epoch begun, if any.
    fn finish(&mut self) -> Option<u64> {
        self.complete();
        if self.queue.is_empty() {
            // A stable cluster whose load drifted evens it out; a no-op when it has not.
            self.queue.push_back(Change::Rebalance { max_over_avg_permille: REBALANCE_PERMILLE });
        }
        self.start_next()
    }

    /// Marks the change in progress as done. A node that failed meanwhile stays failed.
    fn complete(&mut self) {
        let Some(progress) = self.in_progress.take() else { return };
        let (node, from, to) = match progress.change {
            Change::Add { node, .. } => (node.0, NodeStatus::Joining, NodeStatus::Active),
            // A leaver a dead receiver's recovery needs (or a dead node's whose replicas it
            // held) stays until that recovery ends.
            Change::Evict(node) if self.lingering.contains_key(&node.0) => return,
            Change::Evict(node) => (node.0, NodeStatus::Leaving, NodeStatus::Left),
            Change::Fail(dead) | Change::Recover(dead) => {
                self.recovered(dead.0);
                return;
            }
            Change::Register(_) | Change::Rebalance { .. } => return,
        };
        if self.nodes.get(&node).map(|r| r.status) == Some(from) {
            self.set_status(node, to);
        }
    }

    /// `dead`'s entries are rebuilt: the leavers that stayed for it and for nobody else go.
    fn recovered(&mut self, dead: u64) {
        let mut released = Vec::new();
        self.lingering.retain(|&leaver, waits| {
            waits.remove(&dead);
            if waits.is_empty() {
                released.push(leaver);
            }
            !waits.is_empty()
        });
        for leaver in released {
            if self.nodes.get(&leaver).map(|r| r.status) == Some(NodeStatus::Leaving) {
                self.set_status(leaver, NodeStatus::Left);
            }
        }
    }

    /// Starts queued changes until one needs participants; returns the epoch it begins.
    fn start_next(&mut self) -> Option<u64> {
        while let Some(change) = self.queue.pop_front() {
            let before = self.tree.snapshot(Epoch(self.epoch)).ok();
            match self.tree.apply(&change) {
                // A rebalance of a balanced cluster: nothing to do.
                Ok(report)
                    if report.cells.is_empty()
                        && !matches!(change, Change::Register(_) | Change::Recover(_)) =>
                {
                    continue
                }
                Ok(report) => {
                    self.epoch += 1;
                    let mut participants: BTreeSet<u64> =
                        report.participants.iter().map(|n| n.0).collect();
                    if matches!(change, Change::Fail(_) | Change::Recover(_)) {
                        // Any survivor may hold what the dead node's entries are rebuilt from.
                        participants.extend(self.live());
                    }
                    participants.retain(|n| {
                        self.nodes.get(n).is_some_and(|r| r.status != NodeStatus::Failed)
                    });
                    let epoch = self.epoch;
                    let after = self.tree.snapshot(Epoch(epoch));
                    let mut plan = match (&before, &after) {
                        (Some(old), Ok(new)) => MigrationPlan::between(old, new),
                        _ => MigrationPlan::nothing(Epoch(epoch - 1), Epoch(epoch)),
                    };
                    if let Change::Fail(dead) | Change::Recover(dead) = &change {
                        // What it had not handed over is rebuilt with the rest, each slot at
                        // its manager now.
                        // With no node left (no snapshot) there is nowhere to rebuild. It does
                        // not come up: a last node's `Fail` waits for a joiner (`LastNode`
                        // below), and a leaver is never the last.
                        let unfinished = self.interrupted.remove(&dead.0).unwrap_or_default();
                        if let Ok(new) = &after {
                            plan.absorb(unfinished, new);
                        }
                    } else {
                        // A dead node whose recovery waits (for a joiner, when it was the last
                        // in the tree) sends nothing: what this change moves out of it is
                        // rebuilt by that recovery, with the rest of its slots.
                        let dead: Vec<u64> = self.with_status(NodeStatus::Failed).collect();
                        for node in dead {
                            let moves = plan.moves_from(NodeId(node));
                            if !moves.is_empty() {
                                self.interrupted.entry(node).or_default().extend(moves);
                            }
                        }
                    }
                    let failed_moved_in = match &change {
                        Change::Fail(dead) | Change::Recover(dead) => {
                            self.moved_in.get(&dead.0).copied().unwrap_or_default()
                        }
                        Change::Add { node, .. } => {
                            // A new life: what moved of the last one says nothing of it.
                            self.moved_in.remove(&node.0);
                            [None, None]
                        }
                        _ => [None, None],
                    };
                    // Every node touched, taking part or not: one declared failed, whose recovery
                    // waits behind this change, may be handed slots it never receives, and its
                    // holder must not then vouch for them.
                    if let Ok(new) = &after {
                        for node in plan.touched(before.as_ref(), new) {
                            let moved = self.moved_in.entry(node.0).or_default();
                            *moved = [Some(epoch), moved[0]];
                        }
                    }
                    if let Change::Fail(dead) | Change::Recover(dead) = &change {
                        self.moved_in.remove(&dead.0);
                    }
                    let failed_kept_since = match &change {
                        Change::Fail(dead) | Change::Recover(dead) => self.kept_since.of(*dead),
                        _ => None,
                    };
                    if self.rules >= 29 {
                        self.kept_since.record(epoch, &change, &plan);
                    }
                    let held_by_leaver = match (&change, &before) {
                        (Change::Evict(leaver), Some(old)) => (old.nodes().iter())
                            .filter(|&&n| old.replica_holder(n) == Some(*leaver))
                            .map(|n| n.0)
                            .collect(),
                        _ => BTreeSet::new(),
                    };
                    let empty = participants.is_empty();
                    self.in_progress = Some(InProgress {
                        epoch,
                        change,
                        participants,
                        done: BTreeSet::new(),
                        plan,
                        failed_moved_in,
                        held_by_leaver,
                        failed_kept_since,
                    });
                    if !empty {
                        return Some(epoch);
                    }
                    self.complete();
                }
                // A failed node that is the last in the tree waits for the node joining behind
                // it: its entries need somewhere to go.
                Err(LocatorError::LastNode(_)) if matches!(change, Change::Fail(_)) => {
                    let others = !self.queue.is_empty();
                    self.queue.push_back(change);
                    if others {
                        continue;
                    }
                    return None;
                }
                Err(error) => {
                    // The change cannot happen (say, no room for the node): forget a refused
                    // join so that the node may try again, put a refused leaver back to work,
                    // and go on with the next change.
                    match &change {
                        Change::Add { node, .. } => {
                            self.nodes.remove(&node.0);
                            self.kept_since.forget(*node);
                        }
                        Change::Evict(node) => {
                            self.set_status(node.0, NodeStatus::Active);
                            if let Some(record) = self.nodes.get_mut(&node.0) {
                                record.removed_by = None;
                            }
                        }
                        _ => {}
                    }
                    tracing::warn!(%change, %error, "configuration change refused by the locator");
                }
            }
        }
        None
    }
}

/// The moves out of `node` in the change under way: what it may not have handed over.
fn unfinished(progress: &InProgress, node: NodeId) -> Vec<ServicePlan> {
    if progress.change == Change::Fail(node) || progress.change == Change::Recover(node) {
        return Vec::new();
    }
    progress.plan.moves_from(node)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
