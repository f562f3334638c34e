//! Migration messages: staging the batches that arrive, and delivering those that leave.

use super::Inner;
use crate::error::AdaptationError;
use crate::run::Run;
use crate::wire::{Answered, Reply, Settlement};
use bytes::Bytes;
use gobelins_locator::{NodeId, ServiceId};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What [`Inner::deliver`] does with a message its receiver refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnRefusal {
    /// Send it again until it is taken: it carries entries, or an ack the change waits for.
    SendAgain,
    /// Give it up: it carries only what retries of requests may need.
    GiveUp,
}

/// How [`Inner::deliver`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The receiver took it.
    Taken,
    /// The receiver refused it, and [`OnRefusal::GiveUp`] said to give it up.
    Refused,
    /// The receiver had already merged the change it belongs to: a copy of one it took, or
    /// this node's own part in the change ended without it.
    Merged,
    /// The receiver is gone, or this host stopped: `scan` rebuilds what it carried.
    Gone,
}

/// The longest pause between two attempts at a message its receiver refused.
pub(super) const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// How often a refusal that goes on is logged again.
const REFUSED_SAY_EVERY: Duration = Duration::from_secs(30);

impl Inner {
    /// Stages a batch once this node has begun the change it belongs to.
    pub(super) async fn stage(
        self: &Arc<Self>,
        from: NodeId,
        epoch: u64,
        service: ServiceId,
        entries: Run,
        answered: Vec<Answered>,
        settled: &[(NodeId, Settlement)],
    ) -> Reply {
        let Some(plugin) = self.registry.get(service) else { return Reply::Unknown(service.0) };
        let mut begun = self.begun.subscribe();
        // Half the sender's deadline (if it is set as this node's), so that `Late` reaches it
        // before it gives up and sends a copy: staged too, that copy's entries were received
        // twice. A copy sent again after a failed connection can still land twice.
        let until = Instant::now() + self.config.call_timeout / 2;
        if !matches!(
            tokio::time::timeout_at(until, begun.wait_for(|&b| b >= epoch)).await,
            Ok(Ok(_))
        ) {
            return Reply::Late;
        }
        // A batch of a change before the one this node has begun is a copy of one whose
        // change ended without this node's part in it (it was declared failed, and this is
        // its next life): staged now, it would be merged into the change begun.
        if *begun.borrow() > epoch {
            tracing::debug!(
                node = from.0,
                epoch,
                "batch for a change before the one begun here refused"
            );
            return Reply::Merged { epoch };
        }
        // Under the same bound: a merge in progress holds this wait too.
        let Ok(merging) = tokio::time::timeout_at(until, self.merging.read()).await else {
            return Reply::Late;
        };
        if *merging >= epoch || *self.done.borrow() >= epoch {
            tracing::debug!(node = from.0, epoch, "batch for a change already merged here refused");
            return Reply::Merged { epoch };
        }
        let count = entries.len() as u64;
        let ctx = self.context(None);
        match plugin.receive(&ctx, from, &entries).await {
            Ok(()) => {
                self.settled.lock().expect("settled").merge(settled, Instant::now());
                self.remember_all(service, answered);
                self.counters.entries_received.fetch_add(count, Ordering::Relaxed);
                Reply::Accepted
            }
            Err(e) => {
                tracing::error!(node = from.0, service = service.0, error = %e, "a migration batch was refused");
                Reply::Refused(e.to_string())
            }
        }
    }

