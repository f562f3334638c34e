//! The DSM as the adaptation layer sees it: the manager's side of write-invalidate (Li and
//! Hudak's fixed distributed manager, with the manager found by the locator), the holder's
//! side, and what happens to entries and frames when the cluster changes.

use crate::cover::{kept_elsewhere, vouches};
use crate::directory::{digest, rebuild, repair, Report};
use crate::frames::{Bytes, Fetched, Retired, FINAL};
use crate::freed::Freed;
use crate::held::{Held, EXPOSED};
use crate::node::{DsmNode, Live, NodeState, DSM};
use crate::page::{named, taint_key, Named, PageId};
use crate::protocol::{Entry, Granted, LockEntry, PageBytes, PageEntry, Request, Response};
use futures::StreamExt;
use gobelins_adaptation::{ChangeInfo, Context, Moving, Service};
use gobelins_locator::{Change, Key, NodeId, ServiceSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;

/// How long a barrier's manager keeps an arrival waiting before telling it to ask again. It
/// answers at once when a change begins, which waits for the handlers in progress: one in
/// three joins during MGS waited out this poll, 20 ms, in its before-migration phase.
const BARRIER_POLL: Duration = Duration::from_millis(20);

/// Pages given a new backup at once after a change: enough to overlap the round trips, few
/// enough not to flood the owners while they serve requests.
pub(crate) const RESTORING: usize = 16;

/// How often, and how far apart, a manager asks an owner busy writing to move its backup off
/// a leaving node: its write commits to the leaving node, which still answers, in moments.
const ABANDON_TRIES: usize = 5;
const ABANDON_PAUSE: Duration = Duration::from_millis(10);

/// How long a manager takes an owner that did not answer one such request as not answering:
/// it is not asked again for the leaving node's other pages, whose copies it stores at once.
const OWNER_SILENCE: Duration = Duration::from_secs(5);

/// How often, and how far apart, a recovery asks again a backup that did not answer its
/// promotion (each ask waits up to the layer's call timeout): the page is lost otherwise.
const PROMOTE_TRIES: usize = 3;
const PROMOTE_PAUSE: Duration = Duration::from_millis(50);

/// A page the sweep found with no live backup: the page, its entry, its owner, the entry's
/// version, the node to back it up on, and the backup the entry names now.
pub(crate) type Exposed = (PageId, Arc<AsyncMutex<Live>>, NodeId, u64, NodeId, Option<NodeId>);

/// A reader a recovery made a page's owner, at `version`, to be told to own its copy with
/// `backup` as its backup (see [`DsmService::mend`]).
struct Reader {
    reader: NodeId,
    version: u64,
    backup: NodeId,
}

/// Why a holder's copy could not be had.
#[derive(Debug)]
enum Absent {
    /// The holder answered that it does not hold that version: after a wait for a grant on
    /// its way, and refusing that grant should it come later.
    Missing,
    /// The holder, or a reader it had to revoke first, did not answer.
    Unreachable,
}

/// The plug-in: register it with [`gobelins_adaptation::plugin`].
pub struct DsmService {
    pub(crate) node: DsmNode,
}

/// Whether `n` is still in the cluster at the context's epoch.
fn present(ctx: &Context, n: NodeId) -> bool {
    ctx.snapshot().is_none_or(|s| s.nodes().contains(&n))
}

/// The first node after `after` in `nodes` (wrapping), other than `after` and `avoid`.
fn next_node(nodes: &[NodeId], after: NodeId, avoid: Option<NodeId>) -> Option<NodeId> {
    let at = nodes.iter().position(|&n| n == after).unwrap_or(0);
    nodes
        .iter()
        .cycle()
        .skip(at + 1)
        .take(nodes.len())
        .copied()
        .find(|&n| n != after && Some(n) != avoid)
}

/// Whether `n` holds nothing any more: it failed, or left the cluster.
pub(crate) fn gone(state: &NodeState, ctx: &Context, n: NodeId) -> bool {
    !present(ctx, n) || state.failed.lock().expect("failed").holds(ctx, n)
}

/// Invalidates the read copies of `page` up to `version` that `nodes` hold, all at once, and
/// returns the nodes done with: those that dropped their copy, and those gone from the
/// cluster. `owner` is the page's next owner, for the readers' hints.
pub(crate) async fn invalidate(
    state: &NodeState,
    ctx: &Context,
    page: PageId,
    version: u64,
    nodes: impl IntoIterator<Item = NodeId>,
    owner: Option<NodeId>,
) -> Vec<NodeId> {
    let request = Request::Invalidate { page, version, backup: false, owner };
    let answers = futures::future::join_all(nodes.into_iter().map(|n| {
        let request = request.clone();
        async move {
            let done = if n == ctx.node() {
                drop_copy(state, ctx, page, version, owner, None).await
            } else {
                matches!(
                    ctx.tell::<_, Response>(n, DSM, page.key(), &request).await,
                    Ok(Response::Ok)
                )
            };
            (n, done)
        }
    }))
    .await;
    answers.into_iter().filter(|&(n, done)| done || gone(state, ctx, n)).map(|(n, _)| n).collect()
}

/// Whether `manager`, the node asking (`None`: this one), has departed since now: the
/// cluster gave up on it, or on the life that asked, its id back as a new life meanwhile.
fn departed_since(ctx: &Context, manager: Option<NodeId>) -> impl Fn() -> bool + Sync + '_ {
    let since = manager.map(|m| ctx.departures(m));
    move || manager.is_some_and(|m| ctx.gone(m) || Some(ctx.departures(m)) != since)
}

/// Drops this node's copy of `page` up to `version`, and notes where to read it next. An
/// owner first invalidates the readers it served directly, except the next owner, whose copy
/// is the page it is being granted; `false` if one could not be reached, and then nothing was
/// dropped. Nor is this node's copy dropped once `manager`, the node asking (`None`: this
/// one), has departed (the readers it served may have been already): the survivors' `scan`
/// may have counted the copy (see [`crate::frames::Frame::fetch`]).
async fn drop_copy(
    state: &NodeState,
    ctx: &Context,
    page: PageId,
    version: u64,
    owner: Option<NodeId>,
    manager: Option<NodeId>,
) -> bool {
    let departed = departed_since(ctx, manager);
    let frame = state.frames.frame(page);
    let readers: Vec<NodeId> =
        frame.close(version).into_iter().filter(|&r| Some(r) != owner).collect();
    if !readers.is_empty() {
        let done = Box::pin(invalidate(state, ctx, page, version, readers.clone(), owner)).await;
        frame.revoked(&done);
        if done.len() < readers.len() {
            frame.reopen();
            return false;
        }
    }
    if !frame.invalidate_unless(version, &departed) {
        frame.reopen();
        return false;
    }
    tracing::debug!(?page, node = ctx.node().0, version, next = ?owner, "dsm: copy dropped");
    match owner {
        Some(o) => state.hints.insert(page, o),
        None => state.hints.remove(&page).map(|(_, o)| o),
    };
    true
}

impl DsmService {
    pub(crate) fn state(&self) -> &crate::node::NodeState {
        &self.node.inner
    }

    /// Whether `n` failed, and is not back since: its copies are gone, and the pages it owned
    /// must be rebuilt.
    fn failed(&self, ctx: &Context, n: NodeId) -> bool {
        self.state().failed.lock().expect("failed").holds(ctx, n)
    }

    /// Whether the copies `n` held are gone for good: it failed, or it left and the cluster
    /// is done with its leave. A page a leaving owner could not hand over (its manager did not
    /// answer) is then rebuilt from what survives, or reported lost, rather than asked of a
    /// node that is no longer there until every access to it fails.
    fn lost_holder(&self, ctx: &Context, n: NodeId) -> bool {
        self.failed(ctx, n) || ctx.gone(n)
    }

    /// Whether `n` holds nothing any more: it failed, or left the cluster.
    pub(crate) fn gone(&self, ctx: &Context, n: NodeId) -> bool {
        gone(self.state(), ctx, n)
    }

    /// The manager's entry for `key`, made on first use. A page with no entry in a slot whose
    /// manager died is lost, not new.
    fn slot(&self, key: Key) -> Arc<AsyncMutex<Live>> {
        let st = self.state();
        if let Some(s) = st.live.get(&key) {
            return Arc::clone(&s);
        }
        let fresh = match named(key) {
            Named::Page(page) => {
                let marker = taint_key(st.spec.slot_of(key));
                let freed = || {
                    let freed = st.freed.lock().expect("freed");
                    freed.get(&marker).is_some_and(|segments| segments.contains(page.segment))
                };
                let tainted = st.live.contains_key(&marker) && !freed();
                Live::Page(PageEntry { lost: tainted, ..PageEntry::default() })
            }
            Named::Lock(_) => Live::Lock(LockEntry::default()),
            Named::Barrier(_) => Live::Barrier(Default::default()),
            Named::Taint => Live::Taint,
        };
        Arc::clone(&st.live.entry(key).or_insert_with(|| {
            // Counted once, by whoever makes the entry.
            if matches!(fresh, Live::Page(PageEntry { lost: true, .. })) {
                self.found_lost(1);
                if let Named::Page(page) = named(key) {
                    let what = "pages found lost in slots whose manager died";
                    gobelins_adaptation::log_budget::budgeted(&st.lost_lines, what, || {
                        tracing::warn!(?page, "dsm: page lost: its manager failed, and no surviving node reported a copy of it (every copy died with the manager or before it; or the page was never written, which nobody can tell now). Discard it or free its segment once what mattered is restored")
                    });
                }
            }
            Arc::new(AsyncMutex::new(fresh))
        }))
    }

    /// `pages` more pages this node manages became lost.
    fn found_lost(&self, pages: u64) {
        self.state().lost.fetch_add(pages, Ordering::Relaxed);
    }

