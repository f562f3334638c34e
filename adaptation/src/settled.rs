//! Which requests their senders have settled: received the answer of, or given up on. A
//! manager keeps each answer so that a retry of its request runs nothing twice; once the sender
//! has settled the request no retry will come, so the answer can go, and need not travel with
//! its entry when the key moves (as RIFL does for its completion records).
//!
//! Each run-once request that leaves its node carries its sender's [`Settlement`]: every
//! request numbered from `since` (the sender's first number in this life) up to `below` is
//! settled. Requests that may run twice (repeatable) take numbers too, but never move `below`:
//! no manager keeps a record of them. A repeatable request carries the settlement only when
//! its manager has not answered one that carried the same (see [`Outstanding::news_for`]):
//! noting what it already knew cost the manager a lock and a look in a hash map per request,
//! which a DSM's read faults and barriers paid for nothing. A
//! manager keeps the highest it has heard per sender and life ([`Settled`]), forgets the answers
//! that fall under it, refuses a late copy of a settled request rather than run it again, and
//! hands what it knows to the new manager of the keys that move, so that a late copy is refused
//! there too.
//!
//! A node's own request served by itself on its first attempt carries no settlement, and keeps
//! no answer unless its lease runs out while it runs. The node notes its own settlement when it
//! hands answers over, and at each sweep.

use crate::wire::{RequestId, Settlement};
use gobelins_locator::NodeId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// A sender's requests in flight, to tell managers which are settled.
#[derive(Debug)]
pub(crate) struct Outstanding {
    since: u64,
    /// The next number.
    next: AtomicU64,
    taken: std::sync::Mutex<Taken>,
    /// What `settlement` says, written under the lock whenever it moves and read without it:
    /// every request that leaves its node reads it. It only grows, and passes a number only
    /// once that number is settled, so a late read says less than is settled, never more.
    below: AtomicU64,
    /// Per manager (its id modulo [`TOLD`]), a tag of the last settlement it answered a
    /// repeatable request that carried: see [`Outstanding::news_for`].
    told: [AtomicU64; TOLD],
}

/// Places for what managers were told. Managers whose ids share a place take turns: each
/// hears the settlement again after the other did, which is only a note more.
const TOLD: usize = 64;

/// The tag of `settlement` as told to `manager`. Two managers sharing a place would need the
/// same tag for a settlement to be taken as told to one when it was told to the other; and
/// even then the manager only forgets its kept answers later (at their expiry, or with the
/// sender's next run-once request), never wrongly.
fn told_tag(manager: NodeId, settlement: Settlement) -> u64 {
    let spread = manager.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    spread ^ settlement.below ^ settlement.since.rotate_left(32)
}

/// The run-once numbers taken and not yet settled, and where the settlement stands when none
/// is in flight.
#[derive(Debug)]
struct Taken {
    /// In increasing order. A number is taken and put in under the lock: one taken but not yet
    /// in would look settled. A queue, not a tree: numbers come in order, mostly leave in
    /// order, and the queue keeps its room, where a tree allocated a node for a lone request.
    queue: VecDeque<u64>,
    /// One past the last run-once number taken. Repeatable numbers do not move it: no manager
    /// keeps a record of them, so a settlement that moved with them would be news to the
    /// manager at every request, and each would pay for a look at the kept answers for nothing.
    floor: u64,
}

