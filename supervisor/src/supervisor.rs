//! One node's supervisor: raft, the transport, and the loop that carries out what the replicated
//! state asks of this node.
//!
//! ```text
//!  peers ──Request──▶ handle() ──▶ raft RPCs, proposals (forwarded to the leader), pings, probes
//!  state machine ──new ClusterState──▶ duties loop ──▶ peer addresses, MigrationDone reports,
//!                                                     leave/fence detection
//!  leader only, every ping interval ──▶ raft membership (≤ 5 voters), Detector ──▶ Fail
//! ```
//!
//! Its parts: `entry` (bootstrap, join, a new life), `messages` (proposals, and what peers
//! ask), `duties` (every node's, as the state changes), `leader` (the leader's), `fence`
//! (whether this life is still the cluster's), `health`, `holds`, `lease`, `stopping`.

mod duties;
mod entry;
mod fence;
mod health;
mod holds;
mod leader;
mod lease;
mod messages;
mod stopping;

pub use holds::Unheld;

use crate::detector::Detector;
use crate::error::{Result, SupervisorError};
use crate::flaps::Flaps;
use crate::lane;
use crate::network::Network;
use crate::pauses::Pauses;
use crate::rpc::{Response, View};
use crate::state::{ClusterState, NodeStatus};
use crate::store::{LogStore, StateMachine};
use crate::transport::{Handler, Transport};
use crate::types::Raft;
use async_trait::async_trait;
use bytes::Bytes;
use gobelins_adaptation::log_budget::LogBudget;
use gobelins_adaptation::{Host, Registry};
use gobelins_locator::Labels;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Timers of the supervisor. The defaults suit a LAN; [`SupervisorConfig::loopback`] suits
/// processes on one machine.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// How often the leader pings every member.
    pub ping_interval: Duration,
    /// Silence after which the leader suspects a member.
    pub failure_timeout: Duration,
    /// How long a witness waits for the suspect when asked to probe it.
    pub probe_timeout: Duration,
    /// Deadline of one request to a peer.
    pub rpc_timeout: Duration,
    /// Raft voters at most; other members are learners.
    pub max_voters: usize,
    /// Raft heartbeat interval.
    pub raft_heartbeat: Duration,
    /// Raft election timeout, lower bound (the upper bound is twice it).
    pub raft_election: Duration,
    /// Log entries applied since the last raft snapshot that make the next one. A snapshot is
    /// the whole cluster state, synced to disk; the logs it covers are then purged, all but the
    /// last `logs_kept`. A node that joins, or comes back, behind the purged logs gets the
    /// snapshot.
    pub snapshot_every: u64,
    /// Logs kept after a snapshot covers them, so that a follower a little behind catches up
    /// from logs rather than from a whole snapshot.
    pub logs_kept: u64,
    /// The label levels a bootstrap gives the cluster's cell tree, top first (`--levels
    /// zone,rack`); a node that joins takes the cluster's.
    pub label_levels: Vec<String>,
    /// How long a node is held out before it may rejoin once two of its lives in a row failed
    /// within two minutes of their start; doubled at each further such failure, up to five
    /// minutes, until one of its lives lasts two minutes or ten minutes pass without a
    /// failure. Zero holds nobody.
    pub rejoin_hold: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            ping_interval: Duration::from_millis(200),
            failure_timeout: Duration::from_millis(1000),
            probe_timeout: Duration::from_millis(300),
            rpc_timeout: Duration::from_millis(1000),
            max_voters: 5,
            raft_heartbeat: Duration::from_millis(100),
            raft_election: Duration::from_millis(500),
            snapshot_every: 5000,
            logs_kept: 1000,
            label_levels: Vec::new(),
            rejoin_hold: Duration::from_secs(5),
        }
    }
}