    /// Asks `holder` for its copy of `page` at `version`.
    async fn fetch_from(
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
                    tracing::debug!(node = holder.0, ?page, error = %e, "dsm: holder unreachable");
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
    async fn give(
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
    async fn take_back(&self, ctx: &Context, page: PageId, entry: &mut PageEntry) -> bool {
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
                ?page,
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
        // The owner again, last: a grant it said it lacked may have reached it since (it
        // keeps such a grant aside).
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
        tracing::warn!(?page, version, "dsm: page lost: a write grant never reached its writer, and no node holds what it carried");
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
        tracing::warn!(
            ?page,
            version = entry.version,
            owner = node.0,
            "dsm: a write grant that never reached its writer was taken back"
        );
    }

    /// Asks `node` to make its copy of `page` the owned page at `version` (see
    /// [`Request::Promote`]).
    async fn promote_on(
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
    async fn told(
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

    /// Makes `backup` the owner of `page` from the backup copy it keeps. `Missing` when it
    /// does not hold that version; `Unreachable` when it did not answer, and may well hold it.
    async fn promote(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &mut PageEntry,
        backup: NodeId,
    ) -> Result<(), Absent> {
        self.promote_on(ctx, backup, page, entry.version, None).await?;
        entry.owner = Some(backup);
        entry.copyset = [backup].into();
        entry.backup = None;
        self.settle_grant(ctx, page, entry);
        entry.lost = false;
        entry.strays = true;
        tracing::info!(?page, node = backup.0, "dsm: page rebuilt from its backup");
        Ok(())
    }

    /// [`DsmService::promote`], asked again a few times while `backup` does not answer and is
    /// not gone: a connection reset or one slow answer must not make a page whose copy
    /// survives lost for good. A node in `unanswering` (it did not answer one page's tries)
    /// is asked once: a node that stopped answering costs a recovery one call per page, not
    /// several.
    async fn promote_patiently(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &mut PageEntry,
        backup: NodeId,
        unanswering: &mut BTreeSet<NodeId>,
    ) -> Result<(), Absent> {
        let mut tries = if unanswering.contains(&backup) { PROMOTE_TRIES } else { 0 };
        loop {
            match self.promote(ctx, page, entry, backup).await {
                Err(Absent::Unreachable) if tries >= PROMOTE_TRIES => {
                    unanswering.insert(backup);
                    return Err(Absent::Unreachable);
                }
                Err(Absent::Unreachable) if !self.gone(ctx, backup) => {
                    tries += 1;
                    tracing::debug!(
                        ?page,
                        node = backup.0,
                        tries,
                        "dsm: the backup did not answer a promotion; asking again"
                    );
                    tokio::time::sleep(PROMOTE_PAUSE).await;
                }
                done => {
                    // It answers again: full patience for its next page.
                    unanswering.remove(&backup);
                    return done;
                }
            }
        }
    }

    /// Mends an entry whose nodes left: a reader or the backup takes over a dead owner's page.
    /// False when an owner that disowned its grant is gone and a node holding what the grant
    /// carried did not answer: the fault is asked again.
    async fn mend(&self, ctx: &Context, page: PageId, entry: &mut PageEntry, fault: bool) -> bool {
        let (settled, reader) = self.mend_entry(ctx, page, entry, fault).await;
        if let Some(Reader { reader, version, backup }) = reader {
            self.own_read_copy(ctx, page, reader, version, backup).await;
        }
        settled
    }

    /// [`DsmService::mend`], but for the reader it made the owner, which it leaves the caller
    /// to tell: the sweep tells them all at once, after it lets go of their entries.
    async fn mend_entry(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &mut PageEntry,
        fault: bool,
    ) -> (bool, Option<Reader>) {
        self.release_aside(ctx, page, entry);
        // A failed owner that never had its grant takes nothing with it: the content is where
        // the grant took it from. Only when no live reader holds the page (a reader holds what
        // the owner held), and only at a fault: the sweep after a change must not wait on a
        // source that does not answer, and leaves the entry for the next fault.
        let disowned = matches!(entry.granted, Granted::Disowned { .. })
            && entry.owner.is_some_and(|o| self.lost_holder(ctx, o))
            && entry.copyset.iter().all(|&n| Some(n) == entry.owner || self.gone(ctx, n));
        if disowned && !fault {
            return (true, None);
        }
        if disowned && !self.take_back(ctx, page, entry).await {
            return (false, None);
        }
        let promote = entry
            .owner
            .filter(|&o| self.lost_holder(ctx, o))
            .filter(|&o| entry.copyset.iter().all(|&n| n == o || self.gone(ctx, n)))
            .and(entry.backup.filter(|&b| !self.gone(ctx, b)));
        if let Some(backup) = promote {
            match self.promote(ctx, page, entry, backup).await {
                Ok(()) => return (true, None),
                // It did not answer, and the cluster has not given up on it: it may well hold
                // the page. The fault is asked again (the sweep leaves it for the next fault)
                // rather than the page called lost for good.
                Err(Absent::Unreachable) if !self.gone(ctx, backup) => {
                    tracing::warn!(
                        ?page,
                        node = backup.0,
                        "dsm: a page's backup did not answer its promotion; the page waits for it"
                    );
                    return (false, None);
                }
                Err(_) => entry.backup = None,
            }
        }
        let was_lost = entry.lost;
        let before = entry.owner;
        if repair(entry, |n| self.gone(ctx, n), |n| self.lost_holder(ctx, n)) && entry.lost {
            tracing::warn!(?page, "dsm: page lost: every node holding a copy failed");
            self.found_lost(u64::from(!was_lost));
        }
        // A reader made the owner holds a read copy: told to own it, as an owner it hands it
        // over when it leaves. Left a read copy, its leave handed nothing over, the entry went
        // on naming it, and once it came back as a new life the page was lost. `BackupTo` its
        // backup makes it own the copy only while it still holds that very version, so a late
        // delivery cannot bring back a copy given up since. A page with no backup left, or
        // whose reader keeps its backup too, gets one elsewhere from `restore_backups`, by
        // `BackupTo` as well.
        let reader = entry.owner.filter(|&o| Some(o) != before && Some(o) != entry.backup);
        let reader = reader.zip(entry.backup);
        (true, reader.map(|(reader, backup)| Reader { reader, version: entry.version, backup }))
    }

    /// Tells `reader`, which the entry now names the owner of `page` at `version` from the
    /// read copy it holds, to own that copy, with `backup` as its backup (see
    /// [`DsmService::mend`]). Whether it answered.
    async fn own_read_copy(
        &self,
        ctx: &Context,
        page: PageId,
        reader: NodeId,
        version: u64,
        backup: NodeId,
    ) -> bool {
        let request = Request::BackupTo { page, version, node: backup, replaces: None };
        let answer = self.told(ctx, reader, page, request).await;
        if !matches!(answer, Some(Response::Ok | Response::BackedUp(_))) {
            tracing::debug!(?page, node = reader.0, ?answer, "dsm: a reader made the owner did not take its copy as the page; it does when next backed up");
        }
        answer.is_some()
    }

    /// [`DsmService::own_read_copy`] for each of `readers`, 16 at a time, with no entry held.
    /// A reader that did not answer for one page is not asked for its others: each would
    /// wait out a call timeout, and the change with them. Such a page stays a read copy
    /// until its next write or backup.
    async fn own_read_copies(&self, ctx: &Context, readers: Vec<(PageId, Reader)>) {
        let unanswering: std::sync::Mutex<BTreeSet<NodeId>> = Default::default();
        let unanswering = &unanswering;
        futures::stream::iter(readers)
            .for_each_concurrent(RESTORING, |(page, r)| async move {
                if unanswering.lock().expect("unanswering").contains(&r.reader) {
                    return;
                }
                if !self.own_read_copy(ctx, page, r.reader, r.version, r.backup).await {
                    unanswering.lock().expect("unanswering").insert(r.reader);
                }
            })
            .await;
    }

    /// Records that the entry's last grant landed or was taken back: nothing of it is kept
    /// aside any more.
    fn settle_grant(&self, ctx: &Context, page: PageId, entry: &mut PageEntry) {
        entry.granted = Granted::Unknown;
        self.release_aside(ctx, page, entry);
    }

    /// Drops the copy this manager keeps aside for `page` when the entry's grant does not
    /// name this node as where it took the page from: the grant that copy was kept for
    /// landed, or was taken back. Kept, it would hold memory for ever, and a `scan` after
    /// this node's failure would offer it as the page's content.
    fn release_aside(&self, ctx: &Context, page: PageId, entry: &PageEntry) {
        if entry.granted.source().is_some_and(|(n, _)| n == ctx.node()) {
            return;
        }
        if let Some(frame) = self.state().frames.get(page) {
            frame.drop_retired(u64::MAX);
        }
    }

    async fn read_fault(&self, ctx: &Context, page: PageId, reader: NodeId) -> Response {
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        let Live::Page(entry) = &mut *live else { return Response::Invalid("not a page".into()) };
        if !self.mend(ctx, page, entry, true).await {
            return Response::Retry;
        }
        if entry.lost {
            return Response::Lost;
        }
        let me = ctx.node();
        let Some(owner) = entry.owner else {
            entry.copyset.insert(reader);
            return Response::Copy { version: entry.version, data: None, owner: None };
        };
        let frames = &self.state().frames;
        let cached = (owner != me && entry.copyset.contains(&me))
            .then(|| frames.frame(page).readable())
            .flatten()
            .filter(|(v, _)| *v == entry.version);
        let data = match cached {
            Some((_, data)) => data,
            None => {
                let data =
                    match self.fetch_from(ctx, owner, page, entry.version, (None, None)).await {
                        // The owner holds its version after all (a take-back promoted it).
                        Ok(data) => {
                            self.settle_grant(ctx, page, entry);
                            data
                        }
                        Err(Absent::Missing) => {
                            // The owner lacks the version it was granted: take the grant back, and
                            // the reader asks again.
                            self.take_back(ctx, page, entry).await;
                            return Response::Retry;
                        }
                        Err(Absent::Unreachable) => return Response::Retry,
                    };
                // Later readers are served from here, one round trip instead of two.
                if owner != me {
                    frames.frame(page).install_read(entry.version, Arc::clone(&data));
                    entry.copyset.insert(me);
                }
                entry.copyset.insert(owner);
                data
            }
        };
        entry.copyset.insert(reader);
        tracing::debug!(
            ?page,
            manager = me.0,
            reader = reader.0,
            version = entry.version,
            owner = owner.0,
            "dsm: read copy given"
        );
        Response::Copy {
            version: entry.version,
            data: Some(PageBytes::shared(&data)),
            owner: Some(owner),
        }
    }

    async fn write_fault(
        &self,
        ctx: &Context,
        page: PageId,
        writer: NodeId,
        have: Option<u64>,
        refused: u64,
    ) -> Response {
        if !present(ctx, writer) {
            // A fault held through the change that evicted its node: the page would be granted
            // to a node that is gone.
            return Response::Departed;
        }
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        let Live::Page(entry) = &mut *live else { return Response::Invalid("not a page".into()) };
        if !self.mend(ctx, page, entry, true).await {
            return Response::Retry;
        }
        if entry.lost {
            return Response::Lost;
        }
        // Its own write faults are serialized on a node, so the writer holds what it says.
        if entry.owner == Some(writer) && have != Some(entry.version) {
            tracing::info!(
                ?page,
                writer = writer.0,
                version = entry.version,
                ?have,
                "dsm: the owner does not hold the version it was granted"
            );
            if !self.take_back(ctx, page, entry).await {
                return Response::Retry;
            }
            if entry.lost {
                return Response::Lost;
            }
        }
        let version = entry.version;
        let owner = entry.owner;
        // Only the owner's own copy is sure to be there when the grant arrives: a reader's
        // copy can be revoked meanwhile by the owner, so a reader is sent the page.
        let current = owner == Some(writer);

        // Every other copy goes first: once granted, the writer is the only holder. The
        // owner's goes with the page, below.
        let mut drop: BTreeSet<NodeId> =
            entry.copyset.iter().copied().filter(|&n| n != writer && Some(n) != owner).collect();
        if entry.strays {
            // Readers a dead owner served directly are known to nobody: tell every node.
            let everyone = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
            drop.extend(everyone.into_iter().filter(|&n| n != writer && Some(n) != owner));
        }
        let done = invalidate(self.state(), ctx, page, version, drop.clone(), Some(writer)).await;
        for n in &done {
            entry.copyset.remove(n);
        }
        if done.len() < drop.len() {
            return Response::Retry;
        }
        entry.strays = false;

        // Chosen before the page is taken: the owner keeps the choice with the copy it sets
        // aside, for a recovery should this node die before the grant (see `rebuild`).
        let taking = !current && owner.is_some();
        let chosen = if self.state().config.backups {
            self.choose_backup(ctx, entry, writer, taking)
        } else {
            None
        };
        let (data, zero) = if current {
            (None, false)
        } else {
            match owner {
                None => (None, true),
                Some(o) => match self
                    .fetch_from(ctx, o, page, version, (Some(writer), chosen.map(|(b, _)| b)))
                    .await
                {
                    Ok(data) => (Some(data), false),
                    Err(Absent::Missing) => {
                        self.take_back(ctx, page, entry).await;
                        return Response::Retry;
                    }
                    Err(Absent::Unreachable) => return Response::Retry,
                },
            }
        };
        // The page was taken from its owner only when it travels with the grant.
        let previous = owner.filter(|_| data.is_some());

        let backup = if self.state().config.backups {
            match self.place_backup(ctx, page, entry, writer, chosen, data.as_ref(), zero).await {
                Ok(b) => b,
                Err(()) => {
                    // The owner gave its page up for this grant, which is not made: it takes
                    // it back now, from the copy it keeps aside, rather than leave the entry
                    // naming an owner with no page until the fault is asked again.
                    if let Some(o) = previous {
                        if let Err(absent) =
                            self.promote_on(ctx, o, page, version, Some(version)).await
                        {
                            tracing::debug!(?page, owner = o.0, ?absent, "dsm: the owner did not take back the page a failed grant took; the next fault will");
                        }
                    }
                    return Response::Retry;
                }
            }
        } else {
            None
        };
        // Past any version the writer refused: it would refuse this grant too.
        let granted = version.max(refused) + 1;
        entry.version = granted;
        entry.owner = Some(writer);
        entry.copyset = [writer].into();
        entry.backup = backup;
        // The grant before this one landed or was taken back: a copy kept aside here for it
        // is no longer needed (one this fault just gave up, if any, is newer and stays).
        if let Some((_, label)) = entry.granted.source().filter(|&(n, _)| n == ctx.node()) {
            self.state().frames.frame(page).drop_retired(label);
        }
        entry.granted = match (owner, zero) {
            (_, true) => Granted::Zero,
            (Some(node), false) => Granted::From { node, label: version },
            (None, false) => Granted::Unknown,
        };
        tracing::debug!(?page, manager = ctx.node().0, writer = writer.0, version = granted, previous = ?owner, sent = data.is_some(), "dsm: write granted");
        let data = data.as_ref().map(PageBytes::shared);
        Response::Grant { version: granted, data, zero, backup, previous }
    }

    /// Chooses where `writer`'s backup goes for the grant a write fault is making, and whether
    /// it is the old one, kept (it holds the content already). `taking`: the page is taken
    /// from its owner for the grant. `None` when no node can take it.
    fn choose_backup(
        &self,
        ctx: &Context,
        entry: &PageEntry,
        writer: NodeId,
        taking: bool,
    ) -> Option<(NodeId, bool)> {
        let snapshot = ctx.snapshot()?;
        // Never the node the page is taken from: until the writer holds the grant, that node's
        // copy kept aside and the backup are the page's only copies, and one failure of a node
        // holding both lost it (a manager that owned the page and chose itself for a writer's
        // backup died before the grant arrived).
        let taken_from = entry.owner.filter(|&o| o != writer && taking);
        let keep = entry.backup.filter(|&b| {
            b != writer && Some(b) != taken_from && !self.gone(ctx, b) && entry.owner.is_some()
        });
        if let Some(kept) = keep {
            return Some((kept, true));
        }
        let nodes: Vec<NodeId> =
            snapshot.nodes().iter().copied().filter(|&n| !self.gone(ctx, n)).collect();
        let chosen =
            next_node(&nodes, writer, taken_from).or_else(|| next_node(&nodes, writer, None));
        chosen.map(|c| (c, false))
    }

    /// Makes sure the node [`DsmService::choose_backup`] chose already holds the content
    /// being granted, so that the writer dying before its first commit loses nothing. A new
    /// backup is filled first and the old one dropped after.
    #[allow(clippy::too_many_arguments)]
    async fn place_backup(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &PageEntry,
        writer: NodeId,
        chosen: Option<(NodeId, bool)>,
        data: Option<&Bytes>,
        zero: bool,
    ) -> Result<Option<NodeId>, ()> {
        let Some((chosen, kept)) = chosen else { return Ok(None) };
        if kept {
            return Ok(Some(chosen));
        }
        let content = match (data, zero) {
            (Some(d), _) => Arc::clone(d),
            (None, true) => crate::frames::zeros(),
            (None, false) => {
                // The writer holds the current copy: read it back from there.
                match self.fetch_from(ctx, writer, page, entry.version, (None, None)).await {
                    Ok(d) => d,
                    Err(_) => return Err(()),
                }
            }
        };
        let stored = self
            .tell(
                ctx,
                chosen,
                page,
                // The writer's commits at this version count from 1.
                Request::Backup {
                    page,
                    version: entry.version,
                    commit: 0,
                    data: PageBytes::shared(&content),
                },
            )
            .await;
        if !stored {
            return Err(());
        }
        if let Some(old) = entry.backup.filter(|&b| b != chosen && !self.gone(ctx, b)) {
            self.tell(
                ctx,
                old,
                page,
                Request::Invalidate { page, version: entry.version, backup: true, owner: None },
            )
            .await;
        }
        Ok(Some(chosen))
    }

    /// As the owner of `page` at `version`: stores the page on `node` and commits there from
    /// now on (see [`Request::BackupTo`]).
    async fn back_up_to(
        &self,
        ctx: &Context,
        page: PageId,
        version: u64,
        node: NodeId,
        replaces: Option<NodeId>,
    ) -> Response {
        let me = ctx.node();
        let Some(frame) = self.state().frames.get(page) else { return Response::Missing };
        // Not waited for: a write in progress whose backup is gone asks this page's manager
        // for another, and that manager may be the one asking here. Its commit finds a backup.
        let Ok(_writer) = frame.writer.try_lock() else { return Response::Busy };
        // The manager names this node the owner at `version`, and only a recovery that made it
        // so from the read copy it holds (its owner failed: `repair`) leaves that copy not
        // marked owned. It is the page now: marked so, it can be backed up, and promoted from
        // its backup should this node fail in turn. Left a read copy, the page had no backup
        // until written again, and a third failure (a rolling restart) lost it.
        if frame.adopt_read_copy(version, &departed_since(ctx, ctx.from())) {
            tracing::debug!(?page, version, "dsm: a read copy this node holds is the page now");
        }
        let (data, commit) = {
            let s = frame.lock();
            let Some(data) = s.data.clone().filter(|_| s.owned && s.version == version) else {
                return Response::Missing;
            };
            let live = |b: NodeId| b != me && Some(b) != replaces && !self.gone(ctx, b);
            if let Some(current) = s.backup_node.filter(|&b| live(b)) {
                return Response::BackedUp(current);
            }
            (data, s.commits)
        };
        let request = Request::Backup { page, version, commit, data: PageBytes::shared(&data) };
        if !self.tell(ctx, node, page, request).await {
            return Response::Retry;
        }
        let mut s = frame.lock();
        // A grant of a newer version may have landed meanwhile, with a backup of its own.
        if !(s.owned && s.version == version) {
            return Response::Missing;
        }
        s.backup_node = Some(node);
        // A copy kept here as the page's backup before this node owned it is nobody's now.
        s.backup = None;
        Response::Ok
    }

    /// The node after `after` that a backup goes to, leaving out `leaving` and nodes gone.
    fn live_after(&self, ctx: &Context, after: NodeId, leaving: NodeId) -> Option<NodeId> {
        let nodes = ctx.snapshot()?.nodes().to_vec();
        let live: Vec<NodeId> =
            nodes.into_iter().filter(|&n| n != leaving && !self.gone(ctx, n)).collect();
        next_node(&live, after, None)
    }

    /// `leaving` keeps `page`'s backup and is about to go: the owner stores the page on
    /// another node now (see [`Request::Abandon`]). This manager may take no part in the
    /// change, so its sweep would not see to it.
    /// `copy` is the leaving node's backup copy: should the owner not answer at all, this
    /// manager stores it on the new backup node itself. The owner may have died, to be declared
    /// so only after this leave; the leaving node's copy would go with it.
    pub(crate) async fn abandon(
        &self,
        ctx: &Context,
        page: PageId,
        leaving: NodeId,
        copy: Option<(u64, u64, PageBytes)>,
    ) -> Response {
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        let Live::Page(entry) = &mut *live else { return Response::Ok };
        if entry.backup != Some(leaving) {
            return Response::Ok;
        }
        let owner = entry.owner.filter(|&o| o != leaving && !self.gone(ctx, o));
        let to = owner.and_then(|o| self.live_after(ctx, o, leaving));
        let (Some(owner), Some(to)) = (owner, to) else { return Response::Ok };
        let request =
            Request::BackupTo { page, version: entry.version, node: to, replaces: Some(leaving) };
        let silent = {
            let mut unanswering = self.state().unanswering.lock().expect("unanswering");
            unanswering.retain(|_, since| since.elapsed() < OWNER_SILENCE);
            unanswering.contains_key(&owner)
        };
        // A write in progress commits to the leaving node, which still answers: once it has,
        // the owner can move.
        for _ in 0..ABANDON_TRIES {
            if silent {
                break;
            }
            match self.told(ctx, owner, page, request.clone()).await {
                Some(Response::Ok) => entry.backup = Some(to),
                Some(Response::BackedUp(current)) => entry.backup = Some(current),
                Some(Response::Busy) => {
                    tokio::time::sleep(ABANDON_PAUSE).await;
                    continue;
                }
                Some(_) => {}
                None => {
                    let now = tokio::time::Instant::now();
                    self.state().unanswering.lock().expect("unanswering").insert(owner, now);
                }
            }
            break;
        }
        // The leaving node sealed its copy as it took it: a commit after that went to this
        // manager (`Rebackup`), which this entry's lock orders after this, so the copy holds
        // every commit acknowledged through the leaving node. Only for an owner that did not
        // move its backup itself.
        let copy = copy.filter(|&(version, _, _)| version == entry.version);
        if let (Some((version, commit, data)), true) = (copy, entry.backup == Some(leaving)) {
            let request = Request::Backup { page, version, commit, data };
            if self.tell(ctx, to, page, request).await {
                entry.backup = Some(to);
                tracing::info!(?page, owner = owner.0, node = to.0, "dsm: a page whose owner does not answer has its leaving backup's copy stored on another node");
            }
        }
        if entry.backup == Some(leaving) {
            // Not assumed either way: the owner may have moved, and its next commit tells.
            tracing::warn!(?page, owner = owner.0, "dsm: a page whose backup node is leaving could not be given another now; it gets one at its owner's next commit or the next change this manager takes part in, and until then a failure of its owner loses it");
        }
        Response::Ok
    }

    /// `owner` could not reach `failed`, its backup, with `content`: its version, the commit
    /// and the page.
    async fn rebackup(
        &self,
        ctx: &Context,
        page: PageId,
        owner: NodeId,
        failed: NodeId,
        content: (u64, u64, PageBytes),
    ) -> Response {
        let (version, commit, data) = content;
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        let Live::Page(entry) = &mut *live else { return Response::Invalid("not a page".into()) };
        if entry.owner != Some(owner) || entry.version != version {
            return Response::Invalid(format!(
                "node {} does not own {page:?} at {version}",
                owner.0
            ));
        }
        // The owner commits at the version it was granted: the grant landed.
        self.settle_grant(ctx, page, entry);
        let Some(chosen) = ctx.snapshot().and_then(|s| next_node(s.nodes(), owner, Some(failed)))
        else {
            entry.backup = None;
            return Response::Ok;
        };
        let request = Request::Backup { page, version, commit, data };
        let stored = self.tell(ctx, chosen, page, request).await;
        if !stored {
            return Response::Retry;
        }
        entry.backup = Some(chosen);
        Response::BackedUp(chosen)
    }

    async fn surrender(
        &self,
        ctx: &Context,
        page: PageId,
        from: NodeId,
        version: u64,
        data: PageBytes,
        readers: BTreeSet<NodeId>,
    ) -> Response {
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        let Live::Page(entry) = &mut *live else { return Response::Invalid("not a page".into()) };
        // Or the entry was marked lost meanwhile, its owner gone: the page of a leaver whose
        // manager did not answer, handed on by the node it was left on (`Request::Foster`).
        // No write came since: a write to a lost page needs a discard, a new version.
        let lost = entry.lost && entry.owner.is_none();
        let accepted = (entry.owner == Some(from) || lost) && entry.version == version;
        tracing::debug!(?page, from = from.0, version, accepted, entry = ?entry, "dsm: surrender");
        if accepted {
            let me = ctx.node();
            let frame = self.state().frames.frame(page);
            let data = data.into_shared();
            frame.install_owned(version, Arc::clone(&data), entry.backup.filter(|&b| b != me));
            entry.owner = Some(me);
            entry.lost = false;
            self.settle_grant(ctx, page, entry);
            entry.copyset.remove(&from);
            entry.copyset.insert(me);
            entry.copyset.extend(readers.into_iter().filter(|&r| r != from));
            // This node may have been the page's backup: then the page needs another before
            // the leaving node goes, or it has one copy. This node may take no part in the
            // change, so its sweep would not see to it.
            let exposed = entry.backup.is_none_or(|b| b == me || b == from || self.gone(ctx, b));
            if self.state().config.backups && exposed {
                // The leaving owner's last content of this version.
                let commit = crate::frames::FINAL;
                let request =
                    Request::Backup { page, version, commit, data: PageBytes::shared(&data) };
                entry.backup = match self.live_after(ctx, me, from) {
                    Some(to) if self.tell(ctx, to, page, request).await => Some(to),
                    _ => None,
                };
                frame.lock().backup_node = entry.backup;
            }
            return Response::Ok;
        }
        Response::Missing
    }

    /// Keeps here the copy a leaving node gave up to a writer, when the entry still names that
    /// node as where the grant took the page from: the grant is then taken back from here.
    async fn keep_aside(
        &self,
        ctx: &Context,
        page: PageId,
        from: NodeId,
        label: u64,
        data: PageBytes,
    ) -> Response {
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        let Live::Page(entry) = &mut *live else { return Response::Invalid("not a page".into()) };
        let Some(granted) = entry.granted.relocated(from, label, ctx.node()) else {
            return Response::Missing;
        };
        let data = data.into_shared();
        let retired = Retired { version: label, data, writer: entry.owner, backup: None };
        self.state().frames.frame(page).keep_retired(retired);
        tracing::debug!(
            ?page,
            from = from.0,
            label,
            "dsm: a leaving node's copy kept aside is kept here"
        );
        entry.granted = granted;
        Response::Ok
    }

    async fn discard(&self, ctx: &Context, page: PageId) -> Response {
        let slot = self.slot(page.key());
        let mut live = self.hold(ctx, &slot).await;
        if let Live::Page(entry) = &mut *live {
            if entry.lost {
                // The dead owner's direct readers may still hold the lost contents, unknown
                // to this manager: every node drops its copy before the page reads as zeros,
                // or they would read the old page while the others read the new one. The
                // page stays lost until then: asked again while a node does not answer.
                let everyone = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
                let done =
                    invalidate(self.state(), ctx, page, entry.version, everyone.clone(), None)
                        .await;
                if done.len() < everyone.len() {
                    return Response::Retry;
                }
                *entry = PageEntry { version: entry.version + 1, ..PageEntry::default() };
                return Response::Ok;
            }
        }
        Response::Kept
    }

    async fn lock_op(&self, ctx: &Context, key: Key, request: Request) -> Response {
        let slot = self.slot(key);
        let mut live = slot.lock().await;
        let Live::Lock(lock) = &mut *live else { return Response::Invalid("not a lock".into()) };
        match request {
            // A holder the cluster is done with holds nothing. The sweep after a change frees
            // its locks too, but only on that change's participants: a lock whose manager sits
            // in another cell than an evicted holder stayed held until some later change.
            Request::Acquire(token) => match lock.holder {
                Some(h) if h != token && !self.lost_holder(ctx, h.node) => Response::Busy,
                _ => {
                    lock.holder = Some(token);
                    Response::Granted
                }
            },
            Request::Release(token) => {
                if lock.holder == Some(token) {
                    lock.holder = None;
                }
                drop(live);
                drop(slot);
                self.forget_free_lock(key);
                Response::Ok
            }
            _ => Response::Invalid("not a lock request".into()),
        }
    }

    /// Drops the entry of lock `key` once nobody holds it: a program that takes a lock per
    /// object would otherwise leave an entry for every id it ever used, each moved at every
    /// change. A lock without an entry is a free one. Only while no request holds the entry
    /// (the map's is its only reference), checked under the map's lock, which a request
    /// needs to take it: none can be granted on an entry no longer in the map.
    fn forget_free_lock(&self, key: Key) {
        self.state().live.remove_if(&key, |_, slot| {
            Arc::strong_count(slot) == 1
                && slot.try_lock().is_ok_and(|l| matches!(&*l, Live::Lock(l) if l.holder.is_none()))
        });
    }

    async fn arrive(
        &self,
        ctx: &Context,
        key: Key,
        participant: u64,
        generation: u64,
        parties: u32,
    ) -> Response {
        let st = self.state();
        let notify = Arc::clone(&st.barriers.entry(key).or_default());
        let wake = notify.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        {
            let slot = self.slot(key);
            let mut live = slot.lock().await;
            let Live::Barrier(b) = &mut *live else {
                return Response::Invalid("not a barrier".into());
            };
            if b.passed >= generation {
                return Response::Passed;
            }
            let arrived = b.arrived.entry(generation).or_default();
            arrived.insert(participant);
            if arrived.len() >= parties as usize {
                b.passed = generation;
                b.arrived = b.arrived.split_off(&(generation + 1));
                notify.notify_waiters();
                return Response::Passed;
            }
        }
        // Wait a little for the others without holding the entry, then let the node ask again:
        // at once if a change begins, whose first step waits for this handler.
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(BARRIER_POLL) => {}
            _ = ctx.change_waits() => {}
        }
        let slot = self.slot(key);
        let live = slot.lock().await;
        match &*live {
            Live::Barrier(b) if b.passed >= generation => Response::Passed,
            _ => Response::Waiting,
        }
    }

    /// A message to this node's local server, from a manager, an owner or a reader.
    async fn local(&self, ctx: &Context, request: Request) -> Response {
        let frames = &self.state().frames;
        match request {
            // A leaving node hands its pages over, and one without its lease may have been
            // declared failed and its pages written elsewhere: readers ask their managers.
            Request::Serve { .. }
                if self.state().leaving.load(std::sync::atomic::Ordering::SeqCst)
                    || !ctx.leased() =>
            {
                Response::Missing
            }
            Request::Serve { page, node } => match frames.frame(page).serve(node).await {
                Some((version, data)) => Response::Copy {
                    version,
                    data: Some(PageBytes::shared(&data)),
                    owner: Some(ctx.node()),
                },
                None => Response::Missing,
            },
            Request::Fetch { page, version, writer, backup } => {
                match self.give(ctx, page, version, (writer, backup), ctx.from()).await {
                    Ok(data) => Response::Page(PageBytes::shared(&data)),
                    Err(Absent::Missing) => Response::Missing,
                    // A reader it served could not be revoked: ask again.
                    Err(Absent::Unreachable) => Response::Retry,
                }
            }
            Request::Invalidate { page, version, backup, owner } => {
                if backup {
                    frames.frame(page).drop_backup(version);
                } else if !drop_copy(self.state(), ctx, page, version, owner, ctx.from()).await {
                    return Response::Retry;
                }
                Response::Ok
            }
            Request::Retire { page, version } => {
                frames.frame(page).drop_retired(version);
                Response::Ok
            }
            Request::Losses => crate::losses::look(self.state()),
            Request::Cover { epoch, seq, unclean } => {
                let Some(from) = ctx.from() else { return Response::Invalid("not told".into()) };
                let mut vouches = self.state().vouches.lock().expect("vouches");
                vouches.entry(from).or_default().cover(seq, epoch, unclean);
                Response::Ok
            }
            Request::Uncover { seq } => {
                let Some(from) = ctx.from() else { return Response::Invalid("not told".into()) };
                let mut vouches = self.state().vouches.lock().expect("vouches");
                vouches.entry(from).or_default().uncover(seq);
                Response::Ok
            }
            Request::Backup { page, version, commit, data } => {
                let frame = frames.frame(page);
                // Not once this leaving node took its copy: the owner asks the manager for
                // another backup, rather than be told a commit is kept that the copy lacks.
                if frame.lock().sealed {
                    return Response::Departed;
                }
                frame.store_backup(version, commit, data.into_shared());
                Response::Ok
            }
            Request::Foster { page, leaver, version, data, readers, backup } => {
                let whose = crate::frames::Fostered { leaver, readers, backup };
                frames.frame(page).foster(version, data.into_shared(), whose.clone());
                self.hand_on(ctx, page, version, whose);
                Response::Ok
            }
            // Boxed: it tells the backup node in turn, through `told`, which may run `local`.
            Request::BackupTo { page, version, node, replaces } => {
                Box::pin(self.back_up_to(ctx, page, version, node, replaces)).await
            }
            Request::Promote { page, version, label } => {
                // Checked on arrival too (a departed node's local requests are refused), but a
                // recovery's scan may run between that check and this one.
                let departed = departed_since(ctx, ctx.from());
                if frames.frame(page).promote_unless(version, label, &departed) {
                    Response::Ok
                } else {
                    Response::Missing
                }
            }
            Request::Free { segment } => self.free(ctx, segment),
            other => Response::Invalid(format!("{other:?} is for a manager")),
        }
    }

    /// Runs one request: as the key's manager, or as this node's local server when told.
    async fn serve(&self, ctx: &Context, key: Key, request: Request) -> Response {
        match (named(key), request) {
            (Named::Page(page), Request::ReadFault { node }) => {
                self.read_fault(ctx, page, node).await
            }
            // Versions and generations count up from a peer's: one near the top of the range
            // would wrap them (a page stuck behind version 0, a barrier passed for ever). None
            // this cluster gave out comes near 2^63 (292 years at a billion a second), so one
            // that does is refused before anything changes.
            (Named::Page(_), Request::WriteFault { refused: n, .. })
            | (Named::Barrier(_), Request::Arrive { generation: n, .. })
                if n >= NEVER_REACHED =>
            {
                Response::Invalid(format!("{n} is no version or generation this cluster gave out"))
            }
            (Named::Page(page), Request::WriteFault { node, have, refused }) => {
                self.write_fault(ctx, page, node, have, refused).await
            }
            (Named::Page(page), Request::Surrender { node, version, data, readers }) => {
                self.surrender(ctx, page, node, version, data, readers).await
            }
            (Named::Page(page), Request::KeepAside { node, label, data }) => {
                self.keep_aside(ctx, page, node, label, data).await
            }
            (Named::Page(page), Request::Rebackup { node, version, commit, failed, data }) => {
                self.rebackup(ctx, page, node, failed, (version, commit, data)).await
            }
            (Named::Page(page), Request::Discard) => self.discard(ctx, page).await,
            (Named::Page(page), Request::Abandon { node, copy }) => {
                self.abandon(ctx, page, node, copy).await
            }
            (Named::Lock(_), request @ (Request::Acquire(_) | Request::Release(_))) => {
                self.lock_op(ctx, key, request).await
            }
            (Named::Barrier(_), Request::Arrive { participant, generation, parties }) => {
                self.arrive(ctx, key, participant, generation, parties).await
            }
            (_, request) if ctx.from().is_some() => self.local(ctx, request).await,
            (what, request) => Response::Invalid(format!("{request:?} does not apply to {what:?}")),
        }
    }

    /// Drops all this node holds of `segment`: copies, the entries it manages and those
    /// received in a change, hints. `Busy` during a change, whose entries are on the move:
    /// [`crate::Dsm::free`] asks again after it. In the slots this node manages whose manager
    /// once died, the segment's pages read as zeros from now on, not as lost.
    fn free(&self, ctx: &Context, segment: u32) -> Response {
        let state = self.state();
        if state.change.lock().expect("change").is_some() {
            return Response::Busy;
        }
        let of_segment = |key: &Key| matches!(named(*key), Named::Page(p) if p.segment == segment);
        state.live.retain(|key, _| !of_segment(key));
        state.staged.lock().expect("staged").retain(|(key, _)| !of_segment(key));
        state.frames.free(segment);
        state.hints.retain(|page, _| page.segment != segment);
        // A taint marker lives with the slot it describes: these are slots this node manages.
        // One mark per marker, whatever the segment's length.
        let markers: Vec<Key> =
            state.live.iter().map(|e| *e.key()).filter(|&k| named(k) == Named::Taint).collect();
        let mut freed = state.freed.lock().expect("freed");
        for key in markers {
            freed.entry(key).or_default().insert(segment);
        }
        drop(freed);
        tracing::debug!(node = ctx.node().0, segment, "dsm: segment freed here");
        Response::Ok
    }

    /// The taint markers of this recovery that the dead manager's word lets go, every node
    /// of the cluster having reported (see `crate::cover`).
    fn vouched(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
        staged: &[(Key, Entry)],
    ) -> BTreeSet<Key> {
        if !matches!(change.change, Change::Fail(_) | Change::Recover(_)) {
            return BTreeSet::new();
        }
        // A holder before the last may still keep an older word: the newest counts.
        let mut words: BTreeMap<Key, u64> = BTreeMap::new();
        for (key, entry) in staged {
            if let Entry::Covered { epoch } = entry {
                let word = words.entry(*key).or_default();
                *word = (*word).max(*epoch);
            }
        }
        let cluster = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
        let vouches =
            |&(_, epoch): &(Key, u64)| vouches(epoch, change.epoch, &cluster, &change.acked);
        words.into_iter().filter(vouches).map(|(key, _)| key).collect()
    }

    /// The slots this node manages that have an entry not kept elsewhere, or one being
    /// changed, or a taint of their own; and, of those, the ones with a taint.
    fn unclean_slots(&self, ctx: &Context) -> (BTreeSet<u32>, BTreeSet<u32>) {
        let st = self.state();
        let me = ctx.node();
        let (mut unclean, mut tainted) = (BTreeSet::new(), BTreeSet::new());
        for e in st.live.iter() {
            let slot = st.spec.slot_of(*e.key());
            // A marker is never locked long: by its key, not by its lock, so that one a change
            // holds still counts.
            if named(*e.key()) == Named::Taint {
                tainted.insert(slot);
            }
            let clean = match e.value().try_lock() {
                Ok(live) => match &*live {
                    Live::Page(entry) => kept_elsewhere(entry, me, |n| self.gone(ctx, n)),
                    Live::Taint => false,
                    Live::Lock(_) | Live::Barrier(_) => true,
                },
                // Being changed: not known.
                Err(_) => false,
            };
            if !clean {
                unclean.insert(slot);
            }
        }
        (unclean, tainted)
    }

    /// Gives this node's word to its replica holder, at stable `epoch`, for the slots whose
    /// every page has a copy on another live node (see `crate::cover`).
    async fn give_word(&self, ctx: &Context, epoch: u64) {
        let st = self.state();
        let me = ctx.node();
        // A node the cluster gave up on vouches for nothing: its slots' entries are rebuilt
        // without it, and what it holds may be what never reached it.
        if ctx.gone(me) {
            return;
        }
        let holder = ctx.snapshot().and_then(|s| s.replica_holder(me));
        let mut word = st.word.lock().await;
        // Only once this node carried the change out to its end (not cut short: its merge
        // may not have run), or took no part in it and carried out the last it began; and
        // before a later change begins: that one's stable epoch gives the word. (One beginning
        // while this word is on its way makes it worthless: it counts only for a failure of
        // this node that comes right after `epoch`.)
        let (finished, began) =
            (st.finished.load(Ordering::SeqCst), st.began.load(Ordering::SeqCst));
        let current = (finished == epoch || (began < epoch && finished == began))
            && word.epoch <= epoch
            && word.stale(epoch)
            && st.change.lock().expect("change").is_none();
        let Some(holder) = holder.filter(|_| current) else { return };
        // Pages exposed while the entries are looked at may have been looked at before: look
        // again, a few times, rather than give no word for this epoch.
        let mut unclean = None;
        for _ in 0..WORD_TRIES {
            let seen = st.exposures.load(Ordering::SeqCst);
            let found = self.unclean_slots(ctx);
            if st.exposures.load(Ordering::SeqCst) == seen {
                unclean = Some(found);
                break;
            }
            tokio::task::yield_now().await;
        }
        let Some((unclean, tainted)) = unclean else { return };
        word.seq += 1;
        word.epoch = epoch;
        // Before the answer: the holder may take the word and its answer be lost, and a word
        // taken back that the holder never had costs nothing.
        word.holder = Some(holder);
        word.confirmed = false;
        let word_unclean = unclean.len();
        let request =
            Request::Cover { epoch, seq: word.seq, unclean: unclean.iter().copied().collect() };
        word.unclean = unclean;
        word.tainted = tainted;
        match ctx.tell::<_, Response>(holder, DSM, taint_key(0), &request).await {
            Ok(Response::Ok) => {
                word.confirmed = true;
                tracing::debug!(
                    node = me.0,
                    holder = holder.0,
                    epoch,
                    unclean = word_unclean,
                    "dsm: word given to the replica holder"
                );
            }
            answer => {
                tracing::debug!(node = me.0, holder = holder.0, ?answer, "dsm: the replica holder did not take this node's word; its slots stay tainted should it die");
            }
        }
    }

    /// Gives this node's word at the stable `epoch`, then again, less and less often, while it
    /// leaves slots out that a later look may find clean (not a slot's taint: that stays), or
    /// was taken back, until a later change begins. A word is otherwise
    /// given once per change: a page exposed for a moment (a backup that did not answer, in a
    /// stable cluster) left its manager without a word, or with its slot left out, until the
    /// next change. Its death then tainted those slots, and a page never written read as lost
    /// (a soak saw one after a single failure).
    async fn keep_word(&self, ctx: &Context, epoch: u64) {
        self.give_word(ctx, epoch).await;
        let st = self.state();
        let mut pause = WORD_REFRESH;
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(WORD_REFRESH_MAX);
            if st.began.load(Ordering::SeqCst) > epoch || ctx.gone(ctx.node()) {
                return;
            }
            let stale = st.word.lock().await.stale(epoch);
            if stale {
                self.give_word(ctx, epoch).await;
            }
        }
    }

    /// The entry of `key`, a page this node manages, left not kept elsewhere by a request:
    /// takes this node's word back, before the answer goes, unless the word leaves the slot
    /// out. `false` when the holder, still in the cluster, did not answer in time: the answer
    /// must not go then (a write it grants would be the page's only copy, which the holder's
    /// word would have read as zeros after this node's death).
    async fn take_word_back(&self, ctx: &Context, key: Key) -> bool {
        let st = self.state();
        let mut word = st.word.lock().await;
        let Some(holder) = word.holder else { return true };
        // Only a word the holder confirmed (see `Word::leaves_out`): a page written now with
        // no copy elsewhere would otherwise read as zeros after this node's death.
        if word.leaves_out(st.spec.slot_of(key)) {
            return true;
        }
        word.seq += 1;
        let request = Request::Uncover { seq: word.seq };
        let deadline = tokio::time::Instant::now() + WORD_PATIENCE;
        loop {
            match ctx.tell::<_, Response>(holder, DSM, taint_key(0), &request).await {
                Ok(_) => break,
                Err(_) if ctx.gone(holder) || ctx.gone(ctx.node()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(node = ctx.node().0, holder = holder.0, error = %e, "dsm: could not take this node's word back from its replica holder; the request is answered `Retry` until the holder answers or the cluster gives up on it");
                    return false;
                }
                Err(e) => {
                    tracing::debug!(holder = holder.0, error = %e, "dsm: the replica holder did not take this node's word back; asking again");
                    tokio::time::sleep(ABANDON_PAUSE).await;
                }
            }
        }
        word.holder = None;
        tracing::debug!(
            node = ctx.node().0,
            holder = holder.0,
            ?key,
            "dsm: word taken back: a page may have no copy elsewhere"
        );
        true
    }

    /// Locks a page entry for a handler of its manager (see [`Held`]).
    async fn hold<'a>(&'a self, ctx: &Context, slot: &'a Arc<AsyncMutex<Live>>) -> Held<'a> {
        let st = self.state();
        let exposures = st.config.backups.then_some(&st.exposures);
        Held { guard: slot.lock().await, me: ctx.node(), exposures }
    }

    /// The node's copies of orphaned keys, for `scan`.
    fn reports(&self, me: NodeId, orphans: &Moving) -> Vec<(Key, Entry)> {
        let mut out = Vec::new();
        for (page, frame) in self.state().frames.all() {
            if orphans.destination(page.key()).is_none() {
                continue;
            }
            let mut s = frame.lock();
            // Reported without a write grant on its way: the grant is refused when it comes
            // (see `Frame::install_grant_unless`).
            s.scans += 1;
            // The recovery now knows of a fostered backup: whether it stays is its entry's.
            s.fostered = None;
            // `retired`: the copy given up to a writer, when it is that copy.
            let copy = |version, owned, backup, commit, retired: Option<&Retired>, data: &[u8]| {
                Entry::Copy(Report {
                    holder: me,
                    version,
                    owned,
                    backup,
                    commit,
                    retired: retired.is_some(),
                    writer: retired.and_then(|r| r.writer),
                    backup_to: retired.and_then(|r| r.backup),
                    digest: digest(data),
                })
            };
            if let Some(data) = &s.data {
                out.push((page.key(), copy(s.version, s.owned, false, s.commits, None, data)));
            }
            // Copies kept aside, a backup and one given up to a writer the manager may have
            // died before granting, each reported: their holder must promote one before
            // serving it.
            if let Some((version, data)) = &s.backup {
                out.push((page.key(), copy(*version, false, true, s.backup_commit, None, data)));
            }
            if let Some(r) = &s.retired {
                let retired = copy(r.version, false, true, FINAL, Some(r), &r.data);
                out.push((page.key(), retired));
            }
        }
        for (&id, &token) in self.state().held.lock().expect("held").iter() {
            let key = crate::page::lock_key(id);
            if orphans.destination(key).is_some() {
                out.push((key, Entry::Lock(LockEntry { holder: Some(token) })));
            }
        }
        // Every barrier this node used: where it waits, and the last passage it passed. A node
        // whose answer `Passed` died with the manager still waits at a passage the others
        // passed; rebuilt from the waiting nodes alone, it would wait there for nodes already
        // at the next one, and they for it.
        // Both under both locks, `generations` first, as `Dsm::barrier` changes them.
        let generations = self.state().generations.lock().expect("generations");
        let waiting = self.state().waiting.lock().expect("waiting");
        for (&id, &generation) in generations.iter() {
            let key = crate::page::barrier_key(id);
            if orphans.destination(key).is_none() {
                continue;
            }
            let barrier = match waiting.get(&id) {
                Some(&at) => crate::protocol::BarrierEntry {
                    passed: at.saturating_sub(1),
                    arrived: BTreeMap::from([(at, BTreeSet::from([me.0]))]),
                },
                None => {
                    crate::protocol::BarrierEntry { passed: generation, arrived: BTreeMap::new() }
                }
            };
            out.push((key, Entry::Barrier(barrier)));
        }
        out
    }

    /// Merges what arrived during a change into the live directory.
    async fn merge(&self, ctx: &Context, change: &ChangeInfo) {
        let staged = std::mem::take(&mut *self.state().staged.lock().expect("staged"));
        let me = ctx.node();
        let vouched = self.vouched(ctx, change, &staged);
        let mut reports: BTreeMap<Key, Vec<Report>> = BTreeMap::new();
        for (key, entry) in staged {
            match entry {
                Entry::Page { mut entry, frame, aside } => {
                    if let (Some((label, data)), Named::Page(page)) = (aside, named(key)) {
                        // The evicted manager was where the entry's grant took the page from.
                        let sender = entry.granted.source().map(|(node, _)| node);
                        if let Some(granted) =
                            sender.and_then(|s| entry.granted.relocated(s, label, me))
                        {
                            let f = self.state().frames.frame(page);
                            let data = data.into_shared();
                            let writer = entry.owner;
                            f.keep_retired(Retired { version: label, data, writer, backup: None });
                            entry.granted = granted;
                        }
                    }
                    if let (Some(data), Named::Page(page)) = (frame, named(key)) {
                        // The evicted owner handed its page over with the entry.
                        let f = self.state().frames.frame(page);
                        let backup = entry.backup.filter(|&b| b != me);
                        f.install_owned(entry.version, data.into_shared(), backup);
                        if let Some(old) = entry.owner.replace(me) {
                            entry.copyset.remove(&old);
                        }
                        entry.copyset.insert(me);
                        self.settle_grant(ctx, page, &mut entry);
                    }
                    if let Named::Page(page) = named(key) {
                        tracing::debug!(?page, node = me.0, ?entry, "dsm: entry merged");
                    }
                    self.state().live.insert(key, Arc::new(AsyncMutex::new(Live::Page(entry))));
                }
                Entry::Copy(report) => reports.entry(key).or_default().push(report),
                Entry::Lock(lock) => {
                    let slot = self.slot(key);
                    let mut live = slot.lock().await;
                    if let Live::Lock(l) = &mut *live {
                        l.holder = l.holder.or(lock.holder);
                    }
                }
                Entry::Barrier(b) => {
                    let slot = self.slot(key);
                    let mut live = slot.lock().await;
                    if let Live::Barrier(mine) = &mut *live {
                        mine.passed = mine.passed.max(b.passed);
                        for (generation, who) in b.arrived {
                            mine.arrived.entry(generation).or_default().extend(who);
                        }
                    }
                }
                // Its dead manager vouched, and every node reported: nothing unreported was
                // ever written.
                Entry::Taint { .. } if vouched.contains(&key) => {}
                Entry::Taint { freed } => {
                    // A marker made in this change (its slot's manager died) replaces the one
                    // before: what was freed before that death is no longer known to be zeros.
                    self.state().freed.lock().expect("freed").insert(key, freed);
                    self.state().live.insert(key, Arc::new(AsyncMutex::new(Live::Taint)));
                }
                Entry::Covered { .. } => {}
            }
        }
        if !vouched.is_empty() {
            tracing::info!(
                slots = vouched.len(),
                "dsm: slots of a dead manager that vouched for them rebuilt with no page lost"
            );
        }
        let mut rebuilt = 0usize;
        let mut unanswering = BTreeSet::new();
        let mut readers = Vec::new();
        // A node that died during this recovery is not gone yet, but reported nothing: where
        // a writer's backup was to be says nothing unless that node reported (see `rebuild`).
        let reported = |n: NodeId| n == me || change.acked.contains(&n);
        for (key, mut reports) in reports {
            let Named::Page(page) = named(key) else { continue };
            for r in &mut reports {
                r.backup_to = r.backup_to.filter(|&b| reported(b));
            }
            let Some(mut entry) = rebuild(&reports, |n| self.gone(ctx, n)) else { continue };
            if entry.lost {
                tracing::warn!(?page, version = entry.version, "dsm: page lost with its manager: the only copies left are one given up to a writer that died too, which may have written since, or backups that disagree");
                self.found_lost(1);
            }
            let only_backups = !reports.iter().any(|r| !r.backup && r.version == entry.version);
            if let (true, Some(holder)) = (only_backups, entry.owner) {
                let promoted =
                    self.promote_patiently(ctx, page, &mut entry, holder, &mut unanswering).await;
                if promoted.is_err() {
                    tracing::warn!(?page, node = holder.0, "dsm: page lost: its backup could not be restored (it does not hold that version, or it never answered)");
                    self.found_lost(u64::from(!entry.lost));
                    entry =
                        PageEntry { lost: true, version: entry.version, ..PageEntry::default() };
                }
            }
            // No copy owned at that version survived, and a reader's was chosen (a backup
            // chosen was promoted above): told to own it, as `mend` tells one. Left a read
            // copy, its leave would hand nothing over while the entry went on naming it (a
            // seed of the random-failure test lost a page so, once the reader had come back
            // as a new life).
            let owned = |o: NodeId| {
                reports.iter().any(|r| r.holder == o && r.owned && r.version == entry.version)
            };
            if let (Some(reader), Some(backup)) = (entry.owner, entry.backup) {
                if !entry.lost && !owned(reader) && backup != reader {
                    readers.push((page, Reader { reader, version: entry.version, backup }));
                }
            }
            self.state().live.insert(key, Arc::new(AsyncMutex::new(Live::Page(entry))));
            rebuilt += 1;
        }
        if rebuilt > 0 {
            tracing::info!(pages = rebuilt, "dsm: page entries rebuilt from surviving copies");
        }
        self.own_read_copies(ctx, readers).await;
    }

    /// After nodes left: every entry they held a part of is mended, and their locks freed.
    /// With backups on, the pages left without a live backup, for `restore_backups`.
    async fn sweep(&self, ctx: &Context) -> Vec<Exposed> {
        let mut slots: Vec<(Key, Arc<AsyncMutex<Live>>)> =
            self.state().live.iter().map(|e| (*e.key(), Arc::clone(e.value()))).collect();
        // In key order, the same in every run (a `DashMap`'s order is new each run).
        slots.sort_unstable_by_key(|(key, _)| *key);
        // With backups on, the live nodes a page left without a backup may get one on.
        let backups = self.state().config.backups;
        let live: Vec<NodeId> = ctx
            .snapshot()
            .filter(|_| backups)
            .map(|s| s.nodes().iter().copied().filter(|&n| !self.gone(ctx, n)).collect())
            .unwrap_or_default();
        let mut exposed = Vec::new();
        let mut readers = Vec::new();
        for (key, slot) in slots {
            let mut entry = slot.lock().await;
            match (&mut *entry, named(key)) {
                // One not mended now is mended at its next fault.
                (Live::Page(e), Named::Page(page)) => {
                    let (_, reader) = self.mend_entry(ctx, page, e, false).await;
                    readers.extend(reader.map(|r| (page, r)));
                    let owner = e.owner.filter(|&o| !e.lost && !self.gone(ctx, o));
                    let backed = |o| e.backup.is_some_and(|b| b != o && !self.gone(ctx, b));
                    // The next live node after the owner, as a grant chooses.
                    let to = owner.filter(|&o| !backed(o)).and_then(|o| next_node(&live, o, None));
                    if let (Some(owner), Some(to)) = (owner, to) {
                        exposed.push((page, Arc::clone(&slot), owner, e.version, to, e.backup));
                    }
                }
                (Live::Lock(l), _) if l.holder.is_some_and(|t| self.gone(ctx, t.node)) => {
                    l.holder = None;
                }
                _ => {}
            }
        }
        // All at once, with no entry held: one at a time under each entry's lock, a silent
        // reader held the change up a call timeout per page.
        self.own_read_copies(ctx, readers).await;
        exposed
    }

    /// With backups on, gives each page this node manages whose backup is gone (its node died
    /// or left, or the owner was promoted from it; `sweep` finds them) a new one before the
    /// change ends, in `after_release`: faults are not held for it. Until then the owner
    /// holds the page's only copy, and a second failure, however much later,
    /// would lose it: a commit finds a new backup too, but a page not written again never
    /// commits.
    async fn restore_backups(&self, ctx: &Context, exposed: Vec<Exposed>) {
        // A node that did not answer for one page is not asked for its others: each would
        // wait out a call timeout of its own, 16 at a time, and the change with them (a slow
        // or hung node not declared failed yet). Their pages get a backup at their next
        // commit, as a page whose owner was busy does.
        let unanswering: std::sync::Mutex<BTreeSet<NodeId>> = Default::default();
        let unanswering = &unanswering;
        let answers = |n: NodeId| !unanswering.lock().expect("unanswering").contains(&n);
        let restored: Vec<Restore> = futures::stream::iter(exposed)
            .map(|(page, slot, owner, version, to, replaces)| async move {
                if !answers(owner) || !answers(to) || self.gone(ctx, owner) {
                    return Restore::Unanswered;
                }
                let request = Request::BackupTo { page, version, node: to, replaces };
                let chosen = match self.told(ctx, owner, page, request).await {
                    Some(Response::Ok) => to,
                    Some(Response::BackedUp(current)) => current,
                    // The owner could not store the page on `to`.
                    Some(Response::Retry) => {
                        unanswering.lock().expect("unanswering").insert(to);
                        return Restore::Unanswered;
                    }
                    None => {
                        unanswering.lock().expect("unanswering").insert(owner);
                        return Restore::Unanswered;
                    }
                    // Busy, or that version is gone: a write in progress, or done since, finds
                    // a backup as it commits.
                    Some(Response::Busy | Response::Missing) => return Restore::Written,
                    Some(_) => return Restore::Unanswered,
                };
                // Unless the entry moved on meanwhile: a grant, or a commit's `Rebackup`,
                // placed a backup of its own, and the owner commits there.
                let mut live = slot.lock().await;
                if let Live::Page(e) = &mut *live {
                    if e.owner == Some(owner) && e.version == version {
                        // The owner holds the version it was granted: the grant landed.
                        self.settle_grant(ctx, page, e);
                        if e.backup == replaces {
                            e.backup = Some(chosen);
                        }
                    }
                }
                Restore::Done
            })
            .buffer_unordered(RESTORING)
            .collect()
            .await;
        let count = |of: Restore| restored.iter().filter(|&&r| r == of).count();
        let (done, written, unanswered) =
            (count(Restore::Done), count(Restore::Written), count(Restore::Unanswered));
        if unanswered > 0 {
            tracing::warn!(node = ctx.node().0, pages = unanswered, written, "dsm: pages left with no backup after the change, their owner (or the node chosen for the backup) not answering; each gets one at its next commit, and until then a failure of its owner loses it");
        } else if written > 0 {
            tracing::info!(node = ctx.node().0, pages = done, written, "dsm: pages given a new backup after the change; those being written get theirs as they commit");
        } else {
            tracing::info!(
                node = ctx.node().0,
                pages = done,
                "dsm: pages given a new backup after the change"
            );
        }
    }
}

impl Service for DsmService {
    type Request = Request;
    type Response = Response;
    type Entry = Entry;

    fn spec(&self) -> ServiceSpec {
        self.state().spec.clone()
    }

    /// Pages: each time one this node manages became lost (its every copy died, or what is
    /// left cannot be trusted), or was first asked for in a slot whose manager died without
    /// anyone reporting it. Every access to such a page answers [`crate::DsmError::Lost`]
    /// until a program discards it or frees its segment. Counted by the node that found it
    /// lost: a lost page that moves on to another manager is not counted again there.
    fn reported_lost(&self) -> u64 {
        self.state().lost.load(Ordering::Relaxed)
    }

    /// Every slot is tainted, as after its manager's failure: a page reads as lost, never as
    /// zeros, until a program discards it or frees its segment.
    async fn restarted_alone(&self, _ctx: &Context) {
        let st = self.state();
        for slot in 0..st.spec.slots {
            st.live.insert(taint_key(slot), Arc::new(AsyncMutex::new(Live::Taint)));
        }
        tracing::error!("dsm: this node came back as the only node of its cluster, its pages gone with its last life: every page reads as lost until a program discards it or frees its segment (`gobelins dsm discard`, `gobelins dsm free`)");
    }

    /// A read fault run twice only adds the reader to the copyset again and sends the page as
    /// it is by then; an arrival at a barrier is counted once per participant and generation.
    /// Not remembering their answers spares the manager a copy of every page it serves.
    fn repeatable(request: &Request) -> bool {
        matches!(request, Request::ReadFault { .. } | Request::Arrive { .. })
    }

    /// A manager that could not reach a holder, or a lock held by another, changed nothing:
    /// keeping those answers would push a write grant's out of the few kept per page before
    /// its retry arrives.
    fn changed_nothing(response: &Response) -> bool {
        matches!(
            response,
            Response::Retry | Response::Busy | Response::Waiting | Response::Departed
        )
    }

    async fn handle(&self, ctx: &Context, key: Key, request: Request) -> Response {
        // As a page's manager, with backups on: its entry may no longer be kept elsewhere,
        // which this node's word to its replica holder must not say for long.
        // By what it asks, not by how it came: under `Placement::Static` a manager is told.
        let managed = self.state().config.backups
            && matches!(named(key), Named::Page(_))
            && matches!(
                request,
                Request::ReadFault { .. }
                    | Request::WriteFault { .. }
                    | Request::Surrender { .. }
                    | Request::KeepAside { .. }
                    | Request::Rebackup { .. }
                    | Request::Discard
                    | Request::Abandon { .. }
            );
        if !managed {
            return self.serve(ctx, key, request).await;
        }
        let exposed = std::cell::Cell::new(false);
        let (answer, exposed) = EXPOSED
            .scope(exposed, async {
                let answer = self.serve(ctx, key, request).await;
                (answer, EXPOSED.with(std::cell::Cell::get))
            })
            .await;
        if exposed && !self.take_word_back(ctx, key).await {
            return Response::Retry;
        }
        answer
    }

    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo) {
        *self.state().change.lock().expect("change") = Some(change.clone());
        self.state().began.fetch_max(change.epoch, Ordering::SeqCst);
        match &change.change {
            Change::Fail(n) | Change::Recover(n) => {
                self.state().failed.lock().expect("failed").insert(*n, change.epoch);
            }
            // A node id back as a new life holds nothing of the old one's, and is not failed.
            Change::Add { node, .. } => {
                self.state().failed.lock().expect("failed").remove(node);
                self.state().vouches.lock().expect("vouches").remove(node);
            }
            Change::Evict(node) => {
                self.state().vouches.lock().expect("vouches").remove(node);
            }
            _ => {}
        }
        if change.change == Change::Evict(ctx.node()) {
            let st = self.state();
            st.leaving.store(true, std::sync::atomic::Ordering::SeqCst);
            // Write faults already sent land first, so that their pages are handed over too. A
            // fault held because its key is moving cannot land before this change ends: after
            // a bounded wait the hand-over goes ahead, and the manager refuses that fault then,
            // since this node is no longer in the cluster.
            if tokio::time::timeout(st.config.fetch_wait, st.faults.write()).await.is_err() {
                tracing::warn!("dsm: a write fault of this leaving node did not land in time; if it is granted later, its page is handed over as the grant lands");
            }
            self.hand_over(ctx).await;
        }
    }

    async fn send_out(&self, ctx: &Context, moving: &Moving) -> Vec<(Key, Entry)> {
        let leaving = self
            .state()
            .change
            .lock()
            .expect("change")
            .as_ref()
            .is_some_and(|c| c.change == Change::Evict(ctx.node()));
        let keys: Vec<Key> = self
            .state()
            .live
            .iter()
            .map(|e| *e.key())
            .filter(|&k| moving.destination(k).is_some())
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        // Nodes that did not take a leaving page's second copy (see `second_copy`).
        let mut silent = BTreeSet::new();
        for key in keys {
            let Some((_, slot)) = self.state().live.remove(&key) else { continue };
            let live = Arc::try_unwrap(slot).map(AsyncMutex::into_inner);
            let live = match live {
                Ok(l) => l,
                Err(shared) => {
                    // A handler still holds it (it cannot: requests are held). Wait for it.
                    let guard = shared.lock().await;
                    match &*guard {
                        Live::Page(e) => Live::Page(e.clone()),
                        Live::Lock(l) => Live::Lock(l.clone()),
                        Live::Barrier(b) => Live::Barrier(b.clone()),
                        Live::Taint => Live::Taint,
                    }
                }
            };
            let entry = match live {
                Live::Page(mut entry) => {
                    let frame = match named(key) {
                        Named::Page(page) if leaving && entry.owner == Some(ctx.node()) => {
                            let frame = self.state().frames.frame(page);
                            // A write in progress commits first; no reader is served after.
                            let _writer = frame.writer.lock().await;
                            let (version, data) = {
                                let mut s = frame.lock();
                                s.closed = true;
                                entry.copyset.extend(s.readers.iter().copied());
                                (s.version, s.data.clone())
                            };
                            tracing::debug!(
                                ?page,
                                node = ctx.node().0,
                                version,
                                held = data.is_some(),
                                "dsm: page travels with its entry"
                            );
                            if let (Some(data), Some(to)) = (&data, moving.destination(key)) {
                                let copy = (to, version, data);
                                self.second_copy(ctx, page, &mut entry, copy, &mut silent).await;
                            }
                            data.as_ref().map(PageBytes::shared)
                        }
                        _ => None,
                    };
                    // The copy this manager gave up to a writer, or keeps for a node that left,
                    // goes with the entry whose grant may have to be taken back to it: the
                    // manager is the one that releases it once the grant is settled.
                    let aside = match (named(key), entry.granted.source()) {
                        (Named::Page(page), Some((source, label))) if source == ctx.node() => {
                            let frame = self.state().frames.frame(page);
                            let mut s = frame.lock();
                            let kept = s.retired.take_if(|r| r.version == label);
                            kept.map(|r| (r.version, PageBytes::shared(&r.data)))
                        }
                        _ => None,
                    };
                    Entry::Page { entry, frame, aside }
                }
                Live::Lock(l) => Entry::Lock(l),
                Live::Barrier(b) => {
                    // Its wake-up goes too: the new manager makes its own, and nobody waits
                    // on this one (the change waited out the arrivals routed before it held
                    // the key).
                    self.state().barriers.remove(&key);
                    Entry::Barrier(b)
                }
                Live::Taint => {
                    let freed = self.state().freed.lock().expect("freed").remove(&key);
                    Entry::Taint { freed: freed.unwrap_or_default() }
                }
            };
            out.push((key, entry));
        }
        out
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, entries: Vec<(Key, Entry)>) {
        self.state().staged.lock().expect("staged").extend(entries);
    }

    async fn after_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.merge(ctx, change).await;
        let exposed = self.sweep(ctx).await;
        // Given new backups once the faults are released: a fault that races a restore is
        // settled by `restore_backups`' own check (the entry moved on) and the owner's `Busy`.
        *self.state().exposed.lock().expect("exposed") = Some((change.epoch, exposed));
        if change.change == Change::Evict(ctx.node()) {
            self.state().frames.clear();
        }
    }

