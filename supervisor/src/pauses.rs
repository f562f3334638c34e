//! Noticing that this process itself was not running.

use std::time::Duration;
use tokio::time::Instant;

/// Watches the gaps between the ticks of a periodic task. A gap much longer than its period
/// means this process was not running: stopped by a signal, its virtual machine paused, starved
/// of CPU. What it measured of the others across such a gap (how long each was silent, how
/// long ago a quorum acknowledged it) says nothing about them.
#[derive(Debug)]
pub(crate) struct Pauses {
    limit: Duration,
    last: Option<Instant>,
}

impl Pauses {
    /// A watcher that counts a gap longer than `limit` as a pause.
    pub(crate) fn new(limit: Duration) -> Self {
        Pauses { limit, last: None }
    }

    /// Notes a tick at `now`: the gap since the last one, when it was a pause.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<Duration> {
        let gap = self.last.replace(now).map(|last| now.saturating_duration_since(last));
        gap.filter(|&gap| gap > self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gap_longer_than_the_limit_is_a_pause() {
        let start = Instant::now();
        let mut pauses = Pauses::new(Duration::from_millis(500));
        assert_eq!(pauses.tick(start), None, "the first tick has nothing to compare with");
        let mut at = start;
        for _ in 0..10 {
            at += Duration::from_millis(200);
            assert_eq!(pauses.tick(at), None, "a tick on time");
        }
        at += Duration::from_millis(500);
        assert_eq!(pauses.tick(at), None, "late, but no more than the limit");
        at += Duration::from_secs(13);
        assert_eq!(pauses.tick(at), Some(Duration::from_secs(13)), "stopped for 13 s");
        at += Duration::from_millis(200);
        assert_eq!(pauses.tick(at), None, "the gap after a pause is measured from it");
    }
}
