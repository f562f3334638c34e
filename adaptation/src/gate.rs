//! The gate every served request passes, and a change's hold waits at: a hold waits out the
//! handles that routed before it (they may still change an entry about to leave), and while it
//! waits no new handle passes.
//!
//! Passing is one atomic operation each way. A `tokio::sync::RwLock` gave the same order, but
//! its read guard's release took the lock's waiter list on every request.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The state's top bit: a hold waits, or is being let go.
const HOLD: usize = 1 << (usize::BITS - 1);

/// Handles pass shared; a hold waits until those that passed before it are gone.
pub(crate) struct Gate {
    /// Handles inside, and [`HOLD`].
    state: AtomicUsize,
    /// Told when the last handle leaves while a hold waits.
    drained: Notify,
    /// Told when a hold ends, for the handles it kept out.
    reopened: Notify,
    /// Told when a hold begins, for the handles inside that wait on something else and would
    /// keep it waiting.
    holding: Notify,
    /// One hold at a time.
    holds: tokio::sync::Mutex<()>,
}

/// A handle inside the gate; it leaves when this drops.
pub(crate) struct Pass<'a>(&'a Gate);

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate {
            state: AtomicUsize::new(0),
            drained: Notify::new(),
            reopened: Notify::new(),
            holding: Notify::new(),
            holds: tokio::sync::Mutex::new(()),
        }
    }

    /// Passes now, unless a hold waits.
    pub(crate) fn try_pass(&self) -> Option<Pass<'_>> {
        if self.state.fetch_add(1, Ordering::AcqRel) & HOLD != 0 {
            self.leave();
            return None;
        }
        Some(Pass(self))
    }

    /// Passes once no hold waits; `None` if one still does at `until`.
    pub(crate) async fn pass(&self, until: Instant) -> Option<Pass<'_>> {
        loop {
            // Listening before looking: a hold that ends in between still wakes this.
            let reopened = self.reopened.notified();
            tokio::pin!(reopened);
            reopened.as_mut().enable();
            if let Some(pass) = self.try_pass() {
                return Some(pass);
            }
            if tokio::time::timeout_at(until, reopened).await.is_err() {
                return None;
            }
        }
    }

    /// Waits until every handle that passed before this call has left, keeping new ones out
    /// meanwhile; lets them in again on return.
    pub(crate) async fn hold(&self) {
        let _one = self.holds.lock().await;
        self.state.fetch_or(HOLD, Ordering::AcqRel);
        self.holding.notify_waiters();
        // Reopened however the wait ends, dropped half way included: a hold left standing
        // would keep every request out until the next one.
        let _reopen = Reopen(self);
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.state.load(Ordering::Acquire) & !HOLD == 0 {
                break;
            }
            drained.await;
        }
    }

    /// Returns once a hold waits: at once if one does now.
    pub(crate) async fn held(&self) {
        loop {
            // Listening before looking, as `pass` does.
            let holding = self.holding.notified();
            tokio::pin!(holding);
            holding.as_mut().enable();
            if self.state.load(Ordering::Acquire) & HOLD != 0 {
                return;
            }
            holding.await;
        }
    }

    fn leave(&self) {
        if self.state.fetch_sub(1, Ordering::AcqRel) == HOLD | 1 {
            self.drained.notify_one();
        }
    }
}

/// Ends a hold: lets new handles in, and wakes those it kept out.
struct Reopen<'a>(&'a Gate);

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        self.0.state.fetch_and(!HOLD, Ordering::AcqRel);
        self.0.reopened.notify_waiters();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_hold_waits_for_the_handles_inside_and_keeps_new_ones_out_until_it_ends() {
        let gate = Arc::new(Gate::new());
        let first = gate.try_pass().expect("no hold: passes");
        let second = gate.try_pass().expect("passes side by side");
        let holding = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.hold().await }
        });
        tokio::task::yield_now().await;
        assert!(gate.try_pass().is_none(), "a hold waits: nobody new passes");
        let kept_out = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.pass(Instant::now() + Duration::from_secs(60)).await.is_some() }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!holding.is_finished(), "one handle is still inside");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), holding)
            .await
            .expect("the hold ends once the last handle left")
            .expect("task");
        let let_in = tokio::time::timeout(Duration::from_secs(1), kept_out)
            .await
            .expect("the handle kept out passes once the hold ends")
            .expect("task");
        assert!(let_in);
        assert!(gate.try_pass().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handle_kept_out_gives_up_at_its_deadline() {
        let gate = Arc::new(Gate::new());
        let inside = gate.try_pass().expect("passes");
        let holding = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.hold().await }
        });
        tokio::task::yield_now().await;
        let started = Instant::now();
        assert!(gate.pass(started + Duration::from_millis(50)).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        drop(inside);
        holding.await.expect("task");
        assert!(gate.pass(Instant::now()).await.is_some(), "no hold: passes at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_given_up_while_it_waits_lets_handles_in_again() {
        let gate = Gate::new();
        let inside = gate.try_pass().expect("passes");
        let given_up = tokio::time::timeout(Duration::from_millis(10), gate.hold()).await;
        assert!(given_up.is_err(), "a handle is inside: the hold waits");
        assert!(gate.try_pass().is_some(), "the hold is gone: handles pass again");
        drop(inside);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handle_waiting_on_something_else_hears_of_a_hold_and_lets_it_end() {
        let gate = Arc::new(Gate::new());
        let parked = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move {
                let _inside = gate.try_pass().expect("passes");
                // A long poll: it would keep the hold waiting for the whole minute.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => false,
                    _ = gate.held() => true,
                }
            }
        });
        tokio::task::yield_now().await;
        assert!(!parked.is_finished(), "no hold yet: the handle waits on");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(1), gate.hold())
            .await
            .expect("the parked handle leaves as the hold begins");
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(parked.await.expect("task"), "woken by the hold, not by its own wait");
        // The hold has ended: a handle waiting now waits for the next one.
        let _inside = gate.try_pass().expect("passes");
        assert!(tokio::time::timeout(Duration::from_secs(5), gate.held()).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_with_nobody_inside_ends_at_once() {
        let gate = Gate::new();
        tokio::time::timeout(Duration::from_secs(1), gate.hold()).await.expect("nothing to wait");
        tokio::time::timeout(Duration::from_secs(1), gate.hold()).await.expect("and again");
        assert!(gate.try_pass().is_some());
    }
}
