//! Which nodes keep failing. A node starved of CPU, swapping or on a flaky link can answer
//! again a second after it was declared failed, rejoin as a new life, and be declared failed
//! again: an audit saw one node do so 41 times in 52 s. Each time the cluster moved its entries
//! out and back, healthy nodes served 40% less, and a second failure meanwhile lost entries
//! whose replicas were on their way. So a node's second failure within [`FLAP_MEMORY`] holds it
//! out for a while before it may rejoin, twice as long at each further failure.

use crate::state::Refusal;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How long a failure counts: a node that has not failed for this long is held no more.
pub(crate) const FLAP_MEMORY: Duration = Duration::from_secs(600);
/// The longest hold, whatever the failures.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(300);

/// The failures every node has seen of each node, from the cluster's applied state. Each
/// node keeps its own: a leader elected afterwards holds a flapping node out as the last one
/// did.
#[derive(Debug)]
pub(crate) struct Flaps {
    /// The hold after a second failure; zero holds nobody.
    first_hold: Duration,
    nodes: BTreeMap<u64, Failures>,
}

#[derive(Debug, Default)]
struct Failures {
    /// The last life seen failed: a failure is counted once however often the state shows it.
    life: Option<u64>,
    /// When each failure within [`FLAP_MEMORY`] was seen, oldest first.
    at: VecDeque<Instant>,
}

/// A node held out: how many times it failed within [`FLAP_MEMORY`], from its first such
/// failure to its last, and how much longer it is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hold {
    /// Failures within [`FLAP_MEMORY`].
    pub(crate) failures: u32,
    /// From the first of them to the last.
    pub(crate) within: Duration,
    /// Until it may rejoin.
    pub(crate) left: Duration,
}

impl Hold {
    /// The refusal of `node`'s rejoin while it is held.
    pub(crate) fn refusal(&self, node: u64) -> Refusal {
        Refusal::Held {
            node,
            failures: self.failures,
            within_ms: self.within.as_millis() as u64,
            left_ms: self.left.as_millis() as u64,
        }
    }
}

impl Flaps {
    /// No failure seen yet; a second failure holds a node out for `first_hold`.
    pub(crate) fn new(first_hold: Duration) -> Self {
        Flaps { first_hold, nodes: BTreeMap::new() }
    }

    /// `node`'s life `life` is over, as known since before this process ran: not counted,
    /// but never counted again either.
    pub(crate) fn known(&mut self, node: u64, life: u64) {
        let failures = self.nodes.entry(node).or_default();
        failures.life = failures.life.max(Some(life));
    }

    /// `node`'s life `life` was seen failed at `now`. The hold it brings when it is newly
    /// counted and holds the node out; `None` otherwise.
    pub(crate) fn failed(&mut self, node: u64, life: u64, now: Instant) -> Option<Hold> {
        let failures = self.nodes.entry(node).or_default();
        if failures.life.is_some_and(|counted| life <= counted) {
            return None;
        }
        failures.life = Some(life);
        failures.at.push_back(now);
        self.hold(node, now)
    }

    /// How much longer `node` is held out at `now`, if it is.
    pub(crate) fn hold(&self, node: u64, now: Instant) -> Option<Hold> {
        let failures = self.nodes.get(&node)?;
        let recent: Vec<Instant> = failures
            .at
            .iter()
            .copied()
            .filter(|&at| now.saturating_duration_since(at) < FLAP_MEMORY)
            .collect();
        let (&first, &last) = (recent.first()?, recent.last()?);
        let count = recent.len() as u32;
        if count < 2 || self.first_hold.is_zero() {
            return None;
        }
        let hold = self.first_hold.saturating_mul(1 << (count - 2).min(16)).min(MAX_HOLD);
        let left = (last + hold).saturating_duration_since(now);
        (!left.is_zero()).then(|| Hold { failures: count, within: last - first, left })
    }

    /// Every node held out at `now`. Forgets failures past [`FLAP_MEMORY`].
    pub(crate) fn held(&mut self, now: Instant) -> BTreeMap<u64, Hold> {
        for failures in self.nodes.values_mut() {
            while failures
                .at
                .front()
                .is_some_and(|&at| now.saturating_duration_since(at) >= FLAP_MEMORY)
            {
                failures.at.pop_front();
            }
        }
        self.nodes.keys().filter_map(|&node| Some((node, self.hold(node, now)?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_first_failure_holds_nobody_and_each_failure_after_doubles_the_hold() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        assert_eq!(flaps.failed(4, 1, start), None, "a crash, restarted: back at once");
        assert_eq!(flaps.hold(4, start + S), None);
        let second = start + 10 * S;
        let hold = flaps.failed(4, 2, second).expect("held after a second failure");
        assert_eq!(hold, Hold { failures: 2, within: 10 * S, left: 5 * S });
        assert_eq!(flaps.hold(4, second + 4 * S).map(|h| h.left), Some(S));
        assert_eq!(flaps.hold(4, second + 5 * S), None, "the hold is over");
        let third = second + 6 * S;
        assert_eq!(flaps.failed(4, 3, third).map(|h| h.left), Some(10 * S));
        let fourth = third + 11 * S;
        assert_eq!(flaps.failed(4, 4, fourth).map(|h| (h.failures, h.left)), Some((4, 20 * S)));
        assert_eq!(flaps.hold(3, fourth), None, "another node is not held");
    }

    #[test]
    fn a_failure_is_counted_once_per_life_and_lives_known_at_start_are_not_counted() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        flaps.known(2, 7);
        assert_eq!(flaps.failed(2, 7, start), None);
        assert_eq!(flaps.failed(2, 8, start + S), None, "the first failure seen");
        for later in 2..10 {
            assert_eq!(flaps.failed(2, 8, start + later * S), None, "life 8 again");
        }
        assert_eq!(flaps.failed(2, 6, start + 3 * S), None, "an older life");
        assert_eq!(flaps.held(start + 2 * S), BTreeMap::new(), "one failure counted");
        assert!(flaps.failed(2, 9, start + 2 * S).is_some(), "the second");
    }

    #[test]
    fn failures_are_forgotten_after_the_memory_and_the_hold_is_capped() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        for life in 1..=20 {
            flaps.failed(5, life, start + (life as u32) * S);
        }
        let last = start + 20 * S;
        assert_eq!(flaps.hold(5, last).map(|h| (h.failures, h.left)), Some((20, MAX_HOLD)));
        assert_eq!(flaps.held(last + MAX_HOLD), BTreeMap::new(), "the longest hold ends");
        // Long quiet: the next failure is a first one again.
        let much_later = last + FLAP_MEMORY;
        assert_eq!(flaps.held(much_later), BTreeMap::new());
        assert_eq!(flaps.failed(5, 21, much_later), None, "forgotten");
    }

    #[test]
    fn a_zero_hold_holds_nobody() {
        let start = Instant::now();
        let mut flaps = Flaps::new(Duration::ZERO);
        for life in 1..=5 {
            assert_eq!(flaps.failed(1, life, start + (life as u32) * S), None);
        }
    }
}
