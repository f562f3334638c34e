//! The DSM as the adaptation layer sees it: the manager's side of write-invalidate (Li and
//! Hudak's fixed distributed manager, with the manager found by the locator), the holder's
//! side, and what happens to entries and frames when the cluster changes.
//!
//! `DsmService::serve` sends each request to its part: `faults` (read and write faults at the
//! manager), `backup` (pages surrendered, kept aside, backed up again or abandoned as holders
//! leave), `requests` (discards, frees, locks, barriers, a node's own frames). The other
//! parts: `transfer` (a page between holders, and the grants settled), `mend` (an owner
//! promoted, an entry mended), `word` (a manager's word that its slots are whole), `migration`
//! (what changes do to entries and frames).

mod backup;
mod faults;
mod mend;
mod migration;
mod requests;
#[cfg(test)]
mod tests;
mod transfer;
mod word;

use crate::freed::Freed;
use crate::held::{Held, EXPOSED};
use crate::node::{DsmNode, Live, NodeState, DSM};
use crate::page::{named, taint_key, Named, PageId};
use crate::protocol::{Entry, LockEntry, PageBytes, PageEntry, Request, Response};
use gobelins_adaptation::{ChangeInfo, Context, Moving, Service};
use gobelins_locator::{Change, Key, NodeId, ServiceSpec, Snapshot};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;

/// Pages given a new backup at once after a change: enough to overlap the round trips, few
/// enough not to flood the owners while they serve requests.
pub(crate) const RESTORING: usize = 16;

const ABANDON_PAUSE: Duration = Duration::from_millis(10);

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

/// The first node after `after` in `nodes` (wrapping), other than `after` and `avoid`: of the
/// farthest failure domain from `after` that `nodes` has (`Snapshot::apart_at`: another zone
/// before another rack, under label levels), so that a zone lost whole takes no page's every
/// copy with it.
fn next_node(
    snapshot: Option<&Snapshot>,
    nodes: &[NodeId],
    after: NodeId,
    avoid: Option<NodeId>,
) -> Option<NodeId> {
    let at = nodes.iter().position(|&n| n == after).unwrap_or(0);
    let ring = || {
        let others = nodes.iter().cycle().skip(at + 1).take(nodes.len()).copied();
        others.filter(move |&n| n != after && Some(n) != avoid)
    };
    let level = |n: &NodeId| snapshot.and_then(|s| s.apart_at(after, *n));
    match ring().filter_map(|n| level(&n)).min() {
        Some(farthest) => ring().find(|n| level(n) == Some(farthest)),
        None => ring().next(),
    }
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
    let here = || drop_copy(state, ctx, page, version, owner, None);
    tell_each(state, ctx, page, nodes, request, here).await
}

/// Drops the backups of `page` up to `version` that `nodes` keep, all at once, and returns
/// the nodes done with, as [`invalidate`] does.
pub(crate) async fn drop_backups(
    state: &NodeState,
    ctx: &Context,
    page: PageId,
    version: u64,
    nodes: impl IntoIterator<Item = NodeId>,
) -> Vec<NodeId> {
    let request = Request::Invalidate { page, version, backup: true, owner: None };
    let here = || async move {
        state.frames.frame(page).drop_backup(version);
        true
    };
    tell_each(state, ctx, page, nodes, request, here).await
}

