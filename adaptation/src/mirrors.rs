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
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    departed: ArcSwap<BTreeSet<NodeId>>,
    /// Bit `id % 256` of each of them: a clear bit answers "not departed" (nearly every
    /// request asks, of its manager, twice) without loading the set.
    departed_bits: [AtomicU64; 4],
    /// How many times the cluster gave up on each node, as this host heard it: unlike the
    /// set, it stays changed once the node is back as a new life.
    departures: ArcSwap<BTreeMap<NodeId, u64>>,
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
            departed_bits: Default::default(),
            departures: ArcSwap::from_pointee(BTreeMap::new()),
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

    /// Counts one more departure of each of `newly`, before their departure is mirrored: a
    /// reader who sees a node departed, or back, finds its count already moved on.
    pub(crate) fn count_departures(&self, newly: &[NodeId]) {
        if newly.is_empty() {
            return;
        }
        let mut counts = BTreeMap::clone(&self.departures.load());
        for &node in newly {
            *counts.entry(node).or_default() += 1;
        }
        self.departures.store(Arc::new(counts));
    }

    /// How many times the cluster gave up on `node`, as this host heard it.
    pub(crate) fn departures(&self, node: NodeId) -> u64 {
        self.departures.load().get(&node).copied().unwrap_or(0)
    }

    /// Copies the departed nodes from their watch, after it changed: the set first, then
    /// the bits, so that a reader who sees a node's bit finds the node in the set.
    pub(crate) fn mirror_departed(&self, departed: &BTreeSet<NodeId>) {
        let mut bits = [0u64; 4];
        for node in departed {
            let bit = node.0 % 256;
            bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.departed.store(Arc::new(departed.clone()));
        for (word, bits) in self.departed_bits.iter().zip(bits) {
            word.store(bits, Ordering::Release);
        }
    }

    /// Whether the cluster has given up on `node`.
    pub(crate) fn is_departed(&self, node: NodeId) -> bool {
        let bit = node.0 % 256;
        let word = self.departed_bits[(bit / 64) as usize].load(Ordering::Acquire);
        word & (1 << (bit % 64)) != 0 && self.departed.load().contains(&node)
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

    #[test]
    fn the_departed_mirror_says_what_its_set_says_even_where_ids_share_a_bit() {
        let now = Mirrors::new();
        assert!(!now.is_departed(NodeId(3)));
        now.mirror_departed(&BTreeSet::from([NodeId(3), NodeId(300)]));
        for (node, gone) in [(3, true), (300, true), (259, false), (44, false), (556, false)] {
            assert_eq!(now.is_departed(NodeId(node)), gone, "node {node}");
        }
        now.mirror_departed(&BTreeSet::from([NodeId(300)]));
        assert!(!now.is_departed(NodeId(3)), "a node no longer in the set");
        assert!(now.is_departed(NodeId(300)));
    }

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
