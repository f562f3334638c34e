//! A program's read and write faults: a page fetched from its owner or through its manager,
//! and the copies revoked before a write.

use super::{page_of_a_segment, Dsm, ReadGuard, WriteGuard};
use crate::error::DsmError;
use crate::frames::{zeros, Frame, Installed};
use crate::leave::Handed;
use crate::node::DSM;
use crate::page::PageId;
use crate::protocol::{Request, Response};
use crate::service;
use gobelins_locator::NodeId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

impl Dsm {
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
                    %page,
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
    pub(super) fn hint(&self, page: PageId, owner: Option<NodeId>) {
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
                    %page,
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
                                %page,
                                version,
                                "dsm: a late grant refused; faulting again"
                            );
                            frame.reopen();
                            drop(faulting);
                            self.within_deadline(page, started)?;
                            continue;
                        }
                        Installed::NoCopy => {
                            tracing::error!(%page, version, "dsm: granted write access to a copy this node no longer holds; the page's last content is on its previous owner");
                            frame.reopen();
                            return Err(DsmError::Protocol(format!(
                                "{page}: granted version {version} without the page, and this node holds no copy"
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
                            tracing::warn!(%page, "dsm: could not hand a page granted as this node leaves to its manager, nor leave it on another node; it is lost unless a faulting node fetches it before this node goes");
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
}
