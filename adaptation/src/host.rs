//! One node's adaptation layer at work: it serves requests for the keys this node manages,
//! sends requests for other keys to their managers, and carries out each configuration change
//! the supervisor hands it (the driver of [`crate::Period`] lives in the crate's `driver` module).
//!
//! ```text
//!  supervisor ──Update(epoch, snapshot, change)──▶ Host::update ──▶ driver (one task)
//!  peers ──Message──▶ Host::handle ──▶ serve a request │ stage a batch │ note an ack
//!  services, clients ──Host::request──▶ locate ──▶ serve here, or Link::call the manager
//! ```
//!
//! The host's parts: `send` (the sender's side of a request), `serve` (the manager's side),
//! `relay` (a request passed on to its manager), `answers` (what a manager keeps so that a
//! retry runs once), `deliver` (migration messages in and out), `inner` (the shared state's
//! life, and what requests wait on), `stats`.

mod answers;
mod deliver;
mod inner;
mod relay;
mod send;
mod serve;
mod stats;
#[cfg(test)]
mod tests;

pub(crate) use answers::Answers;
pub(crate) use deliver::{Delivery, OnRefusal};
pub(crate) use stats::Counters;
pub use stats::{ChangeRecord, Stats};

use crate::driver::Input;
use crate::error::AdaptationError;
use crate::gate::Gate;
use crate::kept::KeptOrder;
use crate::link::Link;
use crate::log_budget::{budgeted, LogBudget};
use crate::mirrors::Mirrors;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::router::Router;
use crate::service::Context;
use crate::settled::{Outstanding, Settled};
use crate::wire::{Message, Reply, RequestId};
use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
// Keys come from authenticated peers only; std's SipHash cost more than the maps' other work.
use foldhash::fast::RandomState as Hasher;
use gobelins_locator::{Change, Key, MigrationPlan, NodeId, ServiceId, ServiceSpec, Snapshot};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Timers and sizes of a host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// How long a request may take, holds and retries included, before it fails with
    /// [`AdaptationError::Deadline`]. It bounds the layer's waits, not the service's `handle`:
    /// a request its own node manages runs `handle` in the caller's task, and is not dropped
    /// half-way when the deadline passes. Give every node of a cluster the same: a manager
    /// forgets an answer its sender has not settled after two to three times its own deadline
    /// (it looks once a deadline), so a retry from a requester that waits longer than that
    /// could run its request a second time. `gobelins agent` gives every node the default.
    pub request_deadline: Duration,
    /// Deadline of one migration batch or ack on the wire; it is retried after that.
    pub call_timeout: Duration,
    /// Pause before retrying an unreachable peer.
    pub retry: Duration,
    /// Entries are shipped in batches of about this many bytes. 256 KiB: a batch and the
    /// buffers it passes through stay in a core's cache. Measured against 1 MiB batches
    /// (`examples/adaptation.rs`, seven alternating runs): 367–559 MB/s against 287–344 MB/s.
    pub batch_bytes: usize,
    /// Answers remembered per key, so that retries run once. Each is forgotten once its sender
    /// settled it, or after twice `request_deadline`, when no retry of its request can come any
    /// more. While none of a key's answers is settled, it keeps up to 16 times as many.
    pub answers_per_key: usize,
    /// How long one attempt at a manager may take before the requester asks again (the same
    /// request, by the same id). It bounds what a request loses to a manager holding it for a
    /// change it will not finish, or to a connection gone silent. A retry that reaches the
    /// manager while the first attempt is still being handled waits for it: the request still
    /// runs once (a [`crate::Service::repeatable`] one may run again).
    pub attempt_timeout: Duration,
    /// Requests this node passes on to their manager at once, for senders that routed them
    /// by an old epoch; past that, a sender is told `Moved` and asks the manager itself. Each
    /// holds one of its sender's handler slots here while it waits for the manager, on
    /// another connection. Kept well under the transport's slots per connection (256 by
    /// default), relays alone never take them all: the sender's other requests are not held
    /// behind them, and a reader that has held as many requests as it may stops reading, so
    /// two nodes relaying to each other could then wait on each other until their deadlines.
    pub max_relays: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            request_deadline: Duration::from_secs(10),
            call_timeout: Duration::from_secs(2),
            retry: Duration::from_millis(20),
            batch_bytes: 256 * 1024,
            answers_per_key: 4,
            attempt_timeout: Duration::from_secs(2),
            max_relays: 64,
        }
    }
}

