//! The pages this node holds: read copies, the pages it owns, and backups it keeps for others.
//!
//! A frame's state sits behind a short std mutex. An owner's write guard also holds the frame's
//! `writer` lock for as long as it writes, so a manager's `Fetch` (another node faulted) waits
//! for the write to commit instead of taking half of it.

use crate::page::{PageId, PAGE_SIZE};
use dashmap::DashMap;
use gobelins_locator::NodeId;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Mutex as AsyncMutex, Notify};

/// Page contents, shared between the frame and the read guards handed out.
pub(crate) type Bytes = Arc<Vec<u8>>;

/// A zero-filled page.
pub(crate) fn zeros() -> Bytes {
    Arc::new(vec![0; PAGE_SIZE])
}

/// What this node holds of one page.
#[derive(Default, Debug)]
pub(crate) struct FrameState {
    /// A valid copy, or `None`.
    pub(crate) data: Option<Bytes>,
    /// Its version.
    pub(crate) version: u64,
    /// This node owns the page in write mode: nobody else holds a copy.
    pub(crate) write: bool,
    /// This node owns the page (in write mode, or sharing it with readers).
    pub(crate) owned: bool,
    /// Copies at or below this version were invalidated: a read copy of such a version that
    /// arrives late is not kept.
    pub(crate) invalidated: Option<u64>,
    /// Where this node, as owner, keeps its backup copy.
    pub(crate) backup_node: Option<NodeId>,
    /// A backup this node keeps for the page's owner: the version whose content it is.
    pub(crate) backup: Option<(u64, Bytes)>,
    /// Which of the owner's commits at that version the backup holds (see `commits`).
    pub(crate) backup_commit: u64,
    /// As owner in write mode: the commits made at `version` so far. A backup is stamped with
    /// the commit it holds, so that of two backups of one version, left on two nodes when a
    /// commit went to another backup, the newer is known. [`FINAL`] once the version can take
    /// no more commits here (the page was handed over or promoted, read-only).
    pub(crate) commits: u64,
    /// The copy this node gave up to a writer, kept aside: if the manager dies before the
    /// writer gets it, this is the page's latest content, and `scan` reports it.
    pub(crate) retired: Option<Retired>,
    /// Readers this node, as owner, served directly (they came on a probable-owner hint): the
    /// manager does not know them, so the owner invalidates them before the page changes.
    pub(crate) readers: BTreeSet<NodeId>,
    /// The owner is about to write or give up the page: it serves no more direct reads.
    pub(crate) closed: bool,
    /// This node told a manager it does not hold this version, or refused a grant of it: a
    /// grant of it (or older) that arrives after that is refused, since the manager may have
    /// taken the page back.
    pub(crate) refused: u64,
    /// Recovery scans that reported this frame (`reports`, after its manager failed): a write
    /// grant asked for before one and arriving after it is refused, since the recovery may
    /// have rebuilt the page's entry without it.
    pub(crate) scans: u64,
    /// The page a refused grant carried, should the manager fail to take the page back from
    /// where that grant took it. Not reported to `scan`: only the manager that took the grant
    /// back knows whether it is the page.
    pub(crate) refused_copy: Option<(u64, Bytes)>,
    /// The backup is a leaving owner's page, left here because its manager did not answer
    /// (see `crate::Request::Foster`): nobody's entry names this node. Cleared once an entry
    /// may: a recovery was told of it, a backup was stored over it, or it was promoted.
    pub(crate) fostered: Option<Fostered>,
    /// This node leaves, and took its backup copy to hand it on: it stores no more commits,
    /// which its owner then makes through the manager (`Rebackup`). One acknowledged here
    /// after the copy was taken would be missing from it.
    pub(crate) sealed: bool,
}

/// Whose page a fostered backup is, for handing it on on their behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fostered {
    /// The node that left: the page's owner, or the node that kept its backup.
    pub(crate) leaver: NodeId,
    /// The readers it served directly, which the page's manager does not know of.
    pub(crate) readers: BTreeSet<NodeId>,
    /// For a backup the leaver kept, the owner's commit it holds; `None` for a page it owned.
    pub(crate) backup: Option<u64>,
}

