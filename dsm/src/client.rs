//! The DSM as a program on a node uses it: page guards, byte ranges, locks and barriers.

use crate::error::DsmError;
use crate::frames::{zeros, Bytes, Frame, Installed};
use crate::leave::Handed;
use crate::node::{DsmNode, NodeState, DSM};
use crate::page::{barrier_key, lock_key, named, Named, PageId, PAGE_SIZE};
use crate::protocol::{PageBytes, Request, Response, Token};
use crate::service;
use gobelins_adaptation::{AdaptationError, Host};
use gobelins_locator::{Key, NodeId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// How long a barrier or lock waits, without a wait deadline, between two lines in the log.
const WAIT_WARNING: Duration = Duration::from_secs(60);

/// How a node finds a page's manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Through the locator, by way of the adaptation layer: managers move with the cluster.
    Locator,
    /// `page % n` over the sorted live nodes, sent straight to that node: the report's STAT
    /// baseline. It does not follow changes; use it only on a cluster that keeps its nodes.
    Static,
}

/// A region of pages, `len` bytes long, named by `id`. Nothing is created cluster-wide: a page
/// never written reads as zeros. After a node fails, a page of a directory slot it managed
/// that no survivor holds reads as [`DsmError::Lost`] even if it was never written, since
/// nobody can tell, unless backups are on and the dead node had vouched that every page of
/// the slot had a copy elsewhere (see `cover.rs`): without backups, or after failures one
/// upon another, a program that picks segment ids as it goes should [`Dsm::free`] a segment
/// before its first use, which makes its pages zeros again everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The segment id, at most [`crate::MAX_SEGMENT`].
    pub id: u32,
    /// Its length in bytes.
    pub len: u64,
}

impl Segment {
    /// A segment of `len` bytes.
    pub fn new(id: u32, len: u64) -> Self {
        Segment { id, len }
    }

    /// Its page `page`.
    pub fn page(&self, page: u32) -> PageId {
        PageId { segment: self.id, page }
    }
}

/// The part of one page a byte range covers.
struct Span {
    page: PageId,
    /// Where it starts in the page.
    at: usize,
    /// Where it starts in the caller's buffer.
    done: usize,
    len: usize,
}

impl Span {
    fn within(&self) -> std::ops::Range<usize> {
        self.at..self.at + self.len
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.done..self.done + self.len
    }
}

/// The pages `len` bytes at `offset` of `segment` cover, in order.
fn spans(segment: &Segment, offset: u64, len: usize) -> impl Iterator<Item = Span> + '_ {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let within = (at % PAGE_SIZE as u64) as usize;
        let n = (PAGE_SIZE - within).min(len - done);
        let span =
            Span { page: segment.page((at / PAGE_SIZE as u64) as u32), at: within, done, len: n };
        done += n;
        Some(span)
    })
}

/// A consistent copy of a page, as of when it was taken.
#[derive(Clone, Debug)]
pub struct ReadGuard {
    version: u64,
    data: Bytes,
}

impl ReadGuard {
    /// The version read.
    pub fn version(&self) -> u64 {
        self.version
    }
}

impl std::ops::Deref for ReadGuard {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

/// Exclusive write access to a page. Changes become visible to other nodes only at
/// [`WriteGuard::commit`]; dropping the guard discards them. Hold one write guard at a time:
/// a node that waits for a page while it holds another can deadlock with a node doing the
/// opposite (the access then fails with [`DsmError::Stuck`]).
pub struct WriteGuard {
    dsm: Dsm,
    page: PageId,
    frame: Arc<Frame>,
    version: u64,
    data: Vec<u8>,
    _writer: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGuard")
            .field("page", &self.page)
            .field("version", &self.version)
            .finish()
    }
}