    /// Sends `message`, sealed by the link, to `to` until it is taken, or `to` is known gone,
    /// or this host stops. A message refused is sent again, less and less often, unless
    /// `refused` says to give it up: given up, the entries of a batch would be lost, the change
    /// reported done over them and their new manager serving them as absent.
    pub(crate) async fn deliver(&self, to: NodeId, message: Bytes, refused: OnRefusal) -> Delivery {
        let mut failures = 0u32;
        let mut refusals = 0u32;
        let mut said: Option<Instant> = None;
        let mut too_large = false;
        loop {
            // A stopped life sends nothing more. Not even once: its ack for a change, sent after
            // a batch it gave up as it stopped, would have the receiver count its entries in,
            // release their slots and serve them as absent until the failure is recovered.
            if self.mirrors.stopped.load(Ordering::Acquire) {
                return Delivery::Gone;
            }
            let mut pause = self.config.retry;
            // Sealed once: an attempt sends the same bytes again, not a copy of them.
            let outcome = self.link.call(to, message.clone(), self.config.call_timeout).await;
            let why = match outcome.and_then(|answer| Reply::decode(&answer)) {
                Ok(Reply::Accepted) => return Delivery::Taken,
                Ok(Reply::Merged { epoch }) => {
                    tracing::warn!(
                        node = to.0,
                        epoch,
                        "entries reached their new manager once it had begun to merge the \
                         change: a copy sent again whose first answer was lost (the first was \
                         taken, nothing is missing), or this node was cut off during the change \
                         (the cluster rebuilt them from replicas, and this node rejoins as a new \
                         life)"
                    );
                    return Delivery::Merged;
                }
                Ok(Reply::Refused(why)) => Some(why),
                Ok(Reply::Unknown(service)) => Some(format!("it does not host service {service}")),
                // Refused here, by this node's own frame limit, however often it is sent; but
                // dropped, its entries are lost.
                Err(e @ AdaptationError::TooLarge { .. }) => {
                    too_large = true;
                    Some(e.to_string())
                }
                Ok(other) => {
                    tracing::debug!(node = to.0, ?other, "migration message not taken yet");
                    None
                }
                Err(e) => {
                    failures += 1;
                    match failures {
                        // Most often the connection it went on was replaced by one the peer
                        // opened at the same moment (both sides dial a node that joins), and
                        // the new one is up: sent again at once, a pause would hold up the
                        // whole change (a 20 ms stall in one join of four, measured).
                        1 => {
                            tracing::debug!(node = to.0, error = %e, "migration message not delivered; sending it again");
                            pause = Duration::ZERO;
                        }
                        2 => {
                            tracing::warn!(node = to.0, error = %e, "migration message not delivered; retrying")
                        }
                        _ => {}
                    }
                    None
                }
            };
            if let Some(why) = why {
                self.counters.batches_refused.fetch_add(1, Ordering::Relaxed);
                if refused == OnRefusal::GiveUp {
                    tracing::warn!(node = to.0, %why, "node refused a migration message that carries no entries (answers kept for retries): given up, a late retry of one of those requests may run again");
                    return Delivery::Refused;
                }
                refusals += 1;
                // A refusal does not pass by itself: what cures it is an operator's act.
                pause =
                    (self.config.retry * 2u32.saturating_pow(refusals.min(16))).min(REFUSED_PAUSE);
                if said.is_none_or(|at| at.elapsed() >= REFUSED_SAY_EVERY) {
                    said = Some(Instant::now());
                    if too_large {
                        tracing::error!(
                            node = to.0,
                            error = %why,
                            refusals,
                            "a migration batch is larger than a frame: one entry of this service \
                             alone is. It stays on this node and is tried again, and the change \
                             cannot end before. Stopping a node does not help: the entry would \
                             be rebuilt for another one. The frame limit is fixed in this build \
                             (16 MiB): the service must keep its entries under it; report this \
                             to its authors"
                        );
                    } else {
                        tracing::error!(
                            node = to.0,
                            %why,
                            refusals,
                            "node refuses a migration batch; its entries stay on this node and \
                             are sent again until it takes them, and the change cannot end \
                             before. Most often the nodes run different builds: run the same \
                             gobelins build on every node. To end the change without that node, \
                             stop it: the cluster rebuilds what it was to take where a copy \
                             survives"
                        );
                    }
                }
            }
            if self.mirrors.is_departed(to) {
                tracing::warn!(
                    node = to.0,
                    "node is gone; what it was to receive will be rebuilt by scan where a copy survives"
                );
                return Delivery::Gone;
            }
            if self.mirrors.stopped.load(Ordering::Acquire) {
                return Delivery::Gone;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}
