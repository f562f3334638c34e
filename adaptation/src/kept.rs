//! The order in which a manager kept its answers, per sender, so that it forgets each as soon as
//! its sender settles the request, rather than at the next sweep. A sweep comes every request
//! deadline (10 s by default); until then a busy manager kept every answer of those seconds: a
//! page for each write a DSM manager granted, 20,000 answers after a bulk load, all walked and
//! dropped on the change that followed.

use crate::settled::Settled;
use crate::wire::RequestId;
use gobelins_locator::{Key, NodeId, ServiceId};
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// Where one kept answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kept {
    pub(crate) id: RequestId,
    pub(crate) service: ServiceId,
    pub(crate) key: Key,
    at: Instant,
}

impl Kept {
    pub(crate) fn new(id: RequestId, service: ServiceId, key: Key, at: Instant) -> Self {
        Kept { id, service, key, at }
    }
}

/// The places [`KeptOrder::settled`] takes out: mostly one or two, kept inline, since one is
/// taken out for nearly every answer kept.
pub(crate) type Forget = SmallVec<[Kept; 4]>;

/// Each sender's kept answers, in the order they were kept. A sender's numbers are taken in
/// order and its requests mostly end in order, so its settled answers gather at the front.
#[derive(Debug, Default)]
pub(crate) struct KeptOrder {
    by_origin: HashMap<NodeId, VecDeque<Kept>, foldhash::fast::RandomState>,
}

impl KeptOrder {
    pub(crate) fn push(&mut self, kept: Kept) {
        self.by_origin.entry(kept.id.origin).or_default().push_back(kept);
    }

    /// Takes out into `out`, oldest first, `origin`'s answers that `settled` covers or that are
    /// older than `keep` (already expired). Stops at the first that is neither: one answered
    /// ahead of an older request still in flight waits for that one, or for its expiry.
    ///
    /// A sender's queue stays when emptied, with its room, until the sweep: its next answer
    /// would otherwise allocate it again (one queue per sender, so few are kept). `out` is the
    /// caller's, filled in place: returned, the list was copied on every request.
    pub(crate) fn settled(
        &mut self,
        origin: NodeId,
        settled: &Settled,
        keep: Duration,
        now: Instant,
        out: &mut Forget,
    ) {
        let Some(queue) = self.by_origin.get_mut(&origin) else { return };
        while let Some(front) = queue.front() {
            if !(settled.covers(&front.id) || now.saturating_duration_since(front.at) >= keep) {
                break;
            }
            out.extend(queue.pop_front());
        }
    }

    /// Forgets the places of answers older than `keep`, and the senders left with none: the
    /// sweep drops those answers.
    pub(crate) fn expire(&mut self, keep: Duration, now: Instant) {
        self.by_origin.retain(|_, queue| {
            while queue.front().is_some_and(|k| now.saturating_duration_since(k.at) >= keep) {
                queue.pop_front();
            }
            !queue.is_empty()
        });
    }

    /// How many places are held, stale ones included (answers moved away or pushed out).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_origin.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Settlement;

    /// What node 1's settlement takes out, answers kept up to `KEEP`.
    fn taken(order: &mut KeptOrder, settled: &Settled, now: Instant) -> Forget {
        let mut out = Forget::new();
        order.settled(NodeId(1), settled, KEEP, now, &mut out);
        out
    }

    const KEEP: Duration = Duration::from_secs(20);

    fn kept(origin: u64, seq: u64, at: Instant) -> Kept {
        Kept::new(RequestId { origin: NodeId(origin), seq }, ServiceId(1), Key(seq), at)
    }

    #[test]
    fn a_senders_answers_come_out_as_its_settlement_passes_them_and_no_further() {
        let now = Instant::now();
        let mut order = KeptOrder::default();
        for seq in [10, 11, 13, 12] {
            order.push(kept(1, seq, now));
        }
        order.push(kept(2, 10, now));
        let mut settled = Settled::default();
        settled.note(NodeId(1), Settlement { since: 10, below: 13 }, now);
        let out: Vec<u64> = taken(&mut order, &settled, now).iter().map(|k| k.id.seq).collect();
        assert_eq!(out, vec![10, 11], "13 is not settled, and 12 waits behind it");
        settled.note(NodeId(1), Settlement { since: 10, below: 14 }, now);
        let out: Vec<u64> = taken(&mut order, &settled, now).iter().map(|k| k.id.seq).collect();
        assert_eq!(out, vec![13, 12]);
        assert_eq!(order.len(), 1, "node 2's answer is its own");
    }

    #[test]
    fn an_expired_place_does_not_hold_back_the_settled_ones_behind_it() {
        let start = Instant::now();
        let mut order = KeptOrder::default();
        // A life that ended: its numbers are far from the new life's and never settled.
        order.push(kept(1, 5_000, start));
        let later = start + Duration::from_secs(30);
        order.push(kept(1, 10, later));
        let mut settled = Settled::default();
        settled.note(NodeId(1), Settlement { since: 10, below: 11 }, later);
        assert_eq!(taken(&mut order, &settled, later).len(), 2);
        order.push(kept(3, 1, start));
        order.expire(KEEP, later);
        assert_eq!(order.len(), 0);
    }
}