    /// The pages the sweep found exposed get new backups, with faults flowing again; the change
    /// is not done until they have them.
    async fn after_release(&self, ctx: &Context, change: &ChangeInfo) {
        let exposed = self.state().exposed.lock().expect("exposed").take();
        match exposed {
            Some((epoch, exposed)) if epoch == change.epoch && !exposed.is_empty() => {
                self.restore_backups(ctx, exposed).await;
            }
            _ => {}
        }
        // Only now: until the backups are placed, a `free` must answer `Busy` and come again,
        // or a backup copy still on its way could land after it and outlive the segment.
        *self.state().change.lock().expect("change") = None;
        self.state().finished.fetch_max(change.epoch, Ordering::SeqCst);
    }

    /// The change to `epoch` is stable. What it left is dropped here too when this node's
    /// part was cut short (the cluster went on without it): otherwise `free` would answer
    /// `Busy` until the next change.
    async fn stable(&self, ctx: &Context, epoch: u64) {
        let state = self.state();
        state.change.lock().expect("change").take_if(|c| c.epoch <= epoch);
        state.exposed.lock().expect("exposed").take_if(|(e, _)| *e <= epoch);
        if state.config.backups {
            // In the background: a holder slow to answer must not hold up the next change.
            let (service, ctx) = (DsmService { node: self.node.clone() }, ctx.clone());
            tokio::spawn(async move { service.keep_word(&ctx, epoch).await });
        }
    }

