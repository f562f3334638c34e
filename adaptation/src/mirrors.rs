//! What the host reads on every request of the values it keeps in watches, as atomics.
//!
//! A `watch` holds its value behind a lock, and reading it takes the lock: a write to its
//! cache line. Read for every request by both workers of a node, those lines went from one
//! core to the other and back; profiled, they were the most expensive loads of a routed
//! request. The watches stay, for the tasks that wait on them. Each mirror is written after its
//! watch changed, so a reader never sees a value the watch has not reached yet: a wait for the
//! value after the one read cannot miss it.

use arc_swap::ArcSwap;
use gobelins_locator::NodeId;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::watch;
use tokio::time::Instant;

/// `lease_until` when there is no lease to honour.
const NO_LEASE: u64 = u64::MAX;

pub(crate) struct Mirrors {
    /// The life stopped (renewed after the cluster declared the node failed, or shut down).
    pub(crate) stopped: AtomicBool,
    /// How many times held requests were released.
    pub(crate) released: AtomicU64,
    /// The nodes the cluster has given up on.
    pub(crate) departed: ArcSwap<BTreeSet<NodeId>>,
    /// The lease's end, in nanoseconds from `born`; `NO_LEASE` for none.
    lease_until: AtomicU64,
    born: Instant,
}

impl Mirrors {
    pub(crate) fn new() -> Self {
        Mirrors {
            stopped: AtomicBool::new(false),
            released: AtomicU64::new(0),
            departed: ArcSwap::from_pointee(BTreeSet::new()),
            lease_until: AtomicU64::new(NO_LEASE),
            born: Instant::now(),
        }
    }

    fn since_born(&self, at: Instant) -> u64 {
        // Before `born` counts as `born`: such a lease has run out already.
        u64::try_from(at.saturating_duration_since(self.born).as_nanos()).unwrap_or(NO_LEASE - 1)
    }

    /// Copies the lease from its watch, after it changed.
    pub(crate) fn mirror_lease(&self, lease: &watch::Sender<Option<Instant>>) {
        let until = lease.borrow().map_or(NO_LEASE, |l| self.since_born(l));
        self.lease_until.store(until, Ordering::Release);
    }

    /// Whether the lease, if there is one, still holds at `now`.
    pub(crate) fn leased_at(&self, now: Instant) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until == NO_LEASE || self.since_born(now) < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_lease_mirror_says_what_its_watch_says() {
        let now = Mirrors::new();
        let lease = watch::channel(None).0;
        assert!(now.leased_at(Instant::now()), "no lease: free to serve");
        lease.send_replace(Some(Instant::now() + Duration::from_secs(1)));
        now.mirror_lease(&lease);
        assert!(now.leased_at(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!now.leased_at(Instant::now()), "run out at its end");
        lease.send_replace(Some(Instant::now() - Duration::from_millis(1)));
        now.mirror_lease(&lease);
        assert!(!now.leased_at(Instant::now()), "an end already past");
    }
}