impl Outstanding {
    /// Numbers start at `since`, which must differ from every earlier life's numbers.
    pub(crate) fn new(since: u64) -> Self {
        let taken = Taken { queue: VecDeque::new(), floor: since };
        Outstanding {
            since,
            next: AtomicU64::new(since),
            taken: std::sync::Mutex::new(taken),
            below: AtomicU64::new(since),
            told: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// A new request number, outstanding until the ticket is dropped.
    pub(crate) fn take(&self) -> Ticket<'_> {
        let mut taken = self.taken.lock().expect("outstanding");
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        taken.queue.push_back(seq);
        taken.floor = seq + 1;
        self.below.store(taken.below(), Ordering::Release);
        Ticket { outstanding: self, seq }
    }

    /// A new number for a repeatable request, which no manager keeps a record of.
    pub(crate) fn number(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// What this sender has settled: every run-once number below the oldest still in flight.
    pub(crate) fn settlement(&self) -> Settlement {
        Settlement { since: self.since, below: self.below.load(Ordering::Acquire) }
    }

    /// What a repeatable request to `manager` carries: the settlement, unless `manager` has
    /// answered a request that carried it already (then the default, which says nothing).
    pub(crate) fn news_for(&self, manager: NodeId) -> Settlement {
        let settlement = self.settlement();
        let told = self.told[manager.0 as usize % TOLD].load(Ordering::Relaxed);
        if told == told_tag(manager, settlement) {
            Settlement::default()
        } else {
            settlement
        }
    }

    /// `manager` answered a request that carried `settlement`, so it has noted it.
    pub(crate) fn told(&self, manager: NodeId, settlement: Settlement) {
        let tag = told_tag(manager, settlement);
        self.told[manager.0 as usize % TOLD].store(tag, Ordering::Relaxed);
    }
}

impl Taken {
    /// Every run-once number below the oldest in flight.
    fn below(&self) -> u64 {
        self.queue.front().copied().unwrap_or(self.floor)
    }
}

/// One request in flight; settled when dropped (answered, failed or abandoned).
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    outstanding: &'a Outstanding,
    pub(crate) seq: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut taken = self.outstanding.taken.lock().expect("outstanding");
        // Mostly the front, which `remove` takes without shifting the rest.
        if let Ok(at) = taken.queue.binary_search(&self.seq) {
            taken.queue.remove(at);
        }
        self.outstanding.below.store(taken.below(), Ordering::Release);
    }
}

/// What a manager knows of its senders' settlements, per sender and life.
#[derive(Clone, Debug, Default)]
pub(crate) struct Settled {
    spans: HashMap<NodeId, Vec<Span>, foldhash::fast::RandomState>,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    settled: Settlement,
    heard: Instant,
}

impl Settled {
    /// Takes in that `origin` has settled its requests up to `settlement.below`; whether that
    /// settles anything more than before.
    pub(crate) fn note(&mut self, origin: NodeId, settlement: Settlement, now: Instant) -> bool {
        let spans = self.spans.entry(origin).or_default();
        match spans.iter_mut().find(|s| s.settled.since == settlement.since) {
            Some(span) => {
                span.heard = now;
                let further = settlement.below > span.settled.below;
                span.settled.below = span.settled.below.max(settlement.below);
                further
            }
            None => {
                spans.push(Span { settled: settlement, heard: now });
                settlement.below > settlement.since
            }
        }
    }

    /// Whether the sender of `id` has settled it. Lives number from points far apart (a fresh
    /// random start each), so one life's settled range never covers another's numbers.
    pub(crate) fn covers(&self, id: &RequestId) -> bool {
        self.spans
            .get(&id.origin)
            .is_some_and(|spans| spans.iter().any(|s| s.settled.covers(id.seq)))
    }

    /// Everything known, to hand to a new manager.
    pub(crate) fn to_wire(&self) -> Vec<(NodeId, Settlement)> {
        self.spans
            .iter()
            .flat_map(|(&node, spans)| spans.iter().map(move |s| (node, s.settled)))
            .collect()
    }

    /// Takes in what an old manager knew.
    pub(crate) fn merge(&mut self, known: &[(NodeId, Settlement)], now: Instant) {
        for &(node, settlement) in known {
            self.note(node, settlement, now);
        }
    }

