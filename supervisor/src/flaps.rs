//! Which nodes keep failing. A node starved of CPU, swapping or on a flaky link can answer
//! again a second after it was declared failed, rejoin as a new life, and be declared failed
//! again: an audit saw one node do so 41 times in 52 s. Each time the cluster moved its entries
//! out and back, healthy nodes served 40% less, and a second failure meanwhile lost entries
//! whose replicas were on their way. So a node whose lives keep ending soon after they began is
//! held out for a while before it may rejoin, twice as long at each such failure, until it has
//! stayed up, or away, for [`FLAP_MEMORY`].
//!
//! Only a life that ended within [`SHORT_LIFE`] of its start counts: a node restarted after
//! hours of service, for an upgrade say, is not flapping. Nor does a life its node said it
//! stopped on purpose (SIGTERM, SIGINT), up to [`STOPS_FORGIVEN`] of them within
//! [`FLAP_MEMORY`]: an operator restarting a node a few times is not a flap, but a loop that
//! restarts it with SIGTERM (a liveness probe that keeps failing) is, after those.

use crate::state::{NodeRecord, NodeStatus, Refusal};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// How long a node must go without a failure, counted from when it could come back, to be a
/// first offender again.
pub const FLAP_MEMORY: Duration = Duration::from_secs(600);
/// A life that ended sooner than this after it began counts as a failure here.
pub const SHORT_LIFE: Duration = Duration::from_secs(120);
/// The longest hold, whatever the failures.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(300);
/// Short lives stopped on purpose that go uncounted within [`FLAP_MEMORY`]; those after count.
pub(crate) const STOPS_FORGIVEN: u32 = 3;

/// The short lives each node has seen end, from the cluster's applied state. Each node keeps
/// its own, so that a leader elected afterwards holds a flapping node out too, if it saw the
/// failures (one that joined or restarted since did not).
#[derive(Debug)]
pub(crate) struct Flaps {
    /// The hold after a second failure; zero holds nobody.
    first_hold: Duration,
    nodes: BTreeMap<u64, Lives>,
}

#[derive(Debug, Default)]
struct Lives {
    /// The life last seen live, and when it was first seen so (`None`: before this node
    /// watched, so how long it lasted is not known).
    live: Option<(u64, Option<Instant>)>,
    /// The last life seen failed: each is judged once, however often the state shows it.
    ended: Option<u64>,
    /// A life the node said it stops on purpose: its failure is not a short life, nor does
    /// it end a run of them.
    stopping: Option<u64>,
    /// Short lives stopped on purpose not counted, and when the first of them ended.
    forgiven: u32,
    forgiven_since: Option<Instant>,
    /// Short lives in a row, each failed within [`FLAP_MEMORY`] of the node's last chance to
    /// come back, and when the first of them failed.
    strikes: u32,
    first: Option<Instant>,
    /// When it could last come back: its last failure, or the end of the hold that set.
    back_at: Option<Instant>,
    /// The hold the last failure set, and until when it lasts: set once, as announced.
    hold: Option<(Hold, Instant)>,
}

/// A node held out: how many short lives in a row it failed, from the first of those failures
/// to the last, and how much longer it is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hold {
    /// Short lives failed in a row, the one that set the hold included.
    pub(crate) failures: u32,
    /// From the first of them to the last.
    pub(crate) within: Duration,
    /// Until it may rejoin.
    pub(crate) left: Duration,
}