impl SupervisorConfig {
    /// Timers for agents on one machine: failures are declared in about half a second.
    pub fn loopback() -> Self {
        SupervisorConfig {
            ping_interval: Duration::from_millis(50),
            failure_timeout: Duration::from_millis(300),
            probe_timeout: Duration::from_millis(100),
            rpc_timeout: Duration::from_millis(500),
            max_voters: 5,
            raft_heartbeat: Duration::from_millis(30),
            raft_election: Duration::from_millis(150),
            ..SupervisorConfig::default()
        }
    }

    /// How long a lease lasts past the ask or quorum acknowledgement that renewed it: half the
    /// failure timeout, so that a node cut off stops serving before the leader (which waits a
    /// whole failure timeout, then probes) can declare it failed.
    fn lease_span(&self) -> Duration {
        self.failure_timeout / 2
    }

    fn raft(&self) -> Result<openraft::Config> {
        let election = self.raft_election.as_millis() as u64;
        openraft::Config {
            cluster_name: "gobelins".into(),
            heartbeat_interval: self.raft_heartbeat.as_millis() as u64,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.logs_kept,
            // Until the supervisor knows whether it may (`Supervisor::stand_for_election`).
            enable_elect: false,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| SupervisorError::Config(format!("raft timers: {e}")))
    }
}

/// Who this node is.
#[derive(Clone, Debug)]
pub struct Me {
    /// Node id.
    pub id: u64,
    /// Address peers dial.
    pub addr: String,
    /// Labels that place it in the cell tree.
    pub labels: Labels,
}

/// Routes requests from the transport to the supervisor once it exists: the transport must be
/// built before raft, and raft before the supervisor.
#[derive(Default)]
pub struct Dispatch {
    node: OnceLock<Weak<Supervisor>>,
}

#[async_trait]
impl Handler for Dispatch {
    async fn handle(self: Arc<Self>, from: u64, request: Bytes) -> Bytes {
        match self.node.get().and_then(Weak::upgrade) {
            Some(node) => node.handle(from, request).await,
            None => encode_response(&Response::Malformed("node is starting".into())),
        }
    }
}

fn encode_response(response: &Response) -> Bytes {
    match lane::response(response) {
        Ok(bytes) => bytes,
        // Only reachable with a payload over the codec limit; say so rather than hang the caller.
        Err(e) => lane::response(&Response::Malformed(e.to_string())).unwrap_or_default(),
    }
}

/// Something the node's owner should act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// A member, doing its duties.
    Member,
    /// This node left the cluster gracefully; the agent may exit.
    Left,
    /// Raft stopped on an error this node cannot recover from, most often its store failing (a
    /// full or failing disk). The node has stopped serving and answering its peers, which
    /// declare it failed and rebuild its entries elsewhere; the agent must exit, and once the
    /// disk is mended a restart rejoins as a new life.
    Fatal(String),
    /// The cluster refused what this node is (a service declared otherwise than the cluster
    /// holds it): stopped as on [`Lifecycle::Fatal`], and the agent must exit saying why.
    Refused(String),
}

/// What the lines `Supervisor::malformed` budgets are about.
const MALFORMED: &str = "undecodable messages";

/// What the lines `Supervisor::seed_waits` budgets are about.
const SEED_WAITS: &str = "joins waiting for their seed";

/// What the lines `Supervisor::rejoins` budgets are about.
const REJOINS: &str = "failed or unanswered rejoins";

