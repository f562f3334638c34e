//! How many lines a noisy kind of event may log. Connections refused before they proved the
//! cluster secret come from anyone who can reach the port, and one line each let a flood of
//! them fill the disk the raft store shares (330,000 lines in 25 s, in an audit); messages a
//! peer of another build sends cannot be decoded, one after another. A service whose handler
//! logs what a peer sent it can use it too.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A window's worth of lines, then silence counted until the next window.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    per_window: u32,
    started: Option<Instant>,
    used: u32,
    skipped: u64,
}

/// What to log for one event.
#[derive(Debug, PartialEq, Eq)]
pub struct Take {
    /// Whether this event's line is logged.
    pub log: bool,
    /// Lines not logged in the window that just ended, to be said in one line now.
    pub skipped: u64,
}

impl LogBudget {
    /// `per_window` lines every `window`.
    pub fn new(window: Duration, per_window: u32) -> Self {
        LogBudget { window, per_window, started: None, used: 0, skipped: 0 }
    }

    /// An event at `now`.
    pub fn take(&mut self, now: Instant) -> Take {
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

    /// Lines left out in a window that has ended by `now`, taken: to be said without waiting
    /// for the next event, which may never come (a flood that stopped).
    pub fn ended(&mut self, now: Instant) -> u64 {
        match self.started {
            Some(started) if now.duration_since(started) >= self.window && self.skipped > 0 => {
                self.started = None;
                std::mem::take(&mut self.skipped)
            }
            _ => 0,
        }
    }

    /// The window's length, for the line that counts what was skipped.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// Logs one event of a kind with `log` while `budget` lasts, first saying how many lines of
/// `what` the window before left out.
pub fn budgeted(budget: &Mutex<LogBudget>, what: &str, log: impl FnOnce()) {
    let (take, window, per_window) = {
        let mut budget = budget.lock().unwrap_or_else(|p| p.into_inner());
        (budget.take(Instant::now()), budget.window(), budget.per_window)
    };
    if take.skipped > 0 {
        tracing::warn!(
            skipped = take.skipped,
            "{} more lines of {what} were not logged, since the lines before this one (at most {} every {} s)",
            take.skipped,
            per_window,
            window.as_secs()
        );
    }
    if take.log {
        log();
    }
}

/// Says how many lines of `what` a window that has ended left out, if any: called now and
/// then, so that the count of a flood's last window is not left for an event that may never
/// come.
pub fn say_ended(budget: &Mutex<LogBudget>, what: &str) {
    let (skipped, window) = {
        let mut budget = budget.lock().unwrap_or_else(|p| p.into_inner());
        (budget.ended(Instant::now()), budget.window())
    };
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "{skipped} more lines of {what} were not logged in the last {} s",
            window.as_secs()
        );
    }
}

/// The budget for a kind of line an event repeated several times a second may log (messages
/// from authenticated peers that could not be decoded, rejoins asked again): 5 lines every
/// 10 s.
pub fn noisy() -> Mutex<LogBudget> {
    Mutex::new(LogBudget::new(Duration::from_secs(10), 5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_window_left_out_is_told_once_it_ends_without_another_event() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut budget = LogBudget::new(Duration::from_secs(10), 1);
        assert_eq!(budget.ended(at(0)), 0, "no window yet");
        budget.take(at(0));
        budget.take(at(1));
        budget.take(at(2));
        assert_eq!(budget.ended(at(9_999)), 0, "the window runs on");
        assert_eq!(budget.ended(at(10_000)), 2);
        assert_eq!(budget.ended(at(20_000)), 0, "told once");
        assert_eq!(budget.take(at(20_001)), Take { log: true, skipped: 0 });
    }

    #[test]
    fn budgeted_logs_a_window_s_worth_and_no_more() {
        let budget = Mutex::new(LogBudget::new(Duration::from_secs(3600), 2));
        let mut logged = 0;
        for _ in 0..10 {
            budgeted(&budget, "test lines", || logged += 1);
        }
        assert_eq!(logged, 2);
        assert_eq!(budget.lock().unwrap().skipped, 8);
    }

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
