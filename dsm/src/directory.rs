//! The manager's pure decisions about a page entry: repairing it when nodes leave, and
//! rebuilding it from survivors' copies when its manager died.

use crate::protocol::{Granted, PageEntry};
use gobelins_locator::NodeId;
use serde::{Deserialize, Serialize};

/// One survivor's copy of a page whose manager died, as `scan` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The survivor.
    pub(crate) holder: NodeId,
    /// Its copy's version.
    pub(crate) version: u64,
    /// It owned the page.
    pub(crate) owned: bool,
    /// The copy is a backup (kept for an owner), not a read copy.
    pub(crate) backup: bool,
    /// For a backup, which of its owner's commits at `version` it holds: the newest wins a
    /// rebuild.
    pub(crate) commit: u64,
    /// A copy given up to a writer and kept aside, not a backup.
    pub(crate) retired: bool,
    /// For a copy given up to a writer and kept aside: that writer, if known. Should it be
    /// gone too, it may have written since, and the copy is not offered as the page.
    pub(crate) writer: Option<NodeId>,
    /// For a copy given up to a writer and kept aside: the node the writer's backup was to be
    /// kept on, if known. The writer's first commit went there (see [`rebuild`]).
    pub(crate) backup_to: Option<NodeId>,
    /// A digest of the copy's content: two backups of one version that disagree mean one of
    /// them is stale (see [`rebuild`]).
    pub(crate) digest: u64,
}

/// The digest a [`Report`] carries of its copy's content.
pub(crate) fn digest(data: &[u8]) -> u64 {
    use sha2::Digest as _;
    let sum = sha2::Sha256::digest(data);
    u64::from_le_bytes(sum[..8].try_into().expect("a SHA-256 sum is 32 bytes"))
}

/// Mends `entry` after nodes left. `gone` nodes (failed, or no longer in the cluster) hold no
/// copy; a `failed` owner gives the page to a reader holding the current version, else to its
/// backup, else the page is lost. An owner that left gracefully is not failed: it hands its
/// pages over before it goes. A failed owner takes with it the list of readers it served
/// directly, so the entry is marked as having strays. Returns whether anything changed.
pub(crate) fn repair(
    entry: &mut PageEntry,
    gone: impl Fn(NodeId) -> bool,
    failed: impl Fn(NodeId) -> bool,
) -> bool {
    let before = entry.clone();
    entry.copyset.retain(|&n| !gone(n));
    if entry.backup.is_some_and(&gone) {
        entry.backup = None;
    }
    if let Some(owner) = entry.owner.filter(|&o| failed(o)) {
        entry.strays = true;
        // The page's content is now wherever it is taken from below, not where the last grant
        // took it from.
        entry.granted = Granted::Unknown;
        // Readers exist only while the owner shares, and then they hold exactly its version.
        if let Some(&reader) = entry.copyset.iter().find(|&&n| n != owner) {
            entry.owner = Some(reader);
        } else if let Some(backup) = entry.backup {
            entry.owner = Some(backup);
            entry.copyset = [backup].into();
            entry.backup = None;
        } else {
            entry.owner = None;
            entry.copyset.clear();
            entry.lost = true;
        }
    }
    *entry != before
}

