//! When a leader says that it hears from no majority of the voters, and a voter that it hears
//! from no leader.

use std::time::Duration;
use tokio::time::Instant;

/// The loss of a majority said again at most this often while it lasts.
pub(crate) const SAY_EVERY: Duration = Duration::from_secs(30);

/// Whether a leader's loss of its majority has been said, and when. Without a majority
/// nothing commits: no join, leave or eviction, and no failure is recovered. Raft's own log
/// says only that each follower is unreachable, several times a second; this says what it
/// means, once and then every [`SAY_EVERY`], and says so again when it ends.
#[derive(Debug, Default)]
pub(crate) struct QuorumWatch {
    said_at: Option<Instant>,
}

impl QuorumWatch {
    /// The majority is still lost at `now`: whether to say so now.
    pub(crate) fn lost(&mut self, now: Instant) -> bool {
        if self.said_at.is_some_and(|at| now < at + SAY_EVERY) {
            return false;
        }
        self.said_at = Some(now);
        true
    }

    /// The leader hears from a majority again (or leads no more): whether its loss was said,
    /// so that its end is said too.
    pub(crate) fn back(&mut self) -> bool {
        self.said_at.take().is_some()
    }
}

/// How many of raft's longest election timeouts a voter may go without a leader before it says
/// so: an election lost to a split vote, or one held after a leader died, is ordinary.
const ELECTIONS: u32 = 5;

/// How long a voter whose elections run at least `election` (raft's lower bound) may know no
/// leader before it says so.
pub(crate) fn leaderless_after(election: Duration) -> Duration {
    election * 2 * ELECTIONS
}

/// Since when a voter has known no leader. A voter cut off from the others, or left with a
/// minority of them, calls elections it cannot win for as long as that lasts: raft logs each
/// unanswered call for votes (ours are filtered out of the default log), and none of them says
/// what it means for the node.
#[derive(Debug, Default)]
pub(crate) struct Leaderless {
    since: Option<Instant>,
}

impl Leaderless {
    /// Takes in whether this node is a voter that knows no leader at `now`; while it is, for
    /// how long it has been.
    pub(crate) fn observe(&mut self, leaderless: bool, now: Instant) -> Option<Duration> {
        if !leaderless {
            self.since = None;
            return None;
        }
        Some(now - *self.since.get_or_insert(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_without_a_leader_counts_from_when_it_first_had_none() {
        let mut l = Leaderless::default();
        let t = Instant::now();
        assert_eq!(l.observe(false, t), None);
        assert_eq!(l.observe(true, t + Duration::from_secs(1)), Some(Duration::ZERO));
        assert_eq!(l.observe(true, t + Duration::from_secs(4)), Some(Duration::from_secs(3)));
        assert_eq!(l.observe(false, t + Duration::from_secs(5)), None);
        assert_eq!(l.observe(true, t + Duration::from_secs(6)), Some(Duration::ZERO), "afresh");
        assert_eq!(leaderless_after(Duration::from_millis(500)), Duration::from_secs(5));
    }

    #[test]
    fn a_lost_majority_is_said_at_once_then_every_interval_and_its_end_once() {
        let mut q = QuorumWatch::default();
        assert!(!q.back(), "nothing was said");
        let t = Instant::now();
        assert!(q.lost(t));
        assert!(!q.lost(t + Duration::from_secs(1)));
        assert!(!q.lost(t + SAY_EVERY - Duration::from_millis(1)));
        assert!(q.lost(t + SAY_EVERY));
        assert!(q.back());
        assert!(!q.back(), "its end said once");
    }
}
