//! The DSM's one error type.

use crate::page::PageId;
use gobelins_adaptation::AdaptationError;

/// Why a DSM operation failed. None of them leaves a page half written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsmError {
    /// Every copy of the page died with the nodes that held it, or its manager died and no
    /// survivor holds a copy, so that nobody can tell whether it was ever written (a page of
    /// a segment first used after the failure, say). Its contents are never replaced by zeros
    /// on their own: [`crate::Dsm::discard`] starts the page afresh, [`crate::Dsm::free`] its
    /// whole segment.
    #[error("page {} of segment {} is lost: every node holding a copy failed, or its manager failed and no surviving copy tells whether it was ever written. Decide what the program needs, then discard the page (`gobelins dsm discard {1} {0}`, or `Dsm::discard`) or free its segment (`gobelins dsm free`, `Dsm::free`) to start afresh from zeros (with backups on, one failure while no other change is under way loses no written page; `gobelins dsm lost` lists the pages known lost, cluster-wide, and `gobelins dsm forgive {1} {0}` lets the pages of its slot, tainted by its manager's failure, read as zeros again)", .page.page, .page.segment)]
    Lost {
        /// The page.
        page: PageId,
    },
    /// A page of a segment id past [`crate::MAX_SEGMENT`]: its key would name another
    /// segment's page.
    #[error("segment {} does not exist: segment ids go up to {max}", .page.segment, max = crate::MAX_SEGMENT)]
    NoSuchSegment {
        /// The page.
        page: PageId,
    },
    /// An access outside the segment, or past what a segment can hold
    /// ([`crate::MAX_SEGMENT_LEN`]).
    #[error("{}", outside(*.segment, *.offset, *.end, *.len))]
    OutOfRange {
        /// The segment.
        segment: u32,
        /// Where the access began.
        offset: u64,
        /// Where it ended.
        end: u64,
        /// The segment's length.
        len: u64,
    },
    /// The page's manager could not finish in time: the node holding the page stayed
    /// unreachable. Nothing changed; the access can be retried.
    #[error("{page}: its holder did not answer within {waited_ms} ms")]
    Stuck {
        /// The page.
        page: PageId,
        /// How long the access tried.
        waited_ms: u64,
    },
    /// A barrier or a lock waited past [`crate::DsmConfig::wait_deadline`]: the other nodes
    /// did not all arrive, or the holder did not let go. A barrier may be called again: it
    /// waits for the same passage.
    #[error("{what} waited {waited_ms} ms, past the wait deadline (DsmConfig::wait_deadline)")]
    WaitedTooLong {
        /// The barrier or lock, named.
        what: String,
        /// How long it waited.
        waited_ms: u64,
    },
    /// The adaptation layer could not deliver a request.
    #[error(transparent)]
    Adaptation(#[from] AdaptationError),
    /// This node is being evicted, or was: a write now could not be handed over with its
    /// pages, and a copy it reads may be older than one it read before. Its programs must stop
    /// using shared memory before it leaves. A range access may have done its first pages.
    #[error("this node is leaving the cluster: shared memory can no longer be read or written through it (use another node; a multi-page write may have written its first pages)")]
    Leaving,
    /// The page's manager does not count this node as a member: the cluster declared it
    /// failed (cut off by the network, or stopped, a while), and it has yet to rejoin as a new
    /// life. Nothing was written; the access can be made again once the node is active.
    #[error("{page}: this node is not a member of the cluster now: the cluster declared it failed (cut off or stopped for a while) and it rejoins as a new life. Nothing was written; try again once `gobelins status` shows it active, or use another node")]
    NotMember {
        /// The page.
        page: PageId,
    },
    /// The page was given to another node while this one wrote it: the cluster declared this
    /// node failed meanwhile (cut off, or stopped) and rebuilt the page from its copies. The
    /// write was discarded; no other node saw it.
    #[error("{page}: this node no longer owns the page: the cluster declared it failed while it wrote (cut off or stopped for a while) and rebuilt the page elsewhere. This write was discarded and no other node saw it: write again")]
    Disowned {
        /// The page.
        page: PageId,
    },
    /// This node's lease ran out before the write was published: cut off from the cluster's
    /// leader (or stopped a while), it may be declared failed and the page rebuilt elsewhere
    /// from what the others hold. The write was discarded; no other node saw it.
    #[error("{page}: this node lost touch with the cluster's leader before the write was published (its lease ran out: cut off, or stopped a while), and the cluster may be rebuilding the page elsewhere. The write was discarded and no other node saw it: write again once `gobelins status` shows the node active")]
    NoLease {
        /// The page.
        page: PageId,
    },
    /// The life of this node the handle was taken in has ended: the cluster declared the node
    /// failed while it ran (cut off, or stopped a while), and it started afresh as a new life.
    /// The handle's copies are that old life's, which the cluster has given up on, so it is
    /// refused everything from then on. A write under way may have taken effect or not: its
    /// commit may have reached the page's backup, from which the cluster rebuilt the page,
    /// before the life ended (an audit pausing nodes saw one that had). Also what a handle is
    /// told once its host has shut down.
    #[error("this node's life in the cluster ended while the access was under way: the cluster declared it failed (cut off or stopped a while) and it rejoins as a new life, or its agent is stopping. A write under way may or may not have taken effect (its changes may have reached the page's backup before the life ended), and a multi-page write may have done its first pages: read the pages through the new life before writing them again (`gobelins dsm` takes the new life with each command; a program takes a new `Dsm` from the new life's `DsmNode`)")]
    LifeEnded,
    /// A peer answered something this version does not expect.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// [`DsmError::OutOfRange`]'s text: a segment made as long as it can be (the console's) is said
/// to have no more room, not to be of 17592186044416 bytes, a length nobody gave.
fn outside(segment: u32, offset: u64, end: u64, len: u64) -> String {
    if len == crate::MAX_SEGMENT_LEN {
        format!("bytes {offset}..{end} reach past the 16 TiB (2^44 bytes) a segment can hold (segment {segment})")
    } else {
        format!("bytes {offset}..{end} are outside segment {segment} of {len} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_page_is_named_as_an_operator_types_it_with_the_command_that_starts_it_afresh() {
        let said = DsmError::Lost { page: PageId { segment: 7, page: 3 } }.to_string();
        assert!(said.starts_with("page 3 of segment 7 is lost"), "{said}");
        assert!(said.contains("`gobelins dsm discard 7 3`"), "{said}");
        // And so in every other message, and in the log's lines: not in Rust's debug form.
        let stuck = DsmError::Stuck { page: PageId { segment: 7, page: 3 }, waited_ms: 5 };
        assert!(stuck.to_string().starts_with("segment 7 page 3: its holder"), "{stuck}");
    }

    /// The console's segments are as long as a segment can be: past that, the refusal names
    /// the limit, not a segment length nobody gave (a helper's run).
    #[test]
    fn an_access_past_what_a_segment_holds_names_the_limit() {
        let at = |len| DsmError::OutOfRange { segment: 5, offset: 7, end: u64::MAX, len };
        let past = at(crate::MAX_SEGMENT_LEN).to_string();
        assert!(past.contains("past the 16 TiB (2^44 bytes) a segment can hold"), "{past}");
        assert!(!past.contains(&crate::MAX_SEGMENT_LEN.to_string()), "{past}");
        let outside = at(8192).to_string();
        assert!(outside.ends_with("outside segment 5 of 8192 bytes"), "{outside}");
    }
}