impl WriteGuard {
    /// The version this node owns the page at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Publishes the changes. With backups on, the backup node stores them first, so that
    /// nothing another node can see is missing from the backup. A backup that does not answer
    /// is replaced (the manager chooses another); an error means the changes were discarded.
    pub async fn commit(self) -> Result<(), DsmError> {
        // A guard taken under the lease may be committed after it ran out: published then,
        // the write could be served to a reader, or acknowledged, after the cluster had given
        // the page up on this node. A lease renewed late (a leader whose acknowledgements lag
        // as the voters change, seen on the leader itself in an audit) is waited for a moment.
        self.dsm.alive()?;
        if !self.dsm.host.leased_within(LEASE_BACK).await {
            self.dsm.alive()?;
            return Err(DsmError::NoLease { page: self.page });
        }
        let data = Arc::new(self.data);
        let (backup, commit) = {
            let mut s = self.frame.lock();
            s.commits = s.commits.saturating_add(1);
            (s.backup_node, s.commits)
        };
        if let Some(node) = backup.filter(|&b| b != self.dsm.me()) {
            let request = Request::Backup {
                page: self.page,
                version: self.version,
                commit,
                data: PageBytes::shared(&data),
            };
            let ctx = self.dsm.host.context();
            let stored = ctx.tell::<_, Response>(node, DSM, self.page.key(), &request).await;
            if !matches!(stored, Ok(Response::Ok)) {
                tracing::info!(page = ?self.page, backup = node.0, "dsm: backup did not answer; asking for another");
                let request = Request::Rebackup {
                    node: self.dsm.me(),
                    version: self.version,
                    commit,
                    failed: node,
                    data: PageBytes::shared(&data),
                };
                let asked = {
                    let _rebacking = self.frame.rebacking();
                    self.dsm.ask(self.page.key(), &request).await
                };
                match asked {
                    Ok(Response::BackedUp(new)) => self.frame.lock().backup_node = Some(new),
                    Ok(Response::Ok) => self.frame.lock().backup_node = None,
                    // Refused (`Invalid`): the manager's entry names another owner, or a newer
                    // version.
                    Err(DsmError::Protocol(_)) => {
                        // Not kept as the page either: read here, or served on a hint, it would
                        // go stale at the next write where the page lives now.
                        self.frame.invalidate(self.version);
                        return Err(DsmError::Disowned { page: self.page });
                    }
                    Ok(other) => {
                        self.frame.lock().write = false;
                        return Err(DsmError::Protocol(format!("rebackup answered {other:?}")));
                    }
                    Err(e) => {
                        self.frame.lock().write = false;
                        return Err(e);
                    }
                }
            }
        }
        self.frame.lock().data = Some(data);
        Ok(())
    }
}

impl std::ops::Deref for WriteGuard {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for WriteGuard {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

/// How long a commit waits for a lease that ran out to be renewed: a few ping intervals,
/// well under the failure timeout after which the cluster would declare the node failed.
const LEASE_BACK: Duration = Duration::from_millis(500);

/// A lock held; [`LockGuard::unlock`] releases it. A guard dropped without it (an early
/// return, a panic unwinding) releases the lock in a task of its own, as does an unlock whose
/// release failed: a lock is never left held by a node that no longer holds its guard.
#[derive(Debug)]
pub struct LockGuard {
    dsm: Dsm,
    id: u64,
    token: Token,
    released: bool,
    /// Made before the lock was granted, by a [`Dsm::lock`] still asking.
    asking: bool,
}

impl LockGuard {
    /// Releases the lock. On an error the release is tried again in the background, a few
    /// times over (each up to the access deadline).
    pub async fn unlock(mut self) -> Result<(), DsmError> {
        release(&self.dsm, self.id, self.token).await?;
        self.released = true;
        Ok(())
    }
}

/// Asks the manager of lock `id` to release `token`. The node stops reporting the lock as
/// held first: it has left its critical section. Reported until the release was answered, a
/// manager that died between granting the lock to the next node and that answer was rebuilt
/// with two holders reporting, kept the first it heard, and the release then freed the lock
/// under its new holder. Released without a report, the lock is rebuilt free or held by the
/// next node, and a release that lands later frees nothing (it names its own token).
async fn release(dsm: &Dsm, id: u64, token: Token) -> Result<(), DsmError> {
    {
        let mut held = dsm.state().held.lock().expect("held");
        if held.get(&id) == Some(&token) {
            held.remove(&id);
        }
    }
    dsm.ask(lock_key(id), &Request::Release(token)).await?;
    Ok(())
}

/// [`release`], asked again on failure a few times over: whether it was released.
async fn release_patiently(dsm: &Dsm, id: u64, token: Token) -> bool {
    // Each attempt asks until the access deadline; a node that cannot reach the lock's
    // manager for that long is about to be declared failed, which frees it too.
    for _ in 0..3 {
        match release(dsm, id, token).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(lock = id, error = %e, "dsm: releasing a dropped lock failed; asking again")
            }
        }
    }
    tracing::error!(
        lock = id,
        "dsm: a dropped lock could not be released; it stays held until this node leaves or fails"
    );
    false
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (dsm, id, token) = (self.dsm.clone(), self.id, self.token);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(lock = id, "dsm: a lock guard dropped outside a runtime cannot release its lock; it stays held until this node leaves or fails");
            return;
        };
        let asking = self.asking;
        runtime.spawn(async move {
            if !release_patiently(&dsm, id, token).await {
                return;
            }
            // A lock given up on while it was asked for: a copy of the request for it may
            // still be held at its manager (through a change) or on its way, and be granted
            // after this release. A manager serves a copy for up to the request's deadline
            // from when the copy reached it, so twice that is past the last (the margin the
            // layer keeps answers for, too).
            if asking {
                tokio::time::sleep(dsm.host.config().request_deadline * 2).await;
                release_patiently(&dsm, id, token).await;
            }
        });
    }
}

