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
    /// The nodes found lagging at the last look, to say when one starts or stops.
    lagging: BTreeSet<u64>,
    /// When each node was last found lagging.
    seen: BTreeMap<u64, Instant>,
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
        self.lagging.clear();
        self.seen.clear();
    }

    /// The nodes of `matched` (each follower's last entry stored, as raft's replication says)
    /// that have not stored what the leader's log held [`LAG_WINDOW`] before `now`; none
    /// while this leader has led for less than that.
    pub(crate) fn lagging(
        &self,
        now: Instant,
        matched: &BTreeMap<u64, Option<u64>>,
    ) -> BTreeSet<u64> {
        let due = self
            .samples
            .iter()
            .take_while(|&&(at, _)| now.saturating_duration_since(at) >= LAG_WINDOW)
            .last()
            .map(|&(_, index)| index);
        let Some(due) = due else { return BTreeSet::new() };
        matched
            .iter()
            .filter(|(_, stored)| stored.is_none_or(|s| s < due))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Records `now_lagging` as the nodes that lag at `now`; returns those that began to, and
    /// those that stopped.
    pub(crate) fn changed(
        &mut self,
        now: Instant,
        now_lagging: BTreeSet<u64>,
    ) -> (Vec<u64>, Vec<u64>) {
        for &node in &now_lagging {
            self.seen.insert(node, now);
        }
        self.seen.retain(|_, at| now.saturating_duration_since(*at) < LAG_MEMORY);
        let began = now_lagging.difference(&self.lagging).copied().collect();
        let ended = self.lagging.difference(&now_lagging).copied().collect();
        self.lagging = now_lagging;
        (began, ended)
    }

    /// The nodes found lagging within [`LAG_MEMORY`] before `now`.
    pub(crate) fn lagged(&self, now: Instant) -> BTreeSet<u64> {
        let recent = |at: &Instant| now.saturating_duration_since(*at) < LAG_MEMORY;
        self.seen.iter().filter(|(_, at)| recent(at)).map(|(&id, _)| id).collect()
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
        assert!(watch.lagging(start, &matched).is_empty(), "a new leader judges nobody");
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
        assert_eq!(watch.lagging(now, &matched), BTreeSet::from([3, 4]));
        let caught_up = BTreeMap::from([(2, Some(10)), (3, Some(index)), (4, Some(index))]);
        assert!(watch.lagging(now, &caught_up).is_empty());
        // A window later, node 2 has not stored what came since: it lags.
        for _ in 0..(LAG_WINDOW.as_millis() / tick.as_millis()) {
            now += tick;
            index += 1;
            watch.sample(now, 1, index);
        }
        assert_eq!(watch.lagging(now, &caught_up), BTreeSet::from([2]));
        assert!(watch.samples.len() <= 43, "old samples are forgotten: {}", watch.samples.len());
        assert_eq!(watch.changed(now, BTreeSet::from([3, 4])), (vec![3, 4], vec![]));
        assert_eq!(watch.changed(now, BTreeSet::from([4])), (vec![], vec![3]));
        // Node 3 keeps up again, and still counts as lagging for a while.
        assert_eq!(watch.lagged(now + LAG_MEMORY / 2), BTreeSet::from([3, 4]));
        assert_eq!(watch.changed(now + LAG_MEMORY, BTreeSet::new()), (vec![], vec![4]));
        assert!(watch.lagged(now + LAG_MEMORY).is_empty());
        // A new term starts afresh.
        watch.sample(now, 2, index);
        assert!(watch.lagging(now, &matched).is_empty());
    }
}
