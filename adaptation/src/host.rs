//! One node's adaptation layer at work: it serves requests for the keys this node manages,
//! sends requests for other keys to their managers, and carries out each configuration change
//! the supervisor hands it (the driver of [`crate::Period`] lives in the crate's `driver` module).
//!
//! ```text
//!  supervisor ──Update(epoch, snapshot, change)──▶ Host::update ──▶ driver (one task)
//!  peers ──Message──▶ Host::handle ──▶ serve a request │ stage a batch │ note an ack
//!  services, clients ──Host::request──▶ locate ──▶ serve here, or Link::call the manager
//! ```

use crate::codec;
use crate::deadline::Deadline;
use crate::driver::{Driver, Input};
use crate::error::AdaptationError;
use crate::gate::{Gate, Pass};
use crate::kept::{Forget, Kept, KeptOrder};
use crate::link::Link;
use crate::log_budget::{budgeted, say_ended, LogBudget};
use crate::mirrors::Mirrors;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::router::{Router, Verdict};
use crate::run::Run;
use crate::service::Context;
use crate::settled::{Outstanding, Settled};
use crate::wire::{Answered, Message, Reply, RequestId, Routed, Settlement};
use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
// Keys come from authenticated peers only; std's SipHash cost more than the maps' other work.
use foldhash::fast::RandomState as Hasher;
use gobelins_locator::{Change, Key, MigrationPlan, NodeId, ServiceId, ServiceSpec, Snapshot};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A message's answer, being worked out.
type Answering = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Timers and sizes of a host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// How long a request may take, holds and retries included, before it fails with
    /// [`AdaptationError::Deadline`]. It bounds the layer's waits, not the service's `handle`:
    /// a request its own node manages runs `handle` in the caller's task, and is not dropped
    /// half-way when the deadline passes.
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

/// Counters of one host, for operators and the demo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests issued here that completed.
    pub requests_ok: u64,
    /// Of those, requests that waited: held, redirected or retried.
    pub requests_delayed: u64,
    /// Requests issued here that failed (deadline, unknown service, refused), and those its
    /// agent refused before they reached the host ([`Host::count_refused`]).
    pub requests_failed: u64,
    /// Requests this node served as manager.
    pub served: u64,
    /// Requests this node held because their key was moving.
    pub held: u64,
    /// Entries shipped to new managers.
    pub entries_sent: u64,
    /// Entries received from old managers.
    pub entries_received: u64,
    /// Entries `scan` rebuilt after failures.
    pub entries_rebuilt: u64,
    /// Entry bytes shipped.
    pub bytes_sent: u64,
    /// Answers this node keeps as a manager so that retries run nothing twice (mostly at most
    /// `answers_per_key` per key; [`crate::Service::repeatable`] requests keep none, nor does
    /// a manager's own request served on its first attempt, of which no copy exists, unless
    /// its lease runs out while it runs).
    #[serde(default)]
    pub answers_kept: u64,
    /// Requests for keys this node no longer manages that it passed on to their manager,
    /// relaying the manager's reply to their sender (who counts them as neither delayed nor
    /// redirected: nothing told it to ask again).
    #[serde(default)]
    pub forwarded: u64,
    /// Times a migration message this node sent was refused by its receiver. A batch of
    /// entries refused is sent again until taken, and its change waits for it: a count that
    /// grows means a change that cannot end (the log names the receiver and why). A batch of
    /// answers alone is given up.
    #[serde(default)]
    pub batches_refused: u64,
    /// Per service, by name: how much it reported lost after failures, in its own unit
    /// ([`crate::Service::reported_lost`]). Anything but 0 means data may be gone: the
    /// service's log says what.
    #[serde(default)]
    pub reported_lost: BTreeMap<String, u64>,
}

impl Stats {
    /// Adds the counters of `earlier`, a life before this one. `answers_kept` counts what is
    /// kept now, so only this life's.
    fn add_earlier(&mut self, earlier: &Stats) {
        // Taken apart whole, without `..`: a counter added to `Stats` fails to build here until
        // it is said whether it adds up over lives.
        let Stats {
            requests_ok,
            requests_delayed,
            requests_failed,
            served,
            held,
            entries_sent,
            entries_received,
            entries_rebuilt,
            bytes_sent,
            answers_kept: _,
            forwarded,
            batches_refused,
            reported_lost,
        } = earlier;
        self.requests_ok += requests_ok;
        self.requests_delayed += requests_delayed;
        self.requests_failed += requests_failed;
        self.served += served;
        self.held += held;
        self.entries_sent += entries_sent;
        self.entries_received += entries_received;
        self.entries_rebuilt += entries_rebuilt;
        self.bytes_sent += bytes_sent;
        self.forwarded += forwarded;
        self.batches_refused += batches_refused;
        for (name, lost) in reported_lost {
            *self.reported_lost.entry(name.clone()).or_default() += lost;
        }
    }
}

/// One change as this node carried it out: what moved and how long each phase took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The epoch it led to.
    pub epoch: u64,
    /// The change, printed.
    pub change: String,
    /// Milliseconds in before migration (scan included).
    pub before_ms: f64,
    /// Milliseconds sending out.
    pub sending_ms: f64,
    /// Milliseconds waiting for the other participants' entries and acks.
    pub receiving_ms: f64,
    /// Milliseconds in after migration: `after_migration`, then (requests released)
    /// `after_release`.
    pub after_ms: f64,
    /// Milliseconds from the change's start here to the release of the requests it held for
    /// the keys that moved: how long such a request waited at most, on this node. Absent
    /// (0) from the stats of a build before it.
    #[serde(default)]
    pub held_ms: f64,
    /// Milliseconds from the report of done to the stable epoch (`None` until then).
    pub stable_ms: Option<f64>,
    /// Entries this node sent.
    pub entries_sent: u64,
    /// Entries it received.
    pub entries_received: u64,
    /// Entries it rebuilt with `scan`.
    pub entries_rebuilt: u64,
    /// When this node began the change: from then on it stages the batches sent to it. An
    /// instant of this process, for an observer in it (the migration benchmark sets one node's
    /// against another's); not carried in `stats`.
    #[serde(skip)]
    pub begun_at: Option<std::time::Instant>,
    /// When its sending phase began (its new table installed) and ended, as `begun_at`.
    #[serde(skip)]
    pub sending: Option<(std::time::Instant, std::time::Instant)>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests_ok: AtomicU64,
    pub(crate) requests_delayed: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) served: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) entries_sent: AtomicU64,
    pub(crate) entries_received: AtomicU64,
    pub(crate) entries_rebuilt: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) batches_refused: AtomicU64,
}

/// A request being handled: while it lives, a retry of the same request waits for it.
struct Running<'a> {
    inner: &'a Inner,
    id: RequestId,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some((_, Some(ended))) = self.inner.running.remove(&self.id) {
            ended.notify_waiters();
        }
    }
}

/// One request being passed on (`Inner::forward`); dropped, it makes room for another.
struct Relay<'a>(&'a AtomicUsize);

impl<'a> Relay<'a> {
    /// A place among the `most` requests relayed at once, if one is free.
    fn take(relaying: &'a AtomicUsize, most: usize) -> Option<Relay<'a>> {
        if relaying.fetch_add(1, Ordering::AcqRel) >= most {
            relaying.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Relay(relaying))
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What names a request on every attempt of it.
struct Trip {
    service: ServiceId,
    key: Key,
    id: RequestId,
    /// Whether the service may run it twice (`Service::repeatable`).
    repeatable: bool,
}

impl Trip {
    /// The request as it goes to a manager at `epoch`, which may wait `left` for it, carrying
    /// `settled`; its body goes in when it is encoded.
    fn routed(&self, epoch: u64, left: Duration, settled: Settlement) -> Routed {
        let Trip { service, key, id, repeatable } = *self;
        let wait_ms = left.as_millis() as u64;
        Routed { id, service, key, epoch, body: Bytes::new(), wait_ms, settled, repeatable }
    }
}

/// A request [`Inner::enter`] let in: its pass through the gate, and the router's epoch and
/// snapshot under that pass.
type Entered<'a> = (Pass<'a>, u64, Arc<Snapshot>);

/// The last answers given for one key, oldest first, each with when it was kept: mostly one,
/// kept in place (most keys get one answer before its sender settles it).
pub(crate) type Answers = SmallVec<[(RequestId, Bytes, Instant); 1]>;

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
        let _ = inner.inputs.send(Input::Update(update));
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

/// How many times `answers_per_key` a key's answers may grow to while none of them is settled.
const UNSETTLED_ROOM: usize = 16;

/// A starting point for request numbers that differs from one start of the process to the next.
fn boot_sequence() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // The top bit clear leaves 2^63 requests before wrapping.
    gobelins_locator::mix(nanos ^ u64::from(std::process::id())) >> 1
}

/// Drops the answers kept longer than twice the request deadline, and those their senders have
/// settled, every deadline, until the host's life ends. A requester retries one request only
/// until its deadline, so no retry comes for them; kept, they would stay for the node's life,
/// and a DSM manager keeps a page with each write it grants.
async fn forget_old_answers(inner: Weak<Inner>) {
    let Some(period) = inner.upgrade().map(|i| i.config.request_deadline) else { return };
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.mirrors.stopped.load(Ordering::Acquire) {
            return;
        }
        say_ended(&inner.malformed, MALFORMED);
        let keep = inner.config.request_deadline * 2;
        let settled = {
            let mut settled = inner.settled.lock().expect("settled");
            inner.note_own(&mut settled, Instant::now());
            settled.forget_quiet(keep, Instant::now());
            inner.kept.lock().expect("kept").expire(keep, Instant::now());
            settled.clone()
        };
        inner.answers.retain(|_, list| {
            list.retain(|(id, _, at)| at.elapsed() < keep && !settled.covers(id));
            !list.is_empty()
        });
    }
}

/// Numbers lives, so that a renewed host is told apart from the one it replaces.
static LIVES: AtomicU64 = AtomicU64::new(1);

