//! Byte ranges across pages, segments freed, pages discarded, locks and barriers.

use super::{page_of_a_segment, spans, Dsm, LockGuard, Segment};
use crate::error::DsmError;
use crate::node::{NodeState, DSM};
use crate::page::{barrier_key, lock_key, PageId, PAGE_SIZE};
use crate::protocol::{Request, Response, Token};
use gobelins_adaptation::AdaptationError;
use gobelins_locator::{Key, NodeId};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// This node at a barrier, until it passes or gives up (an error, or its caller dropped the
/// wait): then the next call waits for the same passage (an arrival counts once), not for the
/// one after, which the other nodes would reach a phase later.
pub(super) struct Arrival<'a> {
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

impl Dsm {
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

    /// Lifts the taint of the slot `page` falls in, once the program or its operator accepts
    /// what that slot's failed manager took with it: its pages no node reported read as zeros
    /// again, as never written, and so do those first asked for while it was tainted.
    /// `Some(n)`: the taint is lifted, and `n` pages reported lost meanwhile are new again;
    /// `None`: the slot was not tainted. A page lost otherwise (every copy died) stays lost
    /// until [`Dsm::discard`]ed. [`Dsm::losses`] lists the tainted slots.
    pub async fn forgive(&self, page: PageId) -> Result<Option<u64>, DsmError> {
        page_of_a_segment(page)?;
        let slot = self.state().spec.slot_of(page.key());
        let forgiven = self.forgive_slot(slot).await?;
        if let Some(reset) = forgiven {
            tracing::warn!(%page, slot, reset, "dsm: the taint of a page's slot was lifted (`dsm forgive`): its pages nobody reported after its manager failed read as zeros, as never written");
        }
        Ok(forgiven)
    }

    /// [`Dsm::forgive`] of every slot, a few at a time: after every node of the cluster
    /// stopped at once (a power cut), every slot is tainted. The slots forgiven, and the pages
    /// made new again.
    pub async fn forgive_all(&self) -> Result<(u32, u64), DsmError> {
        use futures::StreamExt as _;
        let slots = self.state().spec.slots;
        let mut asked = futures::stream::iter(0..slots)
            .map(|slot| self.forgive_slot(slot))
            .buffer_unordered(16);
        let (mut forgiven, mut reset) = (0, 0);
        let mut failed = None;
        while let Some(answer) = asked.next().await {
            match answer {
                Ok(Some(n)) => {
                    forgiven += 1;
                    reset += n;
                }
                Ok(None) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if forgiven > 0 {
            tracing::warn!(slots = forgiven, reset, "dsm: the taints of every slot were lifted (`dsm forgive --all`): pages nobody reported after their managers failed read as zeros, as never written");
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((forgiven, reset)),
        }
    }

    async fn forgive_slot(&self, slot: u32) -> Result<Option<u64>, DsmError> {
        match self.ask(crate::page::taint_key(slot), &Request::Forgive).await? {
            Response::Forgiven { reset } => Ok(Some(reset)),
            Response::Kept => Ok(None),
            other => Err(DsmError::Protocol(format!("unexpected answer to a forgive: {other:?}"))),
        }
    }

    fn check(segment: &Segment, offset: u64, len: usize) -> Result<(), DsmError> {
        let end = offset.saturating_add(len as u64);
        let most = crate::MAX_SEGMENT_LEN;
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