/// The change the replicated state is carrying out, as the host needs it.
#[derive(Clone, Debug)]
pub struct Progress {
    /// The epoch it leads to.
    pub epoch: u64,
    /// The change.
    pub change: Change,
    /// The nodes that take part.
    pub participants: BTreeSet<NodeId>,
    /// What moves.
    pub plan: MigrationPlan,
    /// For a `Fail` or `Recover`: the last two changes that moved something of the dead
    /// node's, as the cluster recorded them ([`ChangeInfo::failed_moved_in`](crate::ChangeInfo)).
    pub failed_moved_in: [Option<u64>; 2],
    /// For a `Fail` or `Recover`: since when the dead node's word of its entries holds
    /// ([`ChangeInfo::failed_kept_since`](crate::ChangeInfo)).
    pub failed_kept_since: Option<u64>,
    /// For an `Evict`: its node asked to leave (`gobelins leave`), where another node's
    /// `evict` took it out. Carried out alike; the change's record says `leave nN`.
    pub leave: bool,
}

/// What the supervisor tells the host each time the replicated state changes.
#[derive(Clone, Debug)]
pub struct Update {
    /// The configuration's epoch.
    pub epoch: u64,
    /// The locator's table at that epoch (`None` while the cluster has no node).
    pub snapshot: Option<Arc<Snapshot>>,
    /// The change in progress, if any.
    pub change: Option<Progress>,
    /// Nodes that failed or left: nobody waits for them.
    pub departed: BTreeSet<NodeId>,
}

/// What every part of the host shares.
pub(crate) struct Inner {
    life: u64,
    pub(crate) me: NodeId,
    pub(crate) registry: Registry,
    pub(crate) link: Arc<dyn Link>,
    pub(crate) config: HostConfig,
    pub(crate) router: Mutex<Option<Router>>,
    /// The epoch requests are routed by.
    pub(crate) epoch: watch::Sender<u64>,
    /// Counts releases of held requests.
    pub(crate) released: watch::Sender<u64>,
    /// The last epoch whose period began here: batches for it may be staged.
    pub(crate) begun: watch::Sender<u64>,
    /// The last epoch this node reported done.
    pub(crate) done: watch::Sender<u64>,
    /// The last epoch whose entries this node began to merge (`after_migration`). A batch is
    /// staged under its read lock, a merge begins under its write lock: a batch sent again
    /// that comes in once the merge has begun is refused, not staged for the next change's
    /// merge, where it would overwrite what the entries became meanwhile.
    pub(crate) merging: tokio::sync::RwLock<u64>,
    /// Handles pass it; a hold waits out the handles that routed before the hold and may
    /// still be changing an entry that is about to leave.
    pub(crate) gate: Gate,
    /// The answers kept for retries, by service and key. Few are kept at a time, since each
    /// goes once its sender settles it (or at the sweep), so a change finds those of the slots
    /// that leave by looking at them all, rather than keeping a map per slot.
    pub(crate) answers: DashMap<(ServiceId, Key), Answers, Hasher>,
    /// Requests being handled here, each with the signal of its end once a retry of it waits
    /// for that. Made only then: a channel for every request that is not repeatable cost an
    /// allocation and eight wake-up lists' locks, and retries rarely wait.
    running: DashMap<RequestId, Option<Arc<tokio::sync::Notify>>, Hasher>,
    /// This node's requests in flight, as a sender.
    outstanding: Outstanding,
    /// Requests this node passes on to their manager now (`Inner::forward`).
    relaying: AtomicUsize,
    /// What this node's senders have settled, as a manager.
    pub(crate) settled: Mutex<Settled>,
    /// Where each kept answer is, per sender in the order kept: forgotten once settled. Taken
    /// after `settled` when both are held.
    kept: Mutex<KeptOrder>,
    pub(crate) departed: watch::Sender<BTreeSet<NodeId>>,
    inputs: mpsc::UnboundedSender<Input>,
    pub(crate) counters: Counters,
    /// The counters of this process's lives before this one (see [`Host::renew`]): what a
    /// node reported lost must not vanish from `gobelins stats` as it starts afresh.
    earlier: Mutex<Stats>,
    pub(crate) history: Mutex<Vec<ChangeRecord>>,
    pub(crate) stopped: watch::Sender<bool>,
    /// Until when this node may act as a manager ([`Host::lease`]); `None`: no lease needed.
    lease: watch::Sender<Option<Instant>>,
    /// `stopped`, `released`, `lease` and `departed` as every request reads them: atomics,
    /// not the watches' locks (see `crate::mirrors`).
    pub(crate) mirrors: Mirrors,
    /// Migration batch buffers, kept from one batch (and one change) to the next.
    pub(crate) pool: Pool,
    /// Lines about messages that could not be decoded: a peer of another build sends nothing
    /// else.
    pub(crate) malformed: Mutex<LogBudget>,
}

/// What the lines `Inner::malformed` budgets are about.
const MALFORMED: &str = "undecodable adaptation messages";

