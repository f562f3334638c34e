//! What the DSM does as the cluster changes: reports of frames, the merge, and the backups
//! restored after it.

use super::{next_node, DsmService, Exposed, Reader, RESTORING};
use crate::directory::{digest, rebuild, Report};
use crate::frames::{Retired, FINAL};
use crate::node::Live;
use crate::page::{named, Named};
use crate::protocol::{Entry, LockEntry, PageEntry, Request, Response};
use futures::StreamExt;
use gobelins_adaptation::{ChangeInfo, Context, Moving};
use gobelins_locator::{Change, Key, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Mutex as AsyncMutex;

/// How one page's backup fared after a change.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Restore {
    /// It has one.
    Done,
    /// Its owner is writing it, or moved on from that version (a write since, or a grant to
    /// another writer): that commit places a backup.
    Written,
    /// Its owner, or the node chosen for the backup, did not answer.
    Unanswered,
}

impl DsmService {
    /// The node's copies of orphaned keys, for `scan`.
    pub(super) fn reports(&self, me: NodeId, orphans: &Moving) -> Vec<(Key, Entry)> {
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
    pub(super) async fn merge(&self, ctx: &Context, change: &ChangeInfo) {
        let staged = std::mem::take(&mut *self.state().staged.lock().expect("staged"));
        let me = ctx.node();
        let vouched = self.vouched(ctx, change, &staged);
        let mut reports: BTreeMap<Key, Vec<Report>> = BTreeMap::new();
        let mut kept_tainted = 0usize;
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
                            let on_behalf = None;
                            let retired =
                                Retired { version: label, data, writer, backup: None, on_behalf };
                            f.keep_retired(retired);
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
                        tracing::debug!(%page, node = me.0, ?entry, "dsm: entry merged");
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
                    kept_tainted += 1;
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
        if let (Change::Fail(dead) | Change::Recover(dead), 1..) = (&change.change, kept_tainted) {
            // With backups on, one failure should taint nothing: an operator would otherwise
            // learn of it only as reads of pages never written fail. Without, it always does.
            if self.state().config.backups {
                tracing::warn!(
                    slots = kept_tainted,
                    dead = dead.0,
                    "dsm: slots of the dead node stay tainted here: a page in them that no node reported reads as lost, never as zeros. The dead node had not vouched for them, through its replica holder, since the last change that could have taken a copy away (another node's removal, or slots moved to it), or a page of the slot had no copy elsewhere, or a node did not report. `gobelins dsm lost` lists them; once what mattered is checked, `gobelins dsm forgive SEGMENT PAGE` (that page's slot) or `--all` lets the pages no node reported read as zeros again, whether never written or lost"
                );
            } else {
                tracing::info!(slots = kept_tainted, dead = dead.0, "dsm: slots of the dead node tainted: without backups, a page in them that no node reported reads as lost");
            }
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
                tracing::warn!(%page, version = entry.version, "dsm: page lost with its manager: the only copies left are one given up to a writer that died too, which may have written since, or backups that disagree");
                self.found_lost(1);
            }
            let only_backups = !reports.iter().any(|r| !r.backup && r.version == entry.version);
            if let (true, Some(holder)) = (only_backups, entry.owner) {
                let promoted =
                    self.promote_patiently(ctx, page, &mut entry, holder, &mut unanswering).await;
                if promoted.is_err() {
                    tracing::warn!(%page, node = holder.0, "dsm: page lost: its backup could not be restored (it does not hold that version, or it never answered)");
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
    pub(super) async fn sweep(&self, ctx: &Context) -> Vec<Exposed> {
        let mut slots: Vec<(Key, Arc<AsyncMutex<Live>>)> =
            self.state().live.iter().map(|e| (*e.key(), Arc::clone(e.value()))).collect();
        // In key order, the same in every run (a `DashMap`'s order is new each run).
        slots.sort_unstable_by_key(|(key, _)| *key);
        // With backups on, the live nodes a page left without a backup may get one on.
        let backups = self.state().config.backups;
        let live: Vec<NodeId> = ctx
            .snapshot()
            .filter(|_| backups)
            .map(|s| {
                // Nor those the cluster gave up on, whose recoveries are still to come.
                let nodes = s.nodes().iter().copied();
                nodes.filter(|&n| !self.gone(ctx, n) && !ctx.gone(n)).collect()
            })
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
                    // Where a grant would put it: the next live node after the owner, of
                    // another zone first.
                    let to = owner.filter(|&o| !backed(o));
                    let to = to.and_then(|o| next_node(ctx.snapshot(), &live, o, None));
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
    pub(super) async fn restore_backups(&self, ctx: &Context, exposed: Vec<Exposed>) {
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
