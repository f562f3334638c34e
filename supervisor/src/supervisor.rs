//! One node's supervisor: raft, the transport, and the loop that carries out what the replicated
//! state asks of this node.
//!
//! ```text
//!  peers ──Request──▶ handle() ──▶ raft RPCs, proposals (forwarded to the leader), pings, probes
//!  state machine ──new ClusterState──▶ duties loop ──▶ peer addresses, MigrationDone reports,
//!                                                     leave/fence detection
//!  leader only, every ping interval ──▶ raft membership (≤ 5 voters), Detector ──▶ Fail
//! ```

use crate::detector::{Action, Detector};
use crate::error::{Result, SupervisorError};
use crate::flaps::Flaps;
use crate::lane::{self, Lane};
use crate::network::Network;
use crate::pauses::Pauses;
use crate::rpc::{JoinRequest, ProposeError, Request, Response, View};
use crate::state::{Applied, ClusterState, Command, NodeRecord, NodeStatus, Outcome, Refusal};
use crate::store::{LogStore, StateMachine};
use crate::transport::{Handler, Transport};
use crate::types::Raft;
use crate::voters::{can_commit, desired_voters};
use async_trait::async_trait;
use bytes::Bytes;
use gobelins_adaptation::log_budget::{budgeted, LogBudget};
use gobelins_adaptation::{codec, Host, Progress, Registry, Update};
use gobelins_locator::{Change, Epoch, Labels, NodeId, Snapshot};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::raft::VoteResponse;
use openraft::{BasicNode, ChangeMembers, Membership, ServerState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Failure timeouts a proposal waits to commit on this node as leader: well past a healthy
/// commit (milliseconds) or a leader change (which answers at once), well short of an operator
/// waiting on a silent command.
const COMMIT_WAIT_TIMEOUTS: u32 = 5;

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
    /// The state a join's answer or the leader's word carried ([`Request::Begun`]), with the
    /// incarnation it is for: fed to the host until this node's own applied state has caught up
    /// with it ([`caught_up`]).
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
    /// Called once, at the first admission of a fresh node, to record it (see
    /// [`crate::datadir::DataDir::clear_unadmitted`]); on the agent's runtime, on a blocking
    /// thread, after [`Supervisor::admit_life`] has returned.
    pub admitted_first: Box<dyn Fn() -> Result<()> + Send + Sync>,
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
            record_left: Arc::from(parts.record_left),
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
            joining: Mutex::new(HashMap::new()),
            admitted: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            head_start: Mutex::new(None),
            told: AtomicU64::new(0),
            asking: Mutex::new(BTreeMap::new()),
            made_at_start: parts.made_incarnation.then_some(parts.incarnation),
            lifecycle,
            save_incarnation: parts.save_incarnation,
            fresh: AtomicBool::new(parts.fresh),
            admitted_first: Arc::from(parts.admitted_first),
            shutdown: CancellationToken::new(),
        });
        // Set once, here; a second set would mean two supervisors on one transport.
        let _ = parts.dispatch.node.set(Arc::downgrade(&node));
        // No serving as a manager before the cluster has vouched for this node (see `lease`).
        node.host.lease(Instant::now());
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

    /// The nodes whose short lives in a row still count here, with how many and how much
    /// longer each is held out (zero when not), in milliseconds; and this node itself, while a
    /// refusal of its rejoin holds it.
    pub fn held_out(&self) -> BTreeMap<u64, (u32, u64)> {
        let state = self.state();
        let now = Instant::now();
        let streaks = self.flaps.lock().expect("flaps").streaks(now);
        let mut held: BTreeMap<u64, (u32, u64)> = streaks
            .into_iter()
            .map(|(n, (failures, left))| {
                let left = if holds_out(&state, n) { left.as_millis() as u64 } else { 0 };
                (n, (failures, left))
            })
            .collect();
        if let Some((failures, left)) = self.held_back() {
            held.insert(self.me.id, (failures, left.as_millis() as u64));
        }
        held
    }

    /// While the cluster holds this node out for failing again and again, and it is not back:
    /// its short lives failed in a row, and how much longer the hold lasts.
    pub fn held_back(&self) -> Option<(u32, Duration)> {
        let (life, failures, until) = (*self.held_back.borrow())?;
        let left = until.saturating_duration_since(Instant::now());
        let current = life == self.incarnation() && !self.life_admitted();
        (current && !left.is_zero()).then_some((failures, left))
    }

    /// While this node leads: the members its detector has not heard from for half the
    /// failure timeout or more, in milliseconds, and whether each is suspected. Between a
    /// node's death and its failure's commit the cluster still shows it active: this says so.
    pub fn silent_members(&self) -> BTreeMap<u64, (u64, bool)> {
        let live = self.state().live();
        let detector = self.detector.lock().unwrap_or_else(|p| p.into_inner());
        let Some(detector) = detector.as_ref() else { return BTreeMap::new() };
        // The detector forgets a node gone from the members only at its next tick.
        detector
            .silent(Instant::now(), self.config.failure_timeout / 2)
            .into_iter()
            .filter(|(n, _)| live.contains(n))
            .map(|(n, (age, suspected))| (n, (age.as_millis() as u64, suspected)))
            .collect()
    }

    /// While this node leads and has heard from no majority of the voters for longer than the
    /// failure timeout: for how long, as far as raft's metrics tell.
    pub fn quorum_lost(&self) -> Option<Duration> {
        let (leads, acked) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let alone = metrics.membership_config.membership().voter_ids().eq([self.me.id]);
            (metrics.state == ServerState::Leader && !alone, metrics.millis_since_quorum_ack)
        };
        let mut unacked = self.unacked_since.lock().unwrap_or_else(|p| p.into_inner());
        if !leads {
            *unacked = None;
            return None;
        }
        let age = match acked {
            Some(ms) => {
                *unacked = None;
                Duration::from_millis(ms)
            }
            // None on record yet: counted from when this node first saw none.
            None => unacked.get_or_insert_with(Instant::now).elapsed(),
        };
        (age >= self.config.failure_timeout).then_some(age)
    }

    /// Says that this leader hears from no majority of the voters, and which voters did not
    /// answer a ping just now.
    async fn say_quorum_lost(self: Arc<Self>, lost: Duration) {
        let (voters, silent) = self.silent_voters().await;
        if silent.is_empty() {
            // Every voter answers its ping, and none acknowledges raft in time: the slowness is
            // in storing raft's entries (theirs, or this leader's), not in the network.
            tracing::warn!(
                node = self.me.id,
                lost_for_ms = lost.as_millis() as u64,
                ?voters,
                said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
                "this leader hears from no majority of the voters, though every voter answers its pings: they do not acknowledge raft's entries in time. A disk slow to store them (fsync), here or on the voters, or a node starved of CPU, does this; check their disks and load. Nothing commits meanwhile"
            );
            return;
        }
        tracing::warn!(
            node = self.me.id,
            lost_for_ms = lost.as_millis() as u64,
            ?silent,
            ?voters,
            said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
            "this leader hears from no majority of the voters, so it can commit nothing (no join, leave or eviction, no failure recovered). If the silent voters are down, nothing commits until enough of them are back: restart them with their data directories. If they are up but cut off from this node, and reach each other, they have elected another leader and go on without this node, which they will declare failed: mend the network"
        );
    }

    /// The other voters, and those of them that did not answer a ping just now.
    async fn silent_voters(&self) -> (Vec<u64>, Vec<u64>) {
        let voters: Vec<u64> = self.voters().into_iter().filter(|&v| v != self.me.id).collect();
        let deadline = self.config.ping_interval * 2;
        let pings = voters.iter().map(|&v| async move { (v, self.ping(v, deadline).await) });
        let silent = futures::future::join_all(pings)
            .await
            .into_iter()
            .filter_map(|(v, answered)| (!answered).then_some(v))
            .collect();
        (voters, silent)
    }

    /// Whether this node is a voter that knows no leader (it is not one itself).
    fn leaderless_voter(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader.is_none()
            && metrics.state != ServerState::Leader
            && metrics.membership_config.membership().voter_ids().any(|v| v == self.me.id)
    }

    /// While this node is a voter that knows no leader, for how long it has known none.
    pub fn leaderless_for(&self, now: Instant) -> Option<Duration> {
        // Held out, it was taken out of the voters by a leader it no longer hears from: its
        // own raft still lists it, and nothing is cut off.
        let leaderless = self.leaderless_voter() && self.held_back().is_none();
        self.leaderless.lock().unwrap_or_else(|p| p.into_inner()).observe(leaderless, now)
    }

    /// Says that this voter has known no leader for `lost`, and which voters did not answer a
    /// ping just now.
    async fn say_leaderless(self: Arc<Self>, lost: Duration) {
        let (voters, silent) = self.silent_voters().await;
        tracing::warn!(
            node = self.me.id,
            leaderless_for_ms = lost.as_millis() as u64,
            ?silent,
            ?voters,
            said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
            "this voter has heard from no leader, and its calls for votes win no majority: nothing it asks commits (no join, leave or eviction), and its `gobelins status` shows its own view. If the silent voters are down, restart them with their data directories. If they are up and reach each other, they go on without this node and will declare it failed: mend the network between them and this node"
        );
    }

    /// The freshest view available: the leader's if it answers, else our own.
    pub async fn cluster_view(&self) -> View {
        if let Some(leader) = self.leader().filter(|&l| l != self.me.id) {
            if let Ok(Response::View(view)) =
                self.call(leader, &Request::State, self.config.rpc_timeout).await
            {
                return *view;
            }
        }
        self.view()
    }

    /// Stops the duties and raft.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.host.shutdown();
        // Raft may already be down after a fatal error; there is nothing more to do then.
        let _ = self.raft.shutdown().await;
    }

    /// Makes this node the first member of a new cluster.
    pub async fn bootstrap(&self) -> Result<Outcome> {
        self.start_raft_alone().await?;
        self.join_own_cluster().await
    }

    /// Gives the new cluster's tree its label levels, if any, and joins it as its first
    /// member. A refusal (a `--label` that is not a level, say) is an error: taken for an
    /// admission, it left a cluster without a member that said it was bootstrapped.
    async fn join_own_cluster(&self) -> Result<Outcome> {
        let refused = |refusal: Refusal| {
            SupervisorError::Refused(format!(
                "{refusal}. The bootstrap stopped half-way, before this node was a member: \
                 start the agent again with the same --data-dir, mended flags and without \
                 --bootstrap to finish it"
            ))
        };
        if !self.config.label_levels.is_empty() {
            let levels = self.config.label_levels.clone();
            let shape = Command::Shape { levels };
            self.propose_until(shape, Duration::from_secs(10)).await?.map_err(refused)?;
        }
        let outcome = self.propose_until(self.join_command(), Duration::from_secs(10)).await?;
        let outcome = outcome.map_err(refused)?;
        self.admit_life();
        Ok(Ok(outcome))
    }

    /// The first half of [`Supervisor::bootstrap`]: raft started with this node its only
    /// voter, and no node in the cluster's state yet.
    pub async fn start_raft_alone(&self) -> Result<()> {
        let members = BTreeMap::from([(self.me.id, BasicNode::new(&self.me.addr))]);
        self.raft.initialize(members).await.map_err(|e| SupervisorError::Raft(e.to_string()))
    }

    /// Finishes a bootstrap that stopped between its two halves (killed, or its own join not
    /// committed in time): raft holds this node alone and the cluster's state no node at all,
    /// which no other history leaves. A joiner's raft always lists the node it joined through.
    /// `None` if there is nothing to finish.
    pub async fn finish_bootstrap(&self) -> Result<Option<Outcome>> {
        let alone = self.voters_in_store().await? == [self.me.id];
        if !alone || !self.state().nodes.is_empty() {
            return Ok(None);
        }
        self.join_own_cluster().await.map(Some)
    }

    /// [`Supervisor::finish_bootstrap`] for a node whose data directory says it began a
    /// bootstrap (see [`crate::datadir::DataDir::mark_bootstrapping`]): one that stopped before
    /// raft kept anything, which left raft without members and the state without nodes, is
    /// run again whole.
    pub async fn finish_begun_bootstrap(&self) -> Result<Option<Outcome>> {
        let memberless = self.voters_in_store().await?.is_empty();
        if memberless && self.state().nodes.is_empty() {
            return self.bootstrap().await.map(Some);
        }
        self.finish_bootstrap().await
    }

    /// The voters of the membership raft loaded from its store, asked of raft's core. Its
    /// metrics may not show that membership yet just after a start: read there, a bootstrap
    /// refused and started again looked memberless, was initialized a second time, and the
    /// agent exited on raft's refusal.
    async fn voters_in_store(&self) -> Result<Vec<u64>> {
        self.raft
            .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
            .await
            .map_err(|e| SupervisorError::Raft(e.to_string()))
    }

    /// Lets this process's life serve: its host is fed the cluster's state from now on, and
    /// its lease runs from now. For a node alone in its cluster, which nobody can declare
    /// failed; a join's admission leases from its ask.
    pub fn admit_life(&self) {
        self.admit_life_asked(Instant::now());
    }

    /// [`Supervisor::admit_life`], the lease running from `asked`, when this process began to
    /// ask to be admitted: the cluster watches the node from the join's commit, after that,
    /// and declares it failed a failure timeout later if it stays silent. Leased from the
    /// answer's arrival, a process frozen while the answer waited served for half a failure
    /// timeout after it woke, when the cluster may have rebuilt its entries elsewhere.
    fn admit_life_asked(&self, asked: Instant) {
        self.admitted.store(true, Ordering::SeqCst);
        self.held_back.send_replace(None);
        if self.fresh.swap(false, Ordering::SeqCst) {
            let (record, node) = (Arc::clone(&self.admitted_first), self.me.id);
            let record = move || {
                if let Err(error) = record() {
                    // Kept, the mark only makes the next start refuse votes until it is admitted.
                    tracing::warn!(node, %error, "cannot record in the data directory that this node was admitted");
                }
            };
            // Off the workers where that is safe: the disk's sync would hold one while the
            // change that admits this node sends it its entries.
            if crate::disk::off_workers() {
                tokio::task::spawn_blocking(record);
            } else {
                record();
            }
        }
        // The cluster just vouched for this node: it may serve until the leader's pings take over.
        self.host.lease(asked + self.lease_span());
        self.wake.notify_one();
    }

    /// When the calls still asking the cluster to admit `life` began to; now if none is (its
    /// callers hold an ask, or saw one).
    fn asked_since(&self, life: u64) -> Instant {
        let asking = self.asking.lock().expect("asking");
        asking.get(&life).map_or_else(Instant::now, |&(_, since)| since)
    }

    /// Whether this process's life was admitted by the cluster.
    pub fn life_admitted(&self) -> bool {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Whether this process made its current incarnation (renewed it, or wrote it at its first
    /// start): a restarted process's own log, read from disk, holds the life an earlier run
    /// served, which it did not make.
    pub fn life_made_here(&self) -> bool {
        let life = self.incarnation();
        self.renewed_to.load(Ordering::SeqCst) == life || self.made_at_start == Some(life)
    }

    /// Asks the cluster at `seed` to admit this node; retries until `deadline`.
    pub async fn join_via(&self, seed: &str, deadline: Duration) -> Result<Outcome> {
        let _asking = Asking::new(self, self.incarnation());
        self.ask_to_join(seed, deadline).await
    }

    /// [`Supervisor::join_via`], the asking.
    async fn ask_to_join(&self, seed: &str, deadline: Duration) -> Result<Outcome> {
        let until = Instant::now() + deadline;
        let mut last = String::from("no attempt");
        // The seed answered, and only the cluster's recovery of this node's last life stood in
        // the way: the seed is fine, and the advice must say so.
        let mut recovering = false;
        let mut warned = false;
        while Instant::now() < until {
            if !warned && last != "no attempt" {
                warned = true;
                gobelins_adaptation::log_budget::budgeted(
                    &self.seed_waits,
                    SEED_WAITS,
                    || tracing::warn!(%seed, error = %last, "cannot join through the seed yet; retrying for {} s", deadline.as_secs()),
                );
            }
            // Built again for every attempt: this process may have moved to a new life
            // meanwhile (its fence check found the last one ended and rejoined as the next).
            let join = self.join_request();
            let asked = join.incarnation;
            // This call asks as that life now, whatever life it began asking as: a change that
            // admits it as it begins looks for an ask of it (`own_join_begun`).
            let _asking = Asking::new(self, asked);
            let bytes = lane::request(&Request::Join(join))?;
            // The answer vouches for this node as of no earlier than now: a lease counted from
            // later would outlast it. (This call's own ask may be for a life it has left.)
            let sent = Instant::now();
            match self.transport.call_addr(seed, bytes, self.config.rpc_timeout * 3).await {
                Ok((_, reply)) => {
                    match lane::decode_response(reply).map_err(|e| match e {
                        // The seed will not get better by asking it again, but the cluster may
                        // take the join through another member.
                        SupervisorError::PeerStopped(_) => SupervisorError::Refused(format!(
                        "{seed} takes no joins: {e}. Join through another member of the cluster"
                    )),
                        e => e,
                    })? {
                        // An answer for a life this process left while it was on its way (its
                        // fence check found it ended and rejoined as the next): what it says of
                        // that life, even "already a member" (the new one, admitted meanwhile),
                        // is no word on this one. Asked again as the new life, the cluster says
                        // where its join stands.
                        Response::Admitted { outcome, .. } if self.incarnation() != asked => {
                            // Not kept as the last error: the seed refuses nothing.
                            tracing::debug!(asked, ?outcome, "answered for a life left since");
                            continue;
                        }
                        // The cluster is still recovering this node's last life: it will take
                        // the new one once that is done.
                        Response::Admitted {
                            outcome: Ok(Err(refusal @ Refusal::Recovering(_))),
                            ..
                        } => {
                            recovering = true;
                            last = refusal.to_string();
                        }
                        // A join always begins a change or waits for one, which this process must
                        // take part in: a life whose join ended already was served by another run
                        // of this node, whose memory this one does not have.
                        Response::Admitted {
                            outcome: Ok(Ok(Applied::Recorded { .. })), ..
                        } if !self.life_admitted() => {
                            return Err(SupervisorError::Refused(format!(
                            "node {}'s life {} is already active in the cluster, but this process \
                             never served it: its entries are elsewhere, and serving them empty \
                             would lose them. An agent restarted from its data directory (this \
                             one, started again) recovers that life by itself and rejoins as a new \
                             one: no join is needed",
                            self.me.id,
                            self.incarnation()
                        )));
                        }
                        Response::Admitted { outcome: Ok(outcome), state } => {
                            // Renewed since the arm above looked, it is the new life's join
                            // that admits it.
                            if outcome.is_ok() && self.incarnation() == asked {
                                if let Some(state) = state {
                                    self.keep_head_start(asked, state);
                                }
                                self.admit_life_asked(self.asked_since(asked).min(sent));
                            }
                            return Ok(outcome);
                        }
                        Response::Admitted { outcome: Err(e), .. } => {
                            (recovering, last) = (false, e.to_string())
                        }
                        _ => {
                            (recovering, last) =
                                (false, "seed answered with the wrong message".into())
                        }
                    }
                }
                // A refused handshake will not get better by retrying: wrong secret or cluster.
                Err(e @ SupervisorError::Handshake { .. }) => return Err(e),
                Err(SupervisorError::SecretDiffers { peer, reason }) => {
                    return Err(SupervisorError::Handshake { peer, reason })
                }
                Err(e) => (recovering, last) = (false, e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let advice = if recovering {
            "the seed answered, but the change that deals with this node's last life has not \
             finished: `gobelins status` on a member shows the change under way and what it \
             waits for"
        } else {
            "is an agent of this cluster running there?"
        };
        Err(SupervisorError::Config(format!("could not join through {seed}: {last}; {advice}")))
    }

    /// Whether the cluster counts this node's current life as a member, asked through `seed`
    /// and the members this node's own state lists, all at once; `None` if none gave an answer
    /// to trust before `deadline`. Silence is asked again rather than taken for "no": a seed
    /// that answers a join a moment later would admit the same life again, served from empty
    /// services. An answer from a copy of the state older than this node's own is asked again
    /// too: it may not have heard of this node's join yet. A seed that holds another secret
    /// is an error: one of another cluster than this directory's was taken for a seed down,
    /// and the node resumed its old cluster alone on its own state, instead of the one asked
    /// for.
    pub async fn last_life_is_member(
        &self,
        seed: &str,
        deadline: Duration,
    ) -> Result<Option<bool>> {
        let until = Instant::now() + deadline;
        let own = self.state();
        let mut asked: Vec<String> = vec![seed.to_string()];
        asked.extend(
            own.nodes
                .iter()
                .filter(|(&id, r)| id != self.me.id && r.status.is_live() && r.addr != seed)
                .map(|(_, r)| r.addr.clone()),
        );
        // The seed alone first: every answer carries the whole state.
        let mut round = 1;
        loop {
            let answers = futures::future::join_all(asked[..round].iter().map(|addr| async move {
                let Ok(bytes) = lane::request(&Request::State) else { return Ok(None) };
                let reply =
                    match self.transport.call_addr(addr, bytes, self.config.rpc_timeout).await {
                        Ok((_, reply)) => reply,
                        // Not a refusal for now (a member's id on another address, until
                        // the cluster declares that life failed): a seed of another cluster.
                        Err(SupervisorError::SecretDiffers { peer, reason }) => {
                            return Err(SupervisorError::Handshake { peer, reason })
                        }
                        Err(_) => return Ok(None),
                    };
                Ok(match lane::decode_response(reply) {
                    Ok(Response::View(view)) => Some(view.state),
                    _ => None,
                })
            }))
            .await;
            let mut answers = answers.into_iter();
            // Only the seed's: a member of this node's own state that proves another secret
            // is the odd one (see `members_with_another_secret`).
            let seed_said = answers.next().expect("the seed is asked first");
            let answers = seed_said?.into_iter().chain(answers.flatten().flatten());
            round = asked.len();
            // The first of the newest: the seed's, when it is as new as any.
            let newest = answers.reduce(|a, b| if b.epoch > a.epoch { b } else { a });
            if let Some(state) = newest.filter(|s| s.epoch >= own.epoch) {
                return Ok(Some(
                    state
                        .nodes
                        .get(&self.me.id)
                        .is_some_and(|r| r.incarnation == self.incarnation() && r.status.is_live()),
                ));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            tracing::debug!(%seed, "no answer to trust yet on this node's last life; asking again");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether this node's own copy of the state counts its current life as joining or active.
    /// A leaving life is left out: a node removed from raft as it left never applies the entry
    /// that ends it, so its own copy may say "leaving" for ever.
    pub fn last_life_is_member_here(&self) -> bool {
        self.state().nodes.get(&self.me.id).is_some_and(|r| {
            r.incarnation == self.incarnation()
                && matches!(r.status, NodeStatus::Joining | NodeStatus::Active)
        })
    }

    /// Joins through `seed`; a node the cluster remembers as departed comes back as a new life
    /// of itself (a higher incarnation, persisted first). With `wait_holds`, a node held out
    /// for failing again and again waits its hold out (at most five minutes) and asks again,
    /// rather than stop: its operator started it to have it back.
    pub async fn join_cluster(
        &self,
        seed: &str,
        deadline: Duration,
        wait_holds: bool,
    ) -> Result<Outcome> {
        let mut renewed = false;
        loop {
            match self.join_via(seed, deadline).await? {
                // Asked again every few seconds rather than at the end: an operator's
                // `unhold`, or a leader that never saw the failures, may let it in sooner.
                Err(refusal @ Refusal::Held { left_ms, .. }) if wait_holds => {
                    if self.note_held(&refusal) {
                        tracing::warn!(node = self.me.id, "rejoin held back: {refusal}");
                    }
                    let wait = Duration::from_millis(left_ms) + self.config.ping_interval;
                    tokio::time::sleep(wait.min(self.config.failure_timeout * 3)).await;
                }
                // Noted all the same (`gobelins join` on a held node): requests waiting here
                // learn of it now, not at the next fence check.
                Err(refusal @ Refusal::Held { .. }) => {
                    self.note_held(&refusal);
                    return Ok(Err(refusal));
                }
                Err(Refusal::StaleIncarnation { last, .. }) if !renewed => {
                    // The life that ended may be this process's own (`gobelins join` asked of
                    // an agent declared failed before its own check noticed): its services'
                    // memory must not come back with the new life.
                    if last >= self.incarnation() {
                        self.start_services_afresh(last);
                    }
                    self.renew_incarnation(last)?;
                    renewed = true;
                }
                outcome => return Ok(outcome),
            }
        }
    }

    /// Lifts the hold on `node` at every other live member and here, each of which keeps its
    /// own count of the node's failures (the next leader must not hold it either). The
    /// members that answered, those that did not, and whether any held the node or counted
    /// short lives of it.
    pub async fn unhold(&self, node: u64) -> Unheld {
        let (held, counted) = self.unhold_here(node, self.me.id);
        let mut unheld = Unheld { held, counted, ..Unheld::default() };
        let others = self.state().live().into_iter().filter(|&n| n != self.me.id && n != node);
        let asked = others.map(|n| async move {
            (n, self.call(n, &Request::Unhold(node), self.config.rpc_timeout).await)
        });
        for (n, answer) in futures::future::join_all(asked).await {
            match answer {
                Ok(Response::Unheld { held, counted }) => {
                    unheld.answered.push(n);
                    unheld.held |= held;
                    unheld.counted |= counted;
                }
                _ => unheld.silent.push(n),
            }
        }
        unheld
    }

    /// Tells every other live member that this life stops on purpose (the agent got SIGTERM
    /// or SIGINT), so that none counts its failure as a short life: restarted a few times in a
    /// row by an operator, the node would be held out. Waits for the answers at most `wait`;
    /// how many members took the notice, of how many told. A member that did not take it
    /// counts the failure, as before.
    pub async fn announce_stopping(&self, wait: Duration) -> (usize, usize) {
        let life = self.incarnation();
        let others: Vec<u64> =
            self.state().live().into_iter().filter(|&n| n != self.me.id).collect();
        let told = others.iter().map(|&n| async move {
            matches!(self.call(n, &Request::Stopping(life), wait).await, Ok(Response::Heard(true)))
        });
        let heard = futures::future::join_all(told).await.into_iter().filter(|&h| h).count();
        (heard, others.len())
    }

    /// [`Supervisor::unhold`] at this node, asked by node `by`: whether it held the node, and
    /// whether it had counted short lives of it.
    fn unhold_here(&self, node: u64, by: u64) -> (bool, bool) {
        let (held, counted) = self.flaps.lock().expect("flaps").unhold(node, Instant::now());
        if held {
            tracing::warn!(node, by, "node {node}'s hold is lifted, its short lives forgotten");
        } else if counted {
            tracing::info!(node, by, "node {node}'s short lives are forgotten (it was not held)");
        }
        (held, counted)
    }

    /// Keeps what a refusal said of this node's hold, for its own view while it waits;
    /// whether it is a hold not heard of before.
    fn note_held(&self, refusal: &Refusal) -> bool {
        let Refusal::Held { failures, left_ms, .. } = refusal else { return false };
        let now = Instant::now();
        let life = self.incarnation();
        let mut new = false;
        self.held_back.send_modify(|held| {
            // Not by life: a held node renews its incarnation between two asks of the same
            // hold.
            new = held.is_none_or(|(_, known, until)| known != *failures || until <= now);
            *held = Some((life, *failures, now + Duration::from_millis(*left_ms)));
        });
        new
    }

    /// Resolves once this node is held out of the cluster ([`Supervisor::held_back`]), with
    /// what that says. A request that waits for a configuration races it: the node learns of
    /// its hold only when it asks to rejoin, and a request that reached it before then would
    /// otherwise wait out its whole deadline for a configuration that is not coming.
    pub async fn until_held(&self) -> (u32, Duration) {
        let mut held = self.held_back.subscribe();
        loop {
            if let Some(hold) = self.held_back() {
                return hold;
            }
            // `self` owns the sender: it does not close while this runs.
            if held.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Moves to an incarnation above `seen` (the last one the cluster knows), persisted before it
    /// is used; returns the incarnation now in force.
    pub fn renew_incarnation(&self, seen: u64) -> Result<u64> {
        let _renewing = self.renewing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = self.incarnation().max(seen + 1);
        if next != self.incarnation() {
            tracing::warn!(node = self.me.id, incarnation = next, "joining as a new incarnation");
            (self.save_incarnation)(next)?;
            self.renewed_to.store(next, Ordering::SeqCst);
            // Under the lifecycle's lock, which the duties take to judge "left" by the
            // incarnation: a node restarted with --join replays the record of its last life as
            // left, and that must not end the new life.
            self.lifecycle.send_modify(|lifecycle| {
                self.incarnation.store(next, Ordering::SeqCst);
                if *lifecycle == Lifecycle::Left {
                    *lifecycle = Lifecycle::Member;
                }
            });
        }
        Ok(next)
    }

    /// Proposes a command, through the leader, retrying while no leader is known.
    pub async fn propose_until(&self, command: Command, deadline: Duration) -> Result<Outcome> {
        let until = Instant::now() + deadline;
        loop {
            match self.propose(command.clone()).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if Instant::now() >= until => {
                    return Err(SupervisorError::Raft(e.to_string()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Proposes a command once: locally if leader, else forwarded to the leader.
    pub async fn propose(&self, command: Command) -> std::result::Result<Outcome, ProposeError> {
        // A follower that knows the leader asks it at once. Its own raft would say it is no
        // leader only once it is free: storing entries on a slow disk (seconds a write), it
        // never said so within the wait, and a participant's report of its part in a change
        // never reached the leader, which held the change up for as long as the disk was slow.
        if let Some(leader) = self.leader().filter(|&l| l != self.me.id) {
            return self.forward(leader, command).await;
        }
        match self.propose_here(command.clone()).await {
            Err(ProposeError::NoLeader) => {}
            other => return other,
        }
        let Some(leader) = self.leader().filter(|&l| l != self.me.id) else {
            return Err(ProposeError::NoLeader);
        };
        self.forward(leader, command).await
    }

    /// Has `leader` propose `command`.
    async fn forward(
        &self,
        leader: u64,
        command: Command,
    ) -> std::result::Result<Outcome, ProposeError> {
        match self.call(leader, &Request::Propose(command), self.config.rpc_timeout).await {
            Ok(Response::Proposed(result)) => result,
            Ok(_) => Err(ProposeError::Unreachable("wrong answer".into())),
            Err(e) => Err(ProposeError::Unreachable(e.to_string())),
        }
    }

    /// Proposes through this node's raft; `NoLeader` if this node is not the leader. A leader
    /// cut off from the majority keeps believing it leads, and its proposals wait for a quorum
    /// that does not come: they are given up after a while, with what to check.
    async fn propose_here(&self, command: Command) -> std::result::Result<Outcome, ProposeError> {
        let wait = self.config.failure_timeout * COMMIT_WAIT_TIMEOUTS;
        let Ok(written) = tokio::time::timeout(wait, self.raft.client_write(command)).await else {
            return Err(ProposeError::Raft(format!(
                "not committed within {} ms: a majority of the voters must be up, reachable \
                 from this leader, and quick enough to store its entries (a slow disk is not); \
                 `gobelins status` lists them. It may still commit once they are",
                wait.as_millis()
            )));
        };
        match written {
            Ok(response) => {
                response.data.0.ok_or_else(|| ProposeError::Raft("entry had no outcome".into()))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(ProposeError::NoLeader)
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    fn join_request(&self) -> JoinRequest {
        JoinRequest {
            node: self.me.id,
            addr: self.me.addr.clone(),
            labels: self.me.labels.clone(),
            incarnation: self.incarnation(),
        }
    }

    fn join_command(&self) -> Command {
        let j = self.join_request();
        Command::Join { node: j.node, addr: j.addr, labels: j.labels, incarnation: j.incarnation }
    }

    async fn call(&self, to: u64, request: &Request, deadline: Duration) -> Result<Response> {
        lane::decode_response(self.transport.call(to, lane::request(request)?, deadline).await?)
    }

    /// What a node stopped on a fatal error answers to everything, so that the cluster
    /// declares it failed.
    fn stopped(&self) -> Option<Bytes> {
        let why = self.fatal()?;
        let message = format!("node {} stopped on a fatal error: {why}", self.me.id);
        Some(encode_response(&Response::Stopped(message)))
    }

    async fn adapt(&self, from: u64, message: Bytes) -> Bytes {
        if let Some(stopped) = self.stopped() {
            return stopped;
        }
        Lane::Adaptation.seal(self.host.handle(NodeId(from), message).await)
    }

    async fn handle(&self, from: u64, message: Bytes) -> Bytes {
        match Lane::open(message) {
            Ok((Lane::Adaptation, bytes)) => self.adapt(from, bytes).await,
            // Boxed: the supervisor's own messages are the rarer ones, and their future would
            // make every message's future (allocated once per message) larger.
            Ok((Lane::Supervisor, bytes)) => Box::pin(self.supervise(from, bytes)).await,
            Err(e) => {
                budgeted(&self.malformed, MALFORMED, || {
                    tracing::warn!(node = from, error = %e, "a message from this node could not be decoded, and was answered Malformed: is it running another gobelins build? (`gobelins --version` on both; a cluster's nodes must run builds of one protocol version)");
                });
                encode_response(&Response::Malformed(e.to_string()))
            }
        }
    }

    /// Answers a message of the supervisor's own lane.
    async fn supervise(&self, from: u64, bytes: Bytes) -> Bytes {
        let request = match codec::decode::<Request>(&bytes) {
            Ok(request) => request,
            Err(e) => {
                budgeted(&self.malformed, MALFORMED, || {
                    tracing::warn!(node = from, error = %e, "a request from this node could not be decoded, and was answered Malformed: is it running another gobelins build? (`gobelins --version` on both; a cluster's nodes must run builds of one protocol version)");
                });
                return encode_response(&Response::Malformed(e.to_string()));
            }
        };
        if let Some(stopped) = self.stopped() {
            return stopped;
        }
        // The raft calls, proposals, joins and probes are boxed: their futures run to
        // kilobytes, and inline they would make the future of every message of this lane
        // (pings and leases included, allocated one per message) that large, past the
        // allocator's per-thread cache.
        let response = match request {
            Request::AppendEntries(r) => {
                Response::AppendEntries(Box::pin(self.raft.append_entries(r)).await)
            }
            Request::Vote(r) if self.fresh.load(Ordering::SeqCst) => {
                tracing::warn!(
                    node = self.me.id,
                    candidate = r.vote.leader_id().voted_for(),
                    "vote refused: this node's data directory is new and the cluster has not admitted it; if it was a voter's, wiped, its log no longer holds what it voted on"
                );
                Response::Vote(Ok(VoteResponse {
                    vote: r.vote,
                    vote_granted: false,
                    last_log_id: None,
                }))
            }
            Request::Vote(r) => Response::Vote(Box::pin(self.raft.vote(r)).await),
            Request::InstallSnapshot(r) => {
                Response::InstallSnapshot(Box::pin(self.raft.install_snapshot(r)).await)
            }
            // A peer reports only its own part of a change.
            Request::Propose(Command::MigrationDone { node, .. }) if node != from => {
                Response::Proposed(Err(ProposeError::Raft(format!(
                    "node {from} may not report for node {node}"
                ))))
            }
            Request::Propose(command) => {
                Response::Proposed(Box::pin(self.propose_here(command)).await)
            }
            Request::Join(join) => {
                let (outcome, state) = Box::pin(self.admit(join)).await;
                Response::Admitted { outcome, state }
            }
            Request::Ping => Response::Pong,
            Request::Lease { incarnation } => {
                let granted = self.grants_lease(from, incarnation);
                // A node that renews its lease is heard, whatever became of the leader's
                // pings to it (queued behind other calls on the same connection, say): it is
                // in touch, and must not be declared cut off.
                if granted {
                    if let Some(d) =
                        self.detector.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    {
                        d.handle_pong(from, Instant::now());
                    }
                }
                Response::Leased(granted)
            }
            Request::Probe { target } => {
                Response::Probed(Box::pin(self.ping(target, self.config.probe_timeout)).await)
            }
            Request::State => Response::View(Box::new(self.view())),
            Request::Begun(state) => Response::Heard(self.hear_begun(from, *state)),
            Request::Unhold(node) => {
                let (held, counted) = self.unhold_here(node, from);
                Response::Unheld { held, counted }
            }
            Request::Stopping(life) => {
                // Only the life the cluster has live for the sender: a restarted process that
                // has not rejoined yet must not excuse the life that crashed.
                let live = self
                    .state()
                    .nodes
                    .get(&from)
                    .is_some_and(|r| r.incarnation == life && r.status.is_live());
                if live {
                    tracing::info!(node = from, life, "node {from} is stopping on purpose: its failure will not count as a short life (the first {} such in {} min)", crate::flaps::STOPS_FORGIVEN, crate::flaps::FLAP_MEMORY.as_secs() / 60);
                    self.flaps.lock().expect("flaps").stopping(from, life);
                }
                Response::Heard(live)
            }
        };
        encode_response(&response)
    }

    /// Admits a joining node: as leader, makes it a raft learner (so it receives the entry that
    /// adds it) and proposes its `Join`; otherwise hands the request to the leader. A join that
    /// began a change comes back with the state it began, which the joiner begins from.
    async fn admit(
        &self,
        join: JoinRequest,
    ) -> (std::result::Result<Outcome, ProposeError>, Option<Box<ClusterState>>) {
        let is_leader = self.raft.metrics().borrow().state == ServerState::Leader;
        if !is_leader {
            let Some(leader) = self.leader().filter(|&l| l != self.me.id) else {
                return (Err(ProposeError::NoLeader), None);
            };
            return match self.call(leader, &Request::Join(join), self.config.rpc_timeout * 2).await
            {
                Ok(Response::Admitted { outcome, state }) => (outcome, state),
                Ok(_) => (Err(ProposeError::Unreachable("wrong answer".into())), None),
                Err(e) => (Err(ProposeError::Unreachable(e.to_string())), None),
            };
        }
        let node = join.node;
        let outcome = self.admit_here(join).await;
        // Applied here before the proposal returned, so this state has the change begun (or
        // a later one, which the joiner's part would still be in: it cannot end without it).
        let state = match &outcome {
            Ok(Ok(Applied::Began { .. })) => Some(Box::new((*self.state()).clone()))
                .filter(|s| s.in_progress.as_ref().is_some_and(|p| p.participants.contains(&node))),
            _ => None,
        };
        (outcome, state)
    }

    /// [`Supervisor::admit`] on the leader.
    async fn admit_here(&self, join: JoinRequest) -> std::result::Result<Outcome, ProposeError> {
        // Counted first: the duties loop, which counts failures as the state changes, may not
        // have seen this one yet, and a join let in unheld would record the new life over it.
        let state = self.state();
        self.count_failures(&state);
        if holds_out(&state, join.node) {
            if let Some(hold) = self.flaps.lock().expect("flaps").hold(join.node, Instant::now()) {
                return Ok(Err(hold.refusal(join.node)));
            }
        }
        self.transport.set_peer(join.node, join.addr.clone());
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&join.node)
            .is_some();
        self.joining.lock().expect("joining").insert(join.node, Instant::now());
        if !known {
            self.raft.add_learner(join.node, BasicNode::new(&join.addr), false).await.map_err(
                |e| match e {
                    // Passing (a change of voters under way); the joiner asks again, and its
                    // operator needs no raft log id.
                    RaftError::APIError(ClientWriteError::ChangeMembershipError(
                        ChangeMembershipError::InProgress(_),
                    )) => ProposeError::Raft(
                        "the cluster is changing its raft voters; ask again shortly".into(),
                    ),
                    e => ProposeError::Raft(e.to_string()),
                },
            )?;
        }
        let JoinRequest { node, addr, labels, incarnation } = join;
        self.propose_here(Command::Join { node, addr, labels, incarnation }).await
    }

    /// [`SupervisorConfig::lease_span`].
    fn lease_span(&self) -> Duration {
        self.config.lease_span()
    }

    /// Whether the leader loop has ticked on time lately. Just back from a pause it has not,
    /// whatever ran first when this process resumed, and what was measured across the pause
    /// (raft's metrics, probes that ran out) says nothing of the others.
    fn running_on_time(&self) -> bool {
        let within = self.config.ping_interval + self.lease_span();
        self.pauses.ticked_on_time(within, Instant::now())
    }

    /// Whether this node, as a leader a quorum acknowledged within half a lease, counts
    /// `node` (at `incarnation`) as a member that may serve.
    fn grants_lease(&self, node: u64, incarnation: u64) -> bool {
        // Just back from a pause, raft's metrics may predate it: no grant until a tick on time.
        self.running_on_time()
            && self.leader_ack_age().is_some()
            && self
                .state()
                .nodes
                .get(&node)
                .is_some_and(|r| r.incarnation == incarnation && r.status.is_live())
    }

    /// As a leader a quorum acknowledged within half a lease, how long ago it did (zero for the
    /// only voter); `None` otherwise.
    fn leader_ack_age(&self) -> Option<Duration> {
        // Asked by every member each ping interval: read the metrics in place, not cloned.
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != ServerState::Leader {
            return None;
        }
        let acked = metrics.millis_since_quorum_ack.map(Duration::from_millis);
        let alone = metrics.membership_config.membership().voter_ids().eq([self.me.id]);
        acked.filter(|&age| age < self.lease_span()).or(alone.then_some(Duration::ZERO))
    }

    /// A follower's lease: renewed each ping interval by asking the leader, and running from
    /// the moment it asked. A node cut off, or frozen, stops serving half a failure timeout
    /// after its last granted ask at the latest, before any leader can declare it failed.
    async fn lease_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.ping_interval);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(leader) = self.leader().filter(|&l| l != self.me.id) else { continue };
            let asked = Instant::now();
            let request = Request::Lease { incarnation: self.incarnation() };
            if let Ok(Response::Leased(true)) =
                self.call(leader, &request, self.config.ping_interval * 2).await
            {
                self.host.lease(asked + self.lease_span());
            }
        }
    }

    /// Waits for raft to stop on its own (a storage error, typically a full disk), and then
    /// takes the node out of service: a node whose raft is gone can neither learn nor commit
    /// configurations, yet would go on answering pings, and the cluster would never replace it.
    async fn watch_raft(self: Arc<Self>) {
        let mut metrics = self.raft.metrics();
        let fatal = loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                break fatal.to_string();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = metrics.changed() => if changed.is_err() {
                    // The raft core is gone without saying why (it panicked, say).
                    break "raft stopped without a reason".to_string();
                },
            }
        };
        if self.shutdown.is_cancelled() {
            return; // our own shutdown stopped raft
        }
        self.stop_on_storage(format!("raft stopped: {fatal}"));
    }

    /// Stops this node for good because its data directory cannot be written: it stops serving
    /// and answering its peers, so that the cluster declares it failed and rebuilds its entries
    /// elsewhere, and the agent exits saying so.
    fn stop_on_storage(&self, why: String) {
        tracing::error!(
            node = self.me.id,
            error = %why,
            "this node's data directory cannot be written (is its disk full or failing?). The \
             node stops serving and answering its peers, so that the cluster declares it failed \
             and rebuilds its entries elsewhere. Mend the disk, then restart the agent: it \
             rejoins as a new life"
        );
        self.shutdown.cancel();
        self.host.shutdown();
        self.lifecycle.send_replace(Lifecycle::Fatal(why));
    }

    /// Whether raft has committed a membership in which this node does not vote, as far as
    /// this node knows. Applied, not only written: a leader that leaves appends the last
    /// membership, without itself, before the others have it.
    pub fn out_of_voters(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = &metrics.membership_config;
        !membership.membership().voter_ids().any(|v| v == self.me.id)
            && membership.log_id() <= &metrics.last_applied
    }

    /// How many other members this node's state counts live, and how many of them proved, at
    /// the last dial to each, that they hold another secret than this node's.
    pub(crate) fn members_with_another_secret(&self) -> (usize, usize) {
        let state = self.state();
        let members: Vec<u64> = state
            .nodes
            .iter()
            .filter(|(&id, r)| id != self.me.id && r.status.is_live())
            .map(|(&id, _)| id)
            .collect();
        let differ = members.iter().filter(|&&id| self.transport.secret_differs(id)).count();
        (members.len(), differ)
    }

    /// Stops this node for good because the cluster refused what it is: it stops serving and
    /// answering its peers, which declare it failed and rebuild its entries elsewhere.
    pub fn stop_refused(&self, why: String) {
        tracing::error!(node = self.me.id, "{why}; this node stops");
        self.shutdown.cancel();
        self.host.shutdown();
        self.lifecycle.send_replace(Lifecycle::Refused(why));
    }

    /// Why this node stopped for good, if it did.
    fn fatal(&self) -> Option<String> {
        match &*self.lifecycle.borrow() {
            Lifecycle::Fatal(why) | Lifecycle::Refused(why) => Some(why.clone()),
            _ => None,
        }
    }

    async fn ping(&self, node: u64, deadline: Duration) -> bool {
        matches!(self.call(node, &Request::Ping, deadline).await, Ok(Response::Pong))
    }

    /// Follows the applied state: keeps peer addresses current, reports this node's part of
    /// each change, notices when it has left or been declared failed.
    async fn duties(self: Arc<Self>) {
        let mut state = self.state.clone();
        let mut retry = tokio::time::interval(Duration::from_millis(100));
        // A node cut off long enough to be declared failed may never hear of it through raft
        // (it is no longer sent the log), so it asks a peer now and then.
        let mut fence_check = tokio::time::interval(self.config.failure_timeout * 3);
        let mut gone = BTreeSet::new();
        let mut done = self.host.done();
        let mut fed = HostFeed::default();
        let mut life = self.host.life();
        loop {
            if self.host.life() != life {
                // A new life of the host: it has reported nothing and been fed nothing.
                life = self.host.life();
                done = self.host.done();
                fed = HostFeed::default();
                self.reported.store(0, Ordering::SeqCst);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = state.changed() => if changed.is_err() { return },
                _ = done.changed() => {}
                _ = self.wake.notified() => {}
                _ = retry.tick() => {}
                _ = fence_check.tick() => {
                    // A leader too, once the cluster has ended its life: declared failed while
                    // paused, say, then elected once it ran again.
                    let ended = self.state().nodes.get(&self.me.id).is_some_and(|r| {
                        r.status == NodeStatus::Failed && r.incarnation == self.incarnation()
                    });
                    if !self.in_touch() || self.leader() != Some(self.me.id) || ended {
                        let me = Arc::clone(&self);
                        tokio::spawn(async move { me.check_fenced().await });
                    }
                }
            }
            let current = self.ahead(state.borrow_and_update().clone());
            for (&id, record) in &current.nodes {
                match record.status {
                    // Once, on the way out: forgetting on every pass would also cut the
                    // connections a departed node opens to ask to come back.
                    NodeStatus::Failed | NodeStatus::Left => {
                        if gone.insert(id) {
                            self.transport.forget(id);
                        }
                    }
                    _ => {
                        gone.remove(&id);
                        self.transport.set_peer(id, record.addr.clone());
                    }
                }
            }
            self.count_failures(&current);
            if let Some(mine) = current.nodes.get(&self.me.id) {
                self.end_if_left(mine);
            }
            if !self.life_admitted() && self.own_join_begun(&current) {
                self.admit_life_asked(self.asked_since(self.incarnation()));
            }
            // Before this node's own part: its senders' packing would hold the calls back.
            if self.tell_participants(&current) {
                // Lets the calls go out before this node's own part keeps the workers busy:
                // without it, the participants began 5 to 10 ms after this node, not 2.
                tokio::task::yield_now().await;
            }
            if self.life_admitted() {
                fed.feed(&self.host, &current);
            }
            self.report_progress(&current);
        }
    }

    /// Takes the lives `state` shows begun and failed, to hold out a node whose lives keep
    /// failing soon after they began; a leader says when one is held.
    fn count_failures(&self, state: &ClusterState) {
        let held = {
            let mut flaps = self.flaps.lock().expect("flaps");
            flaps.watch(&state.nodes, self.life_admitted(), Instant::now())
        };
        // Said by the leader, which enforces it, and only where it does (`holds_out`).
        if self.leader() != Some(self.me.id) {
            return;
        }
        for (node, hold) in held.into_iter().filter(|(node, _)| holds_out(state, *node)) {
            tracing::warn!(
                node,
                failures = hold.failures,
                "node {node} keeps failing: {} short lives in a row, {:.1} s from the first \
                 failure to the last, each declared failed soon after it began. It is held out \
                 for {:.1} s before it may rejoin, longer at each such failure, so that its \
                 entries stop moving out and back; it rejoins by itself then (`--rejoin-hold-ms` \
                 sets the first hold). {}",
                hold.failures,
                hold.within.as_secs_f64(),
                hold.left.as_secs_f64(),
                crate::flaps::advice(node)
            );
        }
    }

    /// Whether `state` has the change begun that the join this process is asking for began,
    /// for a life this process made. Committed, it admits this life as the join's answer
    /// will: on a machine under load, the answer can come milliseconds after the change
    /// reached this node's log, while the other participants have begun to send to it. Only a
    /// life made here: a restarted process's own log, read from disk, may hold the join of a
    /// life an earlier run served and the cluster has since declared failed.
    fn own_join_begun(&self, state: &ClusterState) -> bool {
        let life = self.incarnation();
        let me = self.me.id;
        self.life_made_here()
            && self.asking.lock().expect("asking").contains_key(&life)
            && state.nodes.get(&me).is_some_and(|r| {
                r.incarnation == life && r.status == NodeStatus::Joining && r.addr == self.me.addr
            })
            && state
                .in_progress
                .as_ref()
                .is_some_and(|p| matches!(p.change, Change::Add { node, .. } if node == NodeId(me)))
    }

    /// As leader, tells the other participants of the change `state` began, once per change.
    /// Each would learn of it from its own log one replication round after this node applied
    /// it. Under load, with the senders packing, that round took 1 to 9 ms, and every sender's
    /// batches wait for their receiver to begin. Only the beginning is told: a failure during
    /// the change, which keeps its epoch, reaches each node through its log.
    fn tell_participants(self: &Arc<Self>, state: &Arc<ClusterState>) -> bool {
        let Some(progress) = &state.in_progress else { return false };
        let epoch = progress.epoch;
        if self.leader() != Some(self.me.id)
            || self.told.fetch_max(epoch, Ordering::SeqCst) >= epoch
        {
            return false;
        }
        let request = match lane::request(&Request::Begun(Box::new(ClusterState::clone(state)))) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(epoch, %error, "cannot encode a change's beginning; participants will learn of it from their logs");
                return false;
            }
        };
        // Receivers first: every sender's batches wait on theirs.
        let received = |n: u64| {
            let moves = progress.plan.services.iter().flat_map(|s| &s.moves);
            moves.filter(|m| m.to == NodeId(n)).count()
        };
        let mut told: Vec<u64> =
            progress.participants.iter().copied().filter(|&n| n != self.me.id).collect();
        told.sort_by_key(|&n| std::cmp::Reverse(received(n)));
        let any = !told.is_empty();
        for node in told {
            let me = Arc::clone(self);
            let request = request.clone();
            tokio::spawn(async move {
                let answer = me.transport.call(node, request, me.config.rpc_timeout).await;
                match answer.and_then(lane::decode_response) {
                    Ok(Response::Heard(_)) => {}
                    Ok(_) => tracing::debug!(node, epoch, "a change's beginning not understood"),
                    Err(error) => {
                        tracing::debug!(node, epoch, %error, "a change's beginning not told")
                    }
                }
            });
        }
        any
    }

    /// Begins from `state`, a change's beginning told by `from`, if `from` is the leader this
    /// node knows, this life takes part in the change, and its own applied state has not come
    /// that far. A leader tells only a committed state (its applied state, or a head start it
    /// was told), so beginning from it is applying it early. A joiner still asking for its
    /// life is admitted by it as by its join's answer ([`Supervisor::own_join_begun`]).
    fn hear_begun(&self, from: u64, state: ClusterState) -> bool {
        let life = self.incarnation();
        let me = self.me.id;
        let takes_part = state.in_progress.as_ref().is_some_and(|p| p.participants.contains(&me))
            && state.nodes.get(&me).is_some_and(|r| r.incarnation == life && r.status.is_live())
            && (self.life_admitted() || self.own_join_begun(&state));
        if self.leader() != Some(from) || !takes_part || caught_up(&self.state.borrow(), &state) {
            return false;
        }
        self.keep_head_start(life, Box::new(state));
        self.wake.notify_one();
        true
    }

    /// Keeps `state`, for `life`, as the head start, unless the one kept is newer: two join
    /// calls may ask at once, and the leader's word may come before or after an answer.
    fn keep_head_start(&self, life: u64, state: Box<ClusterState>) {
        let mut head_start = self.head_start.lock().expect("head start");
        if head_start
            .as_ref()
            .is_none_or(|(kept_for, kept)| *kept_for != life || kept.epoch < state.epoch)
        {
            *head_start = Some((life, Arc::from(state)));
        }
    }

    /// `applied`, or the head start (a join's answer, the leader's word) while `applied` has
    /// not caught up with it: a participant begins its part of a change from it.
    fn ahead(&self, applied: Arc<ClusterState>) -> Arc<ClusterState> {
        let mut head_start = self.head_start.lock().expect("head start");
        match head_start.as_ref() {
            Some((life, ahead)) if *life == self.incarnation() && !caught_up(&applied, ahead) => {
                Arc::clone(ahead)
            }
            Some(_) => {
                *head_start = None;
                applied
            }
            None => applied,
        }
    }

    /// Ends this life as left if `record`, this node's in some copy of the state, says this
    /// life has left. Returns whether this call ended it.
    fn end_if_left(&self, record: &NodeRecord) -> bool {
        record.status == NodeStatus::Left && self.end_as_left(record.incarnation)
    }

    /// Ends life `incarnation` as left, if it is this node's and it has not ended yet.
    fn end_as_left(&self, incarnation: u64) -> bool {
        self.lifecycle.send_if_modified(|lifecycle| {
            let ended = *lifecycle == Lifecycle::Member && incarnation == self.incarnation();
            if ended {
                *lifecycle = Lifecycle::Left;
            }
            ended
        })
    }

    /// Whether this node hears from a working leader: a follower knows one, a leader has had
    /// a quorum acknowledge it lately. A leader cut off from the rest believes it still leads,
    /// so the second test is what lets it notice it was replaced.
    fn in_touch(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        match metrics.state {
            ServerState::Leader => metrics
                .millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < self.config.failure_timeout.as_millis()),
            _ => metrics.current_leader.is_some(),
        }
    }

    fn report_progress(self: &Arc<Self>, state: &ClusterState) {
        let Some(progress) = &state.in_progress else { return };
        if !progress.participants.contains(&self.me.id) || progress.done.contains(&self.me.id) {
            return;
        }
        // Only once this node's adaptation layer has carried out its part.
        if *self.host.done().borrow() < progress.epoch {
            return;
        }
        // One report in flight per epoch; a failed one clears the mark so the next tick retries.
        if self.reported.swap(progress.epoch, Ordering::SeqCst) == progress.epoch {
            return;
        }
        let me = Arc::clone(self);
        let epoch = progress.epoch;
        tokio::spawn(async move {
            let command = Command::MigrationDone { node: me.me.id, epoch };
            if let Err(error) = me.propose(command).await {
                tracing::debug!(epoch, %error, "MigrationDone not recorded yet; will retry");
                let _ = me.reported.compare_exchange(epoch, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
        });
    }

    /// Starts the services afresh, once per life `dead` the cluster ended: what they hold is
    /// stale, for the cluster rebuilt those entries elsewhere. The host serves nothing until the
    /// new life is admitted.
    fn start_services_afresh(&self, dead: u64) {
        if self.renewed_for.swap(dead, Ordering::SeqCst) != dead {
            tracing::warn!(
                node = self.me.id,
                incarnation = dead,
                "the cluster ended this node's life: starting services afresh"
            );
            self.admitted.store(false, Ordering::SeqCst);
            *self.head_start.lock().expect("head start") = None;
            self.host.renew(&self.services);
            self.host.lease(Instant::now());
        }
    }

    /// Asks the peers whether the cluster declared this node failed; if so, fences: rejoins
    /// under a new incarnation, as a new life of the same node, through the freshest leader.
    /// The newest view the peers give decides, since a peer that left or was cut off holds a
    /// frozen view. Asks again, too, when this process's rejoin was taken but not answered.
    pub(crate) async fn check_fenced(self: Arc<Self>) {
        // The members first. Nodes this node's state has as departed only when no member
        // answers with a view as new as this node's own (a member may be cut off too, or a
        // leaver whose view froze): one may have come back as a new life this node has not
        // heard of. Asking them on every check had every follower dial every node that ever
        // left, every few seconds, for ever.
        let state = self.state();
        let (members, departed): (Vec<_>, Vec<_>) = state
            .nodes
            .iter()
            .filter(|(&id, _)| id != self.me.id)
            .partition(|(_, r)| r.status.is_live());
        let mut view = self.newest_view(&members).await;
        if view.as_ref().is_none_or(|v| v.state.epoch < state.epoch) {
            let theirs = self.newest_view(&departed).await;
            view = [view, theirs].into_iter().flatten().max_by_key(|v| v.state.epoch);
        }
        // A leader that nobody else answers (a lone voter back, the others down) reads its own:
        // its state is the cluster's.
        let view =
            view.or_else(|| (self.leader() == Some(self.me.id)).then(|| Box::new(self.view())));
        let Some(view) = view else { return };
        // Only a view newer than or as new as ours may tell us we were declared failed.
        let ours = self.state().epoch;
        if view.state.epoch < ours {
            return;
        }
        let record = view.state.nodes.get(&self.me.id);
        // A leaver the leader took out of raft before it sent the entry that ends the leave
        // never applies that entry: its own state says "leaving" for ever, and the peers' say
        // "left". Without this, it stayed up doing nothing, and at each restart proposed the
        // end of a life already ended, refused for want of a leader, every few seconds.
        let left =
            |r: &&NodeRecord| r.status == NodeStatus::Left && r.incarnation == self.incarnation();
        if let Some(record) = record.filter(left) {
            if self.end_if_left(record) {
                tracing::warn!(
                    node = self.me.id,
                    peer_epoch = view.state.epoch,
                    "the cluster has this node as left, though its own state never heard the end of the leave"
                );
            }
            return;
        }
        let fenced = match record {
            Some(r) => r.status == NodeStatus::Failed,
            None => view.state.epoch > ours,
        };
        // This process's rejoin was committed but its answer lost (the leader crashed before it
        // replied, or the attempts ran out): the cluster waits for this life, which, never
        // admitted, serves nothing and reports nothing. The same life asking again is answered
        // with where its join stands.
        let unanswered = !self.life_admitted()
            && self.renewed_to.load(Ordering::SeqCst) == self.incarnation()
            && record.is_some_and(|r| r.incarnation == self.incarnation() && r.status.is_live());
        if !fenced && !unanswered {
            return;
        }
        // A leaver declared failed while it ran (cut off as it left) leaves: the survivors
        // rebuilt what it still held. Rejoining would undo the operator's leave, which the CLI
        // had already reported as under way. Judged by this process's own state only for a
        // life it served: one restarted ends its last life itself (`start_new_life`), and its
        // state shows that end, not the leave, once applied.
        let leaving = self.life_admitted()
            && state.nodes.get(&self.me.id).is_some_and(|r| {
                r.status == NodeStatus::Leaving && r.incarnation == self.incarnation()
            });
        // A process restarted in the middle of its node's leave: its state, read before raft
        // ran, had the life leaving. Rejoining, it undid the leave (the audit's kill -9 during
        // `gobelins leave`, restarted by a unit): the node stayed a member. A leave the
        // restart's state had not applied yet is not seen, and the node rejoins.
        let restarted_leaving = self.leaving_when_started == Some(self.incarnation());
        let dead_here = record.is_some_and(|r| r.incarnation == self.incarnation());
        if fenced && (leaving || restarted_leaving) && dead_here {
            let life = self.incarnation();
            // Kept: the cluster's record says "failed", and the next start of this directory
            // would rejoin from it, its own log showing that end rather than the leave. Once.
            if self.left_recorded.swap(life, Ordering::SeqCst) != life {
                let record = Arc::clone(&self.record_left);
                match crate::disk::on_disk(move || record(life)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cannot record in the data directory that this node's leave ended: a later start of it would rejoin the cluster")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "recording that this node's leave ended did not finish")
                    }
                }
            }
            if self.end_as_left(life) {
                if restarted_leaving {
                    tracing::warn!(
                        node = self.me.id,
                        peer_epoch = view.state.epoch,
                        "restarted in the middle of this node's leave: the leave ends here, and \
                         the entries its last life held were rebuilt from replicas. To bring the \
                         node back, start it with --join ADDR (a member's address)"
                    );
                } else {
                    tracing::warn!(
                        node = self.me.id,
                        peer_epoch = view.state.epoch,
                        "declared failed while leaving; the leave ends here, and the entries \
                         this node still held were rebuilt from replicas"
                    );
                }
            }
            return;
        }
        if fenced {
            let dead = record.map_or(0, |r| r.incarnation);
            self.start_services_afresh(dead);
            // A life the cluster has not seen yet: above both ours and the one it declared dead.
            if let Err(error) = self.renew_incarnation(dead) {
                // Asked again and again, it failed every ping interval for as long as the disk
                // stayed full, and said meanwhile that it waited for a quorum.
                self.stop_on_storage(format!("cannot persist the new incarnation: {error}"));
                return;
            }
            // Made here even when the incarnation did not move (no record of this node in the
            // newest view): its services were started afresh, so asking again is safe.
            self.renewed_to.store(self.incarnation(), Ordering::SeqCst);
        } else {
            // Asked again every ping interval while the answer does not come.
            gobelins_adaptation::log_budget::budgeted(&self.rejoins, REJOINS, || {
                tracing::warn!(
                    node = self.me.id,
                    incarnation = self.incarnation(),
                    "the cluster took this node's rejoin but its answer never came; asking again"
                )
            });
        }
        // Through the leader of the newest view, whatever its own life's status (after the
        // whole cluster stopped, the leader may be a restarted node whose last life ended as
        // this one's did), else through any member it lists as live. A leader asks itself.
        let live = view.state.live();
        let joined = if self.leader() == Some(self.me.id) {
            let _asking = Asking::new(&self, self.incarnation());
            self.join_here().await
        } else {
            let via = view
                .leader
                .into_iter()
                .chain(live.iter().copied())
                .filter(|n| *n != self.me.id)
                .find_map(|n| view.state.nodes.get(&n).map(|r| r.addr.clone()));
            let Some(via) = via else { return };
            self.join_via(&via, self.config.rpc_timeout * 5).await.map_err(|e| (via, e))
        };
        match joined {
            Ok(Ok(applied)) => tracing::info!(?applied, "rejoining"),
            // An earlier attempt got through though its answer was lost.
            Ok(Err(Refusal::AlreadyMember(_))) => tracing::debug!("rejoin already under way"),
            // Asked again at each check until the hold ends; said once per hold, as several
            // checks can ask at once.
            Ok(Err(refusal @ Refusal::Held { .. })) => {
                if self.note_held(&refusal) {
                    tracing::warn!(node = self.me.id, "rejoin held back: {refusal}");
                }
            }
            // Its labels: asking again changes nothing.
            Ok(Err(refusal @ Refusal::Labels(_))) => self.stop_refused(format!(
                "the cluster refused this node's rejoin: {refusal}. Start it again with --label \
                 values the cluster takes"
            )),
            // Asked again every ping interval: a seed kept busy said so three times a second.
            Ok(Err(refusal)) => budgeted(
                &self.rejoins,
                REJOINS,
                || tracing::warn!(%refusal, "rejoin refused; will try again"),
            ),
            Err((via, error)) => budgeted(
                &self.rejoins,
                REJOINS,
                || tracing::warn!(%via, %error, "rejoin failed; will try again"),
            ),
        }
    }

    /// [`Supervisor::ask_to_join`] of this node, which leads: once, through its own raft.
    async fn join_here(&self) -> std::result::Result<Outcome, (String, SupervisorError)> {
        let join = self.join_request();
        let asked = join.incarnation;
        match self.admit(join).await {
            (Ok(outcome), state) => {
                if outcome.is_ok() && self.incarnation() == asked {
                    if let Some(state) = state {
                        self.keep_head_start(asked, state);
                    }
                    self.admit_life_asked(self.asked_since(asked));
                }
                Ok(outcome)
            }
            (Err(error), _) => Err(("this node".into(), SupervisorError::Raft(error.to_string()))),
        }
    }

    /// Which of `nodes` answer a ping now. A node declared failed was forgotten by the
    /// transport; its address comes back from raft's membership or the cluster's state.
    async fn answering(
        &self,
        nodes: &BTreeSet<u64>,
        membership: &Membership<u64, BasicNode>,
    ) -> BTreeSet<u64> {
        let state = &self.state();
        let asks = nodes.iter().map(|&id| async move {
            let addr = membership
                .get_node(&id)
                .map(|n| n.addr.clone())
                .or_else(|| state.nodes.get(&id).map(|r| r.addr.clone()));
            if let Some(addr) = addr {
                self.transport.set_peer(id, addr);
            }
            self.ping(id, self.config.ping_interval * 2).await.then_some(id)
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// The newest view of the cluster among those `peers` give.
    async fn newest_view(&self, peers: &[(&u64, &NodeRecord)]) -> Option<Box<View>> {
        let asks = peers.iter().map(|&(&peer, record)| {
            self.transport.set_peer(peer, record.addr.clone());
            async move {
                match self.call(peer, &Request::State, self.config.rpc_timeout).await {
                    Ok(Response::View(view)) => Some(view),
                    Ok(_) => None,
                    Err(error) => {
                        tracing::debug!(node = self.me.id, peer, %error, "fence check: peer did not answer");
                        None
                    }
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().max_by_key(|v| v.state.epoch)
    }

    /// The leader's periodic work: raft membership follows the cluster state, and the failure
    /// detector watches every member.
    async fn leader_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.ping_interval);
        // After a pause, one tick and then the period again: not a burst of the ticks missed.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quorum = crate::quorum::QuorumWatch::default();
        let mut no_leader = crate::quorum::QuorumWatch::default();
        // When this node last came back from a pause of its own.
        let mut resumed: Option<Instant> = None;
        let leaderless_after = crate::quorum::leaderless_after(self.config.raft_election);
        loop {
            let due = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                due = tick.tick() => due,
            };
            // Back from a pause, raft's metrics may still be those from before it (a quorum's
            // acknowledgement fresh, though the others may have moved on), and every member
            // looks silent for the whole gap. Granted a lease on them, this node served as a
            // leader it may no longer be; judged on them, a live node resumed with it was
            // declared failed. One tick off, and the detector starts afresh, with a full
            // grace period for every member.
            if let Some(gap) = self.pauses.tick(due, Instant::now()) {
                tracing::warn!(
                    node = self.me.id,
                    gap_ms = gap.as_millis() as u64,
                    "this node was not running for a while (stopped, its machine paused, or \
                     starved of CPU): the others' silence over that time is not held against \
                     them"
                );
                *self.detector.lock().unwrap_or_else(|p| p.into_inner()) = None;
                resumed = Some(Instant::now());
                continue;
            }
            gobelins_adaptation::log_budget::say_ended(&self.malformed, MALFORMED);
            gobelins_adaptation::log_budget::say_ended(&self.rejoins, REJOINS);
            gobelins_adaptation::log_budget::say_ended(&self.seed_waits, SEED_WAITS);
            // After the pause check: raft's acknowledgement ages span a pause, which is this
            // node's own silence, not the voters'. They stay that old until raft's next round
            // is acknowledged, a tick after the pause or more: a leader back from 10 s stopped
            // said for 50 ms that it heard from no majority.
            let settled = resumed.is_none_or(|r| r.elapsed() >= self.config.failure_timeout);
            match self.quorum_lost() {
                Some(lost) if settled && quorum.lost(tokio::time::Instant::now()) => {
                    tokio::spawn(Arc::clone(&self).say_quorum_lost(lost));
                }
                None if quorum.back() => tracing::warn!(
                    node = self.me.id,
                    "this node hears from a majority of the voters again, or leads no more"
                ),
                _ => {}
            }
            let now = tokio::time::Instant::now();
            match self.leaderless_for(now) {
                Some(lost) if lost >= leaderless_after && no_leader.lost(now) => {
                    tokio::spawn(Arc::clone(&self).say_leaderless(lost));
                }
                None if no_leader.back() => tracing::warn!(
                    node = self.me.id,
                    leader = ?self.leader(),
                    "this node knows a leader again, or votes no more"
                ),
                _ => {}
            }
            let is_leader = self.raft.metrics().borrow().state == ServerState::Leader;
            // The leader serves while a quorum acknowledged it within half a lease (the others
            // ask it for theirs: `lease_duties`).
            if let Some(age) = self.leader_ack_age() {
                self.host.lease(Instant::now() + self.lease_span() - age);
            }
            // A leader that no quorum acknowledges may be the one cut off: its verdicts on the
            // others would be wrong, and could not commit anyway.
            if !is_leader || !self.in_touch() {
                *self.detector.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.lag.lock().unwrap_or_else(|p| p.into_inner()).clear();
                continue;
            }
            let (term, last_index) = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                (metrics.current_term, metrics.last_log_index.unwrap_or(0))
            };
            let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
            lag.sample(Instant::now(), term, last_index);
            drop(lag);
            let state = self.state();
            if !self.reconciling.swap(true, Ordering::SeqCst) {
                let (me, state) = (Arc::clone(&self), Arc::clone(&state));
                tokio::spawn(async move {
                    me.reconcile_membership(&state).await;
                    me.reconciling.store(false, Ordering::SeqCst);
                });
            }
            let members: BTreeSet<u64> = state.live();
            // Voters whose life ended but who keep their seat while they answer (back after the
            // whole cluster stopped) witness for the members.
            let also: BTreeSet<u64> = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                let membership = metrics.membership_config.membership();
                let also: BTreeSet<u64> =
                    membership.voter_ids().filter(|id| !members.contains(id)).collect();
                // The transport forgot them when their life ended: a probe needs the address.
                for &id in &also {
                    if let Some(node) = membership.get_node(&id) {
                        self.transport.set_peer(id, node.addr.clone());
                    }
                }
                also
            };
            let actions = {
                let mut detector = self.detector.lock().unwrap_or_else(|p| p.into_inner());
                let detector = detector.get_or_insert_with(|| {
                    Detector::new(self.me.id, self.config.failure_timeout, 2)
                });
                detector.handle_tick_asking(Instant::now(), &members, &also)
            };
            for action in actions {
                let me = Arc::clone(&self);
                tokio::spawn(async move { me.carry_out(action).await });
            }
        }
    }

    async fn carry_out(self: Arc<Self>, action: Action) {
        match action {
            Action::Ping(node) => {
                if self.ping(node, self.config.ping_interval * 2).await {
                    if let Some(d) =
                        self.detector.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    {
                        d.handle_pong(node, Instant::now());
                    }
                }
            }
            Action::Confirm { suspect, witnesses } => {
                let probes = witnesses.iter().map(|&w| {
                    let me = Arc::clone(&self);
                    async move {
                        let deadline = me.config.probe_timeout * 2;
                        matches!(
                            me.call(w, &Request::Probe { target: suspect }, deadline).await,
                            Ok(Response::Probed(true))
                        )
                    }
                });
                let reached = futures::future::join_all(probes).await;
                let next = self
                    .detector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .and_then(|d| d.handle_probes(suspect, &reached, Instant::now()));
                if reached.iter().any(|&r| r) {
                    tracing::info!(node = suspect, "suspicion not confirmed by witnesses");
                }
                // Probes sent before a pause of this node ran out during it: their "not
                // reached" says nothing of the suspect. Asked again if it stays silent.
                if next.is_some() && !self.running_on_time() {
                    tracing::warn!(
                        node = suspect,
                        "verdict on a suspect dropped: this node was not running while its \
                         witnesses were asked"
                    );
                    return;
                }
                if let Some(next) = next {
                    Box::pin(self.carry_out(next)).await;
                }
            }
            Action::Withheld(nodes) => tracing::warn!(
                ?nodes,
                "this leader has not reached these nodes for several failure timeouts, though \
                 others do: its own links are the likelier fault, so none is declared failed; \
                 check this node's network"
            ),
            Action::DeclareFailed(node) | Action::DeclareCutOff(node) => {
                let state = self.state();
                let Some(record) = state.nodes.get(&node) else { return };
                let incarnation = record.incarnation;
                // A leaver whose part is done needs nothing more from the leader: its leave
                // ends on its peers' word. Declared failed, it would come back as a new life.
                let leaving_done = record.status == NodeStatus::Leaving
                    && state.in_progress.as_ref().is_some_and(|p| p.done.contains(&node));
                let cut_off = matches!(action, Action::DeclareCutOff(_));
                if cut_off && leaving_done {
                    tracing::debug!(node, "cut off from the leader while its leave ends; left be");
                    return;
                }
                if !cut_off {
                    tracing::warn!(
                        node,
                        incarnation,
                        "declaring node failed: silent and unreachable from witnesses"
                    );
                } else {
                    tracing::warn!(
                        node,
                        incarnation,
                        rounds = crate::detector::CUT_OFF_ROUNDS,
                        "declaring node failed: witnesses reach it but this leader has not for \
                         several failure timeouts, so it can neither hold a lease nor take part \
                         in changes; its entries are rebuilt elsewhere, and it rejoins as a new \
                         life once the link between it and the leader is mended"
                    );
                }
                // Only while still leader: a deposed leader's late verdict must not be forwarded
                // to its successor, which has its own, fresher view.
                if let Err(error) = self.propose_here(Command::Dead { node, incarnation }).await {
                    tracing::warn!(node, %error, "could not commit the failure");
                }
            }
        }
    }

    /// The followers that lag, or lagged within `crate::lag::LAG_MEMORY` (see `crate::lag`),
    /// and of the others, those not voting that have not stored the leader's whole log yet: a
    /// seat given to one before it shows whether it keeps up could be one it never votes from.
    /// Says when a node begins to lag, and when it stops.
    fn lagging(&self, state: &ClusterState, voters: &BTreeSet<u64>) -> BTreeSet<u64> {
        let (matched, last): (BTreeMap<u64, Option<u64>>, u64) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let Some(replication) = metrics.replication.as_ref() else { return BTreeSet::new() };
            // The leader's own entry is its own disk's: not a follower that lags.
            let followers = replication.iter().filter(|(&id, _)| id != self.me.id);
            let matched = followers.map(|(&id, stored)| (id, stored.map(|l| l.index))).collect();
            (matched, metrics.last_log_index.unwrap_or(0))
        };
        let look =
            self.lag.lock().unwrap_or_else(|p| p.into_inner()).look(Instant::now(), &matched);
        let crate::lag::Look { mut lagged, began, ended } = look;
        let behind = |id: &u64| matched.get(id).copied().flatten().is_none_or(|s| s < last);
        lagged.extend(matched.keys().filter(|id| !voters.contains(id) && behind(id)));
        // Said of active members only: one dead and not yet taken out of raft lags too.
        let active = |id: &u64| state.nodes.get(id).is_some_and(|r| r.status == NodeStatus::Active);
        for node in began.into_iter().filter(active) {
            let stored = matched.get(&node).copied().flatten();
            tracing::warn!(node, ?stored, window_ms = crate::lag::LAG_WINDOW.as_millis() as u64, "this node has not stored raft's entries of the last window (its disk is slow, or it is starved of CPU): it gets no vote while it lags and for a while after, and its part in the cluster's changes may come late. Check its disk (fsync times) and its load");
        }
        for node in ended.into_iter().filter(active) {
            let for_s = crate::lag::LAG_MEMORY.as_secs();
            tracing::info!(
                node,
                for_s,
                "this node has kept up with raft's log for a while again: it may vote"
            );
        }
        lagged
    }

    /// Keeps raft's membership in line with the cluster: every live node a member, up to
    /// `max_voters` active nodes voting, always an odd number of them (voters are kept while
    /// they live and stay, so that a change of voters happens only when one is lost or leaves,
    /// or a join makes room for two more), failed and departed nodes removed.
    async fn reconcile_membership(&self, state: &ClusterState) {
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let known: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        let live = state.live();
        for (&id, record) in
            state.nodes.iter().filter(|(id, _)| live.contains(id) && !known.contains(id))
        {
            if let Err(error) = self.raft.add_learner(id, BasicNode::new(&record.addr), false).await
            {
                tracing::debug!(node = id, %error, "adding learner");
            }
        }
        // Who answers is asked only when a change looks due with the live nodes taken to
        // answer and the others not: most passes change nothing, and ask nobody.
        let (me, max) = (self.id(), self.config.max_voters);
        let lagging = self.lagging(state, &voters);
        let lags = |id: u64| lagging.contains(&id);
        let due = desired_voters(me, &voters, state, max, |id| live.contains(&id), lags);
        if due != voters && !due.is_empty() {
            let asked: BTreeSet<u64> = voters
                .iter()
                .chain(&due)
                .copied()
                .chain(state.with_status(NodeStatus::Active))
                .filter(|&id| id != me)
                .collect();
            let answering = self.answering(&asked, &membership).await;
            let answers = |id: u64| id == me || answering.contains(&id);
            let desired = desired_voters(me, &voters, state, max, answers, lags);
            if desired != voters && !desired.is_empty() {
                if !can_commit(&desired, answers) {
                    tracing::debug!(?voters, ?desired, ?answering, "voters not changed: too few of the new ones answer for the change to commit");
                    return;
                }
                // Kept as a learner: a leaver still follows the state until its leave is done.
                match self.raft.change_membership(desired.clone(), true).await {
                    Ok(_) => tracing::info!(?desired, "raft voters changed"),
                    Err(error) => tracing::debug!(%error, "changing voters"),
                }
                return;
            }
        }
        let admitting: BTreeSet<u64> = {
            let mut joining = self.joining.lock().expect("joining");
            // Long enough for a `Join` to commit; one that did not was refused or lost, and its
            // node asks again.
            joining.retain(|_, at| at.elapsed() < self.config.rpc_timeout * 4);
            joining.keys().copied().collect()
        };
        let gone: BTreeSet<u64> = known
            .iter()
            .copied()
            .filter(|id| !live.contains(id) && !voters.contains(id) && !admitting.contains(id))
            .collect();
        if !gone.is_empty() {
            if let Err(error) =
                self.raft.change_membership(ChangeMembers::RemoveNodes(gone), false).await
            {
                tracing::debug!(%error, "removing departed learners");
            }
        }
    }
}

/// Whether `applied` has come as far as `ahead` in what the host is fed: a later epoch, or the
/// same one with no fewer departed nodes and no more participants. The epoch alone moves only
/// when a change begins: a node failed during it would be fed as departed, then not.
fn caught_up(applied: &ClusterState, ahead: &ClusterState) -> bool {
    let departed = |s: &ClusterState| -> BTreeSet<u64> {
        s.nodes.iter().filter(|(_, r)| !r.status.is_live()).map(|(&id, _)| id).collect()
    };
    let participants = |s: &ClusterState| s.in_progress.as_ref().map(|p| p.participants.clone());
    applied.epoch > ahead.epoch
        || (applied.epoch == ahead.epoch
            && departed(applied).is_superset(&departed(ahead))
            && match (participants(applied), participants(ahead)) {
                (Some(a), Some(b)) => a.is_subset(&b),
                (None, _) => true,
                (Some(_), None) => false,
            })
}

/// Whether a hold keeps `node` out of `state`'s cluster: only a life that ended (the same life
/// asking again is answered with where it stands), and only while at least two members are
/// in (one alone keeps no replica, and a recovery may be waiting for a node to join).
fn holds_out(state: &ClusterState, node: u64) -> bool {
    state.nodes.get(&node).is_some_and(|r| !r.status.is_live()) && state.live().len() >= 2
}

/// What [`Supervisor::unhold`] did.
#[derive(Debug, Default)]
pub struct Unheld {
    /// Whether any member held the node out.
    pub held: bool,
    /// Whether any member had counted short lives of it.
    pub counted: bool,
    /// The other members that lifted it.
    pub answered: Vec<u64>,
    /// Those that did not answer: one of them leading next may still hold the node.
    pub silent: Vec<u64>,
}

/// One call of [`Supervisor::join_via`] asking for `incarnation`, until it ends or is dropped.
struct Asking<'a> {
    supervisor: &'a Supervisor,
    incarnation: u64,
}

impl<'a> Asking<'a> {
    fn new(supervisor: &'a Supervisor, incarnation: u64) -> Self {
        let mut asking = supervisor.asking.lock().expect("asking");
        asking.entry(incarnation).or_insert((0, Instant::now())).0 += 1;
        Asking { supervisor, incarnation }
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut asking = self.supervisor.asking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((count, _)) = asking.get_mut(&self.incarnation) {
            *count -= 1;
            if *count == 0 {
                asking.remove(&self.incarnation);
            }
        }
    }
}

type FeedKey = (u64, Option<(u64, usize)>, BTreeSet<u64>);

/// Hands the host each new word of the replicated state, once.
#[derive(Default)]
struct HostFeed {
    /// Epoch, change in progress (epoch, participants) and departed nodes last handed over.
    last: Option<FeedKey>,
    snapshot: Option<Arc<Snapshot>>,
}

impl HostFeed {
    fn feed(&mut self, host: &Host, state: &ClusterState) {
        let departed: BTreeSet<u64> =
            state.nodes.iter().filter(|(_, r)| !r.status.is_live()).map(|(&id, _)| id).collect();
        let progress = state.in_progress.as_ref().map(|p| (p.epoch, p.participants.len()));
        let key = (state.epoch, progress, departed);
        if self.last.as_ref() == Some(&key) {
            return;
        }
        if self.snapshot.as_ref().is_none_or(|s| s.epoch().0 != state.epoch) {
            self.snapshot = state.tree.snapshot(Epoch(state.epoch)).ok().map(Arc::new);
        }
        host.update(Update {
            epoch: state.epoch,
            snapshot: self.snapshot.clone(),
            change: state.in_progress.as_ref().map(|p| Progress {
                epoch: p.epoch,
                change: p.change.clone(),
                participants: p.participants.iter().map(|&n| NodeId(n)).collect(),
                plan: p.plan.clone(),
            }),
            departed: key.2.iter().map(|&n| NodeId(n)).collect(),
        });
        self.last = Some(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three nodes at `epoch`, those in `failed` failed.
    fn state(epoch: u64, failed: &[u64]) -> ClusterState {
        let mut state = ClusterState { epoch, ..ClusterState::default() };
        for id in 1..=3 {
            let status = if failed.contains(&id) { NodeStatus::Failed } else { NodeStatus::Active };
            let addr = format!("n{id}");
            state
                .nodes
                .insert(id, NodeRecord { addr, labels: Labels::new(), status, incarnation: 1 });
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
