//! Telling a page never written from a page lost, once its manager died.
//!
//! A manager's entries die with it. Survivors report the copies they hold and the new managers
//! rebuild those pages' entries, but a page nobody reports was either never written or lost
//! with every copy. Without more to go on, the dead manager's slots are tainted: every such
//! page answers `Lost`, never zeros. With backups on, that taint was wrong for nearly every
//! page it covered: a page written lives on two nodes, so after one failure a page nobody
//! reports was never written (the first write to a new segment failed too).
//!
//! So a manager vouches for its slots to its replica holder (the locator's
//! [`gobelins_locator::Snapshot::replica_holder`]) once a change is stable: `Cover`, naming
//! the slots it cannot vouch for, those with an entry whose page may have no copy outside the
//! manager (lost, or owned there with no live backup) or with a taint of their own. Before an
//! entry stops being kept elsewhere, the manager takes its word back (`Uncover`) and waits
//! for the holder to have it. When the manager dies, the holder passes its word on with the
//! survivors' reports, and the new manager of a slot drops the slot's taint only if:
//!
//! - the word is of a stable epoch at or after the last change that could have made it untrue
//!   ([`gobelins_locator::KeptSince`], which the cluster records: a removal of another node,
//!   which takes copies away, or slots moved to the manager, which its word did not look
//!   at), and before the recovery. A join of another node, say, leaves it true: a node killed
//!   as another joined had every slot tainted before (a helper's black-box run, 3 runs of 3),
//!   when only the word of the epoch just before the failure counted. Nor does the manager's
//!   own eviction, which its death cut short (an operator evicting a node that has just
//!   died): requests for its keys are held through it, at the manager and then at their
//!   receivers until the recovery, and what it sends (entries, its page frames, the second
//!   copies it places first) only adds copies elsewhere or moves ownership: it removes none.
//!   A word whose look at the entries overlapped a change's start is not sent (`give_word`
//!   checks after it looked). A cluster that kept no record for the manager (rules older
//!   than protocol 29's) counts only the word of the epoch just before the failure; and
//! - every node of the cluster reported its copies of the slot: a node that died with the
//!   manager, or took no part in the recovery, may have held a page's only other copy.
//!
//! Anything else, and the slot stays tainted as before: the vouch only ever turns a `Lost`
//! that nothing could back into zeros, never the other way.

use crate::protocol::PageEntry;
use gobelins_locator::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// Whether `entry`'s page, should its manager `me` die, still has a copy on a live node that
/// reports it: never written, or owned or backed up by a live node other than `me`.
pub(crate) fn kept_elsewhere(entry: &PageEntry, me: NodeId, gone: impl Fn(NodeId) -> bool) -> bool {
    if entry.lost {
        return false;
    }
    let elsewhere = |n: &NodeId| *n != me && !gone(*n);
    // A grant that took the page from `me` may not have reached its writer yet: until then
    // only the backup keeps the page elsewhere.
    let landed = entry.granted.source().is_none_or(|(n, _)| n != me);
    let owner = entry.owner.filter(|_| landed);
    entry.owner.is_none() || owner.iter().chain(&entry.backup).any(elsewhere)
}

/// What a replica holder keeps of one node's word.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Vouch {
    /// The last message applied: an older one arriving late changes nothing.
    seq: u64,
    /// The epoch vouched at, and the slots left out; `None` once the word is taken back.
    word: Option<(u64, BTreeSet<u32>)>,
}

impl Vouch {
    /// The node vouches, at `epoch`, for every slot it manages but `unclean`.
    pub(crate) fn cover(&mut self, seq: u64, epoch: u64, unclean: Vec<u32>) {
        if seq > self.seq {
            self.seq = seq;
            self.word = Some((epoch, unclean.into_iter().collect()));
        }
    }

    /// The node takes its word back.
    pub(crate) fn uncover(&mut self, seq: u64) {
        if seq > self.seq {
            self.seq = seq;
            self.word = None;
        }
    }