/// One node's supervisor.
pub struct Supervisor {
    me: Me,
    incarnation: AtomicU64,
    /// The life this process started as, when its own state, replayed from disk before raft
    /// ran, had it leaving: a process restarted in the middle of its node's leave (killed,
    /// its machine rebooted), or one whose end as left was recorded. Once the cluster ends
    /// that life, the leave ends with it.
    leaving_when_started: Option<u64>,
    /// Started with `--join`, and not admitted since: its operator asked for the node back,
    /// so a record that the cluster keeps its last life out does not end this process. Once
    /// admitted, the ask is answered: a later eviction ends it as any other.
    asked_back: AtomicBool,
    /// [`Parts::record_left`].
    record_left: Arc<dyn Fn(u64) -> Result<()> + Send + Sync>,
    /// The life whose end as left this process recorded last (0: none): fence checks run
    /// concurrently, and two writes of the record raced on its temporary file.
    left_recorded: AtomicU64,
    raft: Raft,
    transport: Arc<dyn Transport>,
    state: watch::Receiver<Arc<ClusterState>>,
    config: SupervisorConfig,
    detector: Mutex<Option<Detector>>,
    /// Lines about messages that could not be decoded.
    malformed: Mutex<LogBudget>,
    /// Lines about rejoins that failed, asked again every ping interval.
    rejoins: Mutex<LogBudget>,
    /// Lines about a seed that cannot admit this node yet: a node back from a pause asks
    /// through several calls at once, each with its line.
    seed_waits: Mutex<LogBudget>,
    /// The leader loop's ticks: a pause of this process shows as one woken late.
    pauses: Pauses,
    /// As leader: which followers keep up with its log, for the choice of voters.
    lag: Mutex<crate::lag::LagWatch>,
    /// The failures seen of each node, to hold out one that keeps failing.
    flaps: Mutex<Flaps>,
    /// The last refusal of this node's rejoin for its own failures: for which of its lives,
    /// how many failures, and until when. Watched by the requests that wait for a
    /// configuration: one that would not come while the node is held out.
    held_back: watch::Sender<Option<(u64, u32, Instant)>>,
    /// While this node leads with no acknowledgement of a majority on record (raft has none
    /// right after an election, nor after a change of voters, until replies come): since when.
    unacked_since: Mutex<Option<Instant>>,
    /// Since when this node, a voter, has known no leader (see `crate::quorum::Leaderless`).
    leaderless: Mutex<crate::quorum::Leaderless>,
    reported: AtomicU64,
    host: Host,
    /// Builds the services afresh for a new life of the host (see [`Host::renew`]), when the
    /// cluster declared this node failed while it still ran.
    services: Box<dyn Fn() -> Registry + Send + Sync>,
    /// The incarnation, declared dead by the cluster, whose host was last renewed.
    renewed_for: AtomicU64,
    /// The incarnation this process last moved to, or whose services it started afresh for
    /// (`u64::MAX`: none; a restarted process starts at the one it persisted). Only a life this
    /// process made may be admitted by asking again: a restarted process's last life is
    /// recovered, never resumed with empty services.
    renewed_to: AtomicU64,
    /// Held while an incarnation is renewed: a restart's join and the fencing check can both
    /// find the last life dead at once, and two writers of the incarnation file raced on its
    /// temporary file (the second found it renamed away, and logged an error for a rejoin that
    /// went through).
    renewing: Mutex<()>,
    /// A change of raft voters is under way: it can wait long (a new voter far behind, or a
    /// joint configuration that needs a node that just died), and the leader's other duties
    /// (its lease, failure detection) must not wait with it.
    reconciling: AtomicBool,
    /// A proposal of [`crate::state::Command::Rules`] is under way.
    raising_rules: AtomicBool,
    /// Nodes this leader added as raft learners to admit them, and when: until their `Join`
    /// commits they are in raft's membership but not in the cluster's state, and must not be
    /// taken for departed learners and removed (the joiner would then wait for the next pass
    /// to be added again before it hears of its own change).
    joining: Mutex<HashMap<u64, Instant>>,
    /// Whether the cluster admitted this process's life (bootstrap or join). Until then the
    /// host is not fed: a restarted process has lost its services' memory and must not serve
    /// its old keys as empty.
    admitted: AtomicBool,
    /// Wakes the duties loop when this life is admitted or a head start is kept, so that the
    /// host is fed at once, not at the next tick (a joiner's first change, say).
    wake: tokio::sync::Notify,
    /// The state a join's answer or the leader's word carried
    /// ([`Request::Begun`](crate::rpc::Request::Begun)), with the incarnation it is for: fed to the
    /// host until this node's own applied state has caught up with it
    /// ([`caught_up`](duties::caught_up)).
    head_start: Mutex<Option<(u64, Arc<ClusterState>)>>,
    /// The epoch of the last change this node, as leader, told its participants of.
    told: AtomicU64,
    /// The incarnations this process is asking the cluster to admit, with how many calls ask
    /// and when the first of them began: a change the join of one it made began, once applied
    /// here, admits it as the answer would.
    asking: Mutex<BTreeMap<u64, (usize, Instant)>>,
    /// The incarnation this process started with, if it wrote it itself (its data directory
    /// had none): no earlier run served that life.
    made_at_start: Option<u64>,
    lifecycle: watch::Sender<Lifecycle>,
    /// Persists a new incarnation before the node rejoins with it.
    save_incarnation: Box<dyn Fn(u64) -> Result<()> + Send + Sync>,
    /// Started on a data directory never admitted to a cluster, and not admitted since (see
    /// [`Parts::fresh`]).
    fresh: AtomicBool,
    /// Records in the data directory that its node was admitted.
    admitted_first: Arc<dyn Fn() -> Result<()> + Send + Sync>,
    /// [`Parts::record_older_copy`].
    record_older_copy: Arc<dyn Fn() -> Result<()> + Send + Sync>,
    /// This process's data directory is an older copy of its node's, and the node was not
    /// admitted since: it neither grants votes nor stands for election, unless it is raft's
    /// only voter (see [`Supervisor::stand_for_election`]).
    older_copy: AtomicBool,
    /// Set once the data directory holds the mark that says so: every fence check that finds
    /// it an older copy waits for the write, and only one makes it.
    older_copy_kept: tokio::sync::OnceCell<()>,
    /// A peer has shown this process the cluster's record of its node, or the cluster admitted
    /// it: it knows whether its directory is an older copy (see [`Supervisor::vouch`]).
    vouched: AtomicBool,
    /// A [`Supervisor::vouch`] runs.
    vouching: AtomicBool,
    /// Lines saying a vote was refused: a candidate asks again every election timeout.
    refused_votes: Mutex<gobelins_adaptation::log_budget::LogBudget>,
    shutdown: CancellationToken,
}

