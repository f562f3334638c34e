//! The async loop that carries out [`Period`]'s commands on one node: one task, fed by the
//! supervisor's updates and by acks from peers, so that the machine sees one event at a time.

use crate::host::{ChangeRecord, Delivery, Inner, OnRefusal, Progress, Update};
use crate::period::{Command, Event, Period, Phase, Role};
use crate::router::Router;
use crate::run::{Outlet, Packed, Packer};
use crate::service::{ChangeInfo, Moving};
use crate::wire::{Answered, Message, Settlement};
use bytes::Bytes;
use gobelins_locator::{Change, Key, NodeId, ServiceId, Snapshot};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Remembered answers per migration message, at most.
const ANSWERS_PER_BATCH: usize = 4096;
/// An answer's bytes in a batch besides its response, at most: key, request id, lengths.
const ANSWER_OVERHEAD: usize = 64;
/// Change records a host keeps for `gobelins stats` and the demo: the latest.
pub(crate) const HISTORY: usize = 256;
/// Batches in flight to one node.
const IN_FLIGHT: usize = 4;
/// Full runs waiting for their shipper, per destination: packing waits beyond that.
const QUEUED: usize = 2;

/// What reaches the driver.
pub(crate) enum Input {
    Update(Update),
    Ack { from: NodeId, epoch: u64 },
    Stop,
}

/// Where the current change's phases began, for its record.
struct Clock {
    record: ChangeRecord,
    begun: Instant,
    mark: Instant,
    done_at: Option<Instant>,
    /// The node's count of entries received as the change began: what it received in the
    /// change is the count's growth by its merge, when batches stop being taken.
    received_before: u64,
}

impl Clock {
    /// Milliseconds since the last mark; moves the mark.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.mark).as_secs_f64() * 1e3;
        self.mark = now;
        ms
    }

    /// Milliseconds since the change began here.
    fn since_begin(&self) -> f64 {
        self.begun.elapsed().as_secs_f64() * 1e3
    }
}

pub(crate) struct Driver {
    inner: Arc<Inner>,
    period: Period,
    progress: Option<Progress>,
    /// The snapshot of the epoch being entered.
    target: Option<Arc<Snapshot>>,
    /// Entries `scan` rebuilt, per service and destination, until they are shipped.
    rebuilt: BTreeMap<ServiceId, Vec<(NodeId, Packed)>>,
    clock: Option<Clock>,
    /// Participants of the change being entered that had died before this node began it.
    gone_at_begin: Vec<NodeId>,
    /// The epoch of a change this node saw in progress without taking part in it (another
    /// cell's, say), until it is stable.
    watched: Option<u64>,
}

