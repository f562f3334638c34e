//! A deadline kept as a start and a length, summed only when something waits for it.

use std::time::Duration;
use tokio::time::Instant;

/// When a wait must end: `from + wait`. Most requests never wait, and the sum of an instant
/// and a length costs about what reading the clock does; a request and its manager each
/// needed one or two of them before a wait could need any.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    from: Instant,
    wait: Duration,
}

impl Deadline {
    /// `wait` from `from`.
    pub(crate) fn new(from: Instant, wait: Duration) -> Self {
        Deadline { from, wait }
    }

    /// When it started.
    pub(crate) fn from(self) -> Instant {
        self.from
    }

    /// Its length from its start.
    pub(crate) fn wait(self) -> Duration {
        self.wait
    }

    /// The instant it falls on.
    pub(crate) fn at(self) -> Instant {
        self.from + self.wait
    }

    /// What is left of it at `now` (nothing once it has passed).
    pub(crate) fn left(self, now: Instant) -> Duration {
        self.wait.saturating_sub(now.saturating_duration_since(self.from))
    }

    /// Whether it has passed at `now`.
    pub(crate) fn passed(self, now: Instant) -> bool {
        self.left(now).is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_falls_at_its_start_plus_its_length_and_leaves_the_difference() {
        let from = Instant::now();
        let deadline = Deadline::new(from, Duration::from_millis(300));
        assert_eq!(deadline.at(), from + Duration::from_millis(300));
        assert_eq!(deadline.left(from + Duration::from_millis(100)), Duration::from_millis(200));
        assert!(!deadline.passed(from + Duration::from_millis(299)));
        assert!(deadline.passed(from + Duration::from_millis(300)));
        assert_eq!(deadline.left(from + Duration::from_secs(5)), Duration::ZERO, "never below 0");
        assert_eq!(deadline.left(from), Duration::from_millis(300), "a start not yet reached");
    }
}
