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

/// The digest of a page of zeros, which a reader of a page nobody owns holds.
fn zero_digest() -> u64 {
    static ZEROS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZEROS.get_or_init(|| digest(&[0; crate::page::PAGE_SIZE]))
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
    if owned.is_none() && newest.is_empty() && current.iter().all(|r| r.digest == zero_digest()) {
        // Read copies of zeros, and nothing else: a page nobody owns, as its manager gives
        // one out (never written, or discarded), or one whose content is zeros anyway. It
        // stays nobody's. Made the owner, a reader took the page with it when it failed in
        // turn, and a page never written read as lost.
        return Some(PageEntry {
            copyset: copies.into_iter().collect(),
            version,
            strays: true,
            ..PageEntry::default()
        });
    }
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
#[path = "directory_tests.rs"]
mod tests;
