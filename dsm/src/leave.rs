//! What an evicted node does with its pages before it goes: it hands each page it owns to the
//! page's manager. A manager that does not answer may have died, its entries with it, and the
//! cluster cannot act on that death before this leave ends: the page is then left on a live
//! node, for that manager's recovery to find, rather than taken away.

use crate::frames::{Bytes, Fostered, Frame, Retired, FINAL};
use crate::node::DSM;
use crate::page::PageId;
use crate::protocol::{PageBytes, PageEntry, Request, Response};
use crate::service::{DsmService, RESTORING};
use futures::StreamExt;
use gobelins_adaptation::Context;
use gobelins_locator::NodeId;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a node keeping a leaver's page waits between two attempts to hand it to its
/// manager: each attempt already waits up to the layer's request deadline.
const HAND_ON_PAUSE: Duration = Duration::from_secs(1);

/// How long a leaving node waits before asking a manager again that answered `Retry` or
/// `Busy`.
const ASK_AGAIN_PAUSE: Duration = Duration::from_millis(50);

/// How long a leaving node waits for a page's manager to take its page, or to see to its
/// backup, before leaving the page on another live node. A manager that died cannot be
/// declared so before this leave ends: without this, the leave waited out the layer's
/// request deadline (10 s by default) for it. A manager only slow is no worse off: the node
/// the page is left on hands it over once it answers. Twice the layer's call timeout (2 s by
/// default): the manager may itself wait one for a node it asks on this node's behalf (the
/// page's owner, stopped say, or a new backup).
const MANAGER_PATIENCE: Duration = Duration::from_secs(4);

/// How one page's hand-over went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handed {
    /// The manager has it.
    Over,
    /// Not this node's to hand over: not owned here, or taken by a faulting node meanwhile.
    NotOwned,
    /// The manager did not answer within [`MANAGER_PATIENCE`]. The frame stays closed.
    Unanswered,
}

/// Managers that did not answer this leave: the pages they manage go to another live node at
/// once, rather than each waiting for it in turn.
type Silent = Mutex<BTreeSet<NodeId>>;

impl DsmService {
    /// An evicted node gives each page it owns to the page's manager, before it goes, and each
    /// copy it gave up to a writer and still keeps aside; then asks for new backups of the
    /// pages it keeps the backup of. Pages at once, a few at a time: a manager that died costs
    /// [`MANAGER_PATIENCE`] for all its pages, not that per page.
    pub(crate) async fn hand_over(&self, ctx: &Context) {
        let me = ctx.node();
        let silent = &Silent::default();
        let manager = |page: &PageId| ctx.snapshot().and_then(|s| s.locate(DSM, page.key()));
        // Not the pages it manages: they travel with their entries in send_out.
        let owned: Vec<(PageId, NodeId, Arc<Frame>)> = self
            .state()
            .frames
            .all()
            .into_iter()
            .filter_map(|(page, frame)| Some((page, manager(&page)?, frame)))
            .filter(|&(_, m, _)| m != me)
            .collect();
        futures::stream::iter(owned)
            .for_each_concurrent(RESTORING, |(page, manager, frame)| async move {
                self.leave_page(ctx, page, manager, &frame, silent).await;
            })
            .await;
        // Pages another leaver left here, not yet handed on: left on another live node in
        // turn, which hands them on. No entry names this node for them.
        let fostered: Vec<(PageId, NodeId, Arc<Frame>)> = self
            .state()
            .frames
            .all()
            .into_iter()
            .filter(|(_, frame)| frame.lock().fostered.is_some())
            .filter_map(|(page, frame)| Some((page, manager(&page)?, frame)))
            .collect();
        futures::stream::iter(fostered)
            .for_each_concurrent(RESTORING, |(page, manager, frame)| async move {
                self.foster_again(ctx, page, manager, &frame).await;
            })
            .await;
        // The pages this node keeps the backup of: their managers have the owners move them,
        // or store this node's copy elsewhere themselves should the owner not answer. Those it
        // manages, this node sees to itself, before their entries go: a request for them
        // would wait for the change to end, and the new manager's sweep could only ask the
        // owner, which may have died.
        let backups: Vec<(PageId, NodeId)> = self
            .state()
            .frames
            .all()
            .into_iter()
            .filter(|(_, frame)| {
                let s = frame.lock();
                s.backup.is_some() && s.fostered.is_none()
            })
            .filter_map(|(page, _)| Some((page, manager(&page)?)))
            .collect();
        futures::stream::iter(backups)
            .for_each_concurrent(RESTORING, |(page, manager)| async move {
                let Some(frame) = self.state().frames.get(page) else { return };
                let copy = || frame.backup_copy().map(|(v, c, d)| (v, c, PageBytes::shared(&d)));
                if manager == me {
                    if self.state().live.contains_key(&page.key()) {
                        self.abandon(ctx, page, me, copy()).await;
                    }
                    return;
                }
                if !is_silent(silent, manager) {
                    let request = Request::Abandon { node: me, copy: copy() };
                    match ask_manager(ctx, page, &request).await {
                        Ok(_) => return,
                        Err(e) => {
                            silent.lock().expect("silent").insert(manager);
                            tracing::info!(%page, error = %e, "dsm: the manager of a page this leaving node keeps the backup of did not answer");
                        }
                    }
                }
                if !self.foster_backup(ctx, page, manager, &frame).await {
                    tracing::warn!(%page, manager = manager.0, "dsm: could not ask for a new backup of a page this leaving node keeps the backup of, nor leave its copy on another node; it gets one at its owner's next commit, and until then a failure of its owner loses it");
                }
            })
            .await;
    }

