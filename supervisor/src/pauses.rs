//! Noticing that this process itself was not running.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Watches how late the ticks of a periodic task wake. A tick that wakes much later than it
/// was due means this process was not running: stopped by a signal, its virtual machine
/// paused, starved of CPU. What it measured of the others across such a gap (how long each was
/// silent, how long ago a quorum acknowledged it) says nothing about them.
#[derive(Debug)]
pub(crate) struct Pauses {
    limit: Duration,
    /// When the last tick that woke on time did.
    on_time: Mutex<Option<Instant>>,
}

impl Pauses {
    /// A watcher that counts a tick woken more than `limit` late as the end of a pause.
    pub(crate) fn new(limit: Duration) -> Self {
        Pauses { limit, on_time: Mutex::new(None) }
    }

    /// Notes a tick due at `due` that woke at `now`: how late it woke, when that makes it the
    /// end of a pause. Measured from when it was due, not from the last tick: two ticks a
    /// period apart, each woken a little late, are not a pause.
    pub(crate) fn tick(&self, due: Instant, now: Instant) -> Option<Duration> {
        let late = now.saturating_duration_since(due);
        if late > self.limit {
            return Some(late);
        }
        *self.on_time.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        None
    }

    /// Whether a tick woke on time within `within` of `now`: a process just back from a pause
    /// has not ticked on time since, whatever ran first when it resumed.
    pub(crate) fn ticked_on_time(&self, within: Duration, now: Instant) -> bool {
        let on_time = *self.on_time.lock().unwrap_or_else(|p| p.into_inner());
        on_time.is_some_and(|at| now.saturating_duration_since(at) <= within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tick_woken_later_than_the_limit_ends_a_pause() {
        let start = Instant::now();
        let period = Duration::from_millis(200);
        let pauses = Pauses::new(Duration::from_millis(200));
        let within = period * 2;
        assert!(!pauses.ticked_on_time(within, start), "no tick yet");
        let mut due = start;
        for _ in 0..10 {
            // Each a little late, by more every time: still on time.
            due += period;
            assert_eq!(pauses.tick(due, due + Duration::from_millis(150)), None);
        }
        assert!(pauses.ticked_on_time(within, due + period));
        due += period;
        let woke = due + Duration::from_secs(13);
        assert_eq!(pauses.tick(due, woke), Some(Duration::from_secs(13)), "stopped for 13 s");
        assert!(!pauses.ticked_on_time(within, woke), "not since the pause");
        let due = woke + period;
        assert_eq!(pauses.tick(due, due), None, "the next tick, on time");
        assert!(pauses.ticked_on_time(within, due));
    }
}