    async fn scan(&self, ctx: &Context, failed: NodeId, orphans: &Moving) -> Vec<(Key, Entry)> {
        let me = ctx.node();
        // The change's epoch is the next one: the table this node routes by is the last.
        self.state().failed.lock().expect("failed").insert(failed, ctx.epoch() + 1);
        // Whatever this node is to rebuild, a page of it that nobody reports was lost.
        let mut staged = self.state().staged.lock().expect("staged");
        let taint = |slot| (taint_key(slot), Entry::Taint { freed: Freed::default() });
        staged.extend(orphans.slots_to(me).map(taint));
        drop(staged);
        let mut out = self.reports(me, orphans);
        // The dead node's word, if this node holds it: what its slots' new managers need to
        // drop their taints where nothing was lost.
        let word = self.state().vouches.lock().expect("vouches").remove(&failed);
        if let Some(word) = word {
            let covered = orphans.slots().filter_map(|s| Some((s, word.covers(s)?)));
            out.extend(covered.map(|(slot, epoch)| (taint_key(slot), Entry::Covered { epoch })));
        }
        out
    }
}

/// How one page's backup fared after a change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Restore {
    /// It has one.
    Done,
    /// Its owner is writing it, or moved on from that version (a write since, or a grant to
    /// another writer): that commit places a backup.
    Written,
    /// Its owner, or the node chosen for the backup, did not answer.
    Unanswered,
}