    /// The manager of a page this leaving node keeps the backup of did not answer: it may
    /// have died, the page's owner too. The copy is left on the first live node after the
    /// manager that takes it, where that manager's recovery finds it, or which asks the
    /// manager again on this node's behalf (see [`DsmService::hand_on`]).
    async fn foster_backup(
        &self,
        ctx: &Context,
        page: PageId,
        manager: NodeId,
        frame: &Frame,
    ) -> bool {
        let Some((version, commit, data)) = frame.backup_copy() else { return true };
        let whose = Fostered { leaver: ctx.node(), readers: BTreeSet::new(), backup: Some(commit) };
        self.leave_on_another(ctx, page, manager, (version, &data, whose)).await
    }

    /// Sends `page` at `version`, `whose` it is, to the first live node after `manager` that
    /// takes it, other than this node, the manager and the node that left it. False when none
    /// did.
    async fn leave_on_another(
        &self,
        ctx: &Context,
        page: PageId,
        manager: NodeId,
        (version, data, whose): (u64, &Bytes, Fostered),
    ) -> bool {
        let request = || Request::Foster {
            page,
            leaver: whose.leaver,
            version,
            data: PageBytes::shared(data),
            readers: whose.readers.clone(),
            backup: whose.backup,
        };
        let Some(to) = self.left_with(ctx, page, manager, whose.leaver, request).await else {
            return false;
        };
        self.say_left(|| {
            tracing::warn!(%page, manager = manager.0, node = to.0, "dsm: a page's manager did not answer this leaving node; the page is left on another node, from which that manager's recovery rebuilds it (or which hands it to the manager should it answer)");
        });
        true
    }

    /// Leaves the copy this node keeps aside for a write grant, if any, on the first live node
    /// after `manager` that takes it (not the writer, whose death it must outlive): the
    /// manager did not take it, and may have died before the grant reached the writer. The
    /// page's backup may have died with it: then this copy is the page's last, and the
    /// leave took it away (a helper's review). That manager's recovery finds it there as it
    /// would have here. True when there was none, or it was left.
    async fn leave_aside(
        &self,
        ctx: &Context,
        page: PageId,
        manager: NodeId,
        frame: &Frame,
    ) -> bool {
        let Some(retired) = frame.lock().retired.clone() else { return true };
        let request = || Request::KeepRetired {
            page,
            leaver: retired.on_behalf.unwrap_or(ctx.node()),
            version: retired.version,
            data: PageBytes::shared(&retired.data),
            writer: retired.writer,
            backup: retired.backup,
        };
        let writer = retired.writer.unwrap_or(manager);
        let Some(to) = self.left_with(ctx, page, manager, writer, request).await else {
            return false;
        };
        self.say_left(|| {
            tracing::warn!(%page, manager = manager.0, node = to.0, version = retired.version, "dsm: a copy this leaving node kept aside for a write grant could not be handed to the page's manager; it is left on another node, where that manager's recovery finds it should the manager have died before the grant reached its writer");
        });
        true
    }

