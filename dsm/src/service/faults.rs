//! The manager's side of read and write faults.

use super::{invalidate, present, Absent, DsmService};
use crate::node::Live;
use crate::page::PageId;
use crate::protocol::{Granted, PageBytes, Response};
use gobelins_adaptation::Context;
use gobelins_locator::NodeId;
use std::collections::BTreeSet;
use std::sync::Arc;

impl DsmService {
    pub(super) async fn read_fault(&self, ctx: &Context, page: PageId, reader: NodeId) -> Response {
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
            %page,
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

    pub(super) async fn write_fault(
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
                %page,
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
                            tracing::debug!(%page, owner = o.0, ?absent, "dsm: the owner did not take back the page a failed grant took; the next fault will");
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
        tracing::debug!(%page, manager = ctx.node().0, writer = writer.0, version = granted, previous = ?owner, sent = data.is_some(), "dsm: write granted");
        let data = data.as_ref().map(PageBytes::shared);
        Response::Grant { version: granted, data, zero, backup, previous }
    }
}