    /// The last message applied, and the epoch it vouched for `slot` at, if it did.
    pub(crate) fn covers(&self, slot: u32) -> (u64, Option<u64>) {
        let word = self.word.as_ref().filter(|(_, unclean)| !unclean.contains(&slot));
        (self.seq, word.map(|&(e, _)| e))
    }
}

/// For each key, what the latest of a dead manager's words that its holders pass on says:
/// the epoch it vouched at, or `None` if it left the slot out or was taken back. A manager
/// gives each word to its holder of the moment and takes it back only there: an earlier
/// holder may still keep an older word, which counted, after the manager took back its
/// newer one, for a page that then had no copy elsewhere (a helper's review).
pub(crate) fn newest<K: Ord>(
    words: impl IntoIterator<Item = (K, u64, Option<u64>)>,
) -> BTreeMap<K, Option<u64>> {
    let mut newest: BTreeMap<K, (u64, Option<u64>)> = BTreeMap::new();
    for (key, seq, epoch) in words {
        let kept = newest.entry(key).or_insert((seq, epoch));
        // Two words of one seq cannot be (each goes to one holder); should they, the one
        // that vouches for less counts.
        if seq > kept.0 || (seq == kept.0 && epoch.is_none()) {
            *kept = (seq, epoch);
        }
    }
    newest.into_iter().map(|(key, (_, epoch))| (key, epoch)).collect()
}