/// What became of a backup a node was sent ([`Frame::store_backup`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    /// It is the backup here now.
    Kept,
    /// A newer one stays: a later version, or a later commit of this one (a commit's copy
    /// that came late).
    Newer,
    /// This leaving node took its copies away, and keeps no backup any more.
    Sealed,
}

/// The commit stamp of a version's last content: what an owner gave up, handed over or was
/// promoted to, after which that version takes no more commits (writing needs a new grant).
pub(crate) const FINAL: u64 = u64::MAX;

/// A copy a node gave up to a writer, kept aside until the writer says the grant landed.
#[derive(Clone, Debug)]
pub(crate) struct Retired {
    /// Its version.
    pub(crate) version: u64,
    /// The page.
    pub(crate) data: Bytes,
    /// The writer it was given up to, when one holds the grant. Should that writer die with
    /// the manager that granted it, it may have written since: this copy is then not
    /// the page's last content, and cannot say so itself.
    pub(crate) writer: Option<NodeId>,
    /// Where that writer's backup was to be kept, if known (see
    /// [`crate::protocol::Request::Fetch`]).
    pub(crate) backup: Option<NodeId>,
    /// The node whose grant the copy is kept for, when a leaving node left it here
    /// ([`crate::protocol::Request::KeepRetired`]): the page's entry names that node as the
    /// grant's source, not this one. `None` for this node's own.
    pub(crate) on_behalf: Option<NodeId>,
}

/// What a holder's frame gives a manager that asked for the page.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// The page.
    Page(Bytes),
    /// Not yet: these readers the owner served directly must be invalidated first. The frame
    /// serves no more direct reads meanwhile.
    Revoke(Vec<NodeId>),
    /// The holder no longer has (or never had) that version.
    Missing,
    /// A write of the page here went on past the wait (a program holding its write guard),
    /// or its commit is asking the manager for a new backup: ask again later.
    Busy,
    /// The manager asking was declared failed, or left, while this node waited: nothing was
    /// given.
    Departed,
}

/// What became of a grant that reached this node.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    /// This node owns the page, writable once no direct reader is left.
    Yes,
    /// A grant this node already told the manager it does not hold, or older than its copy,
    /// or one asked for before a recovery's `scan` read this node's frames: the manager has
    /// taken the page back, or the recovery rebuilt its entry without the grant, and the
    /// writer asks again.
    Stale,
    /// Granted without the page, and no copy here: the page is never made up from zeros.
    NoCopy,
}

/// One page's frame.
#[derive(Default)]
pub(crate) struct Frame {
    pub(crate) state: Mutex<FrameState>,
    pub(crate) writer: Arc<AsyncMutex<()>>,
    /// Held by a local writer from its write fault until its grant is installed: a second
    /// local writer's fault would otherwise tell the manager what this node holds while the
    /// first one's grant is on its way, and the manager take that grant for lost.
    pub(crate) faulting: Arc<AsyncMutex<()>>,
    installed: Notify,
    /// A local commit is asking the page's manager for a new backup, holding the writer lock
    /// (see [`Frame::rebacking`]).
    rebacking: AtomicBool,
    rebacking_began: Notify,
}

/// Marks a commit asking the manager for a new backup, until dropped.
pub(crate) struct Rebacking<'a>(&'a Frame);

impl Drop for Rebacking<'_> {
    fn drop(&mut self) {
        self.0.rebacking.store(false, Ordering::SeqCst);
    }
}

impl Frame {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, FrameState> {
        self.state.lock().expect("frame state")
    }