/// How often a word is looked for again when pages were exposed while it was: a program
/// reading a lost page over and over exposes one each time.
const WORD_TRIES: usize = 5;

/// How long after a stable epoch a manager whose word left slots out, or was taken back,
/// looks at its entries again to give it anew; the wait doubles each time, up to
/// [`WORD_REFRESH_MAX`]. Each look reads every entry the node manages.
const WORD_REFRESH: Duration = Duration::from_secs(1);
const WORD_REFRESH_MAX: Duration = Duration::from_secs(30);

/// How long a manager asks its replica holder to take its word back before it answers the
/// request that exposed a page `Retry`.
const WORD_PATIENCE: Duration = Duration::from_secs(2);

/// Past every version and barrier generation a cluster gives out.
const NEVER_REACHED: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::DsmConfig;
    use gobelins_locator::SlotMove;

    /// Only a word its holder confirmed spares a slot it leaves out the taking back: one whose
    /// `Cover` never landed may have left there an earlier word of the same epoch (words are
    /// given again while stale) that vouches for the slot, and a page of it written with no
    /// copy elsewhere would read as zeros after this node's death (the review of `76d86d7`).
    #[test]
    fn only_a_confirmed_word_spares_a_slot_it_leaves_out_the_taking_back() {
        let mut word = crate::node::Word {
            seq: 1,
            holder: Some(NodeId(2)),
            epoch: 5,
            unclean: [7].into(),
            tainted: Default::default(),
            confirmed: false,
        };
        assert!(!word.leaves_out(7), "not answered: the holder may vouch for slot 7");
        word.confirmed = true;
        assert!(word.leaves_out(7));
        assert!(!word.leaves_out(8));
    }

    /// A word left out a slot only for its taint, which no later look clears, is not given
    /// again: it was, every 30 s until the next change, each time reading every entry the
    /// node manages and holding the word's lock across the round trip.
    #[test]
    fn a_word_that_leaves_out_only_tainted_slots_is_not_given_again() {
        let mut word = crate::node::Word {
            seq: 1,
            holder: Some(NodeId(2)),
            epoch: 5,
            unclean: [7, 9].into(),
            tainted: [7].into(),
            confirmed: true,
        };
        assert!(word.stale(5), "slot 9 may be clean at the next look");
        word.unclean = [7].into();
        assert!(!word.stale(5), "slot 7 is left out for its taint, whatever the next look finds");
        assert!(word.stale(6), "a later epoch has a word of its own");
        word.confirmed = false;
        assert!(word.stale(5), "a word not answered is given again");
    }

    /// A leaver's page, handed on by the node it was left on after its entry was marked lost
    /// (its owner gone): taken back at the entry's version, and only at that version.
    #[tokio::test]
    async fn an_entry_marked_lost_takes_its_leavers_page_of_that_version_back() {
        let node = DsmNode::new(DsmConfig::default());
        let service = node.service();
        let ctx = Context::detached(NodeId(1), 1, None);
        let page = PageId { segment: 1, page: 0 };
        let lost = PageEntry { version: 4, lost: true, ..PageEntry::default() };
        service.state().live.insert(page.key(), Arc::new(AsyncMutex::new(Live::Page(lost))));
        let surrender = |version| Request::Surrender {
            node: NodeId(3),
            version,
            data: PageBytes::shared(&Arc::new(vec![7; crate::PAGE_SIZE])),
            readers: BTreeSet::new(),
        };
        let older = service.handle(&ctx, page.key(), surrender(3)).await;
        assert!(matches!(older, Response::Missing), "{older:?}");
        let taken = service.handle(&ctx, page.key(), surrender(4)).await;
        assert!(matches!(taken, Response::Ok), "{taken:?}");
        let slot = service.slot(page.key());
        let Live::Page(entry) = &*slot.lock().await else { panic!("a page entry") };
        assert_eq!((entry.owner, entry.lost), (Some(NodeId(1)), false));
        let held = service.state().frames.get(page).and_then(|f| f.readable());
        assert_eq!(held.map(|(v, d)| (v, d[0])), Some((4, 7)));
    }

    #[tokio::test]
    async fn a_version_or_generation_no_cluster_gave_out_is_refused_and_changes_nothing() {
        let node = DsmNode::new(DsmConfig::default());
        let service = node.service();
        let ctx = Context::detached(NodeId(1), 1, None);
        let page = PageId { segment: 1, page: 0 };
        let wrap = Request::WriteFault { node: NodeId(2), have: None, refused: u64::MAX - 1 };
        let arrive = |generation| Request::Arrive { participant: 2, generation, parties: 2 };
        for (key, request) in [(page.key(), wrap), (crate::page::barrier_key(3), arrive(u64::MAX))]
        {
            let answer = service.handle(&ctx, key, request).await;
            assert!(matches!(answer, Response::Invalid(_)), "{answer:?}");
        }
        assert!(service.state().live.is_empty(), "no entry made for either");
    }

    /// An owner that revoked its direct readers for a write fault, then did not give the page
    /// up (a write here went on past the wait), serves direct reads again: left closed, it
    /// sent every hinted reader to the manager until its next grant.
    #[tokio::test(start_paused = true)]
    async fn an_owner_that_revoked_its_readers_but_kept_the_page_serves_direct_reads_again() {
        let node = DsmNode::new(DsmConfig::default());
        let ctx = Context::detached(NodeId(1), 1, None);
        let page = PageId { segment: 1, page: 0 };
        let frame = node.inner.frames.frame(page);
        let granted = frame.install_grant(3, Some(crate::frames::zeros()), None);
        assert_eq!(granted, crate::frames::Installed::Yes);
        assert!(frame.serve(NodeId(2)).await.is_some());
        // The reader failed: its invalidation is done with at once.
        node.inner.failed.lock().expect("failed").insert(NodeId(2), 1);
        // Held until the fetch waits for it, then handed to the fetch, then back here (the
        // lock is fair): the fetch's second look, after the revocation, finds a write going on.
        let writing = frame.writer.lock().await;
        let (service, c) = (node.service(), ctx.clone());
        let give = tokio::spawn(async move {
            service.give(&c, page, 3, (Some(NodeId(3)), None), None).await.map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(writing);
        let writing = frame.writer.lock().await;
        let given = give.await.expect("give");
        assert!(matches!(given, Err(Absent::Unreachable)), "{given:?}");
        drop(writing);
        assert!(frame.lock().owned, "the page stays here");
        assert!(frame.serve(NodeId(4)).await.is_some(), "direct reads are served again");
    }

    #[test]
    fn a_node_reports_the_passage_it_passed_as_well_as_the_one_it_waits_at() {
        let node = DsmNode::new(DsmConfig::default());
        let service = node.service();
        // Barrier 5: passed its third passage. Barrier 6: waits at its second.
        node.inner.generations.lock().expect("generations").extend([(5, 3), (6, 2)]);
        node.inner.waiting.lock().expect("waiting").insert(6, 2);
        let spec = service.spec();
        let everything = SlotMove { slots: 0..spec.slots, from: NodeId(9), to: NodeId(1) };
        let reports = service.reports(NodeId(1), &Moving::new(spec, vec![everything]));
        let barrier = |id| {
            reports.iter().find_map(|(k, e)| match e {
                Entry::Barrier(b) if *k == crate::page::barrier_key(id) => Some(b.clone()),
                _ => None,
            })
        };
        let passed = barrier(5).expect("reported though it waits at none of its passages");
        assert_eq!((passed.passed, passed.arrived.len()), (3, 0));
        let waits = barrier(6).expect("reported");
        assert_eq!(waits.passed, 1);
        assert_eq!(waits.arrived, BTreeMap::from([(2, BTreeSet::from([1]))]));
    }
}