impl Driver {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        let me = inner.me;
        Driver {
            inner,
            period: Period::new(me),
            progress: None,
            target: None,
            rebuilt: BTreeMap::new(),
            clock: None,
            gone_at_begin: Vec::new(),
            watched: None,
        }
    }

    pub(crate) async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) {
        while let Some(input) = inputs.recv().await {
            match input {
                Input::Stop => return,
                Input::Update(update) => self.on_update(update).await,
                Input::Ack { from, epoch } => self.step(Event::Ack { from, epoch }).await,
            }
        }
    }

    async fn on_update(&mut self, update: Update) {
        let me = self.inner.me;
        if self.period.phase() != Phase::Idle {
            let current = self.period.epoch();
            // Gone: departed, or dropped from the change by the cluster (a failure this node
            // did not see, because states are coalesced or came from a raft snapshot).
            let still = update.change.as_ref().filter(|c| c.epoch == current);
            let dead: Vec<NodeId> = match &self.progress {
                Some(p) => p
                    .participants
                    .iter()
                    .copied()
                    .filter(|n| {
                        *n != me
                            && (update.departed.contains(n)
                                || still.is_some_and(|c| !c.participants.contains(n)))
                    })
                    .collect(),
                None => Vec::new(),
            };
            let awaited = self.period.awaiting();
            for node in dead {
                // Only a sender whose ack never came may have left entries undelivered; one
                // that acked (then left, say) handed everything over.
                if awaited.contains(&node) {
                    if let (Some(router), Some(progress)) =
                        (self.inner.router.lock().expect("router").as_mut(), &self.progress)
                    {
                        router.keep_orphans(node, &progress.plan);
                    }
                }
                self.step(Event::ParticipantFailed { node, epoch: current }).await;
            }
            let same = update.change.as_ref().is_some_and(|c| c.epoch == current);
            if !same && update.epoch >= current {
                self.step(Event::Stable(current)).await;
            }
        }
        if self.period.phase() == Phase::Idle {
            self.watch(&update).await;
        }
        match update.change {
            Some(progress)
                if progress.participants.contains(&me)
                    && self.period.phase() == Phase::Idle
                    && progress.epoch > self.period.epoch() =>
            {
                self.watched = None;
                let role = match &progress.change {
                    Change::Add { node, .. } if *node == me => Role::Receiver,
                    Change::Evict(node) if *node == me => Role::Sender,
                    _ => Role::Both,
                };
                let participants = progress
                    .participants
                    .iter()
                    .copied()
                    .filter(|n| !update.departed.contains(n))
                    .collect();
                // A sender that died before this node even began the change (a lagging node
                // learns of both at once: the cluster took it out of the participants) never
                // handed its slots over: held past the period like those of a sender that dies
                // during it, until its recovery rebuilds them. Not in a recovery, whose plan
                // moves the dead node's slots by design, rebuilt by `scan` in this change.
                self.gone_at_begin = match progress.change {
                    Change::Fail(_) | Change::Recover(_) => Vec::new(),
                    _ => progress
                        .plan
                        .services
                        .iter()
                        .flat_map(|s| &s.moves)
                        .filter(|m| m.to == me && m.from != me)
                        .map(|m| m.from)
                        .filter(|n| {
                            !progress.participants.contains(n) || update.departed.contains(n)
                        })
                        .collect::<BTreeSet<NodeId>>()
                        .into_iter()
                        .collect(),
                };
                let epoch = progress.epoch;
                let now = Instant::now();
                self.clock = Some(Clock {
                    record: ChangeRecord {
                        epoch,
                        change: progress.change.to_string(),
                        begun_at: Some(now.into_std()),
                        ..ChangeRecord::default()
                    },
                    begun: now,
                    mark: now,
                    done_at: None,
                    received_before: self.inner.counters.entries_received.load(Ordering::Relaxed),
                });
                self.progress = Some(progress);
                self.target = update.snapshot;
                self.rebuilt.clear();
                let services = self.inner.registry.ids();
                self.step(Event::Begin { epoch, participants, services, role }).await;
            }
            // Not a participant: nothing of ours moves, so the new table can be used at once.
            _ if self.period.phase() == Phase::Idle => {
                if let Some(snapshot) = update.snapshot {
                    self.install(snapshot);
                }
            }
            _ => {}
        }
    }

    /// A change this node took no part in is stable once the cluster is past it: the services
    /// hear so as the participants do (a DSM manager gives its word at that epoch, say). Only
    /// for a change seen in progress that moves nothing to or from this node, while the
    /// cluster counts it as live: one meant for it that went on without it (it was declared
    /// failed before it began), or heard of only once it was over, is not its to call stable.
    async fn watch(&mut self, update: &Update) {
        let me = self.inner.me;
        if update.departed.contains(&me) {
            self.watched = None;
            return;
        }
        if let Some(epoch) = self.watched {
            let past = match &update.change {
                None => update.epoch >= epoch,
                Some(next) => next.epoch > epoch,
            };
            if past {
                self.watched = None;
                let ctx = self.inner.context(None);
                for plugin in self.inner.registry.iter() {
                    plugin.stable(&ctx, epoch).await;
                }
            }
        }
        let Some(change) = update.change.as_ref() else { return };
        let mine = |m: &gobelins_locator::SlotMove| m.from == me || m.to == me;
        let moves_mine = change.plan.services.iter().flat_map(|s| &s.moves).any(mine);
        if change.epoch > self.period.epoch() && !change.participants.contains(&me) && !moves_mine {
            self.watched = Some(change.epoch);
        }
    }

    async fn step(&mut self, event: Event) {
        let mut queue: VecDeque<Command> = match self.period.handle(event.clone()) {
            Ok(commands) => commands.into(),
            Err(e) => {
                tracing::debug!(?event, error = %e, "adaptation event ignored");
                return;
            }
        };
        while let Some(command) = queue.pop_front() {
            for event in self.execute(command).await {
                match self.period.handle(event.clone()) {
                    Ok(commands) => queue.extend(commands),
                    Err(e) => tracing::warn!(?event, error = %e, "adaptation event refused"),
                }
            }
        }
    }

    fn install(&self, snapshot: Arc<Snapshot>) {
        let epoch = snapshot.epoch().0;
        let mut router = self.inner.router.lock().expect("router");
        match router.as_mut() {
            Some(r) => r.install(snapshot),
            None => *router = Some(Router::new(self.inner.me, snapshot)),
        }
        drop(router);
        self.announce(epoch);
    }

    /// Wakes the requests waiting for the routing epoch to reach `epoch`.
    fn announce(&self, epoch: u64) {
        self.inner.epoch.send_if_modified(|e| {
            let newer = epoch > *e;
            if newer {
                *e = epoch;
            }
            newer
        });
    }

    fn info(&self) -> Option<ChangeInfo> {
        self.progress.as_ref().map(|p| ChangeInfo {
            epoch: p.epoch,
            change: p.change.clone(),
            participants: p.participants.clone(),
            acked: self.period.acked(),
        })
    }

    async fn execute(&mut self, command: Command) -> Vec<Event> {
        let inner = Arc::clone(&self.inner);
        let me = inner.me;
        match command {
            Command::HoldMovingKeys { epoch } => {
                let mut installed = None;
                {
                    let mut router = inner.router.lock().expect("router");
                    // A node joining: it has no old table; it routes by the new one and holds
                    // what it is about to receive. Made, held and published under one lock,
                    // and the epoch told only then: a request woken by a table installed
                    // apart from its holds (one waiting for this node's first epoch, on
                    // another thread) was served on an entry that had not arrived.
                    if router.is_none() {
                        if let Some(target) = self.target.clone() {
                            installed = Some(target.epoch().0);
                            *router = Some(Router::new(me, target));
                        }
                    }
                    if let (Some(router), Some(progress)) = (router.as_mut(), &self.progress) {
                        router.hold(&progress.plan);
                        for node in std::mem::take(&mut self.gone_at_begin) {
                            router.keep_orphans(node, &progress.plan);
                        }
                    }
                }
                if let Some(first) = installed {
                    self.announce(first);
                }
                inner.begun.send_replace(epoch);
                tracing::debug!(node = me.0, epoch, "change begun: moving keys held");
                // Wait out the handles that routed before the hold.
                inner.gate.hold().await;
                Vec::new()
            }
            Command::BeforeMigration(service) => {
                let (Some(plugin), Some(info)) = (inner.registry.get(service), self.info()) else {
                    return vec![Event::BeforeDone(service)];
                };
                let ctx = inner.context(None);
                let scan = match (&info.change, &self.progress, inner.registry.spec(service)) {
                    (Change::Fail(failed) | Change::Recover(failed), Some(p), Some(spec)) => {
                        self.packer(service).map(|packer| {
                            (
                                *failed,
                                Moving::new(spec.clone(), p.plan.outgoing_of(service, *failed)),
                                packer,
                            )
                        })
                    }
                    _ => None,
                };
                // Whatever happens to the scan, the service hears of the change.
                if let Some((failed, orphans, mut packer)) = scan {
                    // What the scan packed is rebuilt even if it failed part-way: an entry that
                    // did not encode is left out, not every entry with it.
                    if let Err(e) = plugin.scan(&ctx, failed, &orphans, &mut packer).await {
                        tracing::error!(
                            service = service.0,
                            error = %e,
                            packed = packer.count(),
                            "scan failed part-way; of the entries of node {failed} held here, only those packed are rebuilt: the others are lost unless another node rebuilds them"
                        );
                    }
                    let (runs, left_out) = orphans.keep_leaving(packer.finish());
                    if left_out > 0 {
                        tracing::warn!(
                            service = service.0,
                            left_out,
                            failed = failed.0,
                            "scan returned entries of keys the failed node did not manage; they \
                             were left out (a service's scan returns copies of the keys `orphans` \
                             names only)"
                        );
                    }
                    let n: u64 = runs.iter().map(|(_, run)| run.len() as u64).sum();
                    inner.counters.entries_rebuilt.fetch_add(n, Ordering::Relaxed);
                    if let Some(clock) = &mut self.clock {
                        clock.record.entries_rebuilt += n;
                    }
                    self.rebuilt.insert(service, runs);
                }
                plugin.before_migration(&ctx, &info).await;
                vec![Event::BeforeDone(service)]
            }
            Command::InstallSnapshot { .. } => {
                if let Some(target) = self.target.clone() {
                    self.install(target);
                }
                if let Some(clock) = &mut self.clock {
                    clock.record.before_ms = clock.lap();
                }
                Vec::new()
            }
            Command::SendOut(service) => {
                self.send_out(service).await;
                vec![Event::SentOut(service)]
            }
            Command::SendAck { to, epoch } => {
                if let Some(clock) = &mut self.clock {
                    if clock.record.sending_ms == 0.0 {
                        let from = clock.mark.into_std();
                        clock.record.sending_ms = clock.lap();
                        clock.record.sending = Some((from, clock.mark.into_std()));
                    }
                }
                if to == me {
                    return vec![Event::Ack { from: me, epoch }];
                }
                tokio::spawn(async move {
                    match (Message::Ack { epoch }).encode() {
                        Ok(ack) => {
                            inner.deliver(to, inner.link.seal(ack), OnRefusal::SendAgain).await;
                        }
                        Err(e) => tracing::error!(error = %e, "an ack could not be encoded"),
                    }
                });
                Vec::new()
            }
            Command::AfterMigration(service) => {
                if let Some(clock) = &mut self.clock {
                    if clock.record.receiving_ms == 0.0 {
                        clock.record.receiving_ms = clock.lap();
                    }
                    let now = inner.counters.entries_received.load(Ordering::Relaxed);
                    clock.record.entries_received = now.saturating_sub(clock.received_before);
                }
                if let (Some(plugin), Some(info)) = (inner.registry.get(service), self.info()) {
                    // Batches being staged go first; those that come after are refused.
                    *inner.merging.write().await = info.epoch;
                    plugin.after_migration(&inner.context(None), &info).await;
                }
                vec![Event::AfterDone(service)]
            }
            Command::ReleaseHeld { .. } => {
                if let Some(clock) = &mut self.clock {
                    clock.record.held_ms = clock.since_begin();
                }
                if let Some(router) = inner.router.lock().expect("router").as_mut() {
                    router.release();
                    match self.progress.as_ref().map(|p| (&p.change, p.epoch)) {
                        Some((Change::Fail(dead) | Change::Recover(dead), _)) => {
                            router.recovered(*dead)
                        }
                        Some((_, epoch)) => router.outlived(epoch),
                        None => {}
                    }
                }
                inner.released.send_modify(|r| *r += 1);
                inner.mirrors.released.fetch_add(1, std::sync::atomic::Ordering::Release);
                Vec::new()
            }
            Command::AfterRelease(service) => {
                if let (Some(plugin), Some(info)) = (inner.registry.get(service), self.info()) {
                    plugin.after_release(&inner.context(None), &info).await;
                }
                vec![Event::ReleasedDone(service)]
            }
            Command::ReportDone { epoch } => {
                inner.done.send_replace(epoch);
                if let Some(clock) = &mut self.clock {
                    clock.record.after_ms = clock.lap();
                    clock.done_at = Some(clock.mark);
                    let mut history = inner.history.lock().expect("history");
                    // The latest changes are what operators read; a node up for months
                    // would otherwise keep, and copy on every status, one record per change.
                    if history.len() >= HISTORY {
                        history.remove(0);
                    }
                    history.push(clock.record.clone());
                }
                Vec::new()
            }
            Command::DropSent { epoch } => {
                // Each service drops what it kept of the entries it sent.
                let ctx = inner.context(None);
                for plugin in inner.registry.iter() {
                    plugin.stable(&ctx, epoch).await;
                }
                if let Some(clock) = self.clock.take() {
                    let stable = clock.done_at.map(|at| at.elapsed().as_secs_f64() * 1e3);
                    let mut history = inner.history.lock().expect("history");
                    if let Some(record) = history.iter_mut().rev().find(|r| r.epoch == epoch) {
                        record.stable_ms = stable;
                    }
                }
                Vec::new()
            }
        }
    }

    /// Encodes entries for their managers in the epoch being entered, in batch-sized runs.
    fn packer(&self, service: ServiceId) -> Option<Packer> {
        let target = self.target.clone()?;
        target.table(service)?;
        let me = self.inner.me;
        let locate = move |key| target.locate(service, key).unwrap_or(me);
        Some(Packer::new(locate, self.inner.config.batch_bytes))
    }

    /// Ships what leaves this node for `service`: what `send_out` exports and what `scan`
    /// rebuilt, each entry to its manager in the new epoch, destinations in parallel. Batches
    /// leave as they fill: packing every batch before shipping the first held the whole export
    /// in memory and let the wire idle while it was packed.
    async fn send_out(&mut self, service: ServiceId) {
        let inner = Arc::clone(&self.inner);
        let me = inner.me;
        let (Some(plugin), Some(spec), Some(progress), Some(target), Some(packer)) = (
            inner.registry.get(service),
            inner.registry.spec(service),
            self.progress.as_ref(),
            self.target.clone(),
            self.packer(service),
        ) else {
            return;
        };
        let epoch = progress.epoch;
        let Some(table) = target.table(service) else { return };
        let ctx = inner.context(None);
        let moves = progress.plan.outgoing_of(service, me);
        let started = Instant::now();
        // Each destination's shipper, and the destinations, as runs for them fill.
        let shippers = Arc::new(std::sync::Mutex::new((JoinSet::new(), BTreeSet::new())));
        let outlet = {
            let (inner, shippers) = (Arc::clone(&inner), Arc::clone(&shippers));
            Outlet::new(me, move |to| {
                let (runs, queue) = mpsc::channel(QUEUED);
                let ship = Arc::clone(&inner).ship_runs(epoch, service, to, queue);
                let mut shippers = shippers.lock().expect("shippers");
                shippers.0.spawn(ship);
                shippers.1.insert(to);
                runs
            })
        };
        let mut packer = packer.shipping(inner.pool.clone(), outlet);
        if !moves.is_empty() {
            if let Err(e) =
                plugin.send_out(&ctx, &Moving::new(spec.clone(), moves), &mut packer).await
            {
                tracing::error!(service = service.0, error = %e, "send_out failed");
            }
        }
        let packed = started.elapsed();
        for (to, run) in self.rebuilt.remove(&service).unwrap_or_default() {
            packer.extend(to, run);
        }
        packer.ship_rest().await;
        // Only the runs for this node are left: rebuilt entries it now manages itself.
        let mine = packer.finish();
        // The answers given for keys that leave go with them, unless their senders have settled
        // them: those go with what was settled, so that a late copy is refused at the new
        // manager rather than run again.
        let mut answers: BTreeMap<NodeId, Vec<Answered>> = BTreeMap::new();
        let leaving: Vec<(Key, NodeId)> = inner
            .answers
            .iter()
            .filter_map(|e| {
                let (s, key) = *e.key();
                if s != service {
                    return None;
                }
                let to = table.owner(table.slot_of(key))?;
                (to != me).then_some((key, to))
            })
            .collect();
        let taken: Vec<_> = leaving
            .into_iter()
            .filter_map(|(key, to)| {
                inner.answers.remove(&(service, key)).map(|(_, l)| (to, key, l))
            })
            .collect();
        // Copied after the keys are out: an answer forgotten as settled meanwhile is covered
        // by this copy, so a late copy of its request is refused at the new manager. With
        // this node's own settlement, which its fresh requests do not carry.
        let settled = {
            let mut settled = inner.settled.lock().expect("settled");
            inner.note_own(&mut settled, Instant::now());
            settled.clone()
        };
        for (to, key, list) in taken {
            answers.entry(to).or_default().extend(
                list.into_iter()
                    .filter(|(id, _, _)| !settled.covers(id))
                    .map(|(id, response, _)| Answered { key, id, response }),
            );
        }
        for (_, run) in mine {
            let n = run.len() as u64;
            match plugin.receive(&ctx, me, &run.into_run()).await {
                Ok(()) => {
                    inner.counters.entries_received.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(service = service.0, error = %e, "rebuilt entries refused")
                }
            }
        }
        let exported = started.elapsed();
        // What was settled goes to every node that gets entries, with the answers or alone:
        // a new manager refuses late copies of what it covers.
        let settled = Arc::new(settled.to_wire());
        let (mut shipping, mut receivers) =
            std::mem::take(&mut *shippers.lock().expect("shippers"));
        receivers.extend(answers.keys().copied());
        for node in receivers {
            let answered = answers.remove(&node).unwrap_or_default();
            let (inner, settled) = (Arc::clone(&inner), Arc::clone(&settled));
            shipping.spawn(async move {
                inner.ship_answers(epoch, service, node, answered, &settled).await
            });
        }
        let mut sent = 0;
        while let Some(done) = shipping.join_next().await {
            sent += done.unwrap_or(0);
        }
        tracing::debug!(service = service.0, epoch, sent, ?packed, ?exported, took = ?started.elapsed(), "sent out");
        if let Some(clock) = &mut self.clock {
            clock.record.entries_sent += sent;
        }
    }
}

