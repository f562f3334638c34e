//! When a leader says that it hears from no majority of the voters.

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

#[cfg(test)]
mod tests {
    use super::*;

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
