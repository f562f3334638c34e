//! The pages this node holds: read copies, the pages it owns, and backups it keeps for others.
//!
//! A frame's state sits behind a short std mutex. An owner's write guard also holds the frame's
//! `writer` lock for as long as it writes, so a manager's `Fetch` (another node faulted) waits
//! for the write to commit instead of taking half of it.

use crate::page::{PageId, PAGE_SIZE};
use crate::protocol::Response;
use dashmap::DashMap;
use gobelins_locator::NodeId;
use serde_bytes::ByteBuf;
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
    /// The copy this node gave up to a writer, kept aside: if the manager dies before the
    /// writer gets it, this is the page's latest content, and `scan` reports it.
    pub(crate) retired: Option<(u64, Bytes)>,
}

impl FrameState {
    /// The copy kept aside (backup or retired) with the newest content.
    pub(crate) fn aside(&self) -> Option<(u64, Bytes)> {
        match (&self.backup, &self.retired) {
            (Some(b), Some(r)) => Some(if r.0 > b.0 { r.clone() } else { b.clone() }),
            (b, r) => b.clone().or_else(|| r.clone()),
        }
    }
}

/// One page's frame.
#[derive(Default)]
pub(crate) struct Frame {
    pub(crate) state: Mutex<FrameState>,
    pub(crate) writer: Arc<AsyncMutex<()>>,
    installed: Notify,
}

impl Frame {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, FrameState> {
        self.state.lock().expect("frame state")
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
    pub(crate) fn install_owned(&self, version: u64, data: Bytes) {
        let mut s = self.lock();
        s.data = Some(data);
        s.version = version;
        s.write = false;
        s.owned = true;
        drop(s);
        self.installed.notify_waiters();
    }

    /// Takes write ownership at `version`; `data` is `None` when the copy held is current.
    pub(crate) fn install_grant(&self, version: u64, data: Option<Bytes>, backup: Option<NodeId>) {
        let mut s = self.lock();
        if let Some(data) = data {
            s.data = Some(data);
        }
        if s.data.is_none() {
            s.data = Some(zeros());
        }
        s.version = version;
        s.write = true;
        s.owned = true;
        s.backup_node = backup;
        s.retired = None;
        drop(s);
        self.installed.notify_waiters();
    }

    /// Drops the read copy at or below `version`. A node may be both a reader and the
    /// backup of one page: the backup is kept.
    pub(crate) fn invalidate(&self, version: u64) {
        let mut s = self.lock();
        s.invalidated = Some(s.invalidated.map_or(version, |i| i.max(version)));
        if s.data.is_some() && s.version <= version {
            s.data = None;
            s.write = false;
            s.owned = false;
        }
    }

    /// Drops the backup copy at or below `version`: this node is no longer the backup.
    pub(crate) fn drop_backup(&self, version: u64) {
        let mut s = self.lock();
        if s.backup.as_ref().is_some_and(|(v, _)| *v <= version) {
            s.backup = None;
        }
    }

    /// Keeps a backup for the owner, unless a newer one is already here.
    pub(crate) fn store_backup(&self, version: u64, data: Bytes) {
        let mut s = self.lock();
        if s.backup.as_ref().is_none_or(|(v, _)| *v <= version) {
            s.backup = Some((version, data));
        }
    }

    /// Hands `version` to the manager: keeps a read copy (`keep`) or drops it. Waits for a
    /// write in progress to commit, and for a grant still on its way here to arrive, up to
    /// `wait`.
    pub(crate) async fn fetch(&self, version: u64, keep: bool, wait: Duration) -> Response {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let installed = self.installed.notified();
            tokio::pin!(installed);
            installed.as_mut().enable();
            {
                let _writer = self.writer.lock().await;
                let mut s = self.lock();
                if s.data.is_some() && s.version == version {
                    let data = s.data.clone().expect("checked");
                    if keep {
                        s.write = false;
                    } else {
                        s.data = None;
                        s.write = false;
                        s.owned = false;
                        s.invalidated = Some(s.invalidated.map_or(version, |i| i.max(version)));
                        s.retired = Some((version, Arc::clone(&data)));
                    }
                    return Response::Page(ByteBuf::from(data.to_vec()));
                }
                if s.version > version {
                    return Response::Missing;
                }
            }
            if tokio::time::timeout_at(deadline, installed).await.is_err() {
                return Response::Missing;
            }
        }
    }

