//! Answers that come back another way than their request went. A request that reaches a node
//! which no longer manages its key (its sender routed by an old epoch) is forwarded by that
//! node to the key's manager, and the manager answers the sender directly:
//!
//! ```text
//!  sender ──Request──▶ old manager ──Forward──▶ manager
//!    ▲   ◀─Forwarded─┘                           │
//!    └───────────────────Answer──────────────────┘
//! ```
//!
//! Three one-way hops on the way to the answer, against four when the sender is told `Moved`
//! and asks again. The `Answer` may arrive before the old manager's `Forwarded` does: it waits
//! here until its sender looks for it, and is dropped after a while if nobody does.

use crate::wire::{Reply, RequestId};
use dashmap::DashMap;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// At most this many answers wait for a sender that has not looked for them yet: a peer that
/// sends answers nobody asked for fills no more memory than this.
const MOST_ARRIVED: usize = 4096;

enum Slot {
    /// The sender waits for the answer.
    Waiting(oneshot::Sender<Reply>),
    /// The answer came first, at this moment.
    Arrived(Reply, Instant),
}

/// A sender's forwarded requests and their answers, by request id.
#[derive(Default)]
pub(crate) struct Forwarded {
    slots: DashMap<RequestId, Slot, foldhash::fast::RandomState>,
}

/// Where the answer to one forwarded request will come from.
pub(crate) enum Wait<'a> {
    /// It had already come.
    Ready(Reply),
    /// It will come through this receiver; dropping it stops the wait.
    Pending(Pending<'a>),
}

/// A wait for an answer not yet come. Dropped, it leaves nothing behind.
pub(crate) struct Pending<'a> {
    table: &'a Forwarded,
    id: RequestId,
    /// Taken by [`Pending::answer`].
    rx: Option<oneshot::Receiver<Reply>>,
}

impl Pending<'_> {
    /// The answer, or `None` if the table dropped the wait (a newer wait for the same id took
    /// its place, which a sender never does while one is pending).
    pub(crate) async fn answer(&mut self) -> Option<Reply> {
        self.rx.as_mut()?.await.ok()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.table.slots.remove_if(&self.id, |_, slot| matches!(slot, Slot::Waiting(_)));
    }
}

impl Forwarded {
    /// The answer to `id`, or a wait for it.
    pub(crate) fn wait(&self, id: RequestId) -> Wait<'_> {
        match self.slots.entry(id) {
            dashmap::Entry::Occupied(slot) if matches!(slot.get(), Slot::Arrived(..)) => {
                match slot.remove() {
                    Slot::Arrived(reply, _) => Wait::Ready(reply),
                    Slot::Waiting(_) => unreachable!("matched as arrived"),
                }
            }
            entry => {
                let (tx, rx) = oneshot::channel();
                entry.insert(Slot::Waiting(tx));
                Wait::Pending(Pending { table: self, id, rx: Some(rx) })
            }
        }
    }

    /// Hands the answer to `id` to its waiting sender, or keeps it for when the sender looks.
    /// False when it was neither: too many answers already wait for nobody.
    pub(crate) fn arrive(&self, id: RequestId, reply: Reply, now: Instant) -> bool {
        if self.slots.len() >= MOST_ARRIVED && !self.slots.contains_key(&id) {
            return false;
        }
        match self.slots.entry(id) {
            dashmap::Entry::Occupied(slot) if matches!(slot.get(), Slot::Waiting(_)) => {
                if let Slot::Waiting(tx) = slot.remove() {
                    // The sender may have stopped waiting since: then the answer is not needed.
                    let _ = tx.send(reply);
                }
            }
            // A second answer to one id (a first attempt's, late) replaces the first: either
            // is the request's one answer, run once.
            entry => {
                entry.insert(Slot::Arrived(reply, now));
            }
        }
        true
    }

    /// Drops answers that waited longer than `keep` for a sender that never looked: it got
    /// its answer another way, or gave up.
    pub(crate) fn forget_older_than(&self, keep: Duration, now: Instant) {
        self.slots.retain(|_, slot| match slot {
            Slot::Arrived(_, at) => now.saturating_duration_since(*at) < keep,
            Slot::Waiting(tx) => !tx.is_closed(),
        });
    }

    /// Answers and waits held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_locator::NodeId;

    fn id(seq: u64) -> RequestId {
        RequestId { origin: NodeId(1), seq }
    }

    fn done(byte: u8) -> Reply {
        Reply::Done(vec![byte].into())
    }

    #[tokio::test]
    async fn an_answer_reaches_the_sender_that_waits_for_it() {
        let table = Forwarded::default();
        let Wait::Pending(mut pending) = table.wait(id(1)) else { panic!("nothing came yet") };
        assert!(table.arrive(id(1), done(7), Instant::now()));
        assert!(matches!(pending.answer().await, Some(Reply::Done(b)) if *b == [7]));
        drop(pending);
        assert_eq!(table.len(), 0);
    }

    #[tokio::test]
    async fn an_answer_that_comes_first_waits_for_its_sender() {
        let table = Forwarded::default();
        assert!(table.arrive(id(2), done(8), Instant::now()));
        assert!(matches!(table.wait(id(2)), Wait::Ready(Reply::Done(b)) if *b == [8]));
        assert_eq!(table.len(), 0, "taken, not copied");
        assert!(matches!(table.wait(id(3)), Wait::Pending(_)), "another id's answer is not it");
    }

    #[tokio::test]
    async fn a_sender_that_stops_waiting_leaves_nothing_behind() {
        let table = Forwarded::default();
        drop(table.wait(id(4)));
        assert_eq!(table.len(), 0);
        // Its answer, late, waits a while for nobody, then goes.
        let at = Instant::now();
        assert!(table.arrive(id(4), done(1), at));
        table.forget_older_than(Duration::from_secs(1), at + Duration::from_millis(999));
        assert_eq!(table.len(), 1, "kept within the time");
        table.forget_older_than(Duration::from_secs(1), at + Duration::from_secs(1));
        assert_eq!(table.len(), 0, "dropped after it");
    }

    #[tokio::test]
    async fn answers_nobody_asked_for_fill_a_bounded_table() {
        let table = Forwarded::default();
        let now = Instant::now();
        for seq in 0..MOST_ARRIVED as u64 {
            assert!(table.arrive(id(seq), done(0), now));
        }
        assert!(!table.arrive(id(u64::MAX), done(0), now), "refused past the bound");
        assert!(table.arrive(id(0), done(1), now), "a second answer to a kept id still lands");
        assert_eq!(table.len(), MOST_ARRIVED);
    }
}