/// Tells each of `nodes` `request` about `page` at once, this node by `here`: the nodes that
/// answered Ok, and those gone from the cluster.
async fn tell_each<F: std::future::Future<Output = bool>>(
    state: &NodeState,
    ctx: &Context,
    page: PageId,
    nodes: impl IntoIterator<Item = NodeId>,
    request: Request,
    here: impl Fn() -> F,
) -> Vec<NodeId> {
    let here = &here;
    let answers = futures::future::join_all(nodes.into_iter().map(|n| {
        let request = request.clone();
        async move {
            let done = if n == ctx.node() {
                here().await
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
    tracing::debug!(%page, node = ctx.node().0, version, next = ?owner, "dsm: copy dropped");
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
        let _minting = st.minting.read().unwrap_or_else(|p| p.into_inner());
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
                        tracing::warn!(%page, "dsm: page lost: its manager failed, and no surviving node reported a copy of it (every copy died with the manager or before it; or the page was never written, which nobody can tell now). Discard it or free its segment once what mattered is restored")
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

    /// Locks a page entry for a handler of its manager (see [`Held`]).
    pub(super) async fn hold<'a>(
        &'a self,
        ctx: &Context,
        slot: &'a Arc<AsyncMutex<Live>>,
    ) -> Held<'a> {
        let st = self.state();
        let exposures = st.config.backups.then_some(&st.exposures);
        let guard = slot.lock().await;
        // Once the lock is held: a change may have begun while the handler waited for it. Only
        // with backups on, where a word is given: not a lock more on every request otherwise.
        let leaving = exposures.and_then(|_| self.leaver());
        Held { guard, me: ctx.node(), exposures, leaving }
    }

    /// The node the change this node has begun takes out, if it is an eviction: its copies
    /// are on their way out, and it takes no new backup (it answers `Departed`). `None` on a
    /// node taking no part, which routes by the new table at once, the leaver out of it.
    pub(crate) fn leaver(&self) -> Option<NodeId> {
        match self.state().change.lock().expect("change").as_ref().map(|c| &c.change) {
            Some(Change::Evict(leaver)) => Some(*leaver),
            _ => None,
        }
    }

    /// Runs one request: as the key's manager, or as this node's local server when told.
    pub(super) async fn serve(&self, ctx: &Context, key: Key, request: Request) -> Response {
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
            (Named::Taint, Request::Forgive) => self.forgive(key).await,
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
        tracing::error!("dsm: this node came back as the only node of its cluster, its pages gone with its last life: every page reads as lost until a program discards it or frees its segment (`gobelins dsm discard`, `gobelins dsm free`), or, once what mattered is restored, `gobelins dsm forgive --all` lifts the loss at once");
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
        // The words of nodes the cluster has given up on go once another node is removed (none
        // counts after that, `crate::cover`), but that of the node this change is about: a
        // recovery's `scan` passes it on, and an evicted node that dies before it has handed
        // everything over is recovered right after, its word of before counting then. A join
        // keeps them: a node killed as another joined is recovered after the join.
        let subject = change.change.node();
        let removal =
            matches!(change.change, Change::Evict(_) | Change::Fail(_) | Change::Recover(_));
        (self.state().vouches.lock().expect("vouches"))
            .retain(|&node, _| !removal || Some(node) == subject || !ctx.gone(node));
        match &change.change {
            Change::Fail(n) | Change::Recover(n) => {
                self.state().failed.lock().expect("failed").insert(*n, change.epoch);
            }
            // A node id back as a new life holds nothing of the old one's, and is not failed.
            Change::Add { node, .. } => {
                self.state().failed.lock().expect("failed").remove(node);
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
                                %page,
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
            // One keeper of the word per node: that of the latest stable epoch. An earlier
            // one ends at its next wake (this node may have taken part in no change since).
            state.keeping.fetch_max(epoch, Ordering::SeqCst);
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
        // The dead node's word, if this node holds it, or held it: what its slots' new
        // managers need to drop their taints where nothing was lost. For every slot, even one
        // it leaves out: a holder before may keep an older word that covers it.
        let word = self.state().vouches.lock().expect("vouches").remove(&failed);
        if let Some(word) = word {
            let covered = orphans.slots().map(|slot| {
                let (seq, epoch) = word.covers(slot);
                (taint_key(slot), Entry::Covered { seq, epoch })
            });
            out.extend(covered);
        }
        out
    }
}

/// Past every version and barrier generation a cluster gives out.
const NEVER_REACHED: u64 = 1 << 63;