    /// Marks this node's commit of the page as asking the manager for a new backup (its
    /// backup did not answer), until the mark drops. The commit holds the writer lock all
    /// along, and the manager serves that request only once it has the page's entry; faults
    /// of other nodes held the entry while their fetch waited here for the writer lock, a
    /// fetch wait (1 s) each, so requests queued behind them for seconds, and a change's
    /// hold with them (an audit pausing nodes saw 4 to 10 s). A fetch or a direct read
    /// answers at once instead while the mark is set.
    pub(crate) fn rebacking(&self) -> Rebacking<'_> {
        self.rebacking.store(true, Ordering::SeqCst);
        self.rebacking_began.notify_waiters();
        Rebacking(self)
    }

    /// Returns once a commit here asks the manager for a new backup.
    async fn until_rebacking(&self) {
        loop {
            let began = self.rebacking_began.notified();
            tokio::pin!(began);
            began.as_mut().enable();
            if self.rebacking.load(Ordering::SeqCst) {
                return;
            }
            began.await;
        }
    }

    /// The writer lock, unless a commit holding it asks the manager for a new backup first.
    async fn writer_unless_rebacking(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        tokio::select! {
            biased;
            () = self.until_rebacking() => None,
            writer = self.writer.lock() => Some(writer),
        }
    }

    /// The valid copy, if any.
    pub(crate) fn readable(&self) -> Option<(u64, Bytes)> {
        let s = self.lock();
        s.data.as_ref().map(|d| (s.version, Arc::clone(d)))
    }

    /// Keeps a read copy of `version`, unless it was invalidated while on its way.
    pub(crate) fn install_read(&self, version: u64, data: Bytes) {
        let mut s = self.lock();
        if s.invalidated.is_some_and(|i| version <= i) || (s.data.is_some() && s.version >= version)
        {
            return;
        }
        s.data = Some(data);
        s.version = version;
        s.write = false;
        s.owned = false;
        drop(s);
        self.installed.notify_waiters();
    }

    /// Takes ownership, read-only, of `version` handed over by a leaving owner. Unlike a read
    /// copy it is the page itself, so an earlier invalidation of this version (a write fault
    /// that could not finish while the owner was leaving) does not keep it out.
    pub(crate) fn install_owned(&self, version: u64, data: Bytes, backup: Option<NodeId>) {
        let mut s = self.lock();
        s.commits = FINAL;
        // Where the entry says its backup is: one left from an earlier time this node owned
        // the page holds nothing of this version.
        s.backup_node = backup;
        s.refused_copy = None;
        s.data = Some(data);
        s.version = version;
        s.write = false;
        s.owned = true;
        s.readers.clear();
        s.closed = false;
        drop(s);
        self.installed.notify_waiters();
    }

    /// Forgets the copy kept aside if it is no newer than `version`: the writer it was given up
    /// to has it. Kept, it would be memory held for ever, and, should that writer die, a
    /// `scan` would offer it as the page's content though the writer may have written since.
    pub(crate) fn drop_retired(&self, version: u64) {
        let mut s = self.lock();
        if s.retired.as_ref().is_some_and(|r| r.version <= version) {
            s.retired = None;
        }
    }

    /// Keeps aside, as if given up here, the copy a leaving node gave up to a writer: this node
    /// manages the page and may have to take that grant back, or the page's manager did not
    /// take it, and its recovery finds it here (`Request::KeepRetired`). A newer copy kept
    /// aside stays. Returns the frame's scans as it was kept.
    pub(crate) fn keep_retired(&self, retired: Retired) -> u64 {
        let mut s = self.lock();
        if s.retired.as_ref().is_none_or(|r| r.version < retired.version) {
            s.retired = Some(retired);
        }
        s.scans
    }

    /// Whether a copy given up to a writer is kept aside here.
    pub(crate) fn has_retired(&self) -> bool {
        self.lock().retired.is_some()
    }

    /// [`Frame::install_grant_unless`], with no recovery's `scan` since the grant was asked for.
    #[cfg(test)]
    #[must_use]
    pub(crate) fn install_grant(
        &self,
        version: u64,
        data: Option<Bytes>,
        backup: Option<NodeId>,
    ) -> Installed {
        let asked = self.lock().scans;
        self.install_grant_unless(version, data, backup, asked)
    }

    /// Takes ownership at `version`; `data` is `None` when the copy held is current. Nothing
    /// changes when the grant is stale or comes without data to a node that holds no copy.
    ///
    /// The frame is writable only once no direct reader is left. The manager invalidated every
    /// copy it knows of, but not the readers this node served itself: a second local writer's
    /// grant can arrive after the first one's, whose version this node went on to serve
    /// directly, and those readers must be revoked before the page changes again.
    ///
    /// Refused, as a stale grant is, when a recovery's `scan` reported this frame since the
    /// grant was asked for (`asked`: the frame's `scans` then): it reported the frame without
    /// the grant, and the recovered manager may have rebuilt the entry naming the previous
    /// owner at the previous version. Installed, the grant would make this node write a page
    /// whose readers and next writers go elsewhere. It is remembered as refused: a grant the
    /// recovered manager made (a fault sent again to it) is taken back to the refused copy at
    /// the next fault, and granted past.
    #[must_use]
    pub(crate) fn install_grant_unless(
        &self,
        version: u64,
        data: Option<Bytes>,
        backup: Option<NodeId>,
        asked: u64,
    ) -> Installed {
        let mut s = self.lock();
        // `reports` counts its scan under this lock: either this grant was installed before
        // the report, which then names it, or the count has moved.
        if s.scans != asked {
            s.refused = s.refused.max(version);
            return Installed::Stale;
        }
        if version <= s.refused || (s.data.is_some() && version <= s.version) {
            return Installed::Stale;
        }
        match data {
            Some(data) => s.data = Some(data),
            None if s.data.is_none() => return Installed::NoCopy,
            None => {}
        }
        s.version = version;
        s.commits = 0;
        s.owned = true;
        s.backup_node = backup;
        s.retired = None;
        s.refused_copy = None;
        s.write = s.readers.is_empty();
        s.closed = false;
        drop(s);
        self.installed.notify_waiters();
        Installed::Yes
    }

    /// Keeps aside the page a refused grant carried: should the manager fail to take the page
    /// back from where that grant took it, this copy is the page's content.
    pub(crate) fn keep_refused(&self, version: u64, data: Bytes) {
        let mut s = self.lock();
        if s.invalidated.is_some_and(|i| version <= i) {
            return;
        }
        if s.refused_copy.as_ref().is_none_or(|(v, _)| *v < version) {
            s.refused_copy = Some((version, data));
        }
    }

    /// Drops the read copy at or below `version`. A node may be both a reader and the
    /// backup of one page: the backup is kept. A copy given up to a writer at or below it
    /// goes too: the manager has gone past that grant (or discarded the page), and kept, it
    /// could come back as the page in a rebuild once its writer, back as a new life, no
    /// longer counts as gone.
    pub(crate) fn invalidate(&self, version: u64) {
        self.invalidate_unless(version, &|| false);
    }

    /// [`Frame::invalidate`], unless `departed` (checked under the frame's lock) says the
    /// manager asking has departed (see [`Frame::fetch`]). Whether it was done.
    pub(crate) fn invalidate_unless(
        &self,
        version: u64,
        departed: &(dyn Fn() -> bool + Sync),
    ) -> bool {
        let mut s = self.lock();
        if departed() {
            return false;
        }
        s.invalidated = Some(s.invalidated.map_or(version, |i| i.max(version)));
        if s.refused_copy.as_ref().is_some_and(|(v, _)| *v <= version) {
            s.refused_copy = None;
        }
        if s.retired.as_ref().is_some_and(|r| r.version <= version) {
            s.retired = None;
        }
        if s.data.is_some() && s.version <= version {
            s.data = None;
            s.write = false;
            s.owned = false;
        }
        true
    }

    /// Takes the read copy held at exactly `version` as the page, owned here: a recovery made
    /// this reader the page's owner in the manager's entry (`repair`), its owner having
    /// failed. Only a valid read copy counts, never a copy kept aside, refused or backed up:
    /// those are left on a node the entry may have moved on from (a grant took the page), and
    /// a request that reaches it late must not make it an owner again. Nor once the manager
    /// that asked has `departed` (see [`Frame::promote_unless`]).
    pub(crate) fn adopt_read_copy(
        &self,
        version: u64,
        departed: &(dyn Fn() -> bool + Sync),
    ) -> bool {
        let mut s = self.lock();
        if departed() {
            return false;
        }
        let valid = s.invalidated.is_none_or(|i| i < version) && s.refused < version;
        if s.owned || s.data.is_none() || s.version != version || !valid {
            return false;
        }
        s.owned = true;
        s.write = false;
        s.commits = FINAL;
        s.backup_node = None;
        s.readers.clear();
        s.closed = false;
        true
    }

    /// Drops the backup copy at or below `version`: this node is no longer the backup.
    pub(crate) fn drop_backup(&self, version: u64) {
        let mut s = self.lock();
        if s.backup.as_ref().is_some_and(|(v, _)| *v <= version) {
            s.backup = None;
        }
    }

    /// Keeps a backup for the owner, unless a newer one (a later version, or a later commit
    /// of this one) is already here, or this leaving node has sealed its copies.
    pub(crate) fn store_backup(&self, version: u64, commit: u64, data: Bytes) -> Stored {
        let mut s = self.lock();
        if s.sealed {
            return Stored::Sealed;
        }
        if s.backup.as_ref().is_none_or(|(v, _)| (*v, s.backup_commit) <= (version, commit)) {
            s.backup = Some((version, data));
            s.backup_commit = commit;
            s.fostered = None;
            return Stored::Kept;
        }
        Stored::Newer
    }

    /// Keeps a leaving owner's page as a fostered backup (see [`FrameState::fostered`]). A
    /// backup of that version or newer already here may be one an entry names (the manager
    /// took the page after all, and placed its backup here): it is not marked, so that
    /// handing the page on never drops it.
    pub(crate) fn foster(&self, version: u64, data: Bytes, whose: Fostered) {
        // An owner's last content of its version: no commit of it is newer.
        let commit = whose.backup.unwrap_or(FINAL);
        let mut s = self.lock();
        if s.backup.as_ref().is_some_and(|(v, _)| *v >= version) {
            if s.backup.as_ref().is_some_and(|(v, _)| *v == version) && commit >= s.backup_commit {
                s.backup = Some((version, data));
                s.backup_commit = commit;
                // Fostered already, for another leaver: the content is now this one's.
                if s.fostered.is_some() {
                    s.fostered = Some(whose);
                }
            }
            return;
        }
        s.backup = Some((version, data));
        s.backup_commit = commit;
        s.fostered = Some(whose);
    }

    /// The fostered backup of `version`, while nobody's entry may name this node for it.
    pub(crate) fn fostered(&self, version: u64) -> Option<Bytes> {
        let s = self.lock();
        let (v, data) = s.backup.as_ref().filter(|_| s.fostered.is_some())?;
        (*v == version).then(|| Arc::clone(data))
    }

    /// The fostered backup, its version and whose it is, if this frame holds one.
    pub(crate) fn fostered_copy(&self) -> Option<(u64, Bytes, Fostered)> {
        let s = self.lock();
        let (version, data) = s.backup.clone()?;
        Some((version, data, s.fostered.clone()?))
    }

    /// The backup this node keeps for the page's owner: its version, commit and content.
    /// Seals the frame as it is taken (see [`FrameState::sealed`]): this leaving node's
    /// copy holds every commit it acknowledged.
    pub(crate) fn backup_copy(&self) -> Option<(u64, u64, Bytes)> {
        let mut s = self.lock();
        s.sealed = true;
        let (version, data) = s.backup.clone()?;
        Some((version, s.backup_commit, data))
    }

    /// Drops the fostered backup `leaver` left here, once its manager has the page: true when
    /// it was one still (not replaced by another leaver's, nor named by an entry since).
    pub(crate) fn drop_fostered(&self, leaver: NodeId) -> bool {
        let mut s = self.lock();
        if s.fostered.as_ref().is_none_or(|f| f.leaver != leaver) {
            return false;
        }
        s.fostered = None;
        s.backup = None;
        true
    }

    /// Hands `version` to the manager: keeps a read copy (no `writer`: a reader faulted) or
    /// gives the page up to `writer`, keeping it aside until told the grant landed. Waits for a
    /// write in progress to commit, and for a grant still on its way here to arrive, up to
    /// `wait` in all: a manager's handler waits here, holding the page's entry and holding up
    /// the next change, so a write guard a program keeps for long gets [`Fetched::Busy`]. Before the page is given up, the readers this owner served directly must be
    /// invalidated ([`Fetched::Revoke`]); the caller does that and asks again.
    ///
    /// `departed` says whether the asking manager was declared failed or left: checked under
    /// the frame's lock, where the page would be handed over. The cluster may have declared it
    /// so, and the survivors' `scan` read this frame, while this wait went on; a page given up
    /// after that is one the recovery counted as owned here, and a seed of the random-failure
    /// test lost a page so (the recovery's manager then dropped the copy kept aside).
    pub(crate) async fn fetch(
        &self,
        version: u64,
        (writer, backup): (Option<NodeId>, Option<NodeId>),
        wait: Duration,
        departed: &(dyn Fn() -> bool + Sync),
    ) -> Fetched {
        let keep = writer.is_none();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let installed = self.installed.notified();
            tokio::pin!(installed);
            installed.as_mut().enable();
            {
                let writing =
                    tokio::time::timeout_at(deadline, self.writer_unless_rebacking()).await;
                let Ok(Some(_writing)) = writing else {
                    return Fetched::Busy;
                };
                let mut s = self.lock();
                if departed() {
                    return Fetched::Departed;
                }
                if s.data.is_some() && s.version == version {
                    if !keep && !s.readers.is_empty() {
                        s.closed = true;
                        return Fetched::Revoke(s.readers.iter().copied().collect());
                    }
                    let data = s.data.clone().expect("checked");
                    if keep {
                        s.write = false;
                    } else {
                        s.data = None;
                        s.write = false;
                        s.owned = false;
                        s.invalidated = Some(s.invalidated.map_or(version, |i| i.max(version)));
                        let data = Arc::clone(&data);
                        s.retired =
                            Some(Retired { version, data, writer, backup, on_behalf: None });
                    }
                    return Fetched::Page(data);
                }
                if s.version > version {
                    return Fetched::Missing;
                }
            }
            if tokio::time::timeout_at(deadline, installed).await.is_err() {
                let mut s = self.lock();
                if s.data.is_some() && s.version == version {
                    // Installed just now: hand it over.
                    continue;
                }
                // From here the manager may take the page back from the node it came from: a
                // grant of this version arriving late must not make this node a second owner.
                s.refused = s.refused.max(version);
                return Fetched::Missing;
            }
        }
    }

    /// Serves `reader` a copy straight from this owner, which then knows it as a reader it
    /// must invalidate itself. `None` unless this node owns the page and is not about to
    /// write it or give it up: the reader then asks the manager. Waits for a write in progress
    /// to commit, so a reader never gets a version the owner is still changing.
    pub(crate) async fn serve(&self, reader: NodeId) -> Option<(u64, Bytes)> {
        let _writer = self.writer_unless_rebacking().await?;
        let mut s = self.lock();
        if !s.owned || s.closed {
            return None;
        }
        let data = s.data.clone()?;
        s.write = false;
        s.readers.insert(reader);
        Some((s.version, data))
    }

    /// Stops serving direct reads and names the readers served so far, for an owner about to
    /// write or give the page up. Empty when this node does not own the page at `version`.
    pub(crate) fn close(&self, version: u64) -> Vec<NodeId> {
        let mut s = self.lock();
        if !s.owned || s.version != version || s.data.is_none() {
            return Vec::new();
        }
        s.closed = true;
        s.readers.iter().copied().collect()
    }

    /// `done` were invalidated: forget them.
    pub(crate) fn revoked(&self, done: &[NodeId]) {
        let mut s = self.lock();
        for n in done {
            s.readers.remove(n);
        }
    }

    /// Serves direct reads again: the write or hand-over did not happen.
    pub(crate) fn reopen(&self) {
        self.lock().closed = false;
    }

    /// Turns the backup into an owned copy at `version`. The backup the manager names holds
    /// the latest committed content whatever its label: every commit reaches it before it
    /// returns, and a node stops being the backup only after its copy is invalidated. Its
    /// label can be older than `version` when the owners since wrote nothing.
    ///
    /// The same takes a page back after a grant that never reached its writer: the previous
    /// owner's copy kept aside is then the content, or, when the writer already owned the
    /// page, the writer's own copy.
    #[cfg(test)]
    pub(crate) fn promote(&self, version: u64, exact: Option<u64>) -> bool {
        self.promote_unless(version, exact, &|| false)
    }

    /// [`Frame::promote`], unless the manager that asked has `departed` by the time the frame
    /// is locked: the survivors' `scan`, which locks the frame too, may have counted it as the
    /// backup it was, and the entry rebuilt from that must not find a second owner here.
    pub(crate) fn promote_unless(
        &self,
        version: u64,
        exact: Option<u64>,
        departed: &(dyn Fn() -> bool + Sync),
    ) -> bool {
        let mut s = self.lock();
        if departed() {
            return false;
        }
        if s.owned && s.data.is_some() && s.version == version {
            // Promoted already: the manager asks again when it missed the answer.
            return true;
        }
        // A read copy counts only when asked for by its exact label: a writer whose grant was
        // lost still holds the content the grant carried.
        let held = s.data.clone().filter(|_| s.owned || exact == Some(s.version));
        let held = held.map(|d| (s.version, d));
        // On equal labels the contents are the same; the copy held, then the backup, win.
        let retired = s.retired.as_ref().map(|r| (r.version, Arc::clone(&r.data)));
        let newest = [s.refused_copy.clone(), retired, s.backup.clone(), held]
            .into_iter()
            .flatten()
            .filter(|(label, _)| *label <= version && exact.is_none_or(|e| e == *label))
            .max_by_key(|(label, _)| *label);
        let Some((_, data)) = newest else { return false };
        s.data = Some(data);
        s.version = version;
        s.commits = FINAL;
        s.owned = true;
        s.write = false;
        s.backup = None;
        // The backup of an earlier time this node owned the page holds nothing of this
        // version: kept, `BackupTo` would name it without copying a byte there.
        s.backup_node = None;
        s.retired = None;
        s.refused_copy = None;
        s.fostered = None;
        s.readers.clear();
        s.closed = false;
        drop(s);
        self.installed.notify_waiters();
        true
    }
}

