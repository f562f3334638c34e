//! The handler slots of one connection: how many of the peer's requests are being handled at
//! once. Taken and given back once per request, so both are one atomic operation; a
//! semaphore's release took its waiters' lock on every request, though only the connection's
//! reader ever waits, and only when every slot is taken.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// A connection's handler slots.
pub(crate) struct Slots {
    taken: AtomicUsize,
    max: usize,
    /// Told when a slot is given back while they were all taken. Its permit survives a
    /// release that comes before the reader waits, so no release is missed.
    freed: Notify,
}

/// One slot, given back when dropped.
pub(crate) struct Slot(Arc<Slots>);

impl Slots {
    pub(crate) fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots { taken: AtomicUsize::new(0), max, freed: Notify::new() })
    }

    /// A slot if one is free now.
    pub(crate) fn try_take(self: &Arc<Self>) -> Option<Slot> {
        if self.taken.fetch_add(1, Ordering::AcqRel) >= self.max {
            // Undone without a wake: told by its own undo, a waiting reader would spin. A slot
            // given back meanwhile saw the count over the limit, and tells it.
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Arc::clone(self)))
    }

    /// A slot, once one is free. Only one task (the connection's reader) waits at a time.
    pub(crate) async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(slot) = self.try_take() {
                return slot;
            }
            self.freed.notified().await;
        }
    }

    /// No slot is taken: nothing of the peer's is being handled.
    pub(crate) fn idle(&self) -> bool {
        self.taken.load(Ordering::Acquire) == 0
    }

    fn give_back(&self) {
        // A count at or over the limit may have turned the reader away: tell it to look again.
        if self.taken.fetch_sub(1, Ordering::AcqRel) >= self.max {
            self.freed.notify_one();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_slots_than_the_limit_are_taken_and_each_comes_back() {
        let slots = Slots::new(2);
        let a = slots.try_take().expect("first");
        let b = slots.try_take().expect("second");
        assert!(slots.try_take().is_none(), "over the limit");
        drop(a);
        let c = slots.try_take().expect("a freed slot");
        assert!(slots.try_take().is_none());
        drop((b, c));
        assert!(slots.idle());
    }

    /// A reader turned away waits, and the slot given back while it was about to wait, or
    /// while it waits, lets it on.
    #[tokio::test(start_paused = true)]
    async fn a_reader_waiting_for_a_slot_gets_the_first_given_back() {
        let slots = Slots::new(1);
        let held = slots.try_take().expect("the only slot");
        let waiting = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.take().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no slot is free");
        drop(held);
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken by the slot given back")
            .expect("task");
        assert!(!slots.idle());
        drop(got);
        assert!(slots.idle());
    }
}