/// What [`Supervisor::start`] needs.
pub struct Parts {
    /// This node.
    pub me: Me,
    /// Its current incarnation.
    pub incarnation: u64,
    /// The transport, already serving `dispatch`.
    pub transport: Arc<dyn Transport>,
    /// The handler the transport calls.
    pub dispatch: Arc<Dispatch>,
    /// Raft's log store.
    pub log: LogStore,
    /// Raft's state machine.
    pub machine: StateMachine,
    /// Timers.
    pub config: SupervisorConfig,
    /// Persists the incarnation.
    pub save_incarnation: Box<dyn Fn(u64) -> Result<()> + Send + Sync>,
    /// The node's adaptation layer, with its services.
    pub host: Host,
    /// Builds the same services afresh, for a new life of the host after this node was declared
    /// failed while it still ran.
    pub services: Box<dyn Fn() -> Registry + Send + Sync>,
    /// The data directory was never admitted to a cluster. Until a life of this node is
    /// admitted, it grants no raft vote: were the directory a voter's, wiped, its empty log
    /// could elect a leader that lacks entries this node helped commit.
    pub fresh: bool,
    /// The data directory was found to be an older copy of its node's, and the node was not
    /// admitted since ([`crate::datadir::DataDir::mark_older_copy`]). Until it is, it grants
    /// no raft vote and stands for no election: its log could elect a leader (itself, say)
    /// that lacks entries the node acknowledged in a later life, and its vote be a second one
    /// in a term it voted in.
    pub older_copy: bool,
    /// Called once, at the first admission of a fresh node, to record it (see
    /// [`crate::datadir::DataDir::clear_until_admitted`]); on the agent's runtime, on a
    /// blocking thread, after [`Supervisor::admit_life`] has returned.
    pub admitted_first: Box<dyn Fn() -> Result<()> + Send + Sync>,
    /// Records in the data directory that it is an older copy of its node's (see
    /// [`crate::datadir::DataDir::mark_older_copy`]), so that later starts refuse votes too
    /// until the node is admitted.
    pub record_older_copy: Box<dyn Fn() -> Result<()> + Send + Sync>,
    /// This process wrote `incarnation` itself: the data directory had none, so no earlier run
    /// of this node served that life, and its own log cannot hold a join of it from before.
    pub made_incarnation: bool,
    /// The life the data directory records as ended left though the cluster counts it failed
    /// ([`crate::datadir::DataDir::mark_left`]): if it is `incarnation`, this start ends as
    /// left too.
    pub ended_left: Option<u64>,
    /// Records, in the data directory, that a life ended so.
    pub record_left: Box<dyn Fn(u64) -> Result<()> + Send + Sync>,
    /// Started with `--join`: the operator asks for this node in the cluster, whatever its
    /// last life was doing. A leave it stopped in the middle of does not end it as left.
    pub rejoin: bool,
}