/// What an operator of a node held out should do, as every message about a hold says it.
pub(crate) fn advice(node: u64) -> String {
    format!(
        "Look for what starves node {node} (CPU, memory, disk, network: its log says what it went \
         through), or for restarts in a loop; once that is mended, `gobelins unhold {node}` lifts \
         the hold"
    )
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

    /// Takes in the cluster's applied records at `now`: lives begun and lives failed. Only
    /// a node whose own life is admitted counts (`counting`): a restarted process replays its
    /// log, and every life in it would seem to begin and end at once. Returns the nodes that
    /// a failure seen now holds out, with their holds.
    pub(crate) fn watch<'a>(
        &mut self,
        records: impl IntoIterator<Item = (&'a u64, &'a NodeRecord)>,
        counting: bool,
        now: Instant,
    ) -> Vec<(u64, Hold)> {
        let mut held = Vec::new();
        for (&node, record) in records {
            let lives = self.nodes.entry(node).or_default();
            if record.status.is_live() {
                if lives.live.is_none_or(|(life, _)| life != record.incarnation) {
                    lives.live = Some((record.incarnation, counting.then_some(now)));
                }
                continue;
            }
            if record.status != NodeStatus::Failed
                || lives.ended.is_some_and(|ended| ended >= record.incarnation)
            {
                continue;
            }
            lives.ended = Some(record.incarnation);
            let began = match lives.live {
                Some((life, Some(began))) if life == record.incarnation => began,
                _ => continue,
            };
            if !counting {
                continue;
            }
            // A long life breaks the run: the short lives before it were not a flap.
            if now.saturating_duration_since(began) >= SHORT_LIFE {
                lives.restart_streak();
                continue;
            }
            if lives.stopping == Some(record.incarnation) && lives.forgive(now) {
                continue;
            }
            if let Some(hold) = self.failed(node, now) {
                held.push((node, hold));
            }
        }
        held
    }

    /// Counts a failure of `node` at `now`; the hold it sets, if any.
    fn failed(&mut self, node: u64, now: Instant) -> Option<Hold> {
        let first_hold = self.first_hold;
        let lives = self.nodes.entry(node).or_default();
        let quiet = lives.back_at.is_none_or(|at| now.saturating_duration_since(at) >= FLAP_MEMORY);
        if quiet {
            lives.strikes = 0;
            lives.first = Some(now);
        }
        lives.strikes += 1;
        lives.back_at = Some(now);
        let strikes = lives.strikes;
        if strikes < 2 || first_hold.is_zero() {
            return None;
        }
        let hold = first_hold.saturating_mul(1 << (strikes - 2).min(16)).min(MAX_HOLD);
        let within = now.saturating_duration_since(lives.first.unwrap_or(now));
        let set = Hold { failures: strikes, within, left: hold };
        lives.back_at = Some(now + hold);
        lives.hold = Some((set, now + hold));
        Some(set)
    }

    /// `node` says its life `life` stops on purpose: its failure is not counted.
    pub(crate) fn stopping(&mut self, node: u64, life: u64) {
        let lives = self.nodes.entry(node).or_default();
        lives.stopping = lives.stopping.max(Some(life));
    }

    /// Whether `node` said its life `life` stops on purpose.
    pub(crate) fn said_stopping(&self, node: u64, life: u64) -> bool {
        self.nodes.get(&node).is_some_and(|l| l.stopping == Some(life))
    }

    /// Forgets `node`'s short lives in a row, and lifts its hold: an operator says the cause is
    /// mended. Whether it was held at `now`, and whether short lives of it were counted.
    pub(crate) fn unhold(&mut self, node: u64, now: Instant) -> (bool, bool) {
        let held = self.hold(node, now).is_some();
        let Some(lives) = self.nodes.get_mut(&node) else { return (false, false) };
        let counted = lives.strikes > 0;
        lives.restart_streak();
        (held, counted)
    }

    /// How much longer `node` is held out at `now`, if it is.
    pub(crate) fn hold(&self, node: u64, now: Instant) -> Option<Hold> {
        let (hold, until) = self.nodes.get(&node)?.hold?;
        let left = until.saturating_duration_since(now);
        (!left.is_zero()).then_some(Hold { left, ..hold })
    }

    /// Every node held out at `now`.
    #[cfg(test)]
    pub(crate) fn held(&self, now: Instant) -> BTreeMap<u64, Hold> {
        self.nodes.keys().filter_map(|&node| Some((node, self.hold(node, now)?))).collect()
    }

    /// Every node whose short lives in a row still count at `now`, held or not: how many,
    /// and how much longer it is held (zero when it is not). Between holds, an operator sees
    /// what the next failure would bring. Nothing when holds are off.
    pub(crate) fn streaks(&self, now: Instant) -> BTreeMap<u64, (u32, Duration)> {
        if self.first_hold.is_zero() {
            return BTreeMap::new();
        }
        let counting = |lives: &&Lives| {
            lives.strikes > 0
                && lives.back_at.is_some_and(|at| now.saturating_duration_since(at) < FLAP_MEMORY)
        };
        let streak = |(&node, lives): (&u64, &Lives)| {
            let left = self.hold(node, now).map_or(Duration::ZERO, |hold| hold.left);
            (node, (lives.strikes, left))
        };
        self.nodes.iter().filter(|(_, lives)| counting(lives)).map(streak).collect()
    }
}