    /// Logs `line`, about a copy left on another node, within the node's budget for those: one
    /// per page flooded the log when a manager died during a leave.
    fn say_left(&self, line: impl FnOnce()) {
        let what = "pages left on another node, their manager not answering this leaving node";
        gobelins_adaptation::log_budget::budgeted(&self.state().left_lines, what, line);
    }

    /// Tells `request()` to the first live node after `manager` that takes it, other than
    /// this node, the manager and `not`; the node that took it.
    async fn left_with(
        &self,
        ctx: &Context,
        page: PageId,
        manager: NodeId,
        not: NodeId,
        request: impl Fn() -> Request,
    ) -> Option<NodeId> {
        let me = ctx.node();
        let usable = |n: NodeId| n != me && n != manager && n != not && !self.gone(ctx, n);
        for to in after(ctx, manager).filter(|&n| usable(n)) {
            if self.tell(ctx, to, page, request()).await {
                return Some(to);
            }
        }
        None
    }

    /// Hands one page over to `manager`, or, should it not answer, leaves it on a live node.
    async fn leave_page(
        &self,
        ctx: &Context,
        page: PageId,
        manager: NodeId,
        frame: &Frame,
        silent: &Silent,
    ) {
        if !is_silent(silent, manager) {
            let mut handed = self.surrender_page(ctx, page, frame).await;
            // A take-back may have promoted the copy kept aside meanwhile: then this node owns
            // the page again, and hands it over as such.
            if handed != Handed::Unanswered && self.hand_aside(ctx, page, frame).await {
                handed = self.surrender_page(ctx, page, frame).await;
            }
            if handed != Handed::Unanswered {
                return;
            }
            silent.lock().expect("silent").insert(manager);
        }
        // A copy kept aside goes to another node too, whether the manager was silent from the
        // start or fell silent at this page's surrender (a helper's review).
        if !self.leave_aside(ctx, page, manager, frame).await {
            tracing::warn!(%page, manager = manager.0, "dsm: could not hand over a copy kept aside for a write grant before leaving, the page's manager not answering, nor leave it on another node; should that grant turn out never to have reached its writer, the page will be reported lost");
        }
        if !self.foster(ctx, page, manager, frame).await {
            frame.reopen();
            tracing::warn!(%page, manager = manager.0, "dsm: could not hand a page over before leaving, its manager not answering, nor leave it on another node; it is lost unless a faulting node fetches it before this node goes");
        }
    }

    /// Gives the page's manager the copy this node gave up to a writer and keeps aside until
    /// told the grant landed: should the grant turn out lost, taking it back needs that copy,
    /// and this node will be gone. True when the page is owned here after all.
    async fn hand_aside(&self, ctx: &Context, page: PageId, frame: &Frame) -> bool {
        let Some(Retired { version: label, data, on_behalf, .. }) = frame.lock().retired.clone()
        else {
            return false;
        };
        // A copy another leaver left here is kept for that leaver's grant.
        let node = on_behalf.unwrap_or(ctx.node());
        let request = Request::KeepAside { node, label, data: PageBytes::shared(&data) };
        // Not given up after the patience: this copy is not left on another node, so a
        // manager only slow must still get it (its death loses it, said below).
        let asked = ctx.request::<_, Response>(DSM, page.key(), &request);
        let handed = unless_declared(ctx, page, asked).await;
        // A manager that answered `Retry` (its replica holder slow to take its word back) may
        // or may not have kept the copy: left on another node, it is handed on until the
        // manager says it has it or needs it not. Taken for done, it was dropped (a helper's
        // review).
        let handed = handed.and_then(|answer| match answer {
            Ok(Response::Retry | Response::Busy) => Err("the manager asked to retry".to_string()),
            answer => answer.map_err(|e| e.to_string()),
        });
        if let Err(e) = handed {
            let manager = ctx.snapshot().and_then(|s| s.locate(DSM, page.key()));
            if let Some(manager) = manager {
                if self.leave_aside(ctx, page, manager, frame).await {
                    return false;
                }
            }
            tracing::warn!(%page, label, error = %e, "dsm: could not hand over a copy kept aside for a write grant before leaving, nor leave it on another node; should that grant turn out never to have reached its writer, the page will be reported lost");
            return false;
        }
        // Kept by the manager, or needed by nobody: the grant landed, or was taken back,
        // perhaps to this very copy.
        frame.drop_retired(label);
        let s = frame.lock();
        s.owned && s.data.is_some()
    }