impl Supervisor {
    /// Starts raft and the node's duties.
    pub async fn start(parts: Parts) -> Result<Arc<Self>> {
        let state = parts.machine.subscribe();
        // Before raft runs: the cluster's end of that life, once applied, hides that it was
        // leaving. What raft applies again first is read from the log: the stored state is
        // the last snapshot's, older.
        let replayed = parts.machine.replayed(&parts.log);
        let leaving = match replayed {
            Ok(last) => last.nodes.get(&parts.me.id).is_some_and(|r| {
                r.status == NodeStatus::Leaving && r.incarnation == parts.incarnation
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot read this node's raft log to learn whether it was leaving; a leave it was in the middle of will not be seen");
                false
            }
        };
        let left = leaving || parts.ended_left == Some(parts.incarnation);
        let leaving_when_started = (left && !parts.rejoin).then_some(parts.incarnation);
        let raft_config = Arc::new(parts.config.raft()?);
        let lease_span = parts.config.lease_span();
        let rejoin_hold = parts.config.rejoin_hold;
        let network = Network::new(Arc::clone(&parts.transport));
        let raft = Raft::new(parts.me.id, raft_config, network, parts.log, parts.machine)
            .await
            .map_err(|e| SupervisorError::Raft(e.to_string()))?;
        let (lifecycle, _) = watch::channel(Lifecycle::Member);
        let node = Arc::new(Supervisor {
            me: parts.me,
            incarnation: AtomicU64::new(parts.incarnation),
            leaving_when_started,
            asked_back: AtomicBool::new(parts.rejoin),
            record_left: Arc::from(parts.record_left),
            record_older_copy: Arc::from(parts.record_older_copy),
            older_copy: AtomicBool::new(parts.older_copy),
            vouched: AtomicBool::new(false),
            vouching: AtomicBool::new(false),
            refused_votes: gobelins_adaptation::log_budget::noisy(),
            older_copy_kept: match parts.older_copy {
                true => tokio::sync::OnceCell::new_with(Some(())),
                false => tokio::sync::OnceCell::new(),
            },
            left_recorded: AtomicU64::new(0),
            raft,
            transport: parts.transport,
            state,
            config: parts.config,
            detector: Mutex::new(None),
            malformed: gobelins_adaptation::log_budget::noisy(),
            rejoins: gobelins_adaptation::log_budget::noisy(),
            seed_waits: gobelins_adaptation::log_budget::noisy(),
            pauses: Pauses::new(lease_span),
            lag: Mutex::default(),
            flaps: Mutex::new(Flaps::new(rejoin_hold)),
            held_back: watch::Sender::new(None),
            unacked_since: Mutex::new(None),
            leaderless: Mutex::default(),
            reported: AtomicU64::new(0),
            host: parts.host,
            services: parts.services,
            // No incarnation is u64::MAX: the first declared-dead life always renews.
            renewed_for: AtomicU64::new(u64::MAX),
            renewed_to: AtomicU64::new(u64::MAX),
            renewing: Mutex::new(()),
            reconciling: AtomicBool::new(false),
            raising_rules: AtomicBool::new(false),
            joining: Mutex::new(HashMap::new()),
            admitted: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            head_start: Mutex::new(None),
            told: AtomicU64::new(0),
            asking: Mutex::new(BTreeMap::new()),
            made_at_start: parts.made_incarnation.then_some(parts.incarnation),
            lifecycle,
            save_incarnation: parts.save_incarnation,
            fresh: AtomicBool::new(parts.fresh || parts.older_copy),
            admitted_first: Arc::from(parts.admitted_first),
            shutdown: CancellationToken::new(),
        });
        // Set once, here; a second set would mean two supervisors on one transport.
        let _ = parts.dispatch.node.set(Arc::downgrade(&node));
        // No serving as a manager before the cluster has vouched for this node (see `lease`).
        node.host.lease(Instant::now());
        node.stand_for_election();
        tokio::spawn(Arc::clone(&node).duties());
        tokio::spawn(Arc::clone(&node).leader_duties());
        tokio::spawn(Arc::clone(&node).lease_duties());
        tokio::spawn(Arc::clone(&node).watch_raft());
        Ok(node)
    }

    /// The timers this node runs with.
    pub fn config(&self) -> &SupervisorConfig {
        &self.config
    }

    /// The node's adaptation layer: its services, requests and migrations.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.me.id
    }