/// Batches to one node, a few in flight at a time rather than one: the wire stays busy while
/// the receiver stages the previous one. Each is acknowledged; the ack of the change follows
/// them all.
struct Flight {
    inner: Arc<Inner>,
    to: NodeId,
    refused: OnRefusal,
    flying: JoinSet<u64>,
    taken: u64,
}

impl Flight {
    fn new(inner: Arc<Inner>, to: NodeId, refused: OnRefusal) -> Self {
        Flight { inner, to, refused, flying: JoinSet::new(), taken: 0 }
    }

    /// Sends `body`, a batch of `n` entries in `size` bytes, once fewer than [`IN_FLIGHT`]
    /// are.
    async fn send(&mut self, body: Bytes, n: u64, size: u64) {
        if self.flying.len() >= IN_FLIGHT {
            self.taken += self.flying.join_next().await.and_then(Result::ok).unwrap_or(0);
        }
        let (inner, to, refused) = (Arc::clone(&self.inner), self.to, self.refused);
        self.flying.spawn(async move {
            let t0 = Instant::now();
            if inner.deliver(to, body, refused).await != Delivery::Taken {
                return 0;
            }
            tracing::trace!(entries = n, bytes = size, node = to.0, took = ?t0.elapsed(), "batch shipped");
            inner.counters.entries_sent.fetch_add(n, Ordering::Relaxed);
            inner.counters.bytes_sent.fetch_add(size, Ordering::Relaxed);
            n
        });
    }