impl Lives {
    /// Whether a short life stopped on purpose, ended at `now`, goes uncounted: the first
    /// [`STOPS_FORGIVEN`] within [`FLAP_MEMORY`] do.
    fn forgive(&mut self, now: Instant) -> bool {
        if self.forgiven_since.is_none_or(|at| now.saturating_duration_since(at) >= FLAP_MEMORY) {
            (self.forgiven, self.forgiven_since) = (0, Some(now));
        }
        self.forgiven += 1;
        self.forgiven <= STOPS_FORGIVEN
    }

    /// Starts the run of short lives afresh, with no hold.
    fn restart_streak(&mut self) {
        (self.strikes, self.first, self.back_at, self.hold) = (0, None, None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_locator::Labels;

    const S: Duration = Duration::from_secs(1);

    fn record(status: NodeStatus, incarnation: u64) -> NodeRecord {
        NodeRecord {
            addr: "n".into(),
            labels: Labels::new(),
            status,
            incarnation,
            kept_out: false,
            removed_by: None,
        }
    }

    /// Node 4's life `life` begins at `start` and fails `lasted` later, as the applied state
    /// shows it to a node whose life is admitted.
    fn live_then_fail(
        flaps: &mut Flaps,
        life: u64,
        start: Instant,
        lasted: Duration,
    ) -> Vec<(u64, Hold)> {
        let live = record(NodeStatus::Active, life);
        assert!(flaps.watch([(&4, &live)], true, start).is_empty());
        let failed = record(NodeStatus::Failed, life);
        flaps.watch([(&4, &failed)], true, start + lasted)
    }

    #[test]
    fn a_first_short_life_holds_nobody_and_each_after_doubles_the_hold() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        assert_eq!(live_then_fail(&mut flaps, 1, start, S), [], "a first failure: back at once");
        let second = start + 10 * S;
        let held = live_then_fail(&mut flaps, 2, second - S, S);
        assert_eq!(held, [(4, Hold { failures: 2, within: 9 * S, left: 5 * S })]);
        assert_eq!(flaps.hold(4, second + 4 * S).map(|h| h.left), Some(S));
        assert_eq!(flaps.hold(4, second + 5 * S), None, "the hold is over");
        let third = second + 6 * S;
        let held = live_then_fail(&mut flaps, 3, third - S, S);
        assert_eq!(held.iter().map(|(_, h)| h.left).collect::<Vec<_>>(), [10 * S]);
        let fourth = third + 11 * S;
        let held = live_then_fail(&mut flaps, 4, fourth - S, S);
        assert_eq!(
            held.iter().map(|(_, h)| (h.failures, h.left)).collect::<Vec<_>>(),
            [(4, 20 * S)]
        );
        assert_eq!(flaps.held(fourth).keys().copied().collect::<Vec<_>>(), [4]);
        // Once the hold is over, the streak still shows, until the memory has passed.
        let over = fourth + 21 * S;
        assert_eq!(flaps.held(over), BTreeMap::new());
        assert_eq!(flaps.streaks(over)[&4], (4, Duration::ZERO));
        assert_eq!(flaps.streaks(fourth + 20 * S + FLAP_MEMORY), BTreeMap::new());
    }

    #[test]
    fn lives_stopped_on_purpose_are_not_counted_and_do_not_end_a_run() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        // Restarted by an operator twice in a row, each life a few seconds long.
        for life in 1..=2 {
            flaps.stopping(4, life);
            let at = start + (life as u32) * 10 * S;
            assert_eq!(live_then_fail(&mut flaps, life, at, S), [], "life {life} was stopped");
        }
        assert_eq!(flaps.streaks(start + 30 * S), BTreeMap::new(), "nothing counted");
        // A notice for another life does not cover the next one, which fails on its own.
        flaps.stopping(4, 2);
        assert_eq!(live_then_fail(&mut flaps, 3, start + 30 * S, S), []);
        assert_eq!(flaps.streaks(start + 32 * S)[&4].0, 1);
        // A stop between two failures neither counts nor ends their run.
        flaps.stopping(4, 4);
        assert_eq!(live_then_fail(&mut flaps, 4, start + 40 * S, S), [], "stopped: not counted");
        let held = live_then_fail(&mut flaps, 5, start + 50 * S, S);
        assert_eq!(held.iter().map(|(_, h)| h.failures).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_long_life_stopped_on_purpose_still_ends_a_run_and_stops_in_a_loop_count_after_three() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        assert_eq!(live_then_fail(&mut flaps, 1, start, S), [], "one short life counted");
        // Up for 4 minutes, then stopped for an upgrade: the long life ends the run.
        flaps.stopping(4, 2);
        assert_eq!(live_then_fail(&mut flaps, 2, start + 10 * S, 240 * S), []);
        assert_eq!(live_then_fail(&mut flaps, 3, start + 260 * S, S), [], "a first failure again");
        // Then restarted with SIGTERM again and again, each life a second long: the first
        // three stops are forgiven, the fourth counts and, with the failure before, holds.
        for life in 4..=6 {
            flaps.stopping(4, life);
            let at = start + (270 + 10 * life as u32) * S;
            assert_eq!(live_then_fail(&mut flaps, life, at, S), [], "stop {life} forgiven");
        }
        flaps.stopping(4, 7);
        let held = live_then_fail(&mut flaps, 7, start + 350 * S, S);
        assert_eq!(held.iter().map(|(_, h)| h.failures).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_long_life_a_life_begun_unseen_and_a_life_seen_twice_are_not_counted() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        // Up for hours, then restarted twice: the long life does not count.
        assert_eq!(live_then_fail(&mut flaps, 1, start, 3 * SHORT_LIFE), []);
        let later = start + 3 * SHORT_LIFE;
        assert_eq!(live_then_fail(&mut flaps, 2, later, S), [], "the first short life");
        // Seen failed again and again: judged once.
        for t in 2..10 {
            let failed = record(NodeStatus::Failed, 2);
            assert_eq!(flaps.watch([(&4, &failed)], true, later + t * S), []);
        }
        // Lives a restarted process replays before it is admitted: known, never counted.
        let replayed = [record(NodeStatus::Joining, 3), record(NodeStatus::Failed, 3)];
        for r in &replayed {
            assert_eq!(flaps.watch([(&4, r)], false, later + 11 * S), []);
        }
        // A life that began before this node counted, failed once it does: length unknown.
        let unseen = record(NodeStatus::Active, 4);
        assert_eq!(flaps.watch([(&4, &unseen)], false, later + 12 * S), []);
        let failed = record(NodeStatus::Failed, 4);
        assert_eq!(flaps.watch([(&4, &failed)], true, later + 13 * S), []);
        assert_eq!(flaps.held(later + 13 * S), BTreeMap::new());
        let streak = flaps.streaks(later + 13 * S);
        assert_eq!(streak[&4], (1, Duration::ZERO), "one short life counted, not held");
        // A node that left is not counted either.
        let left = record(NodeStatus::Left, 5);
        assert_eq!(flaps.watch([(&4, &left)], true, later + 14 * S), []);
        // The next short life is the second counted.
        assert_eq!(live_then_fail(&mut flaps, 6, later + 20 * S, S).len(), 1);
        // A long life between short ones breaks the run.
        let long = later + 30 * S;
        assert_eq!(live_then_fail(&mut flaps, 7, long, 3 * SHORT_LIFE), []);
        assert_eq!(flaps.streaks(long + 3 * SHORT_LIFE), BTreeMap::new(), "the run is over");
        assert_eq!(live_then_fail(&mut flaps, 8, long + 4 * SHORT_LIFE, S), [], "a first again");
    }

    #[test]
    fn a_hold_set_is_not_cut_short_as_old_failures_are_forgotten_and_is_capped() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        // A life of 3 s after each hold ends, as a node starved for good would live.
        let mut now = start;
        let mut holds = Vec::new();
        for life in 1..=14 {
            let held = live_then_fail(&mut flaps, life, now, 3 * S);
            now += 3 * S;
            if let Some(&(_, hold)) = held.first() {
                // The hold announced is the hold kept, to the end.
                assert_eq!(flaps.hold(4, now + hold.left - S).map(|h| h.left), Some(S));
                assert_eq!(flaps.hold(4, now + hold.left), None);
                holds.push(hold.left);
                now += hold.left;
            }
        }
        let doubling: Vec<Duration> = (0..6).map(|k| 5 * S * (1 << k)).collect();
        assert_eq!(holds[..6], doubling[..], "{holds:?}");
        assert!(holds[6..].iter().all(|&h| h == MAX_HOLD), "at the cap for good: {holds:?}");
        // Up for as long as the memory since it came back: a first offender again.
        let much_later = now + FLAP_MEMORY;
        assert_eq!(live_then_fail(&mut flaps, 15, much_later, S), [], "forgotten");
        let held = live_then_fail(&mut flaps, 16, much_later + 2 * S, S);
        assert_eq!(held.iter().map(|(_, h)| h.left).collect::<Vec<_>>(), [5 * S]);
    }

    #[test]
    fn a_node_unheld_is_held_no_more_and_starts_a_new_streak() {
        let start = Instant::now();
        let mut flaps = Flaps::new(5 * S);
        assert_eq!(flaps.unhold(4, start), (false, false), "nothing to lift");
        live_then_fail(&mut flaps, 1, start, S);
        assert_eq!(flaps.unhold(4, start + S), (false, true), "counted, not held");
        live_then_fail(&mut flaps, 2, start + 2 * S, S);
        assert_eq!(live_then_fail(&mut flaps, 3, start + 4 * S, S).len(), 1, "held");
        assert_eq!(flaps.unhold(4, start + 5 * S), (true, true), "a hold lifted");
        assert_eq!(flaps.unhold(4, start + 5 * S), (false, false), "lifted already");
        assert_eq!(flaps.hold(4, start + 4 * S), None, "the hold is lifted");
        assert_eq!(flaps.streaks(start + 4 * S), BTreeMap::new(), "and the streak forgotten");
        assert_eq!(live_then_fail(&mut flaps, 3, start + 5 * S, S), [], "a first failure again");
    }

    #[test]
    fn a_zero_hold_holds_nobody() {
        let start = Instant::now();
        let mut flaps = Flaps::new(Duration::ZERO);
        for life in 1..=5 {
            assert_eq!(live_then_fail(&mut flaps, life, start + (life as u32) * S, S), []);
        }
        assert_eq!(flaps.streaks(start + 7 * S), BTreeMap::new(), "nothing said of holds");
    }
}
