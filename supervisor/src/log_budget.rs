//! How many lines a noisy kind of event may log: connections refused before they proved the
//! cluster secret come from anyone who can reach the port, and one line each let a flood of
//! them fill the disk the raft store shares (330,000 lines in 25 s, in an audit).

use std::time::Duration;
use tokio::time::Instant;

/// A window's worth of lines, then silence counted until the next window.
#[derive(Debug)]
pub(crate) struct LogBudget {
    window: Duration,
    per_window: u32,
    started: Option<Instant>,
    used: u32,
    skipped: u64,
}

/// What to log for one event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Take {
    /// Whether this event's line is logged.
    pub(crate) log: bool,
    /// Lines not logged in the window that just ended, to be said in one line now.
    pub(crate) skipped: u64,
}

impl LogBudget {
    /// `per_window` lines every `window`.
    pub(crate) fn new(window: Duration, per_window: u32) -> Self {
        LogBudget { window, per_window, started: None, used: 0, skipped: 0 }
    }

    /// An event at `now`.
    pub(crate) fn take(&mut self, now: Instant) -> Take {
        let mut ended = 0;
        if self.started.is_none_or(|started| now.duration_since(started) >= self.window) {
            ended = std::mem::take(&mut self.skipped);
            self.started = Some(now);
            self.used = 0;
        }
        if self.used < self.per_window {
            self.used += 1;
            return Take { log: true, skipped: ended };
        }
        self.skipped += 1;
        Take { log: false, skipped: ended }
    }

    /// The window's length, for the line that counts what was skipped.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_logs_its_lines_then_counts_the_rest_and_the_next_one_says_how_many() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut budget = LogBudget::new(Duration::from_secs(10), 2);
        let logged = |log| Take { log, skipped: 0 };
        assert_eq!(budget.take(at(0)), logged(true));
        assert_eq!(budget.take(at(1)), logged(true));
        for ms in 2..1000 {
            assert_eq!(budget.take(at(ms)), logged(false), "at {ms} ms");
        }
        assert_eq!(budget.take(at(10_000)), Take { log: true, skipped: 998 });
        assert_eq!(budget.take(at(10_001)), logged(true));
        assert_eq!(budget.take(at(10_002)), logged(false));
        // A quiet window says nothing was skipped in it.
        assert_eq!(budget.take(at(20_000)), Take { log: true, skipped: 1 });
        assert_eq!(budget.take(at(40_000)), logged(true));
    }
}