    /// Hands one owned page to its manager. The frame's writer lock is held only to wait for a
    /// write in progress, never across the request: the manager may be fetching this very page
    /// for a faulting node while it holds the entry, and the fetch needs that lock.
    pub(crate) async fn surrender_page(
        &self,
        ctx: &Context,
        page: PageId,
        frame: &Frame,
    ) -> Handed {
        let me = ctx.node();
        // A page that changed while it was on its way is handed over again; a local program
        // that keeps writing to a leaving node's pages is the only way to need more.
        for _ in 0..3 {
            let (version, data, readers) = {
                let _writer = frame.writer.lock().await;
                let mut s = frame.lock();
                let (Some(d), true) = (&s.data, s.owned) else { return Handed::NotOwned };
                let taken = (s.version, Arc::clone(d), s.readers.clone());
                // No direct reader from now on; a local write must ask the manager.
                s.closed = true;
                s.write = false;
                taken
            };
            let request =
                Request::Surrender { node: me, version, data: PageBytes::shared(&data), readers };
            match ask_manager(ctx, page, &request).await {
                Ok(Response::Ok) => {
                    let mut s = frame.lock();
                    if s.version == version {
                        s.data = None;
                        s.owned = false;
                        s.write = false;
                    }
                    return Handed::Over;
                }
                Ok(_) => {
                    // The manager's entry had moved on: a faulting node took the page
                    // meanwhile (this frame then no longer owns it), or this node was granted
                    // a newer version, which goes next round.
                    let s = frame.lock();
                    if !(s.owned && s.data.is_some() && s.version > version) {
                        return Handed::NotOwned;
                    }
                }
                Err(e) => {
                    tracing::info!(%page, error = %e, "dsm: a page's manager did not take it from this leaving node");
                    return Handed::Unanswered;
                }
            }
        }
        Handed::NotOwned
    }

    /// `page`'s manager did not answer this leaving owner, and may have died with its entry.
    /// Unless the page's backup is on a live node other than the manager (it holds the last
    /// commit, and the manager's recovery finds it), the page is left on the first live node
    /// after the manager that takes it. The frame stays closed: a local write asks the
    /// manager, so nothing is committed here that the fostered copy lacks.
    ///
    /// Only with backups on: without, a page has one copy by design, and one left on another
    /// node would be a copy no entry names, which a later write would not reach.
    pub(crate) async fn foster(
        &self,
        ctx: &Context,
        page: PageId,
        manager: NodeId,
        frame: &Frame,
    ) -> bool {
        if !self.state().config.backups {
            return false;
        }
        let me = ctx.node();
        let usable = |n: NodeId| n != me && n != manager && !self.gone(ctx, n);
        let (version, data, readers) = {
            let _writer = frame.writer.lock().await;
            let s = frame.lock();
            let (Some(d), true) = (&s.data, s.owned) else { return true };
            if s.backup_node.is_some_and(usable) {
                return true;
            }
            (s.version, Arc::clone(d), s.readers.clone())
        };
        let whose = Fostered { leaver: me, readers, backup: None };
        self.leave_on_another(ctx, page, manager, (version, &data, whose)).await
    }

    /// A page another leaver left here, which this node now leaves too: it goes on to the next
    /// live node after its manager, on the first leaver's behalf.
    async fn foster_again(&self, ctx: &Context, page: PageId, manager: NodeId, frame: &Frame) {
        let Some((version, data, whose)) = frame.fostered_copy() else { return };
        let leaver = whose.leaver;
        if self.leave_on_another(ctx, page, manager, (version, &data, whose)).await {
            frame.drop_fostered(leaver);
            return;
        }
        tracing::warn!(%page, manager = manager.0, "dsm: a page a leaving node left here, not yet handed to its manager, could not be left on another node as this one leaves; it is lost unless its manager's recovery finds another copy");
    }

