//! The sender's side of a request: to its manager, and again until its deadline.

use super::Inner;
use crate::codec;
use crate::deadline::Deadline;
use crate::error::AdaptationError;
use crate::wire::{Reply, RequestId, Routed, Settlement};
use bytes::Bytes;
use gobelins_locator::{Key, NodeId, ServiceId};
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What names a request on every attempt of it.
pub(super) struct Trip {
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

impl Inner {
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

    /// A request the service may run twice, from a typed sender
    /// ([`Context::request`](crate::Context::request)). When the key's manager is another node, its
    /// first attempt is the same as [`Inner::request`]'s, with the message encoded in one piece (as
    /// a told one is) and none of the other cases' code on its way. A DSM's read faults and barrier
    /// arrivals go so; with cold caches, a request pays for each line of code it runs, and these
    /// lines were most of what a routed request cost over a told one (BENCHMARKS.md, stop 30).
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
    pub(super) async fn again(
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
    pub(super) async fn attempt(
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
    pub(super) fn reply_from(
        &self,
        manager: NodeId,
        outcome: Result<Bytes, AdaptationError>,
    ) -> Reply {
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
}