/// One node's adaptation layer. Cheap to clone; every clone is the same host.
#[derive(Clone)]
pub struct Host {
    /// The current life's state. A node the cluster declared failed while it still ran gets a
    /// new life ([`Host::renew`]): every clone must then reach the new one.
    inner: Arc<ArcSwap<Inner>>,
}

impl Host {
    /// Starts the host of node `me` with its services; `link` reaches the other hosts.
    /// Must be called inside a tokio runtime (it spawns the driver).
    pub fn start(me: NodeId, registry: Registry, link: Arc<dyn Link>, config: HostConfig) -> Host {
        Host { inner: Arc::new(ArcSwap::new(Inner::spawn(me, registry, link, config))) }
    }

    /// Ends this life and starts a new one with the fresh services `services` builds: what a
    /// process restart does, without the restart. The supervisor calls it when the cluster declared
    /// this node failed while it still ran (cut off, say): the cluster has rebuilt its entries
    /// elsewhere, so what the old services hold is stale and must neither be served nor be
    /// offered to a later `scan`. The new life routes nothing until it is fed a state.
    ///
    /// The old life stops before `services` builds the new one's: a handle a client took on
    /// the old life ([`Host::this_life`]) together with what it registered there is refused from
    /// then on, and one taken on the new life finds the new services already built.
    pub fn renew(&self, services: impl FnOnce() -> Registry) {
        let old = self.inner.load_full();
        old.stop();
        let fresh = Inner::spawn(old.me, services(), Arc::clone(&old.link), old.config.clone());
        // The counters go on from the old life's, the process's since its start.
        *fresh.earlier.lock().expect("earlier") = old.stats();
        // A node that needed a lease still does: the new life serves nothing until renewed.
        if old.lease.borrow().is_some() {
            fresh.lease.send_replace(Some(Instant::now()));
            fresh.mirrors.mirror_lease(&fresh.lease);
        }
        self.inner.store(fresh);
    }

    /// A handle on this life of the host only: unlike a clone, it does not follow
    /// [`Host::renew`]. Once this life ends, whatever is asked through it is refused, and it
    /// holds no lease. For a client that keeps state of its own next to a service of this life
    /// (the DSM's copies of pages): used after a renewal, that state would be the old life's,
    /// which the cluster has given up on, mixed with the new life's answers. Never renewed
    /// itself: the host's other clones would stay on the life it stopped.
    pub fn this_life(&self) -> Host {
        Host { inner: Arc::new(ArcSwap::new(self.inner.load_full())) }
    }

    /// This node came back as the only node of its cluster, its services empty: each reports
    /// what its last life managed as lost (see [`crate::Service::restarted_alone`]).
    pub async fn restarted_alone(&self) {
        let inner = self.inner.load_full();
        let ctx = inner.context(None);
        for plugin in inner.registry.iter() {
            plugin.restarted_alone(&ctx).await;
        }
    }

    /// Lets this node act as the manager of its keys until `until` (a later lease extends it,
    /// an earlier one changes nothing). Once a host has had a lease, a request for a key it
    /// manages waits while the lease has run out, and is answered `Late` (retried elsewhere or
    /// later) when it cannot wait longer; an answer computed after it ran out is not given. The
    /// supervisor renews it each time the leader grants the node's periodic ask, from the moment
    /// it asked, so a node cut off from the cluster stops serving before the cluster can declare
    /// it failed and rebuild its entries elsewhere: it never answers with what the cluster has
    /// since replaced. A host never given a lease serves freely (tests, tools); a life that
    /// stopped serves nothing, whatever its lease said.
    pub fn lease(&self, until: Instant) {
        let inner = self.inner.load();
        let later = inner.lease.send_if_modified(|lease| {
            let later = lease.is_none_or(|l| until > l);
            if later {
                *lease = Some(until);
            }
            later
        });
        if later {
            inner.mirrors.mirror_lease(&inner.lease);
        }
    }

    /// Whether this node's lease holds now, or it was never given one, and this life has not
    /// stopped: see [`Context::leased`](crate::Context::leased).
    pub fn leased(&self) -> bool {
        self.inner.load().leased()
    }

    /// Whether this node's lease holds, waiting up to `wait` for it to be renewed if it has
    /// run out: a leader's acknowledgements lag for a moment while the voters change, and a
    /// node in touch gets its lease back within a ping interval or two.
    pub async fn leased_within(&self, wait: Duration) -> bool {
        let inner = self.inner.load_full();
        inner.leased() || inner.wait_lease(Instant::now() + wait).await
    }

    /// Until when this node may act as the manager of its keys: `None` if it was never given a
    /// lease (it then serves freely until its life stops).
    pub fn leased_until(&self) -> Option<Instant> {
        *self.inner.load().lease.borrow()
    }