    /// Turns the backup into an owned copy at `version`. The backup the manager names holds
    /// the latest committed content whatever its label: every commit reaches it before it
    /// returns, and a node stops being the backup only after its copy is invalidated. Its
    /// label can be older than `version` when the owners since wrote nothing.
    pub(crate) fn promote(&self, version: u64) -> bool {
        let mut s = self.lock();
        let Some((label, data)) = s.aside() else { return false };
        if label > version {
            return false;
        }
        s.data = Some(data);
        s.version = version;
        s.owned = true;
        s.write = false;
        s.backup = None;
        s.retired = None;
        drop(s);
        self.installed.notify_waiters();
        true
    }
}

/// Every frame of this node.
#[derive(Default)]
pub(crate) struct Frames {
    map: DashMap<PageId, Arc<Frame>>,
}

impl Frames {
    pub(crate) fn frame(&self, page: PageId) -> Arc<Frame> {
        if let Some(f) = self.map.get(&page) {
            return Arc::clone(&f);
        }
        Arc::clone(&self.map.entry(page).or_default())
    }

    /// A snapshot of the frames, to walk without holding the map.
    pub(crate) fn all(&self) -> Vec<(PageId, Arc<Frame>)> {
        self.map.iter().map(|e| (*e.key(), Arc::clone(e.value()))).collect()
    }

    /// Forgets everything (this node left the cluster).
    pub(crate) fn clear(&self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_copy_invalidated_on_its_way_is_not_kept() {
        let f = Frame::default();
        f.invalidate(3);
        f.install_read(3, zeros());
        assert!(f.readable().is_none());
        f.install_read(4, zeros());
        assert_eq!(f.readable().map(|(v, _)| v), Some(4));
    }

    #[test]
    fn a_page_handed_over_is_kept_even_after_its_version_was_invalidated() {
        let f = Frame::default();
        f.invalidate(5);
        f.install_owned(5, zeros());
        let s = f.lock();
        assert!(s.data.is_some() && s.owned && s.version == 5);
    }

    #[tokio::test(start_paused = true)]
    async fn fetch_waits_for_a_grant_on_its_way() {
        let f = Arc::new(Frame::default());
        let g = Arc::clone(&f);
        let fetch = tokio::spawn(async move { g.fetch(2, true, Duration::from_secs(1)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        f.install_grant(2, Some(Arc::new(vec![7; PAGE_SIZE])), None);
        match fetch.await.expect("fetch") {
            Response::Page(p) => assert_eq!(p[0], 7),
            other => panic!("expected the page, got {other:?}"),
        }
        let s = f.lock();
        assert!(s.owned && !s.write, "a reader's fetch leaves the owner a read copy");
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_given_up_to_a_writer_is_kept_aside_and_can_be_promoted() {
        let f = Frame::default();
        f.install_grant(4, Some(Arc::new(vec![9; PAGE_SIZE])), None);
        assert!(matches!(f.fetch(4, false, Duration::from_millis(10)).await, Response::Page(_)));
        assert!(f.readable().is_none());
        assert_eq!(f.lock().aside().map(|(v, d)| (v, d[0])), Some((4, 9)));
        assert!(f.promote(4));
        assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((4, 9)));
    }

    #[tokio::test(start_paused = true)]
    async fn fetch_of_a_version_never_granted_gives_up() {
        let f = Frame::default();
        assert!(matches!(f.fetch(5, false, Duration::from_millis(50)).await, Response::Missing));
    }

    #[test]
    fn promote_accepts_a_backup_no_newer_than_the_entry() {
        let f = Frame::default();
        f.store_backup(8, zeros());
        assert!(!f.promote(7));
        assert!(f.promote(9));
        assert_eq!(f.readable().map(|(v, _)| v), Some(9));
        let f = Frame::default();
        f.store_backup(6, zeros());
        assert!(f.promote(7));
        assert_eq!(f.readable().map(|(v, _)| v), Some(7));
    }
}