    /// Whether this node still refuses raft votes: started on a data directory never admitted
    /// to a cluster, and not admitted since.
    pub fn fresh(&self) -> bool {
        self.fresh.load(Ordering::SeqCst)
    }

    /// This node's current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    /// The last applied cluster state.
    pub fn state(&self) -> Arc<ClusterState> {
        Arc::clone(&self.state.borrow())
    }

    /// A receiver of every applied cluster state.
    pub fn watch_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// A receiver that says when this node has left.
    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// The last log index of this node's raft snapshot, built or installed; `None` before its
    /// first.
    pub fn snapshot_index(&self) -> Option<u64> {
        self.raft.metrics().borrow().snapshot.map(|s| s.index)
    }

    /// Raft voters as this node sees them.
    pub fn voters(&self) -> Vec<u64> {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }

    /// This node's view, as sent to peers.
    pub fn view(&self) -> View {
        View {
            node: self.me.id,
            leader: self.leader(),
            voters: self.voters(),
            state: (*self.state()).clone(),
            quorum_lost_ms: self.quorum_lost().map(|lost| lost.as_millis() as u64),
            silent: self.silent_members(),
            held: self.held_out(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::duties::caught_up;

    use crate::state::{ClusterState, NodeRecord, NodeStatus};
    use gobelins_locator::Labels;

    /// Three nodes at `epoch`, those in `failed` failed.
    fn state(epoch: u64, failed: &[u64]) -> ClusterState {
        let mut state = ClusterState { epoch, ..ClusterState::default() };
        for id in 1..=3 {
            let status = if failed.contains(&id) { NodeStatus::Failed } else { NodeStatus::Active };
            let addr = format!("n{id}");
            state.nodes.insert(
                id,
                NodeRecord {
                    addr,
                    labels: Labels::new(),
                    status,
                    incarnation: 1,
                    kept_out: false,
                    removed_by: None,
                },
            );
        }
        state
    }

    #[test]
    fn a_head_start_is_left_only_once_the_own_state_has_all_it_told() {
        let ahead = state(5, &[3]);
        assert!(!caught_up(&state(4, &[3]), &ahead), "an older epoch");
        assert!(!caught_up(&state(5, &[]), &ahead), "the same epoch, a failure not heard of yet");
        assert!(caught_up(&state(5, &[3]), &ahead));
        assert!(caught_up(&state(6, &[]), &ahead), "a later epoch");
    }
}