    /// Whether the life this handle reaches has stopped: always false for a clone, which
    /// follows [`Host::renew`], until the host is shut down; true for a [`Host::this_life`]
    /// handle once that life was renewed.
    pub fn life_ended(&self) -> bool {
        self.inner.load().mirrors.stopped.load(Ordering::Acquire)
    }

    /// Which life this is: changes with every [`Host::renew`], so that the supervisor knows to
    /// subscribe to the new life's reports and feed it from the start.
    pub fn life(&self) -> u64 {
        self.inner.load().life
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.inner.load().me
    }

    /// The declarations of the services hosted here, to register with the cluster.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.inner.load().registry.specs()
    }

    /// Hands the host the replicated state's latest word. Cheap; the driver acts on it.
    pub fn update(&self, update: Update) {
        // Replaced, not merged: a node that left may come back as a new life.
        let inner = self.inner.load();
        let mut newly = Vec::new();
        let changed = inner.departed.send_if_modified(|gone| {
            let changed = *gone != update.departed;
            if changed {
                newly = update.departed.difference(gone).copied().collect();
                gone.clone_from(&update.departed);
            }
            changed
        });
        if changed {
            inner.mirrors.count_departures(&newly);
            inner.mirrors.mirror_departed(&inner.departed.borrow());
        }
        // Calls waiting on a node the cluster gave up on (cut off, holding a request for a
        // change it will never finish) end now: their requests go to the new manager.
        for node in newly {
            inner.link.abandon(node);
        }
        let _ = inner.inputs.send(Input::Update(Box::new(update)));
    }

    /// The last epoch this node finished its part of: the supervisor reports it as
    /// `MigrationDone`.
    pub fn done(&self) -> watch::Receiver<u64> {
        self.inner.load().done.subscribe()
    }

    /// The timers and sizes this host runs with.
    pub fn config(&self) -> HostConfig {
        self.inner.load().config.clone()
    }

    /// The epoch requests are routed by here.
    pub fn epoch(&self) -> u64 {
        *self.inner.load().epoch.borrow()
    }

    /// Counts a request its agent refused before it reached this host (the node is held out
    /// of the cluster, say) as failed: its client got an error, and `stats` says so.
    pub fn count_refused(&self) {
        self.inner.load().counters.requests_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counters since this process started, over every life it had.
    pub fn stats(&self) -> Stats {
        self.inner.load().stats()
    }
    /// The latest changes this node took part in (256 at most), oldest first.
    pub fn history(&self) -> Vec<ChangeRecord> {
        self.inner.load().history.lock().expect("history").clone()
    }

    /// Sends an encoded request to the manager of `key` of `service`, wherever it is, and
    /// returns its encoded answer. Held through migrations, retried after failures, run once
    /// (except across its manager's failure: the answers it kept die with it).
    pub async fn request(
        &self,
        service: ServiceId,
        key: Key,
        body: Vec<u8>,
    ) -> Result<Bytes, AdaptationError> {
        self.inner.load_full().request(service, key, body, None, None).await
    }

    /// [`Host::request`], sent first to `first` whatever the locator says, as a sender that
    /// routes by an old epoch would: `first` passes it on to the key's manager if it no
    /// longer manages the key, and relays the manager's reply here. For measuring and
    /// testing that path; services use [`Host::request`].
    pub async fn request_via(
        &self,
        first: NodeId,
        service: ServiceId,
        key: Key,
        body: Vec<u8>,
    ) -> Result<Bytes, AdaptationError> {
        self.inner.load_full().request(service, key, body, Some(first), None).await
    }

    /// A context for code outside the service callbacks (a client library on this node, say):
    /// it routes by the epoch requests are routed by now.
    pub fn context(&self) -> Context {
        self.inner.load_full().context(None)
    }

    /// Answers a message from the host on node `from` (the supervisor's handler calls it).
    pub async fn handle(&self, from: NodeId, bytes: Bytes) -> Vec<u8> {
        let inner = self.inner.load_full();
        let reply = match Message::decode(bytes) {
            Ok(message) => inner.answer(from, message).await,
            Err(e) => {
                budgeted(&inner.malformed, MALFORMED, || {
                    tracing::warn!(node = from.0, error = %e, "an adaptation message from this node could not be decoded, and was refused: is it running another gobelins build? (`gobelins --version` on both; a cluster's nodes must run builds of one protocol version)");
                });
                Reply::Refused(format!("malformed message: {e}"))
            }
        };
        reply.encode().unwrap_or_else(|e| {
            Reply::Refused(e.to_string()).encode().expect("a short string encodes")
        })
    }

    /// Stops the driver. Requests in flight end at once, not at their deadline: with
    /// `Refused` at their next attempt, or `Deadline` when held, as a life that stopped will
    /// not serve them.
    pub fn shutdown(&self) {
        self.inner.load().stop();
    }
}
