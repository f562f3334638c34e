//! The async loop that carries out [`Period`]'s commands on one node: one task, fed by the
//! supervisor's updates and by acks from peers, so that the machine sees one event at a time.
//!
//! Its parts: `execute` (each command carried out) and `ship` (what leaves this node).

mod execute;
mod ship;

use crate::host::{ChangeRecord, Inner, Progress, Update};
use crate::period::{Command, Event, Period, Phase, Role};
use crate::router::Router;
use crate::run::Packed;
use crate::service::ChangeInfo;
use gobelins_locator::{Change, NodeId, ServiceId, Snapshot};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Change records a host keeps for `gobelins stats` and the demo: the latest.
pub(crate) const HISTORY: usize = 256;

/// What reaches the driver.
pub(crate) enum Input {
    Update(Box<Update>),
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
                Input::Update(update) => self.on_update(*update).await,
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
                        change: match (&progress.change, progress.leave) {
                            (Change::Evict(node), true) => format!("leave {node}"),
                            (change, _) => change.to_string(),
                        },
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
            failed_moved_in: p.failed_moved_in,
            failed_kept_since: p.failed_kept_since,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ship::{next_answers, ANSWERS_PER_BATCH};
    use super::*;
    use crate::error::AdaptationError;
    use crate::host::HostConfig;
    use crate::link::Link;
    use crate::registry::Registry;
    use crate::wire::{Answered, Message, Settlement};
    use crate::wire::{Reply, RequestId};
    use async_trait::async_trait;
    use bytes::Bytes;
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
