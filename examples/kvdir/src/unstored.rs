//! How often a backup's refusals are said.

use gobelins_locator::NodeId;
use std::time::Duration;
use tokio::time::Instant;

/// Refusals of one backup said again at most this often.
pub(crate) const SAY_EVERY: Duration = Duration::from_secs(10);

/// Copies a backup did not store, said once and then at most every [`SAY_EVERY`] with how many
/// went unsaid: under load every write to a dying backup fails, thousands a second, until the
/// cluster declares it failed, and a line for each buried the one that said what happened.
#[derive(Debug, Default)]
pub(crate) struct Unstored {
    /// The backup last refused by, when it was last said, and the refusals since.
    last: Option<(NodeId, Instant, u64)>,
}

impl Unstored {
    /// Counts a copy `backup` did not store at `now`; `Some(unsaid)` when it is to be said,
    /// with the refusals since it was last said.
    pub(crate) fn refused(&mut self, backup: NodeId, now: Instant) -> Option<u64> {
        match &mut self.last {
            Some((b, said, unsaid)) if *b == backup && now < *said + SAY_EVERY => {
                *unsaid += 1;
                None
            }
            Some((b, said, unsaid)) if *b == backup => {
                let since = std::mem::take(unsaid);
                *said = now;
                Some(since)
            }
            _ => {
                self.last = Some((backup, now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backups_refusals_are_said_once_then_counted_until_the_interval_passes() {
        let mut u = Unstored::default();
        let t = Instant::now();
        let b = NodeId(4);
        assert_eq!(u.refused(b, t), Some(0), "the first is said");
        for i in 1..=500 {
            assert_eq!(u.refused(b, t + Duration::from_millis(i)), None);
        }
        assert_eq!(u.refused(b, t + SAY_EVERY), Some(500), "then the count, once");
        assert_eq!(u.refused(b, t + SAY_EVERY + Duration::from_secs(1)), None);
        // Another backup's refusals are news.
        assert_eq!(u.refused(NodeId(5), t + SAY_EVERY + Duration::from_secs(2)), Some(0));
    }
}
