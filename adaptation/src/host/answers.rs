//! The answers a manager keeps so that a retried request runs once, and their forgetting.

use super::{Inner, MALFORMED};
use crate::kept::{Forget, Kept};
use crate::log_budget::say_ended;
use crate::settled::Settled;
use crate::wire::{Answered, RequestId, Settlement};
use bytes::Bytes;
use gobelins_locator::{Key, ServiceId};
use smallvec::SmallVec;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tokio::time::Instant;

/// The last answers given for one key, oldest first, each with when it was kept: mostly one,
/// kept in place (most keys get one answer before its sender settles it).
pub(crate) type Answers = SmallVec<[(RequestId, Bytes, Instant); 1]>;

/// How many times `answers_per_key` a key's answers may grow to while none of them is settled.
pub(super) const UNSETTLED_ROOM: usize = 16;

/// Drops the answers kept longer than twice the request deadline, and those their senders have
/// settled, every deadline, until the host's life ends. A requester retries one request only
/// until its deadline, so no retry comes for them; kept, they would stay for the node's life,
/// and a DSM manager keeps a page with each write it grants.
pub(super) async fn forget_old_answers(inner: Weak<Inner>) {
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

impl Inner {
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
    pub(super) fn note_settled(
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
    pub(super) fn keep(&self, service: ServiceId, answered: Answered, at: Instant) {
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

    pub(super) fn answered(&self, service: ServiceId, key: Key, id: RequestId) -> Option<Bytes> {
        let list = self.answers.get(&(service, key))?;
        list.iter().find(|(i, _, _)| *i == id).map(|(_, r, _)| r.clone())
    }
}