    /// Forgets lives not heard of for `after`: by then no copy of their requests can come (a
    /// requester retries only until its deadline), and their answers have expired too.
    pub(crate) fn forget_quiet(&mut self, after: Duration, now: Instant) {
        self.spans.retain(|_, spans| {
            spans.retain(|s| now.saturating_duration_since(s.heard) < after);
            !spans.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(origin: u64, seq: u64) -> RequestId {
        RequestId { origin: NodeId(origin), seq }
    }

    #[test]
    fn a_sender_settles_everything_below_its_oldest_request_in_flight() {
        let outstanding = Outstanding::new(100);
        assert_eq!(outstanding.settlement(), Settlement { since: 100, below: 100 });
        let first = outstanding.take();
        let second = outstanding.take();
        let third = outstanding.take();
        assert_eq!((first.seq, second.seq, third.seq), (100, 101, 102));
        drop(second);
        assert_eq!(outstanding.settlement().below, 100, "the first is still in flight");
        drop(first);
        assert_eq!(outstanding.settlement().below, 102, "the third is still in flight");
        drop(third);
        assert_eq!(outstanding.settlement().below, 103, "nothing in flight: all taken settled");
    }

    #[test]
    fn a_repeatable_request_neither_holds_back_nor_moves_the_settlement() {
        let outstanding = Outstanding::new(100);
        let first = outstanding.take();
        assert_eq!(outstanding.number(), 101, "numbers are shared, never repeated");
        assert_eq!(outstanding.settlement().below, 100, "the first is still in flight");
        drop(first);
        assert_eq!(outstanding.settlement().below, 101, "the repeatable one is not waited for");
        assert_eq!(outstanding.number(), 102);
        assert_eq!(
            outstanding.settlement().below,
            101,
            "a repeatable number settles nothing a manager keeps, so it is no news to one"
        );
        let third = outstanding.take();
        assert_eq!((third.seq, outstanding.settlement().below), (103, 103));
        drop(third);
        assert_eq!(outstanding.settlement().below, 104);
    }

    #[test]
    fn a_repeatable_request_carries_the_settlement_until_its_manager_has_answered_one_that_did() {
        let outstanding = Outstanding::new(100);
        let (one, two) = (NodeId(1), NodeId(1 + TOLD as u64));
        drop(outstanding.take());
        let settled = outstanding.settlement();
        assert_eq!(outstanding.news_for(one), settled, "never told: news");
        outstanding.told(one, settled);
        assert_eq!(outstanding.news_for(one), Settlement::default(), "told: nothing to carry");
        assert_eq!(outstanding.news_for(two), settled, "a manager sharing the place was not told");
        outstanding.told(two, settled);
        assert_eq!(outstanding.news_for(one), settled, "its place taken: told again, a note more");
        drop(outstanding.take());
        assert_eq!(outstanding.news_for(two).below, 102, "the settlement moved: news again");
    }

    #[test]
    fn a_manager_covers_each_life_of_a_sender_up_to_what_it_heard() {
        let now = Instant::now();
        let mut settled = Settled::default();
        settled.note(NodeId(1), Settlement { since: 1_000, below: 1_010 }, now);
        settled.note(NodeId(1), Settlement { since: 1_000, below: 1_005 }, now);
        settled.note(NodeId(1), Settlement { since: 50, below: 60 }, now);
        assert!(settled.covers(&id(1, 1_009)), "a late, lower settlement does not undo one");
        assert!(!settled.covers(&id(1, 1_010)));
        assert!(settled.covers(&id(1, 55)), "an older life's range still holds");
        assert!(!settled.covers(&id(1, 999)), "between lives nothing is settled");
        assert!(!settled.covers(&id(2, 1_001)), "another sender's numbers are its own");
    }

    #[test]
    fn what_an_old_manager_knew_reaches_the_new_one_and_quiet_lives_are_forgotten() {
        let start = Instant::now();
        let mut old = Settled::default();
        old.note(NodeId(3), Settlement { since: 7, below: 9 }, start);
        let mut new = Settled::default();
        new.note(NodeId(3), Settlement { since: 7, below: 8 }, start);
        new.merge(&old.to_wire(), start + Duration::from_secs(5));
        assert!(new.covers(&id(3, 8)), "the higher of the two");
        new.forget_quiet(Duration::from_secs(10), start + Duration::from_secs(12));
        assert!(new.covers(&id(3, 8)), "heard 7 s ago through the merge");
        new.forget_quiet(Duration::from_secs(10), start + Duration::from_secs(16));
        assert!(!new.covers(&id(3, 8)), "quiet for 11 s");
    }
}