/// Refuses a page whose segment id is past [`crate::MAX_SEGMENT`]: its key keeps the low 30
/// bits only, so its manager would take it for another segment's page, while this node kept
/// its copy under the id it was given, where no invalidation of that other page reaches it.
fn page_of_a_segment(page: PageId) -> Result<(), DsmError> {
    if page.segment > crate::MAX_SEGMENT {
        return Err(DsmError::NoSuchSegment { page });
    }
    Ok(())
}

/// A node's handle on the DSM. Cheap to clone.
#[derive(Clone)]
pub struct Dsm {
    node: DsmNode,
    host: Host,
    placement: Placement,
}

impl std::fmt::Debug for Dsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dsm")
            .field("node", &self.host.node())
            .field("placement", &self.placement)
            .finish()
    }
}

impl Dsm {
    /// The DSM of the node `host` belongs to, in the life the host is in now; `node` must be
    /// the [`DsmNode`] registered in that life. Should the cluster declare the node failed
    /// while it runs, its host starts afresh ([`Host::renew`]) and this handle refuses every
    /// access from then on ([`DsmError::LifeEnded`]); the new life's `DsmNode` makes the next
    /// one. Following the host into its new life with the old one's copies, it acknowledged
    /// writes on pages the new life never held, which the cluster then took back.
    pub fn new(node: DsmNode, host: Host) -> Self {
        Dsm { node, host: host.this_life(), placement: Placement::Locator }
    }

