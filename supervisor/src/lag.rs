//! Which raft followers keep up with the leader's log. One whose disk takes longer to store an
//! entry than raft waits for its answer (raft's heartbeat interval) answers its pings and
//! never acknowledges an entry: as a voter it counts toward every majority and gives none.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How old an entry of the leader's log may be before a follower that has not stored it lags:
/// a follower that keeps up stores each within milliseconds.
pub(crate) const LAG_WINDOW: Duration = Duration::from_secs(2);
/// How long a follower seen lagging counts as lagging once it keeps up again: a disk slow now
/// and then would otherwise have its node's seat taken and given back at every change.
pub(crate) const LAG_MEMORY: Duration = Duration::from_secs(30);

/// The leader's log as it grew, for as long as a judgement needs.
#[derive(Debug, Default)]
pub(crate) struct LagWatch {
    /// The term the samples are of: a new one starts them afresh.
    term: u64,
    /// The leader's last log index, sampled at each of its ticks, oldest first.
    samples: VecDeque<(Instant, u64)>,
    /// When each follower was first seen in raft's replication: one added since could not have
    /// stored what the log held before.
    known: BTreeMap<u64, Instant>,
    /// When each node was last found lagging, for [`LAG_MEMORY`].
    seen: BTreeMap<u64, Instant>,
}

/// What one look found: the nodes that lag now or lagged lately, and the episodes that began
/// and ended with it, to be said.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Look {
    /// Lagging now, or within [`LAG_MEMORY`].
    pub(crate) lagged: BTreeSet<u64>,
    /// Found lagging, having kept up for [`LAG_MEMORY`] or more before.
    pub(crate) began: Vec<u64>,
    /// Kept up for [`LAG_MEMORY`] since last found lagging.
    pub(crate) ended: Vec<u64>,
}

impl LagWatch {
    /// The leader's last log index at `now`, in `term`. Keeps one sample at least
    /// [`LAG_WINDOW`] old, and the later ones. A new term starts afresh: raft forgets what each
    /// follower stored when a leadership begins, and judged against the last term's samples
    /// every follower would lag until it answered.
    pub(crate) fn sample(&mut self, now: Instant, term: u64, last_index: u64) {
        if term != self.term {
            self.clear();
            self.term = term;
        }
        self.samples.push_back((now, last_index));
        while self
            .samples
            .get(1)
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= LAG_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// This node leads no more, or begins to: what it saw of its log as leader says nothing
    /// of the next term's.
    pub(crate) fn clear(&mut self) {
        self.samples.clear();
        self.known.clear();
        self.seen.clear();
    }

    /// Judges the followers of `matched` (each one's last entry stored, as raft's replication
    /// says) at `now`. One lags when it has not stored what the leader's log held
    /// [`LAG_WINDOW`] before, and was a follower then; nobody does while this leader has led
    /// for less than that.
    pub(crate) fn look(&mut self, now: Instant, matched: &BTreeMap<u64, Option<u64>>) -> Look {
        self.known.retain(|id, _| matched.contains_key(id));
        for &id in matched.keys() {
            self.known.entry(id).or_insert(now);
        }
        let due = self
            .samples
            .iter()
            .take_while(|&&(at, _)| now.saturating_duration_since(at) >= LAG_WINDOW)
            .last()
            .map(|&(_, index)| index);
        let old = |id: &u64| {
            self.known.get(id).is_some_and(|at| now.saturating_duration_since(*at) >= LAG_WINDOW)
        };
        let lagging: Vec<u64> = match due {
            None => Vec::new(),
            Some(due) => matched
                .iter()
                .filter(|(id, stored)| old(id) && stored.is_none_or(|s| s < due))
                .map(|(&id, _)| id)
                .collect(),
        };
        let mut look = Look::default();
        for id in lagging {
            if self.seen.insert(id, now).is_none() {
                look.began.push(id);
            }
        }
        self.seen.retain(|&id, at| {
            let recent = now.saturating_duration_since(*at) < LAG_MEMORY;
            if !recent {
                look.ended.push(id);
            }
            recent
        });
        look.lagged = self.seen.keys().copied().collect();
        look
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_lags_once_it_has_not_stored_what_the_log_held_a_window_ago() {
        let mut watch = LagWatch::default();
        let start = Instant::now();
        let tick = Duration::from_millis(50);
        let matched = BTreeMap::from([(2, Some(10)), (3, Some(4)), (4, None)]);
        watch.sample(start, 1, 10);
        assert_eq!(watch.look(start, &matched), Look::default(), "a new leader judges nobody");
        // The log stays at 10 for a window, then grows by one a tick.
        let mut now = start;
        while now < start + LAG_WINDOW {
            now += tick;
            watch.sample(now, 1, 10);
        }
        let mut index = 10;
        for _ in 0..4 {
            now += tick;
            index += 1;
            watch.sample(now, 1, index);
        }
        // A window ago the log held 10: node 2 stored it, node 3 and node 4 did not.
        let look = watch.look(now, &matched);
        assert_eq!(look.lagged, BTreeSet::from([3, 4]));
        assert_eq!(look.began, [3, 4], "each episode said once");
        // Caught up, they count as lagging for a while, and the episode is not said again.
        let caught_up = BTreeMap::from([(2, Some(10)), (3, Some(index)), (4, Some(index))]);
        let look = watch.look(now, &caught_up);
        assert_eq!((look.lagged, look.began), (BTreeSet::from([3, 4]), vec![]));
        // A window later, node 2 has not stored what came since: it lags.
        for _ in 0..(LAG_WINDOW.as_millis() / tick.as_millis()) {
            now += tick;
            index += 1;
            watch.sample(now, 1, index);
        }
        assert_eq!(watch.look(now, &caught_up).began, [2]);
        assert!(watch.samples.len() <= 43, "old samples are forgotten: {}", watch.samples.len());
        // Node 5 joins now: it stored nothing, and the log held entries before it came.
        let mut joined = caught_up.clone();
        joined.insert(5, None);
        assert!(!watch.look(now, &joined).lagged.contains(&5), "not judged on what came before");
        // Once the memory has passed, the episodes end, each said once.
        let later = now + LAG_MEMORY;
        let all = BTreeMap::from([
            (2, Some(index)),
            (3, Some(index)),
            (4, Some(index)),
            (5, Some(index)),
        ]);
        watch.sample(later, 1, index);
        let look = watch.look(later, &all);
        assert_eq!((look.lagged.len(), look.ended), (0, vec![2, 3, 4]));
        // A new term starts afresh.
        watch.sample(later, 2, index);
        assert_eq!(watch.look(later, &matched), Look::default());
    }
}