impl Inner {
    pub(crate) fn spawn(
        me: NodeId,
        registry: Registry,
        link: Arc<dyn Link>,
        config: HostConfig,
    ) -> Arc<Inner> {
        let (inputs, receiver) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            life: LIVES.fetch_add(1, Ordering::Relaxed),
            me,
            registry,
            link,
            config,
            router: Mutex::new(None),
            epoch: watch::channel(0).0,
            released: watch::channel(0).0,
            begun: watch::channel(0).0,
            done: watch::channel(0).0,
            merging: tokio::sync::RwLock::new(0),
            gate: Gate::new(),
            answers: DashMap::default(),
            running: DashMap::default(),
            // Ids must not repeat across restarts of the node, or a manager would answer a new
            // request with an old request's remembered answer: start each life somewhere new.
            outstanding: Outstanding::new(boot_sequence()),
            relaying: AtomicUsize::new(0),
            settled: Mutex::new(Settled::default()),
            kept: Mutex::new(KeptOrder::default()),
            departed: watch::channel(BTreeSet::new()).0,
            inputs,
            counters: Counters::default(),
            earlier: Mutex::new(Stats::default()),
            history: Mutex::new(Vec::new()),
            stopped: watch::channel(false).0,
            lease: watch::channel(None).0,
            mirrors: Mirrors::new(),
            // Enough for the batches in flight and queued to two destinations at once.
            pool: Pool::new(16),
            malformed: crate::log_budget::noisy(),
        });
        tokio::spawn(Driver::new(Arc::clone(&inner)).run(receiver));
        tokio::spawn(forget_old_answers(Arc::downgrade(&inner)));
        inner
    }

    /// This life's counters, with its earlier lives' added.
    fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut stats = Stats {
            requests_ok: get(&c.requests_ok),
            requests_delayed: get(&c.requests_delayed),
            requests_failed: get(&c.requests_failed),
            served: get(&c.served),
            held: get(&c.held),
            entries_sent: get(&c.entries_sent),
            entries_received: get(&c.entries_received),
            entries_rebuilt: get(&c.entries_rebuilt),
            bytes_sent: get(&c.bytes_sent),
            answers_kept: self.answers.iter().map(|answers| answers.len() as u64).sum(),
            forwarded: get(&c.forwarded),
            batches_refused: get(&c.batches_refused),
            reported_lost: self.registry.iter().fold(BTreeMap::new(), |mut lost, plugin| {
                // Names need not be unique: two services of one name add up.
                *lost.entry(plugin.spec().name).or_default() += plugin.reported_lost();
                lost
            }),
        };
        stats.add_earlier(&self.earlier.lock().expect("earlier"));
        stats
    }

    /// Stops the driver. Requests in flight end at once, not at their deadline: with
    /// `Refused` at their next attempt, or `Deadline` when held, as a life that stopped will
    /// not serve them.
    pub(crate) fn stop(&self) {
        self.stopped.send_replace(true);
        self.mirrors.stopped.store(true, Ordering::Release);
        let _ = self.inputs.send(Input::Stop);
    }

    /// A context at the epoch requests are routed by.
    pub(crate) fn context(self: &Arc<Self>, from: Option<NodeId>) -> Context {
        let (epoch, snapshot) = match &*self.router.lock().expect("router") {
            Some(r) => (r.epoch(), Some(Arc::clone(r.snapshot()))),
            None => (0, None),
        };
        Context::new(self.me, epoch, from, snapshot, Arc::clone(self))
    }

    /// Keeps the answer `serve` just gave for `service`, which this node hosts.
    pub(crate) fn remember(&self, service: ServiceId, answered: Answered) {
        let now = Instant::now();
        let kept = Kept::new(answered.id, service, answered.key, now);
        self.keep(service, answered, now);
        self.kept.lock().expect("kept").push(kept);
    }

    /// Notes in `settled` what this node itself has settled, read from its own requests in
    /// flight. Its fresh requests carry no settlement, so its own answers kept here (a
    /// migration handed them over, or a lease ran out as one was answered) would otherwise
    /// wait for a retry served here, or for their expiry.
    pub(crate) fn note_own(&self, settled: &mut Settled, now: Instant) {
        settled.note(self.me, self.outstanding.settlement(), now);
    }

    /// Takes in the settlement request `id` carries from its sender and forgets the answers it
    /// settles. Answers a retry may still need stay: a settled request gets no retry (a late
    /// copy is refused). With `look_up`, returns whether `id` itself is settled, looked up
    /// under the same lock (else false).
    fn note_settled(
        &self,
        id: RequestId,
        settlement: Settlement,
        now: Instant,
        look_up: bool,
    ) -> bool {
        // A repeatable request whose manager had heard its sender's settlement carries none.
        if !look_up && settlement == Settlement::default() {
            return false;
        }
        let keep = self.config.request_deadline * 2;
        let mut forget = Forget::new();
        let covered = {
            let mut settled = self.settled.lock().expect("settled");
            let news = settled.note(id.origin, settlement, now);
            let covered = look_up && settled.covers(&id);
            if !news {
                return covered;
            }
            let mut kept = self.kept.lock().expect("kept");
            kept.settled(id.origin, &settled, keep, now, &mut forget);
            covered
        };
        for gone in forget {
            // Moved away with its key, or pushed out by later answers: nothing left to do.
            self.answers.remove_if_mut(&(gone.service, gone.key), |_, list| {
                list.retain(|(id, _, _)| *id != gone.id);
                list.is_empty()
            });
        }
        covered
    }

    /// Keeps `answered` (a key's answers oldest first) for retries: a change hands them over
    /// with the keys that move.
    pub(crate) fn remember_all(&self, service: ServiceId, answered: Vec<Answered>) {
        if self.registry.spec(service).is_none() {
            return;
        }
        let now = Instant::now();
        // This node's own answers that it has settled since: no retry of them will come.
        let own = self.outstanding.settlement();
        let settled_here = |id: &RequestId| id.origin == self.me && own.covers(id.seq);
        let mut places = Vec::with_capacity(answered.len());
        for a in answered.into_iter().filter(|a| !settled_here(&a.id)) {
            places.push(Kept::new(a.id, service, a.key, now));
            self.keep(service, a, now);
        }
        // Each sender's in its own order, so that they leave as its settlement passes them.
        places.sort_by_key(|k| (k.id.origin, k.id.seq));
        let mut order = self.kept.lock().expect("kept");
        places.into_iter().for_each(|k| order.push(k));
    }

    /// Adds `answered` to its key's answers, unless it is there already.
    fn keep(&self, service: ServiceId, answered: Answered, at: Instant) {
        let mut list = self.answers.entry((service, answered.key)).or_default();
        if list.iter().any(|(id, _, _)| *id == answered.id) {
            return;
        }
        // At least one: with none, there would be nothing to push out and nowhere to keep.
        let most = self.config.answers_per_key.max(1);
        if list.len() >= most {
            // Out first: an answer its sender settled, which no retry needs. One a retry may
            // still need stays, up to `UNSETTLED_ROOM` times the setting: pushed out, its
            // request would run a second time if retried (a hot key answers many senders
            // before their settlements come back).
            let settled = self.settled.lock().expect("settled");
            match list.iter().position(|(id, _, _)| settled.covers(id)) {
                Some(at) => {
                    list.remove(at);
                }
                None if list.len() >= most * UNSETTLED_ROOM => {
                    tracing::warn!(key = answered.key.0, kept = list.len(), "an answer a retry may still need was pushed out by later ones: should that retry come, its request runs again");
                    list.remove(0);
                }
                None => {}
            }
        }
        list.push((answered.id, answered.response, at));
    }

    fn answered(&self, service: ServiceId, key: Key, id: RequestId) -> Option<Bytes> {
        let list = self.answers.get(&(service, key))?;
        list.iter().find(|(i, _, _)| *i == id).map(|(_, r, _)| r.clone())
    }

    async fn wait_epoch(&self, at_least: u64, until: Instant) -> bool {
        let mut rx = self.epoch.subscribe();
        self.unless_stopped(until, async move { rx.wait_for(|&e| e >= at_least).await.is_ok() })
            .await
    }

    /// `wait`'s answer, or false at `until` or as soon as this life stops: a life renewed
    /// because the cluster declared it failed will never release what it holds, and the
    /// requesters should ask the node that manages the key now.
    ///
    /// Boxed: most requests never wait, and inline these timers would make every request's
    /// future (allocated for each request) a kilobyte larger, too large for the allocator's
    /// per-thread cache.
    fn unless_stopped<'a>(
        &'a self,
        until: Instant,
        wait: impl Future<Output = bool> + Send + 'a,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let mut stopped = self.stopped.subscribe();
            // A stopped life first: with both ready, an unbiased choice said now and then that
            // a stopped life's lease held.
            tokio::select! {
                biased;
                _ = stopped.wait_for(|&s| s) => false,
                done = tokio::time::timeout_at(until, wait) => done.unwrap_or(false),
            }
        })
    }

    /// Returns once request `id` is no longer being handled here.
    async fn running_ends(&self, id: RequestId) {
        loop {
            let signal = match self.running.get_mut(&id) {
                None => return,
                Some(mut run) => {
                    Arc::clone(run.get_or_insert_with(|| Arc::new(tokio::sync::Notify::new())))
                }
            };
            let ended = signal.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            // Looked at again once listening: an end between the two looks is not missed. A
            // run that ended and began again (another copy) is waited for afresh.
            let same = |run: &Option<Arc<tokio::sync::Notify>>| {
                run.as_ref().is_some_and(|s| Arc::ptr_eq(s, &signal))
            };
            if self.running.get(&id).is_some_and(|run| same(&run)) {
                ended.await;
            }
        }
    }

    /// Whether this node may act as a manager now.
    pub(crate) fn leased(&self) -> bool {
        self.leased_at(Instant::now())
    }

    /// Whether this node may act as a manager at `now`.
    fn leased_at(&self, now: Instant) -> bool {
        // A life that stopped holds no lease, whatever its last one said: the supervisor renews
        // only the current life's.
        !self.mirrors.stopped.load(Ordering::Acquire) && self.mirrors.leased_at(now)
    }

    async fn wait_lease(&self, until: Instant) -> bool {
        let mut rx = self.lease.subscribe();
        self.unless_stopped(until, async move {
            rx.wait_for(|l| l.is_none_or(|l| Instant::now() < l)).await.is_ok()
        })
        .await
    }

    async fn wait_release(&self, seen: u64, until: Instant) -> bool {
        let mut rx = self.released.subscribe();
        self.unless_stopped(until, async move { rx.wait_for(|&r| r > seen).await.is_ok() }).await
    }

    /// Waits until the routing epoch moves past `epoch` or a short pause passes, whichever is
    /// first: the manager we tried is unreachable or behind.
    async fn pause(&self, epoch: u64, until: Instant) {
        let soon = (Instant::now() + self.config.retry).min(until);
        self.wait_epoch(epoch + 1, soon).await;
    }

    pub(crate) async fn request(
        self: &Arc<Self>,
        service: ServiceId,
        key: Key,
        body: Vec<u8>,
        first: Option<NodeId>,
        judged: Option<bool>,
    ) -> Result<Bytes, AdaptationError> {
        // Outstanding until this function returns: managers forget its answer only after that.
        // A repeatable request leaves no answer to forget. Judged on the typed request when
        // the sender had it: decoding the body again only to ask cost the DSM a fifth of what
        // a routed request costs over a told one.
        let repeatable = judged
            .unwrap_or_else(|| self.registry.get(service).is_some_and(|p| p.repeatable(&body)));
        let ticket = (!repeatable).then(|| self.outstanding.take());
        let seq = ticket.as_ref().map_or_else(|| self.outstanding.number(), |t| t.seq);
        let trip = Trip { service, key, id: RequestId { origin: self.me, seq }, repeatable };
        let started = Instant::now();
        let until = Deadline::new(started, self.config.request_deadline);
        // The first attempt here, the others apart and boxed: nearly every request needs only
        // the first, and its future carries none of the waits'.
        let (result, rounds) = match self.attempt(&trip, &body, first, 1, until).await {
            Some((_, Reply::Done(response))) => (Ok(response), 1),
            tried => {
                // A first attempt that found no configuration did not go to `first` yet.
                let first = if tried.is_none() { first } else { None };
                Box::pin(self.again(&trip, &body, first, tried, until)).await
            }
        };
        // Settled: the answer is in hand, or never will be.
        drop(ticket);
        self.settle(service, key, started, result, rounds)
    }

    /// A request the service may run twice, from a typed sender ([`Context::request`]). When
    /// the key's manager is another node, its first attempt is the same as
    /// [`Inner::request`]'s, with the message encoded in one piece (as a told one is) and
    /// none of the other cases' code on its way. A DSM's read faults and barrier arrivals go
    /// so; with cold caches, a request pays for each line of code it runs, and these lines
    /// were most of what a routed request cost over a told one (BENCHMARKS.md, stop 30).
    pub(crate) async fn request_repeatable<Q: Serialize>(
        self: &Arc<Self>,
        service: ServiceId,
        key: Key,
        request: &Q,
    ) -> Result<Bytes, AdaptationError> {
        let Some((epoch, manager)) = self.remote_manager(service, key) else {
            return self.request(service, key, codec::encode(request)?, None, Some(true)).await;
        };
        let started = Instant::now();
        let id = RequestId { origin: self.me, seq: self.outstanding.number() };
        let trip = Trip { service, key, id, repeatable: true };
        let left = self.config.request_deadline.min(self.config.attempt_timeout);
        let routed = trip.routed(epoch, left, self.outstanding.news_for(manager));
        let message = routed.encode_typed(request)?;
        let attempt = Deadline::new(started, left);
        let (result, rounds) = match self.send_to_manager(manager, &routed, message, attempt).await
        {
            Reply::Done(response) => (Ok(response), 1),
            tried => {
                let until = Deadline::new(started, self.config.request_deadline);
                let body = codec::encode(request)?;
                Box::pin(self.again(&trip, &body, None, Some((epoch, tried)), until)).await
            }
        };
        self.settle(service, key, started, result, rounds)
    }

    /// The epoch and the manager of `key` when that manager is another node, and this node
    /// still sends.
    fn remote_manager(&self, service: ServiceId, key: Key) -> Option<(u64, NodeId)> {
        if self.mirrors.stopped.load(Ordering::Acquire) {
            return None;
        }
        let router = self.router.lock().expect("router");
        let router = router.as_ref()?;
        let manager = router.snapshot().locate(service, key)?;
        (manager != self.me).then(|| (router.epoch(), manager))
    }

    /// Counts a request of `service` at `key`, begun at `started`, as it ended after `rounds`
    /// attempts, and says what its sender gets.
    fn settle(
        &self,
        service: ServiceId,
        key: Key,
        started: Instant,
        result: Result<Bytes, Reply>,
        rounds: u32,
    ) -> Result<Bytes, AdaptationError> {
        let c = &self.counters;
        match result {
            Ok(response) => {
                c.requests_ok.fetch_add(1, Ordering::Relaxed);
                if rounds > 1 {
                    c.requests_delayed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(response)
            }
            Err(reply) => {
                c.requests_failed.fetch_add(1, Ordering::Relaxed);
                Err(match reply {
                    Reply::Unknown(s) => AdaptationError::UnknownService(s),
                    // Said by this node's own stopped life, not by the manager.
                    Reply::Refused(_) if self.mirrors.stopped.load(Ordering::Acquire) => {
                        AdaptationError::Stopped
                    }
                    Reply::Refused(why) => AdaptationError::Refused(why),
                    _ => {
                        let router = self.router.lock().expect("router");
                        let manager =
                            router.as_ref().and_then(|r| r.snapshot().locate(service, key));
                        AdaptationError::Deadline {
                            service: service.0,
                            key: key.0,
                            waited_ms: started.elapsed().as_millis() as u64,
                            manager: manager.map(|m| m.0),
                            here: manager == Some(self.me),
                        }
                    }
                })
            }
        }
    }

    /// The attempts after the first, which `tried` came to, until one is answered or the
    /// request's time is up: the reply it ended on, and the attempts made.
    async fn again(
        self: &Arc<Self>,
        trip: &Trip,
        body: &[u8],
        mut first: Option<NodeId>,
        mut tried: Option<(u64, Reply)>,
        until: Deadline,
    ) -> (Result<Bytes, Reply>, u32) {
        let mut rounds = 1u32;
        loop {
            match tried {
                Some((_, Reply::Done(response))) => return (Ok(response), rounds),
                Some((_, reply @ (Reply::Unknown(_) | Reply::Refused(_)))) => {
                    return (Err(reply), rounds)
                }
                // No configuration yet: wait for the first one.
                None => {
                    if !self.wait_epoch(1, until.at()).await {
                        return (Err(Reply::Late), rounds);
                    }
                }
                Some((ours, Reply::Moved { epoch })) if epoch > ours => {
                    if !self.wait_epoch(epoch, until.at()).await || until.passed(Instant::now()) {
                        return (Err(Reply::Late), rounds);
                    }
                }
                // Unreachable, late, or a manager behind us: try again shortly.
                Some((ours, _)) => {
                    if until.passed(Instant::now()) {
                        return (Err(Reply::Late), rounds);
                    }
                    self.pause(ours, until.at()).await;
                }
            }
            rounds += 1;
            tried = self.attempt(trip, body, first.take(), rounds, until).await;
        }
    }

    /// Attempt `round` of `trip`, whose body is `body`: served here or sent to the manager of
    /// its key by this node's epoch now (to `first`, if given, whatever the locator says).
    /// The epoch it was routed by and the reply; `None` before this node has a configuration.
    async fn attempt(
        self: &Arc<Self>,
        trip: &Trip,
        body: &[u8],
        first: Option<NodeId>,
        round: u32,
        until: Deadline,
    ) -> Option<(u64, Reply)> {
        let Trip { service, key, id, repeatable } = *trip;
        // A life that stopped (renewed after the cluster declared this node failed, or shut
        // down) sends nothing more: its waits end at once, and trying again would only spin.
        if self.mirrors.stopped.load(Ordering::Acquire) {
            let why = "this node's services stopped (declared failed, or shut down) while the \
                       request waited; send it again";
            return Some((0, Reply::Refused(why.into())));
        }
        let started = until.from();
        let (epoch, located, entered) = self.router.lock().expect("router").as_ref().map(|r| {
            let (epoch, located) = (r.epoch(), r.snapshot().locate(service, key));
            // A first attempt at a key this node manages, while the lease holds, is served
            // at once if nothing is in its way (`Inner::enter`).
            let entered = (round == 1
                && first.is_none()
                && located == Some(self.me)
                && self.leased_at(started))
            .then(|| self.enter(r, service, key, epoch))
            .flatten()
            .and_then(Result::ok);
            (epoch, located, entered)
        })?;
        if let Some(entered) = entered {
            return Some((epoch, self.serve_entered(entered, service, key, id, body, false).await));
        }
        let Some(located) = located else { return Some((epoch, Reply::Unknown(service.0))) };
        let manager = first.unwrap_or(located);
        // The first attempt starts when the request did, and its length needs no instants:
        // two subtractions of instants fewer per request.
        let (now, left) = if round == 1 {
            (started, self.config.request_deadline.min(self.config.attempt_timeout))
        } else {
            let now = Instant::now();
            (now, until.left(now).min(self.config.attempt_timeout))
        };
        let attempt = Deadline::new(now, left);
        // A first attempt served here has never left this node: see `serve`.
        let fresh = round == 1 && manager == self.me;
        // Not read for a fresh request.
        let settled = if fresh {
            Settlement::default()
        } else if repeatable {
            self.outstanding.news_for(manager)
        } else {
            self.outstanding.settlement()
        };
        let routed = trip.routed(epoch, left, settled);
        if manager == self.me {
            // Boxed: a node's own request comes here only when something was in its way.
            let served = Box::pin(self.serve(&routed, body, attempt, now, fresh));
            return Some((epoch, served.await));
        }
        let message = routed.encode_request(body);
        Some((epoch, self.send_to_manager(manager, &routed, message, attempt).await))
    }

    /// Sends `message`, which is `routed` encoded with its body, to `manager`, and waits for
    /// the answer until `attempt` ends (and the little more that lets the manager's own `Late`
    /// come back).
    async fn send_to_manager(
        &self,
        manager: NodeId,
        routed: &Routed,
        message: Vec<u8>,
        attempt: Deadline,
    ) -> Reply {
        // Gone already: ask the new manager. Gone while we wait: `Host::update` has the link
        // abandon the call.
        if self.mirrors.is_departed(manager) {
            return Reply::Late;
        }
        // A little longer than the manager will wait, so that its own `Late` reaches us.
        // From when the attempt began: the link need not read the clock again.
        let (started, left) = (attempt.from(), attempt.wait());
        let sealed = self.link.seal(message);
        let outcome = self.link.call_at(manager, sealed, started, left + self.config.retry).await;
        let reply = self.reply_from(manager, outcome);
        // A node that relayed it to the key's manager noted it too.
        let carried = routed.settled;
        if routed.repeatable && matches!(reply, Reply::Done(_)) && carried != Settlement::default()
        {
            self.outstanding.told(manager, carried);
        }
        reply
    }

    /// What a call to `manager` came to.
    fn reply_from(&self, manager: NodeId, outcome: Result<Bytes, AdaptationError>) -> Reply {
        match outcome {
            // A node declared failed may still run, cut off, and answer once the cut heals; but
            // its entries are being rebuilt from replicas elsewhere, so what it did is not
            // the directory's. Its answer is dropped and the request retried at the new manager.
            Ok(_) if self.mirrors.is_departed(manager) => Reply::Late,
            Ok(answer) => Reply::decode(&answer).unwrap_or_else(|e| Reply::Refused(e.to_string())),
            Err(e @ AdaptationError::TooLarge { .. }) => Reply::Refused(e.to_string()),
            Err(_) => Reply::Late,
        }
    }

    /// Passes a request for a key this node does not manage on to the key's manager, and
    /// relays the manager's reply to the request's origin: `None` when there is nobody to pass
    /// it to and the origin must be told `Moved`.
    ///
    /// Relayed, not answered by the manager to the origin directly: that took one one-way hop
    /// fewer, but five messages instead of four, and the origin had to wait for two of them,
    /// from two nodes. On one machine the second wait cost a sleeping thread's wake-up:
    /// 95 µs a redirect against 18 µs relayed (BENCHMARKS.md, stop 28). Each message now
    /// answers the one before it, and no answer arrives that its receiver did not ask for.
    async fn forward(&self, from: NodeId, routed: Routed, until: Deadline) -> Option<Reply> {
        let id = routed.id;
        if from != id.origin || self.mirrors.stopped.load(Ordering::Acquire) {
            return None;
        }
        let (epoch, to) = {
            let router = self.router.lock().expect("router");
            let router = router.as_ref()?;
            (router.epoch(), router.snapshot().locate(routed.service, routed.key)?)
        };
        // Nobody to pass it to: this node manages the key after all (its epoch moved since
        // `serve`), the origin does (it serves the key itself once it knows), or the manager
        // is gone.
        if to == self.me || to == from || self.mirrors.is_departed(to) {
            return None;
        }
        let Some(_relay) = Relay::take(&self.relaying, self.config.max_relays) else {
            tracing::debug!(
                origin = from.0,
                most = self.config.max_relays,
                "as many requests as may be are being passed on; the origin is told Moved"
            );
            return None;
        };
        let wait = until.left(Instant::now());
        let message =
            Message::Forward(Routed { epoch, wait_ms: wait.as_millis() as u64, ..routed });
        let bytes = self.link.seal(message.encode().ok()?);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        // Longer than the manager will wait, so that its own `Late` comes back, and shorter
        // than the origin waits for this node, so that ours reaches it.
        let taken = self.link.call(to, bytes, wait + self.config.retry / 2).await;
        let reply = self.reply_from(to, taken);
        if matches!(reply, Reply::Late) {
            // The origin asks again now, rather than at the end of its attempt.
            tracing::debug!(node = to.0, origin = from.0, "forwarded request not answered");
        }
        Some(reply)
    }

    /// `Refused` for a copy of a request its sender has settled: the sender has the answer or
    /// gave up, and the answer may be forgotten, so running it again would do it twice.
    fn refuse_if_settled(&self, id: RequestId) -> Option<Reply> {
        if !self.settled.lock().expect("settled").covers(&id) {
            return None;
        }
        Some(Self::refused(id))
    }

    /// The refusal of a copy of request `id`, which its sender has settled.
    fn refused(id: RequestId) -> Reply {
        tracing::debug!(
            origin = id.origin.0,
            seq = id.seq,
            "late copy of a settled request refused"
        );
        Reply::Refused(format!(
            "request {} of node {} was settled by its sender; a late copy is not run again",
            id.seq, id.origin
        ))
    }

    /// Acts as the manager of `routed`'s key (its body is `body`), until `until`; `now` is
    /// when it arrived.
    ///
    /// `fresh` says that the request is this node's own, on its first attempt: it has never
    /// left this node, so no copy of it runs or will run anywhere, no earlier attempt left an
    /// answer to find, and the answer goes straight to the caller, which asks no more once it
    /// has it. Such a request needs no run-once record, as a repeatable one needs none: for a
    /// DSM on two nodes, half of the requests, each of which paid a kept answer (four
    /// allocations), a run-once entry and a settlement it did not need.
    async fn serve(
        self: &Arc<Self>,
        routed: &Routed,
        body: &[u8],
        until: Deadline,
        now: Instant,
        fresh: bool,
    ) -> Reply {
        let Routed { id, service, key, epoch, settled, repeatable, .. } = *routed;
        debug_assert!(!fresh || id.origin == self.me, "only this node's own request is fresh");
        // Whether this request is run once: its copies looked for, its answer kept.
        let once = !(repeatable || fresh);
        // A fresh request carries no settlement: its node notes its own (`Inner::note_own`).
        let mut covered = (!fresh).then(|| self.note_settled(id, settled, now, once));
        let mut arrived = Some(now);
        loop {
            // Read once per pass: a pass after a wait needs the time anew.
            let now = arrived.take().unwrap_or_else(Instant::now);
            // Checked on every pass: a request held through a change may have been settled by
            // its sender (given up) meanwhile. A repeatable request is never refused: no
            // record of it is kept, and running it again is harmless. Nor is a fresh one: no
            // copy of it can be late.
            if once {
                let settled = match covered.take() {
                    Some(first_pass) => first_pass,
                    None => self.settled.lock().expect("settled").covers(&id),
                };
                if settled {
                    return Self::refused(id);
                }
            }
            // Looked up once per pass, for both uses below.
            let leased = self.leased_at(now);
            // Only while the lease holds: a node cut off may already be being replaced, and a
            // write it remembers may not be in what the cluster rebuilds.
            if once && leased {
                if let Some(response) = self.answered(service, key, id) {
                    return Reply::Done(response);
                }
            }
            let released = self.mirrors.released.load(Ordering::Acquire);
            // Taken at once unless a hold waits for it. Then the wait is fair to the hold, and
            // bounded: a handle that calls back into this node while a hold waits for the gate
            // would otherwise wait on itself.
            let (gate, leased) = match self.gate.try_pass() {
                Some(gate) => (gate, leased),
                // The lease is looked at again after the wait: it may have run out meanwhile,
                // and a handler that never yields is not looked at after it runs.
                None => match Box::pin(self.gate.pass(until.at())).await {
                    Some(gate) => (gate, self.leased()),
                    None => return Reply::Late,
                },
            };
            let routed = self
                .router
                .lock()
                .expect("router")
                .as_ref()
                .map(|r| (r.route(service, key, epoch), r.epoch(), Arc::clone(r.snapshot())));
            match routed {
                None => {
                    drop(gate);
                    if !self.wait_epoch(epoch.max(1), until.at()).await {
                        return Reply::Late;
                    }
                }
                Some((Verdict::Serve, _, _)) if !leased => {
                    drop(gate);
                    if !self.wait_lease(until.at()).await {
                        tracing::debug!(
                            node = self.me.0,
                            key = key.0,
                            "lease ran out: request not served here"
                        );
                        return Reply::Late;
                    }
                }
                Some((Verdict::Serve, ours, snapshot)) => {
                    if self.registry.get(service).is_none() {
                        return Reply::Unknown(service.0);
                    }
                    // Copies of a repeatable request may run side by side; a fresh one has
                    // none.
                    let running = if !once {
                        Ok(None)
                    } else {
                        match self.running.entry(id) {
                            dashmap::Entry::Occupied(_) => Err(()),
                            dashmap::Entry::Vacant(slot) => {
                                slot.insert(None);
                                Ok(Some(Running { inner: self, id }))
                            }
                        }
                    };
                    let running = match running {
                        Ok(running) => running,
                        // A retry of a request still being handled (its caller gave up on an
                        // attempt): wait for that one, then give its answer.
                        Err(()) => {
                            drop(gate);
                            let ended = self.unless_stopped(until.at(), async move {
                                self.running_ends(id).await;
                                true
                            });
                            if !ended.await {
                                return Reply::Late;
                            }
                            continue;
                        }
                    };
                    if running.is_some() {
                        // The first attempt may have finished between the check above and now.
                        if let Some(response) = self.answered(service, key, id) {
                            return Reply::Done(response);
                        }
                        // Or its sender settled it while this copy waited for the gate, and
                        // its answer was forgotten.
                        if let Some(refused) = self.refuse_if_settled(id) {
                            return refused;
                        }
                    }
                    let ctx = Context::new(self.me, ours, None, Some(snapshot), Arc::clone(self));
                    let reply = self.handled(&ctx, service, key, id, body, !fresh).await;
                    drop(running);
                    drop(gate);
                    return reply;
                }
                Some((Verdict::Hold, _, _)) => {
                    drop(gate);
                    self.counters.held.fetch_add(1, Ordering::Relaxed);
                    if !self.wait_release(released, until.at()).await {
                        return Reply::Late;
                    }
                }
                Some((Verdict::Wait { epoch }, _, _)) => {
                    drop(gate);
                    if !self.wait_epoch(epoch, until.at()).await {
                        return Reply::Late;
                    }
                }
                Some((Verdict::Moved { epoch }, _, _)) => return Reply::Moved { epoch },
                Some((Verdict::Unknown, _, _)) => return Reply::Unknown(service.0),
            }
        }
    }

    /// Under the look at the router `r` that found this node the manager of `key`: a pass
    /// through the gate and, if the router's verdict for a sender at `epoch` is `Serve` under
    /// that pass, the router's epoch and snapshot. A change's hold marks its keys in the router
    /// before it waits at the gate, so it either comes after this pass (and waits for the
    /// request), or the verdict already holds the key. `Err` with the router's epoch when the
    /// verdict is `Moved`, as [`Inner::serve`] would find it under the same pass. `None` when
    /// the gate or another verdict is in the way: the request then goes through `serve`.
    fn enter(
        &self,
        r: &Router,
        service: ServiceId,
        key: Key,
        epoch: u64,
    ) -> Option<Result<Entered<'_>, u64>> {
        let pass = self.gate.try_pass()?;
        match r.route(service, key, epoch) {
            Verdict::Serve => Some(Ok((pass, r.epoch(), Arc::clone(r.snapshot())))),
            Verdict::Moved { epoch } => Some(Err(epoch)),
            _ => None,
        }
    }

    /// Serves request `id` once [`Inner::enter`] let it in, without `serve`'s loop and waits:
    /// a node's own request on its first attempt (a DSM on two nodes sends half of its
    /// requests so), and a repeatable request from another node. With `keep`, an answer the
    /// service wants kept is remembered.
    async fn serve_entered(
        self: &Arc<Self>,
        (pass, epoch, snapshot): Entered<'_>,
        service: ServiceId,
        key: Key,
        id: RequestId,
        body: &[u8],
        keep: bool,
    ) -> Reply {
        let ctx = Context::new(self.me, epoch, None, Some(snapshot), Arc::clone(self));
        let reply = self.handled(&ctx, service, key, id, body, keep).await;
        drop(pass);
        reply
    }

    /// Runs the handler of `service` for request `id` at `key` as the key's manager, and judges
    /// its answer. With `keep`, an answer the service wants kept is remembered for retries.
    async fn handled(
        self: &Arc<Self>,
        ctx: &Context,
        service: ServiceId,
        key: Key,
        id: RequestId,
        body: &[u8],
        keep: bool,
    ) -> Reply {
        let Some(plugin) = self.registry.get(service) else {
            return Reply::Unknown(service.0);
        };
        let mut handling = plugin.handle(ctx, key, body);
        let mut waited = false;
        let handled = std::future::poll_fn(|cx| {
            let poll = handling.as_mut().poll(cx);
            waited |= poll.is_pending();
            poll
        });
        match handled.await {
            // The lease ran out while the handler waited: the cluster may already be
            // rebuilding this key elsewhere, so the answer is not given; the requester retries
            // at whichever node manages the key by then. What the handler did is done, though,
            // so the answer is kept: a retry that finds this node still the manager gets it
            // rather than running the request a second time. A handler that never waited ran
            // within the look at the lease that let the request in (handlers must not block
            // the thread), so that look holds for its answer too: like the answer's time on
            // the wire, it is what the lease's margin (half the failure timeout) is for. A
            // second read of the clock cost each request about 24 ns here.
            Ok(answer) if waited && !self.leased() => {
                tracing::debug!(node = self.me.0, key = key.0, "lease ran out during the request");
                if answer.keep {
                    let response = answer.response.into();
                    self.remember(service, Answered { key, id, response });
                }
                Reply::Late
            }
            Ok(answer) => {
                // Shared with the answer kept, not copied: a DSM grant carries a page.
                let response = Bytes::from(answer.response);
                if answer.keep && keep {
                    let response = response.clone();
                    self.remember(service, Answered { key, id, response });
                }
                self.counters.served.fetch_add(1, Ordering::Relaxed);
                Reply::Done(response)
            }
            // Not remembered: the retry must run it again.
            Err(e @ AdaptationError::Retry { .. }) => {
                tracing::debug!(error = %e, "request to be retried");
                Reply::Late
            }
            Err(e) => Reply::Refused(e.to_string()),
        }
    }

    /// Serves `routed` as its key's manager, waiting no longer than its sender will: the
    /// reply, and when the sender stops waiting.
    async fn serve_routed(self: &Arc<Self>, routed: &Routed) -> (Reply, Deadline) {
        let now = Instant::now();
        let until = self.sender_waits(routed, now);
        // A repeatable request with nothing in its way is served at once: it keeps no record
        // to look for or to make, and most requests need none of `serve`'s waits.
        match self.enter_repeatable(routed, now) {
            Some(Ok(entered)) => {
                let Routed { id, service, key, .. } = *routed;
                let reply = self.serve_entered(entered, service, key, id, &routed.body, true);
                (reply.await, until)
            }
            // Sent by an old epoch: passed on (`Inner::forward`) without `serve`'s second look.
            Some(Err(epoch)) => (Reply::Moved { epoch }, until),
            None => (self.serve(routed, &routed.body, until, now, false).await, until),
        }
    }

    /// How long the sender of `routed`, which arrived at `now`, waits for it.
    fn sender_waits(&self, routed: &Routed, now: Instant) -> Deadline {
        let wait = Duration::from_millis(routed.wait_ms).min(self.config.request_deadline);
        Deadline::new(now, wait)
    }

    /// Serves a request from node `from`, or passes it on to its key's manager.
    async fn serve_request(self: &Arc<Self>, from: NodeId, routed: Routed) -> Reply {
        match self.serve_routed(&routed).await {
            (Reply::Moved { epoch }, until) => {
                // Boxed: a rare path, which would enlarge every request's future.
                Box::pin(self.forward(from, routed, until)).await.unwrap_or(Reply::Moved { epoch })
            }
            (reply, _) => reply,
        }
    }

    /// [`Inner::serve_request`] for a repeatable request, with the case where nothing is in its
    /// way apart: a DSM's read faults and barrier arrivals come so. A cold request pays for
    /// each line of code it runs, and `serve_routed` holds all of `serve`'s waits
    /// (BENCHMARKS.md, stop 30).
    async fn serve_repeatable(self: &Arc<Self>, from: NodeId, routed: Routed) -> Reply {
        let now = Instant::now();
        match self.enter_repeatable(&routed, now) {
            Some(Ok(entered)) => {
                let Routed { id, service, key, .. } = routed;
                self.serve_entered(entered, service, key, id, &routed.body, true).await
            }
            // Sent by an old epoch: passed on at once, as `serve_request` would after a second
            // look at the router (a request redirected once cost 2.3x an echo with it).
            Some(Err(epoch)) => {
                let until = self.sender_waits(&routed, now);
                let forwarded = Box::pin(self.forward(from, routed, until)).await;
                forwarded.unwrap_or(Reply::Moved { epoch })
            }
            // Everything else: boxed, and from the start (noting the settlement again is no
            // news, and the gate's pass was not taken).
            None => Box::pin(self.serve_request(from, routed)).await,
        }
    }

    /// For a repeatable request that arrived at `now`: its sender's settlement noted and, while
    /// the lease holds, [`Inner::enter`]. `None` sends it through [`Inner::serve`], which notes
    /// the settlement again (it is no news then).
    fn enter_repeatable(&self, routed: &Routed, now: Instant) -> Option<Result<Entered<'_>, u64>> {
        if !routed.repeatable {
            return None;
        }
        self.note_settled(routed.id, routed.settled, now, false);
        if !self.leased_at(now) {
            return None;
        }
        let router = self.router.lock().expect("router");
        self.enter(router.as_ref()?, routed.service, routed.key, routed.epoch)
    }

    /// The answer to `message` from node `from`, each kind of message in a box of its own.
    /// The transport's per-message future stays within the allocator's per-thread cache
    /// (1,032 bytes here), and so does each box. One box for every kind held all of their
    /// waits, 1,137 bytes, and a box past the cache costs its allocation and its free a slow
    /// path each (BENCHMARKS.md, stop 49).
    fn answer(self: Arc<Self>, from: NodeId, message: Message) -> Answering {
        match message {
            Message::Request(routed) if routed.repeatable => {
                Box::pin(async move { self.serve_repeatable(from, routed).await })
            }
            Message::Request(routed) => {
                Box::pin(async move { self.serve_request(from, routed).await })
            }
            // Served, not passed on again: a manager that has moved on says so, and the origin
            // routes anew. One hop at most.
            Message::Forward(routed) => Box::pin(async move { self.serve_routed(&routed).await.0 }),
            // A life the cluster has ended (failed, or left) must not change an entry here: a
            // replica it stores after the survivors' `scan` would be a write nobody rebuilds.
            // Its batches and acks stay welcome: the period's own epochs judge those.
            Message::Local { .. } if self.mirrors.is_departed(from) => {
                tracing::debug!(node = from.0, "local request from a departed node refused");
                Box::pin(std::future::ready(Reply::Refused(format!(
                    "node {from} was declared failed or has left; it must rejoin as a new life"
                ))))
            }
            Message::Local { service, key, body } => {
                Box::pin(async move { self.local(from, service, key, &body).await })
            }
            Message::Batch { epoch, service, entries, answered, settled } => Box::pin(async move {
                self.stage(from, epoch, service, entries, answered, &settled).await
            }),
            Message::Ack { epoch } => {
                let _ = self.inputs.send(Input::Ack { from, epoch });
                Box::pin(std::future::ready(Reply::Accepted))
            }
        }
    }

    async fn local(
        self: &Arc<Self>,
        from: NodeId,
        service: ServiceId,
        key: Key,
        body: &[u8],
    ) -> Reply {
        let Some(plugin) = self.registry.get(service) else { return Reply::Unknown(service.0) };
        let ctx = self.context(Some(from));
        match plugin.handle(&ctx, key, body).await {
            Ok(answer) => Reply::Done(answer.response.into()),
            Err(e) => Reply::Refused(e.to_string()),
        }
    }

    /// Stages a batch once this node has begun the change it belongs to.
    async fn stage(
        self: &Arc<Self>,
        from: NodeId,
        epoch: u64,
        service: ServiceId,
        entries: Run,
        answered: Vec<Answered>,
        settled: &[(NodeId, Settlement)],
    ) -> Reply {
        let Some(plugin) = self.registry.get(service) else { return Reply::Unknown(service.0) };
        let mut begun = self.begun.subscribe();
        // Half the sender's deadline (if it is set as this node's), so that `Late` reaches it
        // before it gives up and sends a copy: staged too, that copy's entries were received
        // twice. A copy sent again after a failed connection can still land twice.
        let until = Instant::now() + self.config.call_timeout / 2;
        if !matches!(
            tokio::time::timeout_at(until, begun.wait_for(|&b| b >= epoch)).await,
            Ok(Ok(_))
        ) {
            return Reply::Late;
        }
        // A batch of a change before the one this node has begun is a copy of one whose
        // change ended without this node's part in it (it was declared failed, and this is
        // its next life): staged now, it would be merged into the change begun.
        if *begun.borrow() > epoch {
            tracing::debug!(
                node = from.0,
                epoch,
                "batch for a change before the one begun here refused"
            );
            return Reply::Merged { epoch };
        }
        // Under the same bound: a merge in progress holds this wait too.
        let Ok(merging) = tokio::time::timeout_at(until, self.merging.read()).await else {
            return Reply::Late;
        };
        if *merging >= epoch || *self.done.borrow() >= epoch {
            tracing::debug!(node = from.0, epoch, "batch for a change already merged here refused");
            return Reply::Merged { epoch };
        }
        let count = entries.len() as u64;
        let ctx = self.context(None);
        match plugin.receive(&ctx, from, &entries).await {
            Ok(()) => {
                self.settled.lock().expect("settled").merge(settled, Instant::now());
                self.remember_all(service, answered);
                self.counters.entries_received.fetch_add(count, Ordering::Relaxed);
                Reply::Accepted
            }
            Err(e) => {
                tracing::error!(node = from.0, service = service.0, error = %e, "a migration batch was refused");
                Reply::Refused(e.to_string())
            }
        }
    }

    /// Sends `message`, sealed by the link, to `to` until it is taken, or `to` is known gone,
    /// or this host stops. A message refused is sent again, less and less often, unless
    /// `refused` says to give it up: given up, the entries of a batch would be lost, the change
    /// reported done over them and their new manager serving them as absent.
    pub(crate) async fn deliver(&self, to: NodeId, message: Bytes, refused: OnRefusal) -> Delivery {
        let mut failures = 0u32;
        let mut refusals = 0u32;
        let mut said: Option<Instant> = None;
        let mut too_large = false;
        loop {
            // A stopped life sends nothing more. Not even once: its ack for a change, sent after
            // a batch it gave up as it stopped, would have the receiver count its entries in,
            // release their slots and serve them as absent until the failure is recovered.
            if self.mirrors.stopped.load(Ordering::Acquire) {
                return Delivery::Gone;
            }
            let mut pause = self.config.retry;
            // Sealed once: an attempt sends the same bytes again, not a copy of them.
            let outcome = self.link.call(to, message.clone(), self.config.call_timeout).await;
            let why = match outcome.and_then(|answer| Reply::decode(&answer)) {
                Ok(Reply::Accepted) => return Delivery::Taken,
                Ok(Reply::Merged { epoch }) => {
                    tracing::warn!(
                        node = to.0,
                        epoch,
                        "entries reached their new manager once it had begun to merge the \
                         change: a copy sent again whose first answer was lost (the first was \
                         taken, nothing is missing), or this node was cut off during the change \
                         (the cluster rebuilt them from replicas, and this node rejoins as a new \
                         life)"
                    );
                    return Delivery::Merged;
                }
                Ok(Reply::Refused(why)) => Some(why),
                Ok(Reply::Unknown(service)) => Some(format!("it does not host service {service}")),
                // Refused here, by this node's own frame limit, however often it is sent; but
                // dropped, its entries are lost.
                Err(e @ AdaptationError::TooLarge { .. }) => {
                    too_large = true;
                    Some(e.to_string())
                }
                Ok(other) => {
                    tracing::debug!(node = to.0, ?other, "migration message not taken yet");
                    None
                }
                Err(e) => {
                    failures += 1;
                    match failures {
                        // Most often the connection it went on was replaced by one the peer
                        // opened at the same moment (both sides dial a node that joins), and
                        // the new one is up: sent again at once, a pause would hold up the
                        // whole change (a 20 ms stall in one join of four, measured).
                        1 => {
                            tracing::debug!(node = to.0, error = %e, "migration message not delivered; sending it again");
                            pause = Duration::ZERO;
                        }
                        2 => {
                            tracing::warn!(node = to.0, error = %e, "migration message not delivered; retrying")
                        }
                        _ => {}
                    }
                    None
                }
            };
            if let Some(why) = why {
                self.counters.batches_refused.fetch_add(1, Ordering::Relaxed);
                if refused == OnRefusal::GiveUp {
                    tracing::warn!(node = to.0, %why, "node refused a migration message that carries no entries (answers kept for retries): given up, a late retry of one of those requests may run again");
                    return Delivery::Refused;
                }
                refusals += 1;
                // A refusal does not pass by itself: what cures it is an operator's act.
                pause =
                    (self.config.retry * 2u32.saturating_pow(refusals.min(16))).min(REFUSED_PAUSE);
                if said.is_none_or(|at| at.elapsed() >= REFUSED_SAY_EVERY) {
                    said = Some(Instant::now());
                    if too_large {
                        tracing::error!(
                            node = to.0,
                            error = %why,
                            refusals,
                            "a migration batch is larger than a frame: one entry of this service \
                             alone is. It stays on this node and is tried again, and the change \
                             cannot end before. Stopping a node does not help: the entry would \
                             be rebuilt for another one. The frame limit is fixed in this build \
                             (16 MiB): the service must keep its entries under it; report this \
                             to its authors"
                        );
                    } else {
                        tracing::error!(
                            node = to.0,
                            %why,
                            refusals,
                            "node refuses a migration batch; its entries stay on this node and \
                             are sent again until it takes them, and the change cannot end \
                             before. Most often the nodes run different builds: run the same \
                             gobelins build on every node. To end the change without that node, \
                             stop it: the cluster rebuilds what it was to take where a copy \
                             survives"
                        );
                    }
                }
            }
            if self.mirrors.is_departed(to) {
                tracing::warn!(
                    node = to.0,
                    "node is gone; what it was to receive will be rebuilt by scan where a copy survives"
                );
                return Delivery::Gone;
            }
            if self.mirrors.stopped.load(Ordering::Acquire) {
                return Delivery::Gone;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// What [`Inner::deliver`] does with a message its receiver refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnRefusal {
    /// Send it again until it is taken: it carries entries, or an ack the change waits for.
    SendAgain,
    /// Give it up: it carries only what retries of requests may need.
    GiveUp,
}

/// How [`Inner::deliver`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The receiver took it.
    Taken,
    /// The receiver refused it, and [`OnRefusal::GiveUp`] said to give it up.
    Refused,
    /// The receiver had already merged the change it belongs to: a copy of one it took, or
    /// this node's own part in the change ended without it.
    Merged,
    /// The receiver is gone, or this host stopped: `scan` rebuilds what it carried.
    Gone,
}

/// The longest pause between two attempts at a message its receiver refused.
const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// How often a refusal that goes on is logged again.
const REFUSED_SAY_EVERY: Duration = Duration::from_secs(30);

/// What a [`Context`] sends through.
impl Inner {
    /// [`Service::repeatable`] of `request`, if it is of the type `service` takes.
    pub(crate) fn repeatable_of(&self, service: ServiceId, request: &dyn Any) -> Option<bool> {
        self.registry.get(service)?.repeatable_typed(request)
    }

    /// Sends `message` (the whole `Message::Local`, as [`Message::encode_local`] wrote it for
    /// the same `service` and `key`) to the local server of `service` on `node`.
    pub(crate) async fn tell(
        self: &Arc<Self>,
        node: NodeId,
        service: ServiceId,
        key: Key,
        message: Vec<u8>,
    ) -> Result<Bytes, AdaptationError> {
        // A stopped life's handlers may still run, and what they would tell (a replica, say)
        // is of a life the cluster has ended or is ending: its node may be back as a new one,
        // which the receiver could not tell apart by its id.
        if self.mirrors.stopped.load(Ordering::Acquire) {
            return Err(AdaptationError::Refused(
                "this life of the node has stopped: it tells nothing more".into(),
            ));
        }
        let reply = if node == self.me {
            self.local(node, service, key, Message::local_body(&message)).await
        } else {
            let bytes = self.link.seal(message);
            let answer = self.link.call(node, bytes, self.config.call_timeout).await?;
            Reply::decode(&answer)?
        };
        match reply {
            Reply::Done(response) => Ok(response),
            Reply::Unknown(s) => Err(AdaptationError::UnknownService(s)),
            Reply::Refused(why) => Err(AdaptationError::Refused(why)),
            other => Err(AdaptationError::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// Whether nothing sent to `node` will land any more.
    pub(crate) fn gone(&self, node: NodeId) -> bool {
        let stopped = node == self.me && self.mirrors.stopped.load(Ordering::Acquire);
        stopped || self.mirrors.is_departed(node)
    }

    /// How many times the cluster gave up on `node`, as this host heard it.
    pub(crate) fn departures(&self, node: NodeId) -> u64 {
        self.mirrors.departures(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;

    /// A link whose first `fails` calls find the connection closed and the `refusals` after
    /// them are refused; the next are accepted.
    struct Flaky {
        fails: u64,
        refusals: u64,
        calls: AtomicU64,
    }

    impl Flaky {
        fn new(fails: u64) -> Self {
            Flaky { fails, refusals: 0, calls: AtomicU64::new(0) }
        }
    }

    #[async_trait]
    impl Link for Flaky {
        async fn call(
            &self,
            to: NodeId,
            _message: Bytes,
            _deadline: Duration,
        ) -> Result<Bytes, AdaptationError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call < self.fails {
                return Err(AdaptationError::Unreachable {
                    node: to.0,
                    reason: "connection closed".into(),
                });
            }
            if call < self.fails + self.refusals {
                return Reply::Refused("entries do not decode".into()).encode().map(Bytes::from);
            }
            Reply::Accepted.encode().map(Bytes::from)
        }
    }

    /// How long `deliver` took over a link failing `fails` times, and the calls it made.
    async fn deliver_over(fails: u64) -> (Duration, u64) {
        let link = Arc::new(Flaky::new(fails));
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
        let started = Instant::now();
        let batch = Bytes::from_static(b"batch");
        assert_eq!(inner.deliver(NodeId(2), batch, OnRefusal::SendAgain).await, Delivery::Taken);
        inner.stop();
        (started.elapsed(), link.calls.load(Ordering::SeqCst))
    }

    /// A stopped life tells nothing more: a handler of it still running would push what the
    /// cluster has since replaced.
    #[tokio::test(start_paused = true)]
    async fn a_stopped_life_tells_nothing() {
        let link = Arc::new(Flaky::new(0));
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
        inner.stop();
        let told = inner.tell(NodeId(2), ServiceId(1), Key(7), b"replica".to_vec()).await;
        assert!(matches!(told, Err(AdaptationError::Refused(_))), "{told:?}");
        assert_eq!(link.calls.load(Ordering::SeqCst), 0, "the stopped life told its peer");
    }

    /// A life stopped while it sent a batch, which it then gave up, must not send the ack that
    /// follows: its receiver would count the batch as taken.
    #[tokio::test(start_paused = true)]
    async fn a_stopped_life_sends_no_more_migration_messages() {
        let link = Arc::new(Flaky::new(0));
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
        inner.stop();
        let ack = Message::Ack { epoch: 2 }.encode().expect("an ack encodes");
        let delivered = inner.deliver(NodeId(2), inner.link.seal(ack), OnRefusal::SendAgain).await;
        assert_eq!(delivered, Delivery::Gone);
        assert_eq!(link.calls.load(Ordering::SeqCst), 0, "the stopped life sent its ack");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_keeps_the_answers_retries_may_need_and_lets_settled_ones_go_first() {
        const KV: ServiceId = ServiceId(1);
        let link = Arc::new(Flaky::new(0));
        let config = HostConfig { answers_per_key: 2, ..HostConfig::default() };
        let inner = Inner::spawn(NodeId(1), Registry::new(), link, config);
        let answer = |seq| Answered {
            key: Key(7),
            id: RequestId { origin: NodeId(2), seq },
            response: Bytes::from_static(b"done"),
        };
        let now = Instant::now();
        for seq in 1..=5 {
            inner.keep(KV, answer(seq), now);
        }
        let held = || -> Vec<u64> {
            inner
                .answers
                .get(&(KV, Key(7)))
                .expect("kept")
                .iter()
                .map(|(id, _, _)| id.seq)
                .collect()
        };
        assert_eq!(held(), vec![1, 2, 3, 4, 5], "none settled: a retry of any may come");
        inner.settled.lock().expect("settled").note(
            NodeId(2),
            Settlement { since: 1, below: 3 },
            now,
        );
        inner.keep(KV, answer(6), now);
        assert_eq!(held(), vec![2, 3, 4, 5, 6], "a settled one goes first");
        // Past the room, the oldest goes.
        for seq in 7..40 {
            inner.keep(KV, answer(seq), now);
        }
        assert_eq!(held().len(), 2 * UNSETTLED_ROOM);
        assert_eq!(held()[0], 40 - 2 * UNSETTLED_ROOM as u64, "the oldest went first");
        inner.stop();
    }

    /// A config asking for no answer kept per key keeps one: with none, the first answer to
    /// keep pushed out of an empty list panicked, under the settled map's lock.
    #[tokio::test(start_paused = true)]
    async fn a_config_of_no_answers_per_key_keeps_one_and_does_not_panic() {
        const KV: ServiceId = ServiceId(1);
        let link = Arc::new(Flaky::new(0));
        let config = HostConfig { answers_per_key: 0, ..HostConfig::default() };
        let inner = Inner::spawn(NodeId(1), Registry::new(), link, config);
        let now = Instant::now();
        for seq in 1..=3 {
            let id = RequestId { origin: NodeId(2), seq };
            inner.keep(KV, Answered { key: Key(7), id, response: Bytes::from_static(b"ok") }, now);
        }
        let kept = inner.answers.get(&(KV, Key(7))).map(|l| l.len());
        assert_eq!(kept, Some(3), "none settled: each may still be retried");
        assert!(!inner.settled.is_poisoned(), "no panic under the settled map's lock");
        inner.stop();
    }

    /// Node 4 joins. Node 1, which was to hand it some slots, died before node 4 even began the
    /// change: node 4 learns of both at once, as a lagging node does. Those slots must stay
    /// held after the change, until node 1's recovery rebuilds them, not be served empty.
    #[tokio::test(start_paused = true)]
    async fn slots_of_a_sender_dead_before_this_node_began_stay_held_after_the_change() {
        use gobelins_locator::{CellTree, Epoch, Labels, MigrationPlan, ServiceSpec, TreeConfig};
        const KV: ServiceId = ServiceId(1);
        let mut tree = CellTree::new(TreeConfig::default()).expect("config");
        tree.register_service(ServiceSpec::new(KV, "kv").with_slots(1024)).expect("register");
        for n in 1..=3 {
            tree.add_node(NodeId(n), Labels::new()).expect("add");
        }
        let old = Arc::new(tree.snapshot(Epoch(4)).expect("snapshot"));
        tree.add_node(NodeId(4), Labels::new()).expect("add");
        let new = Arc::new(tree.snapshot(Epoch(5)).expect("snapshot"));
        let plan = MigrationPlan::between(&old, &new);
        let orphan = (0..)
            .map(Key)
            .find(|&k| old.locate(KV, k) == Some(NodeId(1)) && new.locate(KV, k) == Some(NodeId(4)))
            .expect("node 1 hands node 4 some keys");
        let host =
            Host::start(NodeId(4), Registry::new(), Arc::new(Flaky::new(0)), HostConfig::default());
        // As the supervisor hands it over: the dead node is out of the participants.
        let departed = BTreeSet::from([NodeId(1)]);
        let change = Progress {
            epoch: 5,
            change: Change::Add { node: NodeId(4), labels: Labels::new() },
            participants: BTreeSet::from([NodeId(4)]),
            plan,
        };
        let mut done = host.done();
        host.update(Update {
            epoch: 5,
            snapshot: Some(Arc::clone(&new)),
            change: Some(change),
            departed: departed.clone(),
        });
        tokio::time::timeout(Duration::from_secs(10), done.wait_for(|&d| d >= 5))
            .await
            .expect("node 4 finishes its part")
            .expect("host alive");
        host.update(Update { epoch: 5, snapshot: Some(new), change: None, departed });
        let inner = host.inner.load();
        let mut released = inner.released.subscribe();
        tokio::time::timeout(Duration::from_secs(10), released.wait_for(|&r| r >= 1))
            .await
            .expect("the change ends on node 4")
            .expect("host alive");
        let verdict = inner.router.lock().expect("router").as_ref().map(|r| r.route(KV, orphan, 5));
        assert_eq!(verdict, Some(Verdict::Hold));
        host.shutdown();
    }

    /// A node the cluster gave up on is counted once, and the count stays moved on once the
    /// node is back as a new life, where `gone` says no again: a callback that began for the
    /// old life can tell.
    #[tokio::test(start_paused = true)]
    async fn a_departure_stays_counted_once_the_node_is_back() {
        let host =
            Host::start(NodeId(4), Registry::new(), Arc::new(Flaky::new(0)), HostConfig::default());
        let ctx = host.context();
        let seen = |n| (ctx.gone(NodeId(n)), ctx.departures(NodeId(n)));
        assert_eq!(seen(1), (false, 0));
        let departed = BTreeSet::from([NodeId(1)]);
        host.update(Update { epoch: 1, snapshot: None, change: None, departed });
        assert_eq!(seen(1), (true, 1));
        let departed = BTreeSet::new();
        host.update(Update { epoch: 2, snapshot: None, change: None, departed });
        assert_eq!(seen(1), (false, 1), "back as a new life");
        let departed = BTreeSet::from([NodeId(1), NodeId(2)]);
        host.update(Update { epoch: 3, snapshot: None, change: None, departed });
        assert_eq!((seen(1), seen(2), seen(3)), ((true, 2), (true, 1), (false, 0)));
        host.shutdown();
    }

    /// Receives `KV`'s entries and counts them; its merge waits for the test.
    struct SlowMerge {
        received: Arc<AtomicU64>,
        merging: Arc<tokio::sync::Notify>,
        merge: Arc<tokio::sync::Notify>,
    }

    impl SlowMerge {
        /// One whose merge the test never lets through, and the count of what it received.
        fn counting() -> (SlowMerge, Arc<AtomicU64>) {
            let received: Arc<AtomicU64> = Arc::default();
            let service = SlowMerge {
                received: Arc::clone(&received),
                merging: Arc::default(),
                merge: Arc::default(),
            };
            (service, received)
        }
    }

    impl crate::Service for SlowMerge {
        type Request = ();
        type Response = ();
        type Entry = u64;

        fn spec(&self) -> gobelins_locator::ServiceSpec {
            gobelins_locator::ServiceSpec::new(ServiceId(1), "kv").with_slots(1024)
        }

        async fn handle(&self, _: &Context, _: Key, _: ()) {}

        async fn before_migration(&self, _: &Context, _: &crate::ChangeInfo) {}

        async fn send_out(&self, _: &Context, _: &crate::Moving) -> Vec<(Key, u64)> {
            Vec::new()
        }

        async fn receive(&self, _: &Context, _: NodeId, entries: Vec<(Key, u64)>) {
            self.received.fetch_add(entries.len() as u64, Ordering::SeqCst);
        }

        async fn after_migration(&self, _: &Context, _: &crate::ChangeInfo) {
            self.merging.notify_one();
            self.merge.notified().await;
        }

        async fn scan(&self, _: &Context, _: NodeId, _: &crate::Moving) -> Vec<(Key, u64)> {
            Vec::new()
        }
    }

    /// Node 2 joins and node 1 hands it entries. A batch node 1 sends again (its first answer
    /// lost), which comes in while node 2 merges the change's entries, is refused: staged
    /// then, it stayed for the next change's merge and overwrote what its entries had become.
    const KV: ServiceId = ServiceId(1);

    /// Node 2's host, running `service`, in the change to `epoch` that adds it next to node
    /// 1; and a key node 1 hands it.
    fn node_two_joining(epoch: u64, service: SlowMerge) -> (Host, Key) {
        let (host, moved, update) = node_two_before_joining(epoch, service);
        host.update(update);
        (host, moved)
    }

    /// [`node_two_joining`]'s host before it hears of the change, and the update that tells it.
    fn node_two_before_joining(epoch: u64, service: SlowMerge) -> (Host, Key, Update) {
        use gobelins_locator::{CellTree, Epoch, Labels, MigrationPlan, ServiceSpec, TreeConfig};
        let mut tree = CellTree::new(TreeConfig::default()).expect("config");
        tree.register_service(ServiceSpec::new(KV, "kv").with_slots(1024)).expect("register");
        tree.add_node(NodeId(1), Labels::new()).expect("add");
        let old = Arc::new(tree.snapshot(Epoch(epoch - 1)).expect("snapshot"));
        tree.add_node(NodeId(2), Labels::new()).expect("add");
        let new = Arc::new(tree.snapshot(Epoch(epoch)).expect("snapshot"));
        let plan = MigrationPlan::between(&old, &new);
        let moved = (0..).map(Key).find(|&k| new.locate(KV, k) == Some(NodeId(2))).expect("a key");
        let mut registry = Registry::new();
        registry.register(crate::plugin(service)).expect("register");
        let link = Arc::new(Flaky::new(0));
        let host = Host::start(NodeId(2), registry, link, HostConfig::default());
        let update = Update {
            epoch,
            snapshot: Some(Arc::clone(&new)),
            change: Some(Progress {
                epoch,
                change: Change::Add { node: NodeId(2), labels: Labels::new() },
                participants: BTreeSet::from([NodeId(1), NodeId(2)]),
                plan,
            }),
            departed: BTreeSet::new(),
        };
        (host, moved, update)
    }

    /// A migration batch of the change to `epoch` carrying `key`.
    fn batch(epoch: u64, key: Key) -> Bytes {
        let mut entries = crate::run::Packed::with_capacity(0);
        entries.push_encoded(key, &7u64).expect("encode");
        let entries = entries.into_run();
        let message = Message::Batch {
            epoch,
            service: KV,
            entries,
            answered: Vec::new(),
            settled: Vec::new(),
        };
        Bytes::from(message.encode().expect("encode"))
    }

    fn reply(bytes: Vec<u8>) -> Reply {
        Reply::decode(&Bytes::from(bytes)).expect("a reply")
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_sent_again_during_the_merge_is_refused_not_kept_for_the_next_merge() {
        let (received, merging, merge) = Default::default();
        let service = SlowMerge {
            received: Arc::clone(&received),
            merging: Arc::clone(&merging),
            merge: Arc::clone(&merge),
        };
        let (host, moved) = node_two_joining(2, service);
        let batch = || batch(2, moved);
        assert!(matches!(reply(host.handle(NodeId(1), batch()).await), Reply::Accepted));
        let ack = Bytes::from((Message::Ack { epoch: 2 }).encode().expect("encode"));
        assert!(matches!(reply(host.handle(NodeId(1), ack).await), Reply::Accepted));
        tokio::time::timeout(Duration::from_secs(10), merging.notified())
            .await
            .expect("node 2 begins its merge");

        let again = reply(host.handle(NodeId(1), batch()).await);
        assert!(matches!(again, Reply::Merged { epoch: 2 }), "{again:?}");
        assert_eq!(received.load(Ordering::SeqCst), 1, "the entry was received once");
        merge.notify_one();
        let mut done = host.done();
        tokio::time::timeout(Duration::from_secs(10), done.wait_for(|&d| d >= 2))
            .await
            .expect("node 2 finishes its part")
            .expect("host alive");
        host.shutdown();
    }

    /// Node 2, a new life, begins the change that adds it (epoch 5). A copy of a batch of an
    /// earlier change (epoch 2), sent again by a node that did not hear that this node's
    /// former life was declared failed, is refused: staged, it was merged into epoch 5.
    #[tokio::test(start_paused = true)]
    async fn a_batch_of_a_change_before_the_one_begun_is_refused_not_merged_into_it() {
        let (service, received) = SlowMerge::counting();
        let (host, moved) = node_two_joining(5, service);
        assert!(matches!(reply(host.handle(NodeId(1), batch(5, moved)).await), Reply::Accepted));
        let stale = reply(host.handle(NodeId(3), batch(2, moved)).await);
        assert!(matches!(stale, Reply::Merged { epoch: 2 }), "{stale:?}");
        assert_eq!(received.load(Ordering::SeqCst), 1, "only the batch of the change begun");
        host.shutdown();
    }

    /// A batch that comes before its receiver has begun the change waits for it, but answers
    /// before its sender gives up: else a receiver that began just before the sender's deadline
    /// staged a copy the sender sent again, and counted its entries twice.
    #[tokio::test(start_paused = true)]
    async fn a_batch_waiting_for_its_change_answers_before_its_sender_gives_up() {
        let (service, received) = SlowMerge::counting();
        let (host, moved, update) = node_two_before_joining(2, service);
        let deadline = HostConfig::default().call_timeout;
        let told = tokio::spawn({
            let host = host.clone();
            async move {
                tokio::time::sleep(deadline * 9 / 10).await;
                host.update(update);
            }
        });
        let started = Instant::now();
        let first = reply(host.handle(NodeId(1), batch(2, moved)).await);
        assert!(matches!(first, Reply::Late), "{first:?}");
        assert!(started.elapsed() <= deadline / 2, "answered in {:?}", started.elapsed());
        told.await.expect("task");
        // Sent again, as its sender does: taken, once.
        assert!(matches!(reply(host.handle(NodeId(1), batch(2, moved)).await), Reply::Accepted));
        assert_eq!(received.load(Ordering::SeqCst), 1, "the entry was received once");
        host.shutdown();
    }

    /// A change waits for the handlers of a key's manager, not for a message told to the
    /// local server: only the first hears of it, and a told handler that answered at once was
    /// asked again at once, over and over while the change's first step lasted.
    #[tokio::test(start_paused = true)]
    async fn only_a_managers_handler_hears_that_a_change_waits_for_it() {
        let inner = Inner::spawn(
            NodeId(1),
            Registry::new(),
            Arc::new(Flaky::new(0)),
            HostConfig::default(),
        );
        let inside = inner.gate.try_pass().expect("passes");
        let holding = tokio::spawn({
            let inner = Arc::clone(&inner);
            async move { inner.gate.hold().await }
        });
        tokio::task::yield_now().await;
        let managing = inner.context(None);
        tokio::time::timeout(Duration::from_secs(1), managing.change_waits())
            .await
            .expect("a manager's handler hears of the change");
        let told = inner.context(Some(NodeId(2)));
        let heard = tokio::time::timeout(Duration::from_secs(1), told.change_waits()).await;
        assert!(heard.is_err(), "a told handler does not: the change does not wait for it");
        drop(inside);
        holding.await.expect("task");
        inner.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn a_migration_message_whose_connection_closed_is_sent_again_at_once() {
        assert_eq!(deliver_over(1).await, (Duration::ZERO, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_migration_message_that_fails_again_waits_before_each_further_try() {
        let retry = HostConfig::default().retry;
        assert_eq!(deliver_over(3).await, (retry * 2, 4));
    }

    /// A refusal is not the end of a batch: dropped, its entries were lost, and the change
    /// reported done over them. It is sent again, with pauses that grow, until taken.
    #[tokio::test(start_paused = true)]
    async fn a_refused_migration_message_is_sent_again_until_it_is_taken() {
        let link = Arc::new(Flaky { refusals: 4, ..Flaky::new(0) });
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
        let started = Instant::now();
        let batch = Bytes::from_static(b"batch");
        assert_eq!(inner.deliver(NodeId(2), batch, OnRefusal::SendAgain).await, Delivery::Taken);
        assert_eq!(link.calls.load(Ordering::SeqCst), 5, "four refusals, then taken");
        assert_eq!(inner.counters.batches_refused.load(Ordering::Relaxed), 4, "each counted");
        let retry = HostConfig::default().retry;
        assert_eq!(started.elapsed(), retry * (2 + 4 + 8 + 16), "pauses that double");
        inner.stop();
    }

    /// Refused for ever, a batch waits for as long as its receiver lives; once the receiver is
    /// gone, `scan` rebuilds what it carried, and delivering ends.
    #[tokio::test(start_paused = true)]
    async fn a_message_refused_for_ever_is_given_up_only_once_its_receiver_is_gone() {
        let link = Arc::new(Flaky { refusals: u64::MAX / 2, ..Flaky::new(0) });
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
        let delivering = {
            let inner = Arc::clone(&inner);
            let batch = Bytes::from_static(b"batch");
            tokio::spawn(async move { inner.deliver(NodeId(2), batch, OnRefusal::SendAgain).await })
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!delivering.is_finished(), "still trying after ten minutes");
        let calls = link.calls.load(Ordering::SeqCst);
        assert!((100..=200).contains(&calls), "a try every {REFUSED_PAUSE:?} at most: {calls}");
        inner.mirrors.mirror_departed(&BTreeSet::from([NodeId(2)]));
        let ended = tokio::time::timeout(REFUSED_PAUSE * 2, delivering).await;
        assert_eq!(ended.expect("ends").expect("joins"), Delivery::Gone);
        inner.stop();
    }

    /// A batch of answers alone carries no entry: refused, it is given up at once rather
    /// than hold up the change for what a late retry may need.
    #[tokio::test(start_paused = true)]
    async fn a_refused_message_of_answers_alone_is_given_up_at_once() {
        let link = Arc::new(Flaky { refusals: 1, ..Flaky::new(0) });
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
        let answers = Bytes::from_static(b"answers");
        assert_eq!(inner.deliver(NodeId(2), answers, OnRefusal::GiveUp).await, Delivery::Refused);
        assert_eq!(link.calls.load(Ordering::SeqCst), 1, "not sent again");
        assert_eq!(inner.counters.batches_refused.load(Ordering::Relaxed), 1, "counted");
        inner.stop();
    }
}