/// The entry of a page whose manager died, from the copies survivors hold. The newest version
/// wins: a write grant invalidates every older copy first, so an older copy that survived is
/// only ever a leftover that the newest one supersedes. Whoever owned it may have died too,
/// with the list of readers it served directly, so the entry is marked as having strays.
/// `None` when nobody holds anything.
///
/// An owner commits many times at one version, each time to its backup. When a backup does not
/// answer, the commit goes to another, and the first may keep an older commit under the same
/// version: of the backups, only those holding the latest commit count. Should two of those
/// still disagree, with no other copy of that version left, they cannot be told apart: the
/// page is reported lost rather than rebuilt from what may be a stale one.
///
/// A copy given up to a writer that is `gone` too says nothing of what that writer wrote
/// since: its writes died with it, unless they reached a backup, and every one of them did
/// before it returned, under a newer version. So such a copy is never offered as the page, and
/// without a newer copy, or a backup (whatever its commit stamp: a backup placed after a
/// promotion or a hand-over is stamped final) of at least its version to vouch that the writer
/// committed nothing, the page is lost rather than rolled back. Unless the node chosen for
/// the writer's backup, `backup_to`, reported in this recovery (the caller keeps it only for a
/// node that did) and is not `gone`: the writer's first commit goes there, so nothing newer
/// from it means the writer committed nothing (a manager writing a page it manages, dead
/// before the grant). A commit that could not reach that node went to another, which reports
/// it too unless it died as well, a second failure.
pub(crate) fn rebuild(reports: &[Report], gone: impl Fn(NodeId) -> bool) -> Option<PageEntry> {
    let doubtful =
        |r: &Report| r.retired && r.writer.is_some_and(&gone) && r.backup_to.is_none_or(&gone);
    let doubt = reports.iter().filter(|r| doubtful(r)).map(|r| r.version).max();
    let reports: Vec<Report> = reports.iter().filter(|r| !doubtful(r)).copied().collect();
    if let Some(given) = doubt {
        let vouched = reports
            .iter()
            .any(|r| r.version > given || (r.backup && !r.retired && r.version >= given));
        if !vouched {
            return Some(PageEntry {
                version: given,
                lost: true,
                strays: true,
                ..PageEntry::default()
            });
        }
    }
    let version = reports.iter().map(|r| r.version).max()?;
    let current: Vec<&Report> = reports.iter().filter(|r| r.version == version).collect();
    let copies: Vec<NodeId> = current.iter().filter(|r| !r.backup).map(|r| r.holder).collect();
    let latest = current.iter().filter(|r| r.backup).map(|r| r.commit).max();
    let newest: Vec<&Report> =
        current.iter().copied().filter(|r| r.backup && Some(r.commit) == latest).collect();
    let mut digests = newest.iter().map(|r| r.digest);
    let first = digests.next();
    if copies.is_empty() && digests.any(|d| Some(d) != first) {
        return Some(PageEntry { version, lost: true, strays: true, ..PageEntry::default() });
    }
    let owned = current.iter().find(|r| r.owned && !r.backup).map(|r| r.holder);
    let backups: Vec<NodeId> = newest.iter().map(|r| r.holder).collect();
    let owner =
        owned.or_else(|| copies.iter().min().copied()).or_else(|| backups.iter().min().copied())?;
    let mut copyset: std::collections::BTreeSet<NodeId> = copies.into_iter().collect();
    copyset.insert(owner);
    // A copy given up to a writer is no backup: the next write's invalidation drops it, and
    // a grant would count on a backup that holds nothing.
    let backup = newest.iter().filter(|r| !r.retired).map(|r| r.holder).find(|&b| b != owner);
    Some(PageEntry {
        owner: Some(owner),
        copyset,
        version,
        backup,
        lost: false,
        strays: true,
        granted: Granted::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::FINAL;

    fn n(id: u64) -> NodeId {
        NodeId(id)
    }

    fn entry(owner: u64, copyset: &[u64], backup: Option<u64>) -> PageEntry {
        PageEntry {
            owner: Some(n(owner)),
            copyset: copyset.iter().map(|&i| n(i)).collect(),
            version: 4,
            backup: backup.map(n),
            lost: false,
            strays: false,
            granted: Granted::Unknown,
        }
    }

    #[test]
    fn a_dead_sharing_owner_hands_the_page_to_a_reader() {
        let mut e = entry(1, &[1, 2, 3], None);
        assert!(repair(&mut e, |x| x == n(1), |x| x == n(1)));
        assert_eq!(e.owner, Some(n(2)));
        assert_eq!(e.copyset, [n(2), n(3)].into());
        assert!(!e.lost);
        assert!(e.strays, "the dead owner's direct readers are unknown");
    }

    #[test]
    fn a_dead_writing_owner_falls_back_on_its_backup() {
        let mut e = entry(1, &[1], Some(3));
        assert!(repair(&mut e, |x| x == n(1), |x| x == n(1)));
        assert_eq!(e.owner, Some(n(3)));
        assert_eq!(e.copyset, [n(3)].into());
        assert_eq!(e.backup, None);
    }

    #[test]
    fn a_dead_sole_owner_without_backup_means_a_lost_page() {
        let mut e = entry(1, &[1], Some(3));
        assert!(repair(&mut e, |x| x == n(1) || x == n(3), |x| x == n(1) || x == n(3)));
        assert!(e.lost);
        assert_eq!(e.owner, None);
    }

    #[test]
    fn a_dead_reader_only_leaves_the_copyset() {
        let mut e = entry(1, &[1, 2], None);
        assert!(repair(&mut e, |x| x == n(2), |x| x == n(2)));
        assert_eq!(e.owner, Some(n(1)));
        assert_eq!(e.copyset, [n(1)].into());
        assert!(!e.strays);
        assert!(!repair(&mut e, |x| x == n(2), |x| x == n(2)));
    }

    #[test]
    fn an_owner_that_left_gracefully_keeps_its_page_until_it_hands_it_over() {
        let mut e = entry(1, &[1], None);
        assert!(repair(&mut e, |x| x == n(1), |_| false));
        assert_eq!(e.owner, Some(n(1)));
        assert!(!e.lost);
    }

    #[test]
    fn rebuild_keeps_the_newest_copies_and_their_owner() {
        let r = |h, version, owned, backup| Report {
            holder: n(h),
            version,
            owned,
            backup,
            commit: 0,
            retired: false,
            writer: None,
            backup_to: None,
            digest: 1,
        };
        let e = rebuild(
            &[
                r(2, 3, false, false),
                r(3, 5, false, false),
                r(4, 5, true, false),
                r(5, 5, false, true),
            ],
            |_| false,
        )
        .expect("copies survive");
        assert_eq!(e.version, 5);
        assert_eq!(e.owner, Some(n(4)));
        assert_eq!(e.copyset, [n(3), n(4)].into());
        assert_eq!(e.backup, Some(n(5)));
    }

    #[test]
    fn rebuild_from_a_backup_alone_makes_it_the_owner() {
        let e = rebuild(
            &[Report {
                holder: n(6),
                version: 9,
                owned: false,
                backup: true,
                commit: 2,
                retired: false,
                writer: None,
                backup_to: None,
                digest: 1,
            }],
            |_| false,
        )
        .expect("the backup survives");
        assert_eq!((e.owner, e.version, e.backup), (Some(n(6)), 9, None));
        assert_eq!(rebuild(&[], |_| false), None);
    }

    #[test]
    fn the_latest_commit_of_the_newest_version_wins_and_backups_that_still_disagree_are_lost() {
        let b = |h, digest| Report {
            holder: n(h),
            version: 9,
            owned: false,
            backup: true,
            commit: 4,
            retired: false,
            writer: None,
            backup_to: None,
            digest,
        };
        let agreeing = rebuild(&[b(3, 7), b(5, 7)], |_| false).expect("backups survive");
        assert!(!agreeing.lost);
        assert_eq!(agreeing.owner, Some(n(3)));
        let disagreeing = rebuild(&[b(3, 7), b(5, 8)], |_| false).expect("an entry");
        assert!(disagreeing.lost, "one of them is a stale commit: {disagreeing:?}");
        assert_eq!(disagreeing.owner, None);
        let owned = Report {
            holder: n(4),
            version: 9,
            owned: true,
            backup: false,
            commit: 0,
            retired: false,
            writer: None,
            backup_to: None,
            digest: 8,
        };
        let e = rebuild(&[b(3, 7), b(5, 8), owned], |_| false).expect("the owner's copy survives");
        assert_eq!((e.owner, e.lost), (Some(n(4)), false));
        // A backup holding an older commit of the version is a leftover: the newer one wins.
        let stale = Report { commit: 3, ..b(2, 6) };
        let e = rebuild(&[stale, b(5, 7)], |_| false).expect("backups survive");
        assert_eq!((e.owner, e.lost, e.backup), (Some(n(5)), false, None));
        let e = rebuild(&[stale, b(3, 7), b(5, 7)], |_| false).expect("backups survive");
        assert_eq!((e.owner, e.backup), (Some(n(3)), Some(n(5))), "never the stale one");
        assert_eq!(digest(&[1; 4096]), digest(&[1; 4096]));
        assert_ne!(digest(&[1; 4096]), digest(&[2; 4096]));
    }

    #[test]
    fn a_copy_given_up_to_a_writer_that_died_too_is_never_offered_as_the_page() {
        let given = |writer| Report {
            holder: n(2),
            version: 6,
            owned: false,
            backup: true,
            commit: FINAL,
            retired: true,
            writer: Some(n(writer)),
            backup_to: None,
            digest: 1,
        };
        let dead = |x: NodeId| x == n(3);
        // The writer lives: it holds what it wrote, or never got the grant.
        let e = rebuild(&[given(4)], dead).expect("the copy survives");
        assert_eq!((e.owner, e.version, e.lost), (Some(n(2)), 6, false));
        // The writer died with its manager: what it wrote since died too.
        let e = rebuild(&[given(3)], dead).expect("an entry");
        assert!(e.lost && e.owner.is_none(), "rolled back to the copy given up: {e:?}");
        // Unless the node chosen for its backup reported, and holds nothing newer: the
        // writer's first commit goes there, so it committed nothing.
        let e = rebuild(&[Report { backup_to: Some(n(5)), ..given(3) }], dead).expect("an entry");
        assert_eq!((e.owner, e.version, e.lost), (Some(n(2)), 6, false));
        let both = |x: NodeId| x == n(3) || x == n(5);
        let e = rebuild(&[Report { backup_to: Some(n(5)), ..given(3) }], both).expect("an entry");
        assert!(e.lost, "that node died too: what the writer committed died with it");
        // Nor is an older copy left somewhere the page.
        let older = Report {
            holder: n(5),
            commit: 0,
            retired: false,
            writer: None,
            backup: false,
            version: 5,
            ..given(3)
        };
        assert!(rebuild(&[older, given(3)], dead).expect("an entry").lost);
        // A backup of the copy's version vouches that the writer committed nothing: every
        // commit reaches the backup, under a newer version, before it returns.
        let backup = Report { holder: n(5), commit: 0, retired: false, writer: None, ..given(3) };
        let e = rebuild(&[given(3), backup], dead).expect("the backup survives");
        assert_eq!((e.owner, e.version, e.lost), (Some(n(5)), 6, false));
        // Whatever its stamp: a backup placed after a promotion or a hand-over is final.
        let final_backup = Report { commit: FINAL, ..backup };
        let e = rebuild(&[given(3), final_backup], dead).expect("the backup survives");
        assert_eq!((e.owner, e.version, e.lost), (Some(n(5)), 6, false));
        // Another copy given up (its writer alive) is no backup, and vouches for nothing.
        let other = Report { holder: n(7), writer: Some(n(4)), ..given(3) };
        assert!(rebuild(&[given(3), other], dead).expect("an entry").lost);
        // Nor is it ever made the entry's backup, tied with a real one: the next write's
        // invalidation drops it, and a grant would count on a backup holding nothing.
        let e = rebuild(&[other, final_backup], dead).expect("copies");
        assert_eq!((e.owner, e.backup), (Some(n(5)), None), "the real backup is the owner");
        let e = rebuild(&[Report { holder: n(1), ..other }, final_backup], dead).expect("copies");
        assert_eq!((e.owner, e.backup), (Some(n(1)), Some(n(5))));
    }
}