    /// A page this leaving node owns and manages travels to its new manager `to` with its
    /// entry. With backups on, unless its backup is on a live node other than `to`, the page
    /// is stored on another first: `to` may die before this change ends, and the page with it,
    /// while this node is gone.
    /// Nodes in `silent` did not answer an earlier page: they are not asked again, so that a
    /// node dead but not yet known as such costs one call's timeout, not one per page, while
    /// the change holds requests.
    pub(crate) async fn second_copy(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &mut PageEntry,
        (to, version, data): (NodeId, u64, &Bytes),
        silent: &mut BTreeSet<NodeId>,
    ) {
        if !self.state().config.backups {
            return;
        }
        let me = ctx.node();
        let usable = |n: NodeId| n != me && n != to && !self.gone(ctx, n);
        if entry.backup.is_some_and(usable) {
            return;
        }
        let candidates: Vec<NodeId> =
            after(ctx, to).filter(|&n| usable(n) && !silent.contains(&n)).collect();
        for node in candidates {
            let data = PageBytes::shared(data);
            let request = Request::Backup { page, version, commit: FINAL, data };
            if self.tell(ctx, node, page, request).await {
                entry.backup = Some(node);
                return;
            }
            silent.insert(node);
        }
        tracing::warn!(%page, manager = to.0, "dsm: a page leaving with its entry could not be stored on a second node; until its new manager gives it a backup, that node's failure loses it");
    }

    /// Hands a page a leaving node left here (see [`Request::Foster`]) to its manager on the
    /// leaver's behalf, in the background until the manager answers. Then the copy is dropped,
    /// unless an entry may name this node for it by then: a recovery was told of it (it
    /// answers `Missing`), or the manager placed its own backup here.
    pub(crate) fn hand_on(&self, ctx: &Context, page: PageId, version: u64, whose: Fostered) {
        let leaver = whose.leaver;
        let ask = move |frame: &Frame| {
            let data = PageBytes::shared(&frame.fostered(version)?);
            // As the leaver would have asked: to take its page, or to find another backup
            // than it (the manager answers `Ok` once it did, or had no need to).
            Some(match whose.backup {
                None => {
                    let readers = whose.readers.clone();
                    Request::Surrender { node: leaver, version, data, readers }
                }
                Some(commit) => {
                    Request::Abandon { node: leaver, copy: Some((version, commit, data)) }
                }
            })
        };
        let done = move |frame: &Frame| frame.drop_fostered(leaver);
        self.keep_asking(ctx, page, leaver, "a page a leaving node left here", ask, done);
    }

    /// Hands the copy a leaving node kept aside for a write grant, and left here
    /// ([`Request::KeepRetired`]), to the page's manager on the leaver's behalf, as the
    /// leaver would have: kept there, or needed by nobody (the grant settled), it goes from
    /// here. Unless a recovery saw it here first (`scans` moved on since it came): that
    /// recovery may have made this node the page's owner from that copy, to be promoted when
    /// the page is next asked for. Left here otherwise, a copy no manager knew of was never
    /// released, and a manager only slow could not take its grant back to it.
    pub(crate) fn hand_aside_on(
        &self,
        ctx: &Context,
        page: PageId,
        leaver: NodeId,
        label: u64,
        scans: u64,
    ) {
        let kept = move |s: &crate::frames::FrameState| {
            s.scans == scans && s.retired.as_ref().is_some_and(|r| r.version == label)
        };
        let ask = move |frame: &Frame| {
            let s = frame.lock();
            let data = PageBytes::shared(&s.retired.as_ref().filter(|_| kept(&s))?.data);
            Some(Request::KeepAside { node: leaver, label, data })
        };
        let done = move |frame: &Frame| {
            let mut s = frame.lock();
            kept(&s) && s.retired.take().is_some()
        };
        let what = "a copy a leaving node kept aside for a write grant, left here,";
        self.keep_asking(ctx, page, leaver, what, ask, done);
    }

