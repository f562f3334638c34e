//! The DSM as a program on a node uses it: page guards, byte ranges, locks and barriers.
//!
//! Its parts: `guards` (what a program holds on a page or a lock), `faults` (read and write
//! faults), `ops` (byte ranges, frees, discards, locks and barriers).

mod faults;
mod guards;
mod ops;

pub use guards::{LockGuard, ReadGuard, WriteGuard};

use crate::error::DsmError;
use crate::node::{DsmNode, NodeState, DSM};
use crate::page::{named, Named, PageId, PAGE_SIZE};
use crate::protocol::{Request, Response};
use gobelins_adaptation::Host;
use gobelins_locator::{Key, NodeId};
use std::sync::atomic::Ordering;
use std::time::Duration;

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
                tracing::debug!(%page, node = previous.0, error = %e, "dsm: the previous owner was not told to drop the copy it keeps aside");
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
    use std::sync::Arc;
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
