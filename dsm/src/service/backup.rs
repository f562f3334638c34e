//! Backup copies of dirty pages: where they go, and what becomes of them when holders leave.

use super::{departed_since, next_node, DsmService, ABANDON_PAUSE};
use crate::frames::{Bytes, Retired, FINAL};
use crate::node::Live;
use crate::page::PageId;
use crate::protocol::{PageBytes, PageEntry, Request, Response};
use gobelins_adaptation::Context;
use gobelins_locator::NodeId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// How often, and how far apart, a manager asks an owner busy writing to move its backup off
/// a leaving node: its write commits to the leaving node, which still answers, in moments.
const ABANDON_TRIES: usize = 5;

/// How long a manager takes an owner that did not answer one such request as not answering:
/// it is not asked again for the leaving node's other pages, whose copies it stores at once.
const OWNER_SILENCE: Duration = Duration::from_secs(5);

impl DsmService {
    /// Chooses where `writer`'s backup goes for the grant a write fault is making, and whether
    /// it is the old one, kept (it holds the content already). `taking`: the page is taken
    /// from its owner for the grant. `None` when no node can take it.
    pub(super) fn choose_backup(
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
        // Nor a node the cluster gave up on, whose recovery has yet to reach this node, nor one
        // leaving: it takes no backup (it answers `Departed`), and a write fault retried on
        // the same choice until the change ended (a helper's review).
        let leaver = self.leaver();
        let live = |n: NodeId| !self.gone(ctx, n) && !ctx.gone(n) && Some(n) != leaver;
        // A backup nearer the writer than the farthest live node (in the writer's zone, while
        // another zone has a live node) is replaced by one there: kept, the writer's zone lost
        // whole would take both copies. Looked at only for a backup kept otherwise, and
        // without labels no node is apart: a grant's path, as before, takes no lock a node.
        let level = |n: NodeId| snapshot.apart_at(writer, n);
        let zone_apart = |b: NodeId| {
            let apart = (snapshot.nodes().iter().copied())
                .filter_map(|n| level(n).map(|l| (l, n)))
                .filter(|&(_, n)| Some(n) != taken_from && live(n));
            let farthest = apart.map(|(l, _)| l).min();
            farthest.is_none() || level(b) == farthest
        };
        let keep = entry.backup.filter(|&b| {
            b != writer
                && Some(b) != taken_from
                && live(b)
                && entry.owner.is_some()
                && zone_apart(b)
        });
        if let Some(kept) = keep {
            return Some((kept, true));
        }
        let nodes: Vec<NodeId> = snapshot.nodes().iter().copied().filter(|&n| live(n)).collect();
        let s = Some(snapshot);
        let chosen =
            next_node(s, &nodes, writer, taken_from).or_else(|| next_node(s, &nodes, writer, None));
        chosen.map(|c| (c, false))
    }

    /// Makes sure the node [`DsmService::choose_backup`] chose already holds the content
    /// being granted, so that the writer dying before its first commit loses nothing. A new
    /// backup is filled first and the old one dropped after.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn place_backup(
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
                // The last content of the version this grant gives up: the writer commits
                // under the next. Stamped below every commit, it lost to an older copy that a
                // backup the owner once stopped reaching still held (its commits went on to
                // another), and a writer dead before its first commit rolled the page back.
                Request::Backup {
                    page,
                    version: entry.version,
                    commit: FINAL,
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
    pub(super) async fn back_up_to(
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
            tracing::debug!(%page, version, "dsm: a read copy this node holds is the page now");
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
        let snapshot = ctx.snapshot()?;
        let nodes = snapshot.nodes().iter().copied();
        // Nor the change's leaver, which takes no backup.
        let out = |n: NodeId| n == leaving || Some(n) == self.leaver();
        let live: Vec<NodeId> =
            nodes.filter(|&n| !out(n) && !self.gone(ctx, n) && !ctx.gone(n)).collect();
        next_node(Some(snapshot), &live, after, None)
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
        live.leaving = Some(leaving);
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
                tracing::info!(%page, owner = owner.0, node = to.0, "dsm: a page whose owner does not answer has its leaving backup's copy stored on another node");
            }
        }
        if entry.backup == Some(leaving) {
            // Not assumed either way: the owner may have moved, and its next commit tells.
            tracing::warn!(%page, owner = owner.0, "dsm: a page whose backup node is leaving could not be given another now; it gets one at its owner's next commit or the next change this manager takes part in, and until then a failure of its owner loses it");
        }
        Response::Ok
    }

    /// `owner` could not reach `failed`, its backup, with `content`: its version, the commit
    /// and the page.
    pub(super) async fn rebackup(
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
            return Response::Invalid(format!("node {} does not own {page} at {version}", owner.0));
        }
        // The owner commits at the version it was granted: the grant landed.
        self.settle_grant(ctx, page, entry);
        // Where a grant would put it, among live nodes: one of a zone the cluster gave up on
        // would refuse it, and the commit would be asked again and again until its deadline.
        let Some(chosen) = self.live_after(ctx, owner, failed) else {
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

    pub(super) async fn surrender(
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
        tracing::debug!(%page, from = from.0, version, accepted, entry = ?entry, "dsm: surrender");
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
    pub(super) async fn keep_aside(
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
        let retired =
            Retired { version: label, data, writer: entry.owner, backup: None, on_behalf: None };
        self.state().frames.frame(page).keep_retired(retired);
        tracing::debug!(
            %page,
            from = from.0,
            label,
            "dsm: a leaving node's copy kept aside is kept here"
        );
        entry.granted = granted;
        Response::Ok
    }
}