    /// Asks `page`'s manager what `ask` makes of what this node keeps for `leaver`, in the
    /// background until it answers; `None` from `ask` (nothing left to hand) ends it. `Ok`
    /// or `Missing`: `done` drops the copy, if it should go. A manager not answering yet is
    /// asked again after [`HAND_ON_PAUSE`].
    fn keep_asking(
        &self,
        ctx: &Context,
        page: PageId,
        leaver: NodeId,
        what: &'static str,
        ask: impl Fn(&Frame) -> Option<Request> + Send + 'static,
        done: impl Fn(&Frame) -> bool + Send + 'static,
    ) {
        let (service, ctx) = (self.node.service(), ctx.clone());
        tokio::spawn(async move {
            loop {
                let Some(frame) = service.state().frames.get(page) else { return };
                let Some(request) = ask(&frame) else { return };
                if ctx.gone(ctx.node()) {
                    return;
                }
                match ctx.request::<_, Response>(DSM, page.key(), &request).await {
                    Ok(answer @ (Response::Ok | Response::Missing)) => {
                        if done(&frame) {
                            tracing::info!(
                                %page,
                                leaver = leaver.0,
                                ?answer,
                                "dsm: {what} was handed to its manager"
                            );
                        }
                        return;
                    }
                    Ok(Response::Retry | Response::Busy) => tokio::time::sleep(HAND_ON_PAUSE).await,
                    Ok(other) => {
                        tracing::warn!(%page, leaver = leaver.0, answer = ?other, "dsm: the manager refused {what}; this node keeps it, which a recovery of that manager would find");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(%page, error = %e, "dsm: the manager of {what} does not answer yet");
                        tokio::time::sleep(HAND_ON_PAUSE).await;
                    }
                }
            }
        });
    }
}

/// `request` to `page`'s manager, given up after [`MANAGER_PATIENCE`], or as soon as the
/// cluster declares the manager failed: its recovery waits for this leave to end, and an
/// eviction asked just after a `kill -9` of another node waited out the whole patience (4 s
/// in "receiving", a helper's black-box run). The manager may still carry it out: what it
/// answers those who ask on this node's behalf after says so.
async fn ask_manager(ctx: &Context, page: PageId, request: &Request) -> Result<Response, String> {
    let deadline = tokio::time::Instant::now() + MANAGER_PATIENCE;
    loop {
        let asked = tokio::time::timeout_at(deadline, ctx.request(DSM, page.key(), request));
        match unless_declared(ctx, page, asked).await? {
            // The manager could not say it acted (its replica holder slow to take its word
            // back, say): asked again, then counted as unanswered, and the copy left on another
            // node. Taken for an answer, a surrender was dropped as not owned and a backup's
            // move as done, the copy leaving with this node unsaid (a helper's review).
            Ok(Ok(Response::Retry | Response::Busy))
                if tokio::time::Instant::now() + ASK_AGAIN_PAUSE < deadline =>
            {
                tokio::time::sleep(ASK_AGAIN_PAUSE).await;
            }
            Ok(Ok(Response::Retry | Response::Busy)) => {
                return Err(format!("asked to retry for {} s", MANAGER_PATIENCE.as_secs()))
            }
            Ok(answer) => return answer.map_err(|e| e.to_string()),
            Err(_) => return Err(format!("no answer within {} s", MANAGER_PATIENCE.as_secs())),
        }
    }
}

/// `asked`, a call to `page`'s manager, unless the cluster declares that manager failed first.
async fn unless_declared<T>(
    ctx: &Context,
    page: PageId,
    asked: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    let manager = ctx.snapshot().and_then(|s| s.locate(DSM, page.key()));
    let declared = async {
        match manager {
            Some(manager) => ctx.until_gone(manager).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        // An answer that came counts, even with the declaration: a surrender the manager took
        // is not left on another node as well.
        biased;
        answer = asked => Ok(answer),
        () = declared => Err("the cluster declared it failed".into()),
    }
}

/// The cluster's nodes after `node` in its table, wrapping: where a page goes when `node`
/// cannot take it, spread as backups are.
fn after(ctx: &Context, node: NodeId) -> impl Iterator<Item = NodeId> {
    let nodes = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
    let at = nodes.iter().position(|&n| n == node).unwrap_or(0);
    let count = nodes.len();
    nodes.into_iter().cycle().skip(at + 1).take(count)
}

fn is_silent(silent: &Silent, manager: NodeId) -> bool {
    silent.lock().expect("silent").contains(&manager)
}
