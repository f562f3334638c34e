//! What leaves this node in a change: entries packed into batches as they come, shipped a few
//! in flight per destination, and the answers and settlements that go with them.

use super::Driver;
use crate::host::{Delivery, Inner, OnRefusal};
use crate::run::{Outlet, Packed, Packer};
use crate::service::Moving;
use crate::wire::{Answered, Message, Settlement};
use bytes::Bytes;
use gobelins_locator::{Key, NodeId, ServiceId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Remembered answers per migration message, at most.
pub(super) const ANSWERS_PER_BATCH: usize = 4096;

/// An answer's bytes in a batch besides its response, at most: key, request id, lengths.
const ANSWER_OVERHEAD: usize = 64;

/// Batches in flight to one node.
const IN_FLIGHT: usize = 4;

/// Full runs waiting for their shipper, per destination: packing waits beyond that.
const QUEUED: usize = 2;

/// Batches to one node, a few in flight at a time rather than one: the wire stays busy while
/// the receiver stages the previous one. Each is acknowledged; the ack of the change follows
/// them all.
pub(super) struct Flight {
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
pub(super) fn next_answers(
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

impl Driver {
    /// Encodes entries for their managers in the epoch being entered, in batch-sized runs.
    pub(super) fn packer(&self, service: ServiceId) -> Option<Packer> {
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
    pub(super) async fn send_out(&mut self, service: ServiceId) {
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
        // The answers given for keys that move in this change go with them, unless their
        // senders have settled them: those go with what was settled, so that a late copy is
        // refused at the new manager rather than run again. A copy stays here, as the service
        // keeps what it sent until the change is stable: should the receiver die, the recovery
        // that moves its keys on sends them on with the rest, from here. Taken away, they were
        // lost with the receiver, and a retry ran its request a second time, though the node
        // that ran it lived. Only keys this change moves: a key that moved before is served
        // by a manager that has its answers, and may take no part in this change, whose
        // batches it would never take. Settlements and their expiry forget them here too.
        let mut moving: Vec<(std::ops::Range<u32>, NodeId)> = (progress.plan.services.iter())
            .filter(|p| p.service == service)
            .flat_map(|p| p.moves.iter().map(|m| (m.slots.clone(), m.to)))
            .collect();
        // Looked up by slot for every answer kept: thousands under load.
        moving.sort_by_key(|(slots, _)| slots.start);
        let moves_to = |slot: u32| {
            let after = moving.partition_point(|(slots, _)| slots.start <= slot);
            after.checked_sub(1).map(|i| &moving[i]).filter(|(slots, _)| slots.contains(&slot))
        };
        let mut answers: BTreeMap<NodeId, Vec<Answered>> = BTreeMap::new();
        let leaving: Vec<(Key, NodeId)> = inner
            .answers
            .iter()
            .filter_map(|e| {
                let (s, key) = *e.key();
                if s != service {
                    return None;
                }
                let (_, to) = moves_to(table.slot_of(key))?;
                (*to != me).then_some((key, *to))
            })
            .collect();
        let taken: Vec<_> = leaving
            .into_iter()
            .filter_map(|(key, to)| {
                inner.answers.get(&(service, key)).map(|l| (to, key, l.value().clone()))
            })
            .collect();
        // Copied after the answers: one forgotten as settled meanwhile is covered by this
        // copy, so a late copy of its request is refused at the new manager. With this node's
        // own settlement, which its fresh requests do not carry.
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
