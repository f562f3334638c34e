//! Moving a page between holders: fetching it, giving it, taking it back, and telling holders.

use super::{departed_since, invalidate, Absent, DsmService};
use crate::frames::{Bytes, Fetched};
use crate::node::DSM;
use crate::page::PageId;
use crate::protocol::{Granted, PageEntry, Request, Response};
use gobelins_adaptation::Context;
use gobelins_locator::NodeId;

impl DsmService {
    /// Asks `holder` for its copy of `page` at `version`.
    pub(super) async fn fetch_from(
        &self,
        ctx: &Context,
        holder: NodeId,
        page: PageId,
        version: u64,
        (writer, backup): (Option<NodeId>, Option<NodeId>),
    ) -> Result<Bytes, Absent> {
        let answer = if holder == ctx.node() {
            return self.give(ctx, page, version, (writer, backup), None).await;
        } else {
            let asked = ctx
                .tell::<_, Response>(
                    holder,
                    DSM,
                    page.key(),
                    &Request::Fetch { page, version, writer, backup },
                )
                .await;
            match asked {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::debug!(node = holder.0, %page, error = %e, "dsm: holder unreachable");
                    return Err(Absent::Unreachable);
                }
            }
        };
        match answer {
            Response::Page(data) => Ok(data.into_shared()),
            Response::Missing => Err(Absent::Missing),
            _ => Err(Absent::Unreachable),
        }
    }

    /// This node's copy of `page` at `version`, for a manager: kept as a read copy (no
    /// `writer`) or given up to `writer`, after the readers this node served directly are
    /// invalidated. `Missing` when it does not hold that version, `Unreachable` when a reader
    /// could not be reached or `manager`, the node asking (`None`: this one), has departed.
    pub(super) async fn give(
        &self,
        ctx: &Context,
        page: PageId,
        version: u64,
        (writer, backup): (Option<NodeId>, Option<NodeId>),
        manager: Option<NodeId>,
    ) -> Result<Bytes, Absent> {
        let frame = self.state().frames.frame(page);
        let departed = departed_since(ctx, manager);
        // A revocation closed the frame to direct reads: unless the page is given up, it is
        // opened again, or this owner would send every hinted reader to the manager until its
        // next grant. A leaving node answers no direct read whatever the frame says, so this
        // cannot undo the closing of a hand-over.
        let mut revoking = false;
        loop {
            let wait = self.state().config.fetch_wait;
            match frame.fetch(version, (writer, backup), wait, &departed).await {
                Fetched::Page(data) => return Ok(data),
                Fetched::Missing => {
                    if revoking {
                        frame.reopen();
                    }
                    return Err(Absent::Missing);
                }
                Fetched::Busy | Fetched::Departed => {
                    if revoking {
                        frame.reopen();
                    }
                    return Err(Absent::Unreachable);
                }
                Fetched::Revoke(readers) => {
                    revoking = true;
                    let done =
                        invalidate(self.state(), ctx, page, version, readers.clone(), None).await;
                    frame.revoked(&done);
                    if done.len() < readers.len() {
                        frame.reopen();
                        return Err(Absent::Unreachable);
                    }
                }
            }
        }
    }

    /// Takes back the grant that made `entry.owner` the owner of `entry.version`, which never
    /// reached it (its writer gave up waiting, or says it holds an older copy): the page goes
    /// back to a node that holds the content that grant carried, relabelled with the entry's
    /// version so that versions only grow. In order: the owner's own copy of the entry's
    /// version (the grant did reach it, and a later write fault that took it failed), where
    /// the grant took the page from (which
    /// keeps it aside until the writer says the grant landed, or is the writer itself), the
    /// backup placed with the grant, and the owner, should the grant have reached it after it
    /// said it lacked it (it keeps such a grant aside). A node that does not answer stops the
    /// search: it may have done the promotion, and asking another could make two owners.
    /// Whether the entry is settled: it names a holder of the content, none (a page never
    /// written), or the page is lost because every candidate said it holds nothing.
    pub(super) async fn take_back(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &mut PageEntry,
    ) -> bool {
        let version = entry.version;
        // First, the owner's own copy of this very version: the grant did reach it, and it
        // gave the page up to a later write fault that then failed (a backup it could not
        // place, an answer lost). Nothing is newer, and anything else would undo its writes.
        if let Some(owner) = entry.owner.filter(|&o| !self.gone(ctx, o)) {
            match self.promote_on(ctx, owner, page, version, Some(version)).await {
                Ok(()) => {
                    self.taken_back_by(ctx, page, entry, owner);
                    return true;
                }
                Err(Absent::Missing) => {}
                Err(Absent::Unreachable) => return false,
            }
        }
        if entry.granted == Granted::Zero {
            // Copies in the copyset stay known: the next write invalidates them.
            entry.owner = None;
            self.settle_grant(ctx, page, entry);
            tracing::warn!(
                %page,
                version,
                "dsm: a zero-filled write grant that never reached its writer was taken back"
            );
            return true;
        }
        let (source, before) = match entry.granted {
            Granted::From { node, label } | Granted::Disowned { node, label } => {
                // Remembered until the grant is taken back: should the owner go before a node
                // that did not answer does, the content is still found where it was.
                entry.granted = Granted::Disowned { node, label };
                (Some((node, Some(label))), Some(label))
            }
            _ => (None, None),
        };
        // Last, the writer's own read copy of the version the grant was made from, which is
        // the content it carried (the source already covers a writer that owned the page).
        let held = entry
            .owner
            .filter(|&o| source.is_none_or(|(s, _)| s != o))
            .zip(before)
            .map(|(o, label)| (o, Some(label)));
        // The owner again: a grant it said it lacked may have reached it since (it keeps such
        // a grant aside).
        let candidates = [
            source,
            entry.backup.map(|b| (b, None)),
            entry.owner.map(|o| (o, Some(version))),
            held,
        ];
        for (node, label) in candidates.into_iter().flatten() {
            if self.gone(ctx, node) {
                continue;
            }
            match self.promote_on(ctx, node, page, version, label).await {
                Ok(()) => {}
                Err(Absent::Missing) => continue,
                Err(Absent::Unreachable) => return false,
            }
            self.taken_back_by(ctx, page, entry, node);
            return true;
        }
        // Last, the other readers of this very version, for their read copies alone: an owner
        // a failure's repair chose from the copyset may hold nothing (a reader evicted and
        // back under its id, to a manager in another cell that took no part in either change),
        // while they hold the page. Not through `Promote`, which would take a backup kept
        // there under the same label, perhaps of an older commit (the review of `c29d11e`).
        let owner = entry.owner;
        let readers: Vec<NodeId> = entry
            .copyset
            .iter()
            .copied()
            .filter(|&n| Some(n) != owner && !self.gone(ctx, n))
            .collect();
        for node in readers {
            match self.told(ctx, node, page, Request::Adopt { page, version }).await {
                Some(Response::Ok) => {
                    self.taken_back_by(ctx, page, entry, node);
                    return true;
                }
                Some(Response::Missing) => continue,
                _ => return false,
            }
        }
        tracing::warn!(%page, version, "dsm: page lost: a write grant never reached its writer, and no node holds what it carried");
        self.found_lost(u64::from(!entry.lost));
        *entry = PageEntry { lost: true, version, ..PageEntry::default() };
        true
    }

    /// Records that `node` promoted its copy of `page` to the owned page at the entry's
    /// version, taking back a grant that never reached its writer.
    fn taken_back_by(&self, ctx: &Context, page: PageId, entry: &mut PageEntry, node: NodeId) {
        entry.owner = Some(node);
        entry.copyset = [node].into();
        // The writer may still hold a read copy of the version before, and a node that timed
        // out an earlier try may hold a promoted one: the next write invalidates every node.
        entry.strays = true;
        // Never its own backup: the next grant places one.
        if entry.backup == Some(node) {
            entry.backup = None;
        }
        self.settle_grant(ctx, page, entry);
        // Routine after a writer's death (its grant in flight): nothing written is lost.
        tracing::info!(
            %page,
            version = entry.version,
            owner = node.0,
            "dsm: a write grant that never reached its writer (it died, or timed out) was taken back; the page is as it was before the grant, and no write is lost"
        );
    }

    /// Asks `node` to make its copy of `page` the owned page at `version` (see
    /// [`Request::Promote`]).
    pub(super) async fn promote_on(
        &self,
        ctx: &Context,
        node: NodeId,
        page: PageId,
        version: u64,
        label: Option<u64>,
    ) -> Result<(), Absent> {
        match self.told(ctx, node, page, Request::Promote { page, version, label }).await {
            Some(Response::Ok) => Ok(()),
            Some(Response::Missing) => Err(Absent::Missing),
            _ => Err(Absent::Unreachable),
        }
    }

    /// Sends `request` to `node`'s local server, or runs it here; `None` when `node` did not
    /// answer.
    pub(super) async fn told(
        &self,
        ctx: &Context,
        node: NodeId,
        page: PageId,
        request: Request,
    ) -> Option<Response> {
        if node == ctx.node() {
            return Some(self.local(ctx, request).await);
        }
        ctx.tell::<_, Response>(node, DSM, page.key(), &request).await.ok()
    }

    /// [`DsmService::told`], and whether `node` answered `Ok`.
    pub(crate) async fn tell(
        &self,
        ctx: &Context,
        node: NodeId,
        page: PageId,
        request: Request,
    ) -> bool {
        matches!(self.told(ctx, node, page, request).await, Some(Response::Ok))
    }

    /// Records that the entry's last grant landed or was taken back: nothing of it is kept
    /// aside any more.
    pub(super) fn settle_grant(&self, ctx: &Context, page: PageId, entry: &mut PageEntry) {
        entry.granted = Granted::Unknown;
        self.release_aside(ctx, page, entry);
    }

    /// Drops the copy this manager keeps aside for `page` when the entry's grant does not
    /// name this node as where it took the page from: the grant that copy was kept for
    /// landed, or was taken back. Kept, it would hold memory for ever, and a `scan` after
    /// this node's failure would offer it as the page's content.
    pub(super) fn release_aside(&self, ctx: &Context, page: PageId, entry: &PageEntry) {
        if entry.granted.source().is_some_and(|(n, _)| n == ctx.node()) {
            return;
        }
        if let Some(frame) = self.state().frames.get(page) {
            frame.drop_retired(u64::MAX);
        }
    }
}