    /// Waits for every batch; how many entries were taken.
    async fn land(mut self) -> u64 {
        while let Some(n) = self.flying.join_next().await {
            self.taken += n.unwrap_or(0);
        }
        self.taken
    }
}

impl Inner {
    /// Sends the runs that come down `queue` to `to`, a batch each, as they come; returns how
    /// many entries were taken.
    pub(crate) async fn ship_runs(
        self: Arc<Self>,
        epoch: u64,
        service: ServiceId,
        to: NodeId,
        mut queue: mpsc::Receiver<Packed>,
    ) -> u64 {
        let started = Instant::now();
        // Every batch of entries has this head, written in the room left in front of its run.
        // What was settled travels in batches of its own: here it could outgrow that room, and
        // each run would be copied behind it.
        let head = Message::Batch {
            epoch,
            service,
            answered: Vec::new(),
            settled: Vec::new(),
            entries: Default::default(),
        };
        let head = match head.encode() {
            Ok(head) => head,
            Err(e) => {
                tracing::error!(node = to.0, error = %e, "a migration batch could not be encoded");
                return 0;
            }
        };
        let mut flight = Flight::new(Arc::clone(&self), to, OnRefusal::SendAgain);
        while let Some(run) = queue.recv().await {
            let (n, size) = (run.len() as u64, run.size() as u64);
            let (mut buf, start) = run.behind(&head);
            buf.extend_from_slice(self.link.trailer());
            // Back to the pool once delivered (every attempt's copy dropped).
            let body = self.pool.bytes(buf).slice(start..);
            flight.send(body, n, size).await;
        }
        let taken = flight.land().await;
        tracing::debug!(node = to.0, entries = taken, took = ?started.elapsed(), "shipped");
        taken
    }