/// Every frame of this node.
#[derive(Default)]
pub(crate) struct Frames {
    map: DashMap<PageId, Arc<Frame>, foldhash::fast::RandomState>,
}

impl Frames {
    pub(crate) fn frame(&self, page: PageId) -> Arc<Frame> {
        if let Some(f) = self.map.get(&page) {
            return Arc::clone(&f);
        }
        Arc::clone(&self.map.entry(page).or_default())
    }

    /// The frame of `page`, if this node has one.
    pub(crate) fn get(&self, page: PageId) -> Option<Arc<Frame>> {
        self.map.get(&page).map(|f| Arc::clone(&f))
    }

    /// A snapshot of the frames in page order, to walk without holding the map: the same
    /// order in every run, as a scenario test's seed needs (a `DashMap`'s order changes each run).
    pub(crate) fn all(&self) -> Vec<(PageId, Arc<Frame>)> {
        let mut all: Vec<_> = self.map.iter().map(|e| (*e.key(), Arc::clone(e.value()))).collect();
        all.sort_unstable_by_key(|(page, _)| *page);
        all
    }

    /// Forgets every page of `segment` (freed).
    pub(crate) fn free(&self, segment: u32) {
        self.map.retain(|page, _| page.segment != segment);
    }

    /// Forgets everything (this node left the cluster).
    pub(crate) fn clear(&self) {
        self.map.clear();
    }
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