    /// The same handle, finding managers by `placement`.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    fn state(&self) -> &NodeState {
        &self.node.inner
    }

    /// The host of this handle's node.
    pub(crate) fn host(&self) -> &Host {
        &self.host
    }

    /// `LifeEnded` once the life of the node this handle was taken in has stopped; `Leaving`
    /// if it stopped as the node left the cluster.
    pub(crate) fn alive(&self) -> Result<(), DsmError> {
        if !self.host.life_ended() {
            return Ok(());
        }
        if self.state().leaving.load(Ordering::SeqCst) {
            return Err(DsmError::Leaving);
        }
        Err(DsmError::LifeEnded)
    }

    /// Tells `previous`, the owner this node's grant took `page` from, that the grant landed,
    /// so that it drops the copy it kept aside. In the background: the write need not wait,
    /// and a message lost only leaves that copy kept, as it was before.
    fn retire(&self, previous: NodeId, page: PageId, version: u64) {
        let ctx = self.host.context();
        tokio::spawn(async move {
            let request = Request::Retire { page, version };
            if let Err(e) = ctx.tell::<_, Response>(previous, DSM, page.key(), &request).await {
                tracing::debug!(?page, node = previous.0, error = %e, "dsm: the previous owner was not told to drop the copy it keeps aside");
            }
        });
    }

    /// `Stuck` once an access to `page` begun at `started` has waited past the deadline.
    fn within_deadline(&self, page: PageId, started: tokio::time::Instant) -> Result<(), DsmError> {
        let waited = started.elapsed();
        if waited > self.state().config.access_deadline {
            return Err(DsmError::Stuck { page, waited_ms: waited.as_millis() as u64 });
        }
        Ok(())
    }

    /// `WaitedTooLong` once a barrier or lock at `key`, waited for since `started`, has
    /// waited past the wait deadline, if one is set. Without one, says in the log each time
    /// the wait passes `warn_at`, which then moves a minute on: a party that failed never
    /// arrives, and an operator should see what the program waits for.
    fn within_wait(
        &self,
        key: Key,
        started: tokio::time::Instant,
        warn_at: &mut Duration,
    ) -> Result<(), DsmError> {
        let waited = started.elapsed();
        let what = || match named(key) {
            Named::Lock(id) => format!("lock {id}"),
            Named::Barrier(id) => format!("barrier {id}"),
            _ => format!("key {}", key.0),
        };
        match self.state().config.wait_deadline {
            Some(deadline) if waited > deadline => {
                Err(DsmError::WaitedTooLong { what: what(), waited_ms: waited.as_millis() as u64 })
            }
            Some(_) => Ok(()),
            None => {
                if waited >= *warn_at {
                    *warn_at += WAIT_WARNING;
                    tracing::warn!(node = self.me().0, waited_s = waited.as_secs(), "dsm: {} still waits for the other nodes (a barrier) or its holder (a lock); a node that failed never arrives: set DsmConfig::wait_deadline to bound the wait", what());
                }
                Ok(())
            }
        }
    }

    fn me(&self) -> NodeId {
        self.host.node()
    }

    /// Sends `request` to the manager of `key`, asking again while the manager says to.
    async fn ask(&self, key: Key, request: &Request) -> Result<Response, DsmError> {
        self.ask_with(key, || request.clone()).await
    }

    /// [`Dsm::ask`], with the request made afresh for every attempt: what it says of this
    /// node's copy may have changed since the last one.
    async fn ask_with(&self, key: Key, make: impl Fn() -> Request) -> Result<Response, DsmError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_micros(500);
        let mut warn_at = WAIT_WARNING;
        loop {
            self.alive()?;
            let request = &make();
            let ctx = self.host.context();
            let asked = match self.placement {
                Placement::Locator => ctx.request(DSM, key, request).await,
                Placement::Static => {
                    let nodes = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
                    if nodes.is_empty() {
                        return Err(DsmError::Protocol(
                            "this node has not joined a cluster".into(),
                        ));
                    }
                    let index = match named(key) {
                        Named::Page(p) => u64::from(p.page),
                        Named::Lock(id) | Named::Barrier(id) => id,
                        Named::Taint => 0,
                    };
                    let manager = nodes[(index % nodes.len() as u64) as usize];
                    ctx.tell(manager, DSM, key, request).await
                }
            };
            // Refused because this life stopped as it asked: said as such.
            let answer: Response = asked.map_err(|e| self.alive().err().unwrap_or(e.into()))?;
            match answer {
                // Waiting for the other nodes at a barrier, or for a lock's holder: as long as
                // the program needs, not the access deadline (a slow phase is no fault).
                Response::Busy | Response::Waiting
                    if matches!(named(key), Named::Lock(_) | Named::Barrier(_)) =>
                {
                    self.within_wait(key, started, &mut warn_at)?;
                    if matches!(answer, Response::Busy) {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                }
                Response::Retry | Response::Busy | Response::Waiting => {
                    self.within_deadline(page_named(key), started)?;
                    if !matches!(answer, Response::Waiting) {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                }
                Response::Invalid(why) => return Err(DsmError::Protocol(why)),
                Response::Departed if self.state().leaving.load(Ordering::SeqCst) => {
                    return Err(DsmError::Leaving)
                }
                // Not leaving: out of the manager's table all the same.
                Response::Departed => return Err(DsmError::NotMember { page: page_named(key) }),
                other => return Ok(other),
            }
        }
    }

    /// Reads `page`: from the copy held here, else from its probable owner, else through its
    /// manager. Refused with [`DsmError::Leaving`] once this node is being evicted, as a write
    /// is: the writers' invalidations skip a node that is out of the new table, so a copy it
    /// still held could be older than a value it had read since.
    pub async fn read(&self, page: PageId) -> Result<ReadGuard, DsmError> {
        page_of_a_segment(page)?;
        self.alive()?;
        if self.state().leaving.load(Ordering::SeqCst) {
            return Err(DsmError::Leaving);
        }
        let frame = self.state().frames.frame(page);
        // Only under this node's lease: cut off from the leader, it read its copies for as
        // long as the cut lasted, though the cluster had declared it failed and others had
        // written the pages since (an audit with real partitions). Without it, the read asks
        // the manager, which answers under its own.
        if self.host.leased() {
            if let Some((version, data)) = frame.readable() {
                return Ok(ReadGuard { version, data });
            }
            if let Some(read) = self.read_from_owner(page, &frame).await {
                return Ok(read);
            }
        }
        match self.ask(page.key(), &Request::ReadFault { node: self.me() }).await? {
            Response::Copy { version, data, owner } => {
                tracing::debug!(
                    ?page,
                    node = self.me().0,
                    version,
                    ?owner,
                    "dsm: read through the manager"
                );
                self.hint(page, owner);
                let data = data.map_or_else(zeros, |d| d.into_shared());
                frame.install_read(version, Arc::clone(&data));
                Ok(ReadGuard { version, data })
            }
            Response::Lost => Err(DsmError::Lost { page }),
            other => Err(DsmError::Protocol(format!("a read fault answered {other:?}"))),
        }
    }

    /// Notes `owner` as where `page` is to be read next.
    fn hint(&self, page: PageId, owner: Option<NodeId>) {
        match owner.filter(|&o| o != self.me()) {
            Some(o) => self.state().hints.insert(page, o),
            None => self.state().hints.remove(&page).map(|(_, o)| o),
        };
    }

    /// One round trip to the node this one last learned owns `page` (Li and Hudak's probable
    /// owner). `None` without a hint, or when the hint was stale: the manager knows.
    async fn read_from_owner(&self, page: PageId, frame: &Frame) -> Option<ReadGuard> {
        let owner = self.state().hints.get(&page).map(|h| *h)?;
        let ctx = self.host.context();
        if owner == self.me() || service::gone(self.state(), &ctx, owner) {
            self.state().hints.remove(&page);
            return None;
        }
        let request = Request::Serve { page, node: self.me() };
        match ctx.tell::<_, Response>(owner, DSM, page.key(), &request).await {
            Ok(Response::Copy { version, data: Some(data), .. }) => {
                self.state().hinted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    ?page,
                    node = self.me().0,
                    version,
                    owner = owner.0,
                    "dsm: read from the probable owner"
                );
                let data = data.into_shared();
                frame.install_read(version, Arc::clone(&data));
                Some(ReadGuard { version, data })
            }
            _ => {
                self.state().stale.fetch_add(1, Ordering::Relaxed);
                self.state().hints.remove(&page);
                None
            }
        }
    }

    /// Invalidates the readers this node served directly as `page`'s owner at `version`,
    /// before it asks to write: the manager does not know them. No reader is served from here
    /// until the write is granted (or fails).
    async fn revoke(&self, page: PageId, frame: &Frame, version: u64) -> Result<(), DsmError> {
        let started = tokio::time::Instant::now();
        loop {
            // A life that stopped reaches no reader: it would wait out the deadline.
            self.alive()?;
            let readers = frame.close(version);
            if readers.is_empty() {
                return Ok(());
            }
            let ctx = self.host.context();
            let done = service::invalidate(
                self.state(),
                &ctx,
                page,
                version,
                readers.clone(),
                Some(self.me()),
            )
            .await;
            frame.revoked(&done);
            if done.len() == readers.len() {
                return Ok(());
            }
            frame.reopen();
            self.within_deadline(page, started)?;
            // A reader that does not answer either comes back or is declared failed.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A guard for writing `page` now, holding `writer` until it commits or drops; `None`
    /// (and `writer` let go) unless this node may write the page, at `version` if given.
    fn writable(
        &self,
        page: PageId,
        frame: &Arc<Frame>,
        writer: OwnedMutexGuard<()>,
        version: Option<u64>,
    ) -> Option<WriteGuard> {
        let s = frame.lock();
        if !s.write || version.is_some_and(|v| v != s.version) {
            return None;
        }
        let data = s.data.as_ref()?.to_vec();
        let version = s.version;
        drop(s);
        Some(WriteGuard {
            dsm: self.clone(),
            page,
            frame: Arc::clone(frame),
            version,
            data,
            _writer: writer,
        })
    }

    /// Takes write access to `page`: every other copy is invalidated first. Refused with
    /// [`DsmError::Leaving`] once this node is being evicted.
    pub async fn write(&self, page: PageId) -> Result<WriteGuard, DsmError> {
        page_of_a_segment(page)?;
        self.alive()?;
        let frame = self.state().frames.frame(page);
        let started = tokio::time::Instant::now();
        loop {
            if self.state().leaving.load(Ordering::SeqCst) {
                return Err(DsmError::Leaving);
            }
            // One write fault of this node's at a time per page, until its grant is installed.
            let faulting = Arc::clone(&frame.faulting).lock_owned().await;
            let writer = Arc::clone(&frame.writer).lock_owned().await;
            let have = {
                let s = frame.lock();
                s.data.as_ref().map(|_| s.version)
            };
            // Not writable: the writer lock goes, for the fault may take the page from another
            // node, which may need this frame. Nor without this node's lease: a write the
            // cluster may already have given up on goes through the manager.
            if self.host.leased() {
                if let Some(guard) = self.writable(page, &frame, writer, None) {
                    return Ok(guard);
                }
            } else {
                drop(writer);
            }
            // From here until its grant is installed, an eviction of this node waits for it.
            let _fault = self.state().faults.read().await;
            if self.state().leaving.load(Ordering::SeqCst) {
                return Err(DsmError::Leaving);
            }
            if let Some(version) = have {
                self.revoke(page, &frame, version).await?;
            }
            // How many recovery scans had reported the frame when the fault that was answered
            // was sent: one since may have rebuilt the page's entry without its grant. Read
            // afresh for each attempt, so that a scan during one answered `Retry` costs
            // nothing; a fault sent again to the recovered manager after its manager failed
            // costs one more fault (the refused grant is taken back and granted past).
            let asked_at = AtomicU64::new(0);
            // Which copy this node holds can change between attempts: a manager may take a
            // lost grant back to it.
            let fault = || {
                let s = frame.lock();
                asked_at.store(s.scans, Ordering::Relaxed);
                Request::WriteFault {
                    node: self.me(),
                    have: s.data.as_ref().map(|_| s.version),
                    refused: s.refused,
                }
            };
            let answer = match self.ask_with(page.key(), fault).await.and_then(|answer| {
                // A grant that comes back after this life stopped is not installed, nor is its
                // previous owner told to drop the copy it keeps aside: the manager takes the
                // grant back from there, as one that never reached its writer.
                self.alive().map(|()| answer)
            }) {
                Ok(answer) => answer,
                Err(e) => {
                    frame.reopen();
                    return Err(e);
                }
            };
            match answer {
                Response::Grant { version, data, zero, backup, previous } => {
                    let data = match (data, zero) {
                        (Some(d), _) => Some(d.into_shared()),
                        (None, true) => Some(zeros()),
                        (None, false) => None,
                    };
                    // Taken before the grant is installed and kept for the write: a fault of
                    // another node answered meanwhile takes the page only once this node has
                    // written it. Let go, two nodes writing one page could take it from each
                    // other for ever, neither writing. Nothing holds it long: a fetch of the
                    // version granted here waits for the grant without it.
                    let writer = Arc::clone(&frame.writer).lock_owned().await;
                    // Its manager may have died since it sent the grant, and its recovery
                    // rebuilt the entry from a scan of this node that did not see the grant,
                    // naming the previous owner at the previous version: installed, this node
                    // would write a page the directory says is elsewhere. Refused as a late
                    // grant is, the fault goes to whoever manages the page now.
                    let asked = asked_at.load(Ordering::Relaxed);
                    match frame.install_grant_unless(version, data.clone(), backup, asked) {
                        Installed::Yes => {}
                        Installed::Stale => {
                            if let Some(data) = data {
                                frame.keep_refused(version, data);
                            }
                            // This node told the manager it lacked this version while the grant
                            // was on its way, and the manager may have taken it back, or a
                            // recovery scanned this node meanwhile: ask again.
                            tracing::debug!(
                                ?page,
                                version,
                                "dsm: a late grant refused; faulting again"
                            );
                            frame.reopen();
                            drop(faulting);
                            self.within_deadline(page, started)?;
                            continue;
                        }
                        Installed::NoCopy => {
                            tracing::error!(?page, version, "dsm: granted write access to a copy this node no longer holds; the page's last content is on its previous owner");
                            frame.reopen();
                            return Err(DsmError::Protocol(format!(
                                "{page:?}: granted version {version} without the page, and this node holds no copy"
                            )));
                        }
                    }
                    // Granted after this node's pages were handed over (the manager was slow):
                    // hand this one over too, rather than leave with it.
                    let leaving = self.state().leaving.load(Ordering::SeqCst);
                    let writer = (!leaving).then_some(writer);
                    let mut handed = None;
                    if leaving {
                        let service = self.node.service();
                        handed =
                            Some(service.surrender_page(&self.host.context(), page, &frame).await);
                    }
                    if handed == Some(Handed::Unanswered) {
                        let ctx = self.host.context();
                        let manager = ctx.snapshot().and_then(|s| s.locate(DSM, page.key()));
                        let service = self.node.service();
                        let fostered = match manager {
                            Some(m) => service.foster(&ctx, page, m, &frame).await,
                            None => false,
                        };
                        if !fostered {
                            frame.reopen();
                            tracing::warn!(?page, "dsm: could not hand a page granted as this node leaves to its manager, nor leave it on another node; it is lost unless a faulting node fetches it before this node goes");
                        }
                    }
                    let handed_over = handed == Some(Handed::Over);
                    // Once this node, or its manager, holds the page, the copy the previous
                    // owner kept aside is no longer its last content.
                    if !leaving || handed_over {
                        if let Some(previous) = previous.filter(|&p| p != self.me()) {
                            self.retire(previous, page, version - 1);
                        }
                    }
                    if leaving {
                        return Err(DsmError::Leaving);
                    }
                    if let Some(guard) =
                        writer.and_then(|w| self.writable(page, &frame, w, Some(version)))
                    {
                        return Ok(guard);
                    }
                }
                Response::Lost => {
                    frame.reopen();
                    return Err(DsmError::Lost { page });
                }
                other => {
                    frame.reopen();
                    return Err(DsmError::Protocol(format!("a write fault answered {other:?}")));
                }
            }
        }
    }

    /// Frees `segment` on every node: each drops its copies of the segment's pages and the
    /// directory entries it manages for them, and the segment reads as zeros afterwards, as one
    /// never written, even where a page's manager once died. Without it a program that makes
    /// segments as it goes holds every page it ever wrote, on every node that read it.
    ///
    /// Like freeing memory, it is for a segment nobody uses any more: an access running
    /// meanwhile may fail, or find zeros. A change of the cluster during the free can carry
    /// entries to a node already freed, so the free goes round the nodes again until one round
    /// sees a single epoch from start to end; it fails with [`DsmError::Stuck`] after the
    /// access deadline (a node unreachable and not yet declared failed, say).
    pub async fn free(&self, segment: &Segment) -> Result<(), DsmError> {
        Self::check(segment, 0, usize::try_from(segment.len).unwrap_or(usize::MAX))?;
        let started = tokio::time::Instant::now();
        let first = segment.page(0);
        let request = Request::Free { segment: segment.id };
        loop {
            let (epoch, answers) = self.tell_every_node(first.key(), &request).await?;
            let answers: Vec<_> = answers.into_iter().map(|(_, answer)| answer).collect();
            let freed = answers.iter().all(|a| matches!(a, Ok(Response::Ok)));
            if freed && self.host.context().epoch() == epoch {
                return Ok(());
            }
            if let Some(Ok(Response::Invalid(why))) =
                answers.iter().find(|a| matches!(a, Ok(Response::Invalid(_))))
            {
                return Err(DsmError::Protocol(why.clone()));
            }
            self.within_deadline(first, started)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Tells `request` to every node of the cluster at once, through `key`; returns the epoch
    /// it was sent at, and each node's answer.
    pub(crate) async fn tell_every_node(
        &self,
        key: Key,
        request: &Request,
    ) -> Result<(u64, Vec<(NodeId, Result<Response, AdaptationError>)>), DsmError> {
        let ctx = self.host.context();
        let epoch = ctx.epoch();
        let nodes = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
        if nodes.is_empty() {
            return Err(DsmError::Protocol("this node has not joined a cluster".into()));
        }
        let answers = futures::future::join_all(
            nodes.iter().map(|&n| ctx.tell::<_, Response>(n, DSM, key, request)),
        )
        .await;
        Ok((epoch, nodes.into_iter().zip(answers).collect()))
    }

    /// Starts a lost page afresh, zero-filled: the way out of [`DsmError::Lost`] once the
    /// program has decided what to do about the lost contents. `false` if the page was not
    /// lost: it keeps its contents.
    pub async fn discard(&self, page: PageId) -> Result<bool, DsmError> {
        page_of_a_segment(page)?;
        Ok(!matches!(self.ask(page.key(), &Request::Discard).await?, Response::Kept))
    }

    fn check(segment: &Segment, offset: u64, len: usize) -> Result<(), DsmError> {
        let end = offset.saturating_add(len as u64);
        // Past these, page ids would wrap onto other segments' or the same segment's pages.
        let most = (u64::from(u32::MAX) + 1) * PAGE_SIZE as u64;
        if segment.id > crate::MAX_SEGMENT {
            let page = PageId { segment: segment.id, page: (offset / PAGE_SIZE as u64) as u32 };
            return Err(DsmError::NoSuchSegment { page });
        }
        if end > most {
            return Err(DsmError::OutOfRange { segment: segment.id, offset, end, len: most });
        }
        if end > segment.len {
            return Err(DsmError::OutOfRange {
                segment: segment.id,
                offset,
                end,
                len: segment.len,
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, page by page (each page is read consistently; the
    /// range as a whole is not atomic: take a lock for that).
    pub async fn read_at(
        &self,
        segment: &Segment,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), DsmError> {
        Self::check(segment, offset, buf.len())?;
        for span in spans(segment, offset, buf.len()) {
            let guard = self.read(span.page).await?;
            buf[span.range()].copy_from_slice(&guard[span.within()]);
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`, page by page, each page committed before the next.
    pub async fn write_at(
        &self,
        segment: &Segment,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), DsmError> {
        Self::check(segment, offset, bytes.len())?;
        for span in spans(segment, offset, bytes.len()) {
            let mut guard = self.write(span.page).await?;
            guard[span.within()].copy_from_slice(&bytes[span.range()]);
            guard.commit().await?;
        }
        Ok(())
    }

    /// Takes cluster-wide lock `id`, waiting while another holds it (as long as it takes,
    /// unless [`crate::DsmConfig::wait_deadline`] is set). A lock held by a node that fails is
    /// freed. Cancel-safe: dropped before it returns (under a timeout, say), or failed, it
    /// releases whatever the manager may have granted it meanwhile.
    pub async fn lock(&self, id: u64) -> Result<LockGuard, DsmError> {
        let token =
            Token { node: self.me(), seq: self.state().seq.fetch_add(1, Ordering::Relaxed) };
        // Made before asking: a grant whose answer never reaches this node (the caller gave
        // up, or the answer was lost) would otherwise hold the lock for good. Its release is
        // harmless when nothing was granted: the manager lets go of this token only.
        let mut guard = LockGuard { dsm: self.clone(), id, token, released: false, asking: true };
        match self.ask(lock_key(id), &Request::Acquire(token)).await? {
            Response::Granted => {
                self.state().held.lock().expect("held").insert(id, token);
                guard.asking = false;
                Ok(guard)
            }
            other => {
                // Not granted: nothing to release.
                guard.released = true;
                Err(DsmError::Protocol(format!("acquire answered {other:?}")))
            }
        }
    }

    /// Waits until `parties` nodes have reached barrier `id` (one participant per node: every
    /// node calls it the same number of times), as long as it takes unless
    /// [`crate::DsmConfig::wait_deadline`] is set. A call that fails, or is dropped before it
    /// returns, may be made again: it waits for the same passage.
    ///
    /// Every id ever used is kept for the life of the cluster: a counter of passages on each
    /// node, and an entry at its manager, moved at every change like a page's. Nothing tells
    /// when a program is done with an id, and one forgotten on one side only would let a
    /// later call pass without waiting. So reuse an id for a barrier met again and again (one
    /// id for a whole loop of phases, as the MGS example does per segment) rather than take
    /// a new one per phase.
    pub async fn barrier(&self, id: u64, parties: u32) -> Result<(), DsmError> {
        // Both maps under both locks, `generations` first, here, when it ends, and in the
        // reports a recovery reads: a report must never see a passage counted that this node
        // neither passed nor waits at.
        let generation = {
            let mut gens = self.state().generations.lock().expect("generations");
            let g = gens.entry(id).or_insert(0);
            *g += 1;
            self.state().waiting.lock().expect("waiting").insert(id, *g);
            *g
        };
        let mut arrival = Arrival { state: self.state(), id, passed: false };
        let request = Request::Arrive { participant: self.me().0, generation, parties };
        match self.ask(barrier_key(id), &request).await? {
            Response::Passed => {
                arrival.passed = true;
                Ok(())
            }
            other => Err(DsmError::Protocol(format!("a barrier answered {other:?}"))),
        }
    }
}

/// This node at a barrier, until it passes or gives up (an error, or its caller dropped the
/// wait): then the next call waits for the same passage (an arrival counts once), not for the
/// one after, which the other nodes would reach a phase later.
struct Arrival<'a> {
    state: &'a NodeState,
    id: u64,
    passed: bool,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        let mut gens = self.state.generations.lock().expect("generations");
        self.state.waiting.lock().expect("waiting").remove(&self.id);
        if !self.passed {
            if let Some(g) = gens.get_mut(&self.id) {
                *g -= 1;
            }
        }
    }
}

/// The page `key` names, for an error; a lock's or a barrier's key, as a page of no segment.
fn page_named(key: Key) -> PageId {
    match named(key) {
        Named::Page(page) => page,
        _ => PageId { segment: u32::MAX, page: key.0 as u32 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{DsmConfig, Live};
    use gobelins_adaptation::testing::{replay, MemCluster};
    use gobelins_adaptation::{plugin, HostConfig, Registry};
    use std::sync::Mutex;

    /// A writer's grant reaches it, then its manager dies before it is installed: the
    /// recovery's scan of the writer saw no grant, and the page's entry is rebuilt naming the
    /// previous owner at the previous version. Installed after that, the grant made the writer
    /// write a page whose readers went to the previous owner, and read what it held before.
    #[test]
    fn a_grant_installed_after_its_dead_manager_s_recovery_scanned_the_writer_is_refused() {
        replay(async {
            let made: Arc<Mutex<Vec<DsmNode>>> = Arc::new(Mutex::new(Vec::new()));
            let m = Arc::clone(&made);
            let mut mem = MemCluster::start(4, HostConfig::default(), move || {
                let node = DsmNode::new(DsmConfig::default());
                m.lock().expect("made").push(node.clone());
                let mut registry = Registry::new();
                registry.register(plugin(node.service())).expect("dsm registers");
                registry
            })
            .await;
            // The first registry built is only read for its declarations: node `n` is the
            // `n`th built.
            let node = |n: NodeId| made.lock().expect("made")[n.0 as usize].clone();
            let dsm = |n: NodeId| Dsm::new(node(n), mem.host(n));
            let page = PageId { segment: 1, page: 0 };
            let manager = mem.snapshot().locate(DSM, page.key()).expect("a manager");
            let others: Vec<NodeId> = mem.nodes().into_iter().filter(|&n| n != manager).collect();
            let (owner, writer, reader) = (others[0], others[1], others[2]);
            let (o, w, r) = (dsm(owner), dsm(writer), dsm(reader));

            let mut g = o.write(page).await.expect("the owner writes");
            g[0] = 1;
            g.commit().await.expect("the owner commits");
            let writing = tokio::spawn(async move {
                let mut g = w.write(page).await?;
                g[0] = 2;
                let version = g.version();
                g.commit().await?;
                Ok::<u64, DsmError>(version)
            });
            // The owner gives the page up for the grant while the writer's fault waits for its
            // answer, its frame's writer lock let go: held from now on, the grant waits for it.
            let given_up = node(owner).inner.frames.frame(page);
            let mut polls = 0;
            while !given_up.has_retired() {
                polls += 1;
                assert!(polls < 100_000, "the owner never gave the page up to the writer");
                tokio::time::sleep(Duration::from_micros(10)).await;
            }
            let frame = node(writer).inner.frames.frame(page);
            let held = Arc::clone(&frame.writer).lock_owned().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let slot = node(manager).inner.live.get(&page.key()).map(|e| Arc::clone(e.value()));
            let slot = slot.expect("the manager's entry");
            let granted = match &*slot.lock().await {
                Live::Page(e) if e.owner == Some(writer) => e.version,
                other => panic!("expected the page granted to the writer, got {other:?}"),
            };

            mem.fail(manager).await;
            drop(held);
            let version = writing.await.expect("the writer's task").expect("the write");
            let read = r.read(page).await.expect("the reader reads");
            assert_eq!(read[0], 2, "the reader sees the write");
            assert!(version > granted, "the grant the dead manager made was refused");
        });
    }
}
