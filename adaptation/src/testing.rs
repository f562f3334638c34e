//! An in-memory cluster of hosts and a conformance suite, for service authors and for our own
//! tests (feature `testing`).
//!
//! [`MemCluster`] plays the supervisor's part without consensus: it applies each change to a
//! cell tree, hands every host the same [`Update`] and waits for the participants' reports, as
//! the replicated state machine would. Hosts talk through [`MemLink`], which can cut a node off
//! as a crash would. [`conformance`] runs a service through additions, evictions and failures
//! under load and checks after each that it kept its contract.

pub use crate::conformance::{conformance, Probe, Stage, Verdict, Wrong};

use crate::error::AdaptationError;
use crate::host::{Host, HostConfig, Progress, Update};
use crate::link::Link;
use crate::registry::Registry;
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use gobelins_locator::{
    CellTree, Change, Epoch, KeptSince, Labels, MigrationPlan, NodeId, ServicePlan, Snapshot,
    TreeConfig,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Hosts in one process, reachable by id, each message delayed by a one-way latency (so that,
/// under a paused clock, migrations take time and requests overlap them); a crashed node
/// answers nothing.
pub struct MemNet {
    hosts: DashMap<NodeId, Host>,
    crashed: DashMap<NodeId, ()>,
    latency: Duration,
    /// Nodes that messages take longer to reach, and by how much.
    slow: DashMap<NodeId, Duration>,
    /// A node that crashes as it is about to tell a peer that it has sent everything for a
    /// change (its `Ack` of that epoch): every batch it sent has then been taken.
    crash_at_ack: std::sync::Mutex<Option<(NodeId, u64)>>,
    /// Told when that node has crashed so.
    crashed_at_ack: tokio::sync::Notify,
    /// Every migration batch is delivered twice, as when a sender whose call timed out as its
    /// batch was staged sends it again ([`Faults::batches_twice`]).
    batches_twice: std::sync::atomic::AtomicBool,
}

/// One host's way into a [`MemNet`].
pub struct MemLink {
    net: Arc<MemNet>,
    me: NodeId,
    /// Per node called, what its calls watch for [`Link::abandon`].
    abandoned: DashMap<NodeId, tokio::sync::watch::Sender<bool>>,
}

#[async_trait]
impl Link for MemLink {
    async fn call(
        &self,
        to: NodeId,
        message: Bytes,
        deadline: Duration,
    ) -> Result<Bytes, AdaptationError> {
        let unreachable =
            |reason: &str| AdaptationError::Unreachable { node: to.0, reason: reason.into() };
        if self.net.crashed.contains_key(&self.me) || self.net.crashed.contains_key(&to) {
            return Err(unreachable("crashed"));
        }
        if self.crashes_at(&message) {
            self.net.crashed.insert(self.me, ());
            self.net.crashed_at_ack.notify_one();
            return Err(unreachable("crashed"));
        }
        let host =
            self.net.hosts.get(&to).map(|h| h.clone()).ok_or_else(|| unreachable("unknown"))?;
        let latency = self.net.latency;
        let there = latency + self.net.slow.get(&to).map_or(Duration::ZERO, |d| *d);
        let me = self.me;
        // The callee's handler runs on its own, as over TCP: a caller that gives up does not
        // stop it.
        let twice = self.net.batches_twice.load(std::sync::atomic::Ordering::SeqCst)
            && matches!(
                crate::wire::Message::decode(message.clone()),
                Ok(crate::wire::Message::Batch { .. })
            );
        let handled = tokio::spawn(async move {
            tokio::time::sleep(there).await;
            let answer = host.handle(me, message.clone()).await;
            if twice {
                // The copy comes once the first is staged; its answer goes nowhere.
                host.handle(me, message).await;
            }
            answer
        });
        let round_trip = async move {
            let answer = handled.await.map_err(|_| {
                unreachable(
                    "the handler ended without answering (it panicked, or the runtime is stopping)",
                )
            })?;
            tokio::time::sleep(latency).await;
            Ok(answer)
        };
        // As a transport closing its connections to a node it forgets.
        let mut abandoned = self
            .abandoned
            .entry(to)
            .or_insert_with(|| tokio::sync::watch::channel(false).0)
            .subscribe();
        let answer = tokio::select! {
            answer = tokio::time::timeout(deadline, round_trip) => {
                answer.map_err(|_| unreachable("timed out"))??
            }
            _ = abandoned.wait_for(|&gone| gone) => return Err(unreachable("abandoned")),
        };
        // A node that crashed meanwhile never answered.
        if self.net.crashed.contains_key(&to) {
            return Err(unreachable("crashed"));
        }
        Ok(Bytes::from(answer))
    }

    fn abandon(&self, to: NodeId) {
        // Removed: calls made from now on (to a new life of the node) watch afresh.
        if let Some((_, gone)) = self.abandoned.remove(&to) {
            gone.send_replace(true);
        }
    }
}

impl MemLink {
    /// Whether this node is to crash rather than send `message`: it is its `Ack` of the epoch
    /// [`MemCluster::change_and_crash_once_sent`] armed.
    /// Disarmed as it fires: of the acks a node sends its peers at once, one crashes it.
    fn crashes_at(&self, message: &Bytes) -> bool {
        let mut armed = self.net.crash_at_ack.lock().expect("crash_at_ack");
        let fires = armed.is_some_and(|(node, epoch)| {
            node == self.me
                && matches!(
                    crate::wire::Message::decode(message.clone()),
                    Ok(crate::wire::Message::Ack { epoch: e }) if e == epoch
                )
        });
        if fires {
            *armed = None;
        }
        fires
    }
}

/// [`MemCluster::crash`] and [`MemCluster::heal`], usable while a change is under way.
#[derive(Clone)]
pub struct Faults {
    net: Arc<MemNet>,
}

impl Faults {
    /// As [`MemCluster::crash`].
    pub fn crash(&self, node: NodeId) {
        self.net.crashed.insert(node, ());
    }

    /// As [`MemCluster::heal`].
    pub fn heal(&self, node: NodeId) {
        self.net.crashed.remove(&node);
    }

    /// Messages to `node` take `by` longer to arrive from now on, as to a loaded or distant
    /// node (zero ends it); its answers are not slowed.
    pub fn slow(&self, node: NodeId, by: Duration) {
        self.net.slow.insert(node, by);
    }

    /// From now on, while `on`, every migration batch is delivered twice, the copy after the
    /// first was staged: what a sender does when its call times out just as the batch lands.
    pub fn batches_twice(&self, on: bool) {
        self.net.batches_twice.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A cluster of hosts in one process, driven like the supervisor drives real ones.
pub struct MemCluster {
    net: Arc<MemNet>,
    tree: CellTree,
    epoch: u64,
    services: Arc<dyn Fn() -> Registry + Send + Sync>,
    config: HostConfig,
    departed: BTreeSet<NodeId>,
    /// Nodes declared failed that still run, cut off: they hear nothing more.
    cut_off: BTreeSet<NodeId>,
    /// Evicted nodes that stay for the recovery of a node they sent entries to, which died
    /// before it had them all.
    lingering: BTreeSet<NodeId>,
    /// The last two changes that moved something of each node's, latest first, as the
    /// supervisor records them.
    moved_in: BTreeMap<NodeId, [Option<u64>; 2]>,
    /// Since when each node's word of its entries holds, as the supervisor records it.
    kept_since: KeptSince,
    /// The table the change under way began from.
    began_from: Option<Snapshot>,
    next: u64,
}

impl MemCluster {
    /// `nodes` nodes, each hosting the services `services` builds, registered cluster-wide.
    pub async fn start(
        nodes: u64,
        config: HostConfig,
        services: impl Fn() -> Registry + Send + Sync + 'static,
    ) -> Self {
        Self::start_shaped(nodes, TreeConfig::default(), config, services).await
    }

    /// [`MemCluster::start`] with a tree of this shape: small cells, say, for a cluster of
    /// several cells on a few nodes.
    pub async fn start_shaped(
        nodes: u64,
        shape: TreeConfig,
        config: HostConfig,
        services: impl Fn() -> Registry + Send + Sync + 'static,
    ) -> Self {
        let mut tree = CellTree::new(shape).expect("a valid tree config");
        for spec in services().specs() {
            tree.register_service(spec).expect("service registers");
        }
        let mut cluster = MemCluster {
            net: Arc::new(MemNet {
                hosts: DashMap::new(),
                crashed: DashMap::new(),
                latency: Duration::from_micros(200),
                slow: DashMap::new(),
                crash_at_ack: std::sync::Mutex::new(None),
                crashed_at_ack: tokio::sync::Notify::new(),
                batches_twice: Default::default(),
            }),
            tree,
            epoch: 0,
            services: Arc::new(services),
            config,
            departed: BTreeSet::new(),
            cut_off: BTreeSet::new(),
            lingering: BTreeSet::new(),
            moved_in: BTreeMap::new(),
            kept_since: KeptSince::default(),
            began_from: None,
            next: 1,
        };
        for _ in 0..nodes {
            cluster.add().await;
        }
        cluster
    }

    /// The table of the current epoch.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(self.tree.snapshot(Epoch(self.epoch)).expect("the cluster has nodes"))
    }

    /// The current epoch: how many changes the cluster carried out, from its first node on.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The live nodes.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.tree.nodes().collect()
    }

    /// The host of `node`.
    pub fn host(&self, node: NodeId) -> Host {
        self.net.hosts.get(&node).map(|h| h.clone()).expect("a host of the cluster")
    }

    /// Adds a node with fresh services; returns its id once the change is stable.
    pub async fn add(&mut self) -> NodeId {
        let node = self.new_host();
        self.change(Change::Add { node, labels: Labels::new() }).await;
        node
    }

    /// Adds a node with `labels` (`zone=a`, say, in a tree shaped with label levels); returns
    /// its id once the change is stable.
    pub async fn add_labelled(&mut self, labels: Labels) -> NodeId {
        let node = self.new_host();
        self.change(Change::Add { node, labels }).await;
        node
    }

    /// What `change` would move if it began now: a test picks its nodes by it (a node that
    /// takes none of a leaver's slots, say). The cluster is left as it is.
    pub fn preview(&self, change: &Change) -> MigrationPlan {
        let mut tree = self.tree.clone();
        tree.apply(change).expect("the locator accepts the change");
        let after = tree.snapshot(Epoch(self.epoch + 1)).expect("nodes remain");
        MigrationPlan::between(&self.snapshot(), &after)
    }

    /// Adds a node that crashes as soon as the change has begun, before it can pass on what it
    /// was sent; returns its id once its failure is recovered. What moved to it can then only
    /// be rebuilt from the copies its senders kept.
    pub async fn add_and_crash(&mut self) -> NodeId {
        let node = self.new_host();
        self.change_and_crash(Change::Add { node, labels: Labels::new() }, node).await;
        node
    }

    /// Adds a node while `victim` crashes as the join begins, before it can hand anything over
    /// (a node killed a moment before another joins, its failure declared during the join);
    /// returns the joiner's id once the victim's failure is recovered.
    pub async fn add_while_dying(&mut self, victim: NodeId) -> NodeId {
        let node = self.new_host();
        self.change_and_crash(Change::Add { node, labels: Labels::new() }, victim).await;
        node
    }

    /// Brings `node`, failed before, back as a new life with fresh services (as an agent
    /// restarted from its data directory comes back once its last life is recovered): the
    /// same id joins again. Returns once the change is stable. A node declared failed while
    /// it still ran ([`MemCluster::fail_cut_off`]) starts its new life in the same host, as the
    /// supervisor's does ([`Host::renew`]): clones of the host follow it there.
    pub async fn rejoin(&mut self, node: NodeId) {
        assert!(!self.tree.nodes().any(|n| n == node), "node {node} is still a member");
        // Its new life first, then it answers again: nothing reaches the old one meanwhile.
        let running = self.net.hosts.get(&node).map(|h| h.value().clone());
        match running {
            Some(host) => host.renew(|| (self.services)()),
            None => self.start_host(node),
        }
        self.departed.remove(&node);
        self.cut_off.remove(&node);
        self.net.crashed.remove(&node);
        self.change(Change::Add { node, labels: Labels::new() }).await;
    }

    /// A host with fresh services for the next node, not yet in the cluster.
    fn new_host(&mut self) -> NodeId {
        let node = NodeId(self.next);
        self.next += 1;
        self.start_host(node);
        node
    }

    /// Starts a host with fresh services as `node`, in place of any before it.
    fn start_host(&mut self, node: NodeId) {
        let link =
            Arc::new(MemLink { net: Arc::clone(&self.net), me: node, abandoned: DashMap::new() });
        let host = Host::start(node, (self.services)(), link, self.config.clone());
        if let Some(old) = self.net.hosts.insert(node, host) {
            old.shutdown();
        }
    }

    /// Evicts `node`: it sends its entries away, then leaves.
    pub async fn evict(&mut self, node: NodeId) {
        self.change(Change::Evict(node)).await;
        self.depart(node);
    }

    /// `node`, evicted, stops; as the supervisor does once it has left, everyone learns it is
    /// gone.
    fn depart(&mut self, node: NodeId) {
        self.departed.insert(node);
        if let Some((_, host)) = self.net.hosts.remove(&node) {
            host.shutdown();
        }
        self.broadcast(None, self.snapshot());
    }

    /// Crashes `node` without the cluster knowing yet, as before a failure detector notices:
    /// messages to and from it fail. [`MemCluster::fail`] then recovers it.
    pub fn crash(&self, node: NodeId) {
        self.net.crashed.insert(node, ());
    }

    /// Ends a [`MemCluster::crash`] the cluster has not acted on: a node cut off for a moment
    /// answers again, with its memory intact.
    pub fn heal(&self, node: NodeId) {
        self.net.crashed.remove(&node);
    }

    /// A handle that crashes and heals nodes while a change borrows the cluster.
    pub fn faults(&self) -> Faults {
        Faults { net: Arc::clone(&self.net) }
    }

    /// Crashes `node` (it answers nothing from now on, and its memory is gone), then carries
    /// out the recovery the supervisor would commit.
    pub async fn fail(&mut self, node: NodeId) {
        self.kill(node);
        self.change(Change::Fail(node)).await;
    }

    /// As [`MemCluster::fail`], and `victim` dies as soon as that recovery has begun, before
    /// it can hand anything over (as [`MemCluster::change_and_crash`]): two failures at once,
    /// `victim` perhaps the only other holder of what `node` had.
    pub async fn fail_and_crash(&mut self, node: NodeId, victim: NodeId) {
        self.kill(node);
        self.change_and_crash(Change::Fail(node), victim).await;
    }

    /// `first` and `then` die at once, and the cluster declares `first` failed, then `then`.
    /// As the supervisor has it (a recovery goes to the front of the queue), `then` is
    /// recovered first, while `first`, given up on, still stands in the table: that recovery
    /// may hand it slots it never receives. Then `first` is recovered.
    pub async fn fail_both(&mut self, first: NodeId, then: NodeId) {
        self.kill(first);
        self.kill(then);
        self.change(Change::Fail(then)).await;
        self.change(Change::Fail(first)).await;
    }

    /// `node` answers nothing from now on, its memory is gone, and the cluster knows it.
    fn kill(&mut self, node: NodeId) {
        self.net.crashed.insert(node, ());
        if let Some((_, host)) = self.net.hosts.remove(&node) {
            host.shutdown();
        }
        self.departed.insert(node);
    }

    /// As [`MemCluster::fail_and_crash`], but `victim` dies only once every entry it rebuilt
    /// for others has been taken by its new manager, as it is about to say so: the others then
    /// hold what it handed over, and its death has taken only what it rebuilt for itself.
    pub async fn fail_and_crash_once_sent(&mut self, node: NodeId, victim: NodeId) {
        self.kill(node);
        self.change_and_crash_once_sent(Change::Fail(node), victim).await;
    }

    /// As [`MemCluster::change_and_crash`], but `victim` dies only as it acknowledges the
    /// change to its peers: every batch it sent has been taken, and it dies before saying it
    /// is done (an evicted node that handed everything over, say).
    pub async fn change_and_crash_once_sent(&mut self, change: Change, victim: NodeId) {
        // Armed before the change begins: the victim's ack cannot go first.
        *self.net.crash_at_ack.lock().expect("crash_at_ack") = Some((victim, self.epoch + 1));
        let progress = self.begin(change, Vec::new());
        debug_assert_eq!(progress.epoch, self.epoch);
        tokio::time::timeout(Duration::from_secs(60), self.net.crashed_at_ack.notified())
            .await
            .expect("the victim sends out within a minute");
        self.without(progress, victim).await;
    }

    /// Declares `node` failed while it still runs, cut off as by a partition: messages to and
    /// from it fail and it hears nothing of the cluster any more, but what it was doing goes
    /// on (a request it holds, say). The survivors recover its entries.
    pub async fn fail_cut_off(&mut self, node: NodeId) {
        self.net.crashed.insert(node, ());
        self.cut_off.insert(node);
        self.departed.insert(node);
        self.change(Change::Fail(node)).await;
    }

    /// Applies `change` and waits until every participant has reported done, then tells
    /// every host the epoch is stable.
    pub async fn change(&mut self, change: Change) {
        let progress = self.begin(change, Vec::new());
        self.finish(progress).await;
    }

    /// Applies `change` and crashes `victim` as soon as the change has begun, before it can
    /// hand anything over; then carries out what the supervisor would: the change finishes
    /// without the victim, and the victim's failure is recovered (`Fail` if it is still in
    /// the tree, `Recover` if the change took it out), moves it had not finished included.
    /// A node the change evicts leaves before that recovery, or after it when it sent the
    /// victim entries or held its replicas as the change began (it stays to report them, as
    /// the supervisor has it).
    pub async fn change_and_crash(&mut self, change: Change, victim: NodeId) {
        self.crash_during(change, victim, None).await;
    }

    /// As [`MemCluster::change_and_crash`], but `lagging` hears of the change only with the
    /// victim's death, in one update, as a node that applied both at once would: it never
    /// sees the victim among the participants.
    pub async fn change_and_crash_unseen_by(
        &mut self,
        change: Change,
        victim: NodeId,
        lagging: NodeId,
    ) {
        self.crash_during(change, victim, Some(lagging)).await;
    }

    async fn crash_during(&mut self, change: Change, victim: NodeId, lagging: Option<NodeId>) {
        let cut = lagging.filter(|&node| self.cut_off.insert(node));
        let progress = self.begin(change, Vec::new());
        if let Some(node) = cut {
            self.cut_off.remove(&node);
        }
        self.without(progress, victim).await;
    }

    /// Kills `victim`, a participant of the change under way, and carries out what the
    /// supervisor would: the change finishes without it, then its failure is recovered.
    async fn without(&mut self, mut progress: Progress, victim: NodeId) {
        self.kill(victim);
        progress.participants.remove(&victim);
        let unfinished = progress.plan.moves_from(victim);
        // A node evicted meanwhile leaves once its change ends, as the supervisor has it,
        // unless it sent the victim entries: then it stays to take part in the victim's
        // recovery, and leaves after.
        let leaver = match progress.change {
            Change::Evict(leaver) if leaver != victim => Some(leaver),
            _ => None,
        };
        // Or it held the victim's replicas as the change began: the victim may not have
        // copied them to its new holder yet.
        let held = self.began_from.as_ref().and_then(|t| t.replica_holder(victim));
        let lingers = leaver
            .filter(|&l| held == Some(l) || progress.plan.outgoing(l).any(|(_, m)| m.to == victim));
        self.broadcast(Some(progress.clone()), self.snapshot());
        self.finish(progress).await;
        match (leaver, lingers) {
            (Some(leaver), None) => self.depart(leaver),
            (_, Some(leaver)) => {
                self.lingering.insert(leaver);
            }
            _ => {}
        }
        // Consensus takes a moment to start the recovery; requests keep arriving meanwhile.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let recovery =
            if self.tree.contains(victim) { Change::Fail(victim) } else { Change::Recover(victim) };
        let progress = self.begin(recovery, unfinished);
        self.finish(progress).await;
        for leaver in std::mem::take(&mut self.lingering) {
            self.depart(leaver);
        }
    }

    fn begin(&mut self, change: Change, unfinished: Vec<ServicePlan>) -> Progress {
        let before = self.tree.snapshot(Epoch(self.epoch)).ok();
        let report = self.tree.apply(&change).expect("the locator accepts the change");
        self.epoch += 1;
        let after = Arc::new(self.tree.snapshot(Epoch(self.epoch)).expect("nodes remain"));
        let mut plan = match &before {
            Some(old) => MigrationPlan::between(old, &after),
            None => MigrationPlan::nothing(Epoch(self.epoch - 1), Epoch(self.epoch)),
        };
        plan.absorb(unfinished, &after);
        let mut participants = report.participants.clone();
        if matches!(change, Change::Fail(_) | Change::Recover(_)) {
            participants.extend(self.tree.nodes());
            participants.extend(&self.lingering);
        }
        participants.retain(|n| !self.departed.contains(n));
        let failed_moved_in = match change {
            Change::Fail(dead) | Change::Recover(dead) => {
                self.moved_in.get(&dead).copied().unwrap_or_default()
            }
            Change::Add { node, .. } => {
                // A new life: what moved of the last one says nothing of this one.
                self.moved_in.remove(&node);
                [None, None]
            }
            _ => [None, None],
        };
        // Every node touched, taking part or not, as the supervisor has it.
        for node in plan.touched(before.as_ref(), &after) {
            let moved = self.moved_in.entry(node).or_default();
            *moved = [Some(self.epoch), moved[0]];
        }
        if let Change::Fail(dead) | Change::Recover(dead) = change {
            self.moved_in.remove(&dead);
        }
        let failed_kept_since = match change {
            Change::Fail(dead) | Change::Recover(dead) => self.kept_since.of(dead),
            _ => None,
        };
        self.kept_since.record(self.epoch, &change, &plan);
        self.began_from = before;
        let progress = Progress {
            epoch: self.epoch,
            change,
            participants,
            plan,
            failed_moved_in,
            failed_kept_since,
            leave: false,
        };
        self.broadcast(Some(progress.clone()), after);
        progress
    }

    async fn finish(&mut self, progress: Progress) {
        for node in &progress.participants {
            let mut done = self.host(*node).done();
            let epoch = progress.epoch;
            tokio::time::timeout(Duration::from_secs(60), done.wait_for(|&d| d >= epoch))
                .await
                .expect("a participant finishes its part within a minute")
                .expect("host alive");
        }
        self.broadcast(None, self.snapshot());
    }

    fn broadcast(&self, change: Option<Progress>, snapshot: Arc<Snapshot>) {
        // In node order, the same in every run: a `DashMap` iterates in a new order each run.
        let mut hosts: Vec<(NodeId, Host)> = self
            .net
            .hosts
            .iter()
            .filter(|h| !self.cut_off.contains(h.key()))
            .map(|h| (*h.key(), h.value().clone()))
            .collect();
        hosts.sort_by_key(|(node, _)| *node);
        for (_, host) in hosts {
            host.update(Update {
                epoch: self.epoch,
                snapshot: Some(Arc::clone(&snapshot)),
                change: change.clone(),
                departed: self.departed.clone(),
            });
        }
    }
}

/// The seed [`replay`] runs on: `GOBELINS_TEST_SEED` if set, else 0.
pub fn test_seed() -> u64 {
    std::env::var("GOBELINS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Runs `test` as `#[tokio::test(start_paused = true)]` would (one thread, the clock paused
/// until every task waits), but with tokio's own random choices (which branch of a `select!` is
/// polled first) drawn from [`test_seed`], so that a scenario test takes the same path in every
/// run and a failure replays: run the test again with the seed it failed with. The choices are
/// seeded only when tokio is built with `--cfg tokio_unstable`, as this workspace is
/// (`.cargo/config.toml`); without it they come from the OS, as in any tokio test.
pub fn replay<F: std::future::Future>(test: F) -> F::Output {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().start_paused(true);
    // A seed given and not used would make a failure look as if it did not replay.
    #[cfg(not(tokio_unstable))]
    if std::env::var_os("GOBELINS_TEST_SEED").is_some() {
        eprintln!(
            "GOBELINS_TEST_SEED is set, but this build has no `--cfg tokio_unstable`: tokio's \
             random choices are not seeded and a run may not replay. Build with \
             RUSTFLAGS=\"--cfg tokio_unstable\" (this workspace's .cargo/config.toml sets it)"
        );
    }
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&test_seed().to_le_bytes()));
    builder.build().expect("a current-thread runtime").block_on(test)
}