    /// Sends `to` the answers a retry needs for the keys it takes, in batches of their own so
    /// that none outgrows a frame, and what this node knows its senders settled. They only
    /// have to be in before the ack of the change. Returns 0: no entries.
    pub(crate) async fn ship_answers(
        self: Arc<Self>,
        epoch: u64,
        service: ServiceId,
        to: NodeId,
        answered: Vec<Answered>,
        settled: &[(NodeId, Settlement)],
    ) -> u64 {
        let batch = |answered: Vec<Answered>| Message::Batch {
            epoch,
            service,
            answered,
            settled: settled.to_vec(),
            entries: Default::default(),
        };
        let mut flight = Flight::new(Arc::clone(&self), to, OnRefusal::GiveUp);
        // Moved into their batches, not cloned: one allocation fewer per answer.
        let mut answered = answered.into_iter().peekable();
        loop {
            let chunk = next_answers(&mut answered, self.config.batch_bytes);
            match batch(chunk).encode() {
                Ok(body) => flight.send(self.link.seal(body), 0, 0).await,
                Err(e) => {
                    tracing::error!(node = to.0, error = %e, "migration answers could not be encoded");
                }
            }
            if answered.peek().is_none() {
                break;
            }
        }
        flight.land().await
    }
}

/// The next batch of `answers`: at most [`ANSWERS_PER_BATCH`], and no more bytes of
/// responses than `batch_bytes` unless the first alone has more. Cut by count alone, 4,096
/// answers carrying a DSM page each outgrew the transport's largest frame, and the batch was
/// refused for ever.
fn next_answers(
    answers: &mut std::iter::Peekable<impl Iterator<Item = Answered>>,
    batch_bytes: usize,
) -> Vec<Answered> {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    while chunk.len() < ANSWERS_PER_BATCH {
        let Some(next) = answers.peek() else { break };
        let size = next.response.len() + ANSWER_OVERHEAD;
        if !chunk.is_empty() && bytes + size > batch_bytes {
            break;
        }
        bytes += size;
        chunk.extend(answers.next());
    }
    chunk
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AdaptationError;
    use crate::host::HostConfig;
    use crate::link::Link;
    use crate::registry::Registry;
    use crate::wire::{Reply, RequestId};
    use async_trait::async_trait;
    use gobelins_locator::Key;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Takes every message, and keeps the answers each batch carried and its size.
    #[derive(Default)]
    struct Recording {
        batches: Mutex<Vec<(usize, usize)>>,
    }

    #[async_trait]
    impl Link for Recording {
        async fn call(
            &self,
            _to: NodeId,
            message: Bytes,
            _deadline: Duration,
        ) -> Result<Bytes, AdaptationError> {
            let size = message.len();
            if let Message::Batch { answered, .. } = Message::decode(message)? {
                self.batches.lock().unwrap().push((answered.len(), size));
            }
            Reply::Accepted.encode().map(Bytes::from)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_kept_for_moving_keys_travel_in_batches_no_larger_than_the_setting() {
        let link = Arc::new(Recording::default());
        let config = HostConfig { batch_bytes: 256 * 1024, ..HostConfig::default() };
        let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), config);
        // As many answers as a count alone lets into one batch, each with a page: 16 MiB.
        let answered: Vec<Answered> = (0..ANSWERS_PER_BATCH as u64)
            .map(|seq| Answered {
                key: Key(seq),
                id: RequestId { origin: NodeId(2), seq },
                response: Bytes::from(vec![7u8; 4096]),
            })
            .collect();
        let settled = [(NodeId(2), Settlement { since: 1, below: 1 })];
        Arc::clone(&inner).ship_answers(4, ServiceId(1), NodeId(3), answered, &settled).await;
        inner.stop();
        let batches = link.batches.lock().unwrap().clone();
        let carried: usize = batches.iter().map(|&(n, _)| n).sum();
        assert_eq!(carried, ANSWERS_PER_BATCH, "every answer travels");
        let largest = batches.iter().map(|&(_, size)| size).max().unwrap();
        assert!(largest <= 256 * 1024 + 1024, "a batch of {largest} bytes: {batches:?}");
        // One answer larger than the setting still travels, alone.
        let big = Answered {
            key: Key(1),
            id: RequestId { origin: NodeId(2), seq: 1 },
            response: Bytes::from(vec![1u8; 300 * 1024]),
        };
        let small = Answered { response: Bytes::from_static(b"ok"), ..big.clone() };
        let mut answers = vec![big, small].into_iter().peekable();
        assert_eq!(next_answers(&mut answers, 256 * 1024).len(), 1);
        assert_eq!(next_answers(&mut answers, 256 * 1024).len(), 1);
        assert!(next_answers(&mut answers, 256 * 1024).is_empty());
    }
}
