//! Promoting a copy to owner, and mending an entry whose owner is gone.

use super::{Absent, DsmService, Reader, RESTORING};
use crate::directory::repair;
use crate::page::PageId;
use crate::protocol::{Granted, PageEntry, Request, Response};
use futures::StreamExt;
use gobelins_adaptation::Context;
use gobelins_locator::NodeId;
use std::collections::BTreeSet;
use std::time::Duration;

const PROMOTE_PAUSE: Duration = Duration::from_millis(50);

/// How often, and how far apart, a recovery asks again a backup that did not answer its
/// promotion (each ask waits up to the layer's call timeout): the page is lost otherwise.
const PROMOTE_TRIES: usize = 3;

impl DsmService {
    /// Makes `backup` the owner of `page` from the backup copy it keeps. `Missing` when it
    /// does not hold that version; `Unreachable` when it did not answer, and may well hold it.
    pub(super) async fn promote(
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
        tracing::info!(%page, node = backup.0, "dsm: page rebuilt from its backup");
        Ok(())
    }

    /// [`DsmService::promote`], asked again a few times while `backup` does not answer and is
    /// not gone: a connection reset or one slow answer must not make a page whose copy
    /// survives lost for good. A node in `unanswering` (it did not answer one page's tries)
    /// is asked once: a node that stopped answering costs a recovery one call per page, not
    /// several.
    pub(super) async fn promote_patiently(
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
                        %page,
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
    pub(super) async fn mend(
        &self,
        ctx: &Context,
        page: PageId,
        entry: &mut PageEntry,
        fault: bool,
    ) -> bool {
        let (settled, reader) = self.mend_entry(ctx, page, entry, fault).await;
        if let Some(Reader { reader, version, backup }) = reader {
            self.own_read_copy(ctx, page, reader, version, backup).await;
        }
        settled
    }

    /// [`DsmService::mend`], but for the reader it made the owner, which it leaves the caller
    /// to tell: the sweep tells them all at once, after it lets go of their entries.
    pub(super) async fn mend_entry(
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
                        %page,
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
            tracing::warn!(%page, "dsm: page lost: every node holding a copy failed");
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
            tracing::debug!(%page, node = reader.0, ?answer, "dsm: a reader made the owner did not take its copy as the page; it does when next backed up");
        }
        answer.is_some()
    }

    /// [`DsmService::own_read_copy`] for each of `readers`, 16 at a time, with no entry held.
    /// A reader that did not answer for one page is not asked for its others: each would
    /// wait out a call timeout, and the change with them. Such a page stays a read copy
    /// until its next write or backup.
    pub(super) async fn own_read_copies(&self, ctx: &Context, readers: Vec<(PageId, Reader)>) {
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
}