/// Whether a dead manager's word, given at `word`, lets its slot's taint go in the recovery
/// to `epoch`: it is of `since` or later (`ChangeInfo::failed_kept_since`; without it, of the
/// epoch just before) and before `epoch`; and every node of `cluster` has `acked`, that is,
/// reported every copy it holds.
pub(crate) fn vouches(
    word: u64,
    epoch: u64,
    since: Option<u64>,
    cluster: &[NodeId],
    acked: &BTreeSet<NodeId>,
) -> bool {
    // A peer's word may name any epoch.
    let since = since.unwrap_or(epoch.saturating_sub(1));
    (since..epoch).contains(&word)
        && !cluster.is_empty()
        && cluster.iter().all(|n| acked.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Granted;

    fn n(id: u64) -> NodeId {
        NodeId(id)
    }

    fn entry(owner: Option<u64>, backup: Option<u64>, lost: bool) -> PageEntry {
        PageEntry {
            owner: owner.map(n),
            copyset: owner.map(n).into_iter().collect(),
            version: 3,
            backup: backup.map(n),
            lost,
            strays: false,
            granted: Granted::Unknown,
        }
    }

    #[test]
    fn a_page_is_kept_elsewhere_only_on_a_live_node_other_than_its_manager() {
        let me = n(1);
        let alive = |_| false;
        assert!(kept_elsewhere(&entry(None, None, false), me, alive), "never written");
        assert!(kept_elsewhere(&entry(Some(2), None, false), me, alive), "owned elsewhere");
        assert!(kept_elsewhere(&entry(Some(1), Some(2), false), me, alive), "backed up elsewhere");
        assert!(!kept_elsewhere(&entry(Some(1), None, false), me, alive), "only here");
        assert!(!kept_elsewhere(&entry(Some(1), Some(1), false), me, alive), "its own backup");
        assert!(!kept_elsewhere(&entry(None, None, true), me, alive), "lost");
        let two_gone = |x| x == n(2);
        assert!(!kept_elsewhere(&entry(Some(1), Some(2), false), me, two_gone), "backup gone");
        assert!(!kept_elsewhere(&entry(Some(2), None, false), me, two_gone), "owner gone");
        assert!(kept_elsewhere(&entry(Some(2), Some(3), false), me, two_gone), "its backup lives");
    }

    /// A grant that took the page from the manager's node may not have reached its writer:
    /// until it is settled, only a backup elsewhere keeps the page. Counted kept by its new
    /// owner, a manager that died before the grant arrived took the page's only copies with
    /// it, and its word had the page read as zeros.
    #[test]
    fn a_page_granted_from_its_manager_is_kept_by_its_backup_until_the_grant_lands() {
        let me = n(1);
        let alive = |_| false;
        let from_me = |backup| PageEntry {
            granted: Granted::From { node: me, label: 2 },
            ..entry(Some(2), backup, false)
        };
        assert!(!kept_elsewhere(&from_me(None), me, alive), "the writer may not hold it yet");
        assert!(!kept_elsewhere(&from_me(Some(1)), me, alive), "backed up here too");
        assert!(kept_elsewhere(&from_me(Some(3)), me, alive), "backed up elsewhere");
        let from_another = PageEntry {
            granted: Granted::From { node: n(3), label: 2 },
            ..entry(Some(2), None, false)
        };
        assert!(kept_elsewhere(&from_another, me, alive), "a copy aside on node 3 at worst");
    }

    #[test]
    fn a_word_taken_back_stays_taken_back_whatever_arrives_late() {
        let mut v = Vouch::default();
        v.cover(1, 7, vec![4]);
        assert_eq!((v.covers(3), v.covers(4)), ((1, Some(7)), (1, None)), "slot 4 left out");
        v.uncover(2);
        assert_eq!(v.covers(3), (2, None));
        v.cover(1, 7, vec![]);
        assert_eq!(v.covers(3), (2, None), "an older word arriving late");
        v.cover(3, 8, vec![]);
        assert_eq!(v.covers(4), (3, Some(8)));
    }

    /// The manager's holder changed (a joiner became it): the earlier holder keeps the word of
    /// before, the new one has the later word, which leaves the slot out or was taken back.
    /// The later counts, whichever holder's batch arrives first.
    #[test]
    fn the_latest_word_counts_not_an_earlier_holder_s_older_one() {
        let (old, new) = ((5, Some(6)), (7, None));
        for words in [[old, new], [new, old]] {
            let passed = words.map(|(seq, epoch)| ("slot", seq, epoch));
            assert_eq!(newest(passed)["slot"], None);
        }
        let passed = [("a", 5, Some(6)), ("b", 5, None), ("a", 4, None), ("b", 3, Some(2))];
        let latest = newest(passed);
        assert_eq!((latest["a"], latest["b"]), (Some(6), None));
        for tie in [[(5, Some(6)), (5, None)], [(5, None), (5, Some(6))]] {
            let passed = tie.map(|(seq, epoch)| ("slot", seq, epoch));
            assert_eq!(newest(passed)["slot"], None, "a tie vouches for less");
        }
    }

    #[test]
    fn a_slot_is_vouched_for_only_by_a_word_since_the_record_and_every_node_reporting() {
        let cluster = [n(1), n(2), n(4)];
        let all: BTreeSet<NodeId> = cluster.into_iter().collect();
        assert!(vouches(6, 7, Some(6), &cluster, &all));
        assert!(vouches(6, 9, Some(5), &cluster, &all), "changes since that leave it true");
        assert!(!vouches(5, 9, Some(6), &cluster, &all), "a change since that may not");
        assert!(!vouches(9, 9, Some(6), &cluster, &all), "not before the recovery");
        assert!(!vouches(10, 9, Some(6), &cluster, &all), "a word of a later epoch");
        let silent: BTreeSet<NodeId> = [n(1), n(2)].into();
        assert!(!vouches(6, 7, Some(6), &cluster, &silent), "node 4 did not report");
        assert!(!vouches(6, 7, Some(6), &[], &all), "no cluster known");
    }

    /// A cluster under older rules records nothing: only the word just before counts.
    #[test]
    fn without_a_record_only_the_word_of_the_epoch_just_before_counts() {
        let cluster = [n(1), n(2), n(4)];
        let all: BTreeSet<NodeId> = cluster.into_iter().collect();
        assert!(vouches(6, 7, None, &cluster, &all));
        assert!(!vouches(6, 8, None, &cluster, &all), "a change in between");
        assert!(!vouches(6, 6, None, &cluster, &all));
        assert!(!vouches(u64::MAX, 0, None, &cluster, &all), "no epoch follows the last");
    }
}
