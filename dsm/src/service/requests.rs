//! What a node serves besides faults: discards, frees, locks, barriers, and messages to its own
//! frames.

use super::{departed_since, drop_backups, drop_copy, invalidate, Absent, DsmService};
use crate::frames::{Retired, Stored};
use crate::node::Live;
use crate::page::{named, Named, PageId};
use crate::protocol::{PageBytes, PageEntry, Request, Response};
use gobelins_adaptation::Context;
use gobelins_locator::Key;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;

/// How long a barrier's manager keeps an arrival waiting before telling it to ask again. It
/// answers at once when a change begins, which waits for the handlers in progress: one in
/// three joins during MGS waited out this poll, 20 ms, in its before-migration phase.
const BARRIER_POLL: Duration = Duration::from_millis(20);

impl DsmService {
    pub(super) async fn discard(&self, ctx: &Context, page: PageId) -> Response {
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
                // Backups too: one left on a node (its owner stopped reaching it, or two that
                // disagreed made the page lost) outlived the discard, and should this manager
                // die, the recovery rebuilt the page from it, old contents and old version.
                let dropped =
                    drop_backups(self.state(), ctx, page, entry.version, everyone.iter().copied())
                        .await;
                if dropped.len() < everyone.len() {
                    return Response::Retry;
                }
                *entry = PageEntry { version: entry.version + 1, ..PageEntry::default() };
                return Response::Ok;
            }
        }
        Response::Kept
    }

    /// Lifts the taint of the slot whose marker is `marker`: its pages with no entry read as
    /// zeros again, and so do those first asked for while it lasted (lost at version 0, held by
    /// nobody: no node ever had a copy of them from this manager). A page lost otherwise (its
    /// copies died, or disagreed) stays lost until discarded: copies of it may live on.
    pub(super) async fn forgive(&self, marker: Key) -> Response {
        let st = self.state();
        let Some(held) = st.live.get(&marker).map(|e| Arc::clone(&e)) else {
            return Response::Kept;
        };
        let _marker = held.lock().await;
        // The marker first: a page first asked for from now on is made new, not lost. Those
        // made lost before are all in the table once every entry being made as the marker
        // went is in (`minting`, held for no more than that wait: nothing else under it).
        if st.live.remove(&marker).is_none() {
            return Response::Kept;
        }
        st.freed.lock().expect("freed").remove(&marker);
        drop(st.minting.write().unwrap_or_else(|p| p.into_inner()));
        let slot = st.spec.slot_of(marker);
        let of_slot: Vec<Arc<AsyncMutex<Live>>> = st
            .live
            .iter()
            .filter(|e| matches!(named(*e.key()), Named::Page(_)))
            .filter(|e| st.spec.slot_of(*e.key()) == slot)
            .map(|e| Arc::clone(e.value()))
            .collect();
        let mut reset = 0;
        for entry in of_slot {
            if let Live::Page(page) = &mut *entry.lock().await {
                if page.lost && *page == (PageEntry { lost: true, ..PageEntry::default() }) {
                    *page = PageEntry::default();
                    reset += 1;
                }
            }
        }
        // The word to the replica holder left the slot out for its taint, and was not to be
        // given again for it: given again now, it may vouch for the slot, and this node's
        // death soon after does not taint the slot anew.
        st.word.lock().await.tainted.remove(&slot);
        st.word_wanted.notify_one();
        // The node that was asked says it once for all the slots (`Dsm::forgive_all`): one
        // line per slot was hundreds in a millisecond.
        if reset > 0 {
            tracing::info!(slot, reset, "dsm: a slot's taint was lifted: pages reported lost while it lasted read as zeros again");
        } else {
            tracing::debug!(slot, "dsm: a slot's taint was lifted");
        }
        Response::Forgiven { reset }
    }

    pub(super) async fn lock_op(&self, ctx: &Context, key: Key, request: Request) -> Response {
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

    pub(super) async fn arrive(
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
    pub(super) async fn local(&self, ctx: &Context, request: Request) -> Response {
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
            // As for `Foster` below: not once this node leaves too.
            Request::KeepRetired { .. } if self.state().leaving.load(Ordering::SeqCst) => {
                Response::Departed
            }
            Request::KeepRetired { page, leaver, version, data, writer, backup } => {
                let data = data.into_shared();
                let on_behalf = Some(leaver);
                let retired = Retired { version, data, writer, backup, on_behalf };
                let scans = frames.frame(page).keep_retired(retired);
                self.hand_aside_on(ctx, page, leaver, version, scans);
                Response::Ok
            }
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
                // Not once this node's leave has begun: its hand-over may have looked at its
                // frames already, and the copy would leave with it unsaid, while the page's
                // manager, lagging, counts it as kept elsewhere (a helper's review). A
                // committing owner then asks the manager for another backup, as for a sealed
                // frame (a page whose slot moves in this change waits for its end); a manager
                // placing a backup retries, and once it has begun the change it chooses another
                // node (`choose_backup`, `live_after`).
                if self.state().leaving.load(Ordering::SeqCst) {
                    return Response::Departed;
                }
                // Sealed is judged under the lock the copy is stored under: judged apart, a
                // leaving node that sealed in between answered Ok for a copy it did not keep.
                match frames.frame(page).store_backup(version, commit, data.into_shared()) {
                    Stored::Kept | Stored::Newer => Response::Ok,
                    // Not once this leaving node took its copy: the owner asks the manager for
                    // another backup, rather than be told a commit is kept that the copy lacks.
                    Stored::Sealed => Response::Departed,
                }
            }
            // Nor a leaver's page once this node leaves too: it would go with this node's frames
            // unsaid. The leaver tries the next node.
            Request::Foster { .. } if self.state().leaving.load(Ordering::SeqCst) => {
                Response::Departed
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
            Request::Adopt { page, version } => {
                let departed = departed_since(ctx, ctx.from());
                if frames.frame(page).adopt_read_copy(version, &departed) {
                    Response::Ok
                } else {
                    Response::Missing
                }
            }
            Request::Free { segment } => self.free(ctx, segment),
            other => Response::Invalid(format!("{other:?} is for a manager")),
        }
    }

    /// Drops all this node holds of `segment`: copies, the entries it manages and those
    /// received in a change, hints. `Busy` during a change, whose entries are on the move:
    /// [`crate::Dsm::free`] asks again after it. In the slots this node manages whose manager
    /// once died, the segment's pages read as zeros from now on, not as lost.
    pub(super) fn free(&self, ctx: &Context, segment: u32) -> Response {
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
}
