//! The manager's side of a request: let in, handled once, answered, or passed on.

use super::Inner;
use crate::deadline::Deadline;
use crate::driver::Input;
use crate::error::AdaptationError;
use crate::gate::Pass;
use crate::router::{Router, Verdict};
use crate::service::Context;
use crate::wire::{Answered, Message, Reply, RequestId, Routed};
use bytes::Bytes;
use gobelins_locator::{Key, NodeId, ServiceId, Snapshot};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A message's answer, being worked out.
pub(super) type Answering = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A request [`Inner::enter`] let in: its pass through the gate, and the router's epoch and
/// snapshot under that pass.
pub(super) type Entered<'a> = (Pass<'a>, u64, Arc<Snapshot>);

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

impl Inner {
    /// `Refused` for a copy of a request its sender has settled: the sender has the answer or
    /// gave up, and the answer may be forgotten, so running it again would do it twice.
    fn refuse_if_settled(&self, id: RequestId) -> Option<Reply> {
        if !self.settled.lock().expect("settled").covers(&id) {
            return None;
        }
        Some(Self::refused(id))
    }

    /// The refusal of a copy of request `id`, which its sender has settled.
    pub(super) fn refused(id: RequestId) -> Reply {
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
    pub(super) async fn serve(
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
    pub(super) fn enter(
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
    pub(super) async fn serve_entered(
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
    pub(super) async fn handled(
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
    pub(super) fn answer(self: Arc<Self>, from: NodeId, message: Message) -> Answering {
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

    pub(super) async fn local(
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
}
