//! Requests this node passes on to their manager: sent by a node whose table is older, or
//! that asked the wrong node, they are relayed rather than answered with `Moved`.

use super::Inner;
use crate::deadline::Deadline;
use crate::wire::{Message, Reply, Routed};
use gobelins_locator::NodeId;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::Instant;

/// One request being passed on (`Inner::forward`); dropped, it makes room for another.
struct Relay<'a>(&'a AtomicUsize);

impl<'a> Relay<'a> {
    /// A place among the `most` requests relayed at once, if one is free.
    fn take(relaying: &'a AtomicUsize, most: usize) -> Option<Relay<'a>> {
        if relaying.fetch_add(1, Ordering::AcqRel) >= most {
            relaying.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Relay(relaying))
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// Passes a request for a key this node does not manage on to the key's manager, and
    /// relays the manager's reply to the request's origin: `None` when there is nobody to pass
    /// it to and the origin must be told `Moved`.
    ///
    /// Relayed, not answered by the manager to the origin directly: that took one one-way hop
    /// fewer, but five messages instead of four, and the origin had to wait for two of them,
    /// from two nodes. On one machine the second wait cost a sleeping thread's wake-up:
    /// 95 µs a redirect against 18 µs relayed (BENCHMARKS.md, stop 28). Each message now
    /// answers the one before it, and no answer arrives that its receiver did not ask for.
    pub(super) async fn forward(
        &self,
        from: NodeId,
        routed: Routed,
        until: Deadline,
    ) -> Option<Reply> {
        let id = routed.id;
        if from != id.origin || self.mirrors.stopped.load(Ordering::Acquire) {
            return None;
        }
        let (epoch, to) = {
            let router = self.router.lock().expect("router");
            let router = router.as_ref()?;
            (router.epoch(), router.snapshot().locate(routed.service, routed.key)?)
        };
        // Nobody to pass it to: this node manages the key after all (its epoch moved since
        // `serve`), the origin does (it serves the key itself once it knows), or the manager
        // is gone.
        if to == self.me || to == from || self.mirrors.is_departed(to) {
            return None;
        }
        let Some(_relay) = Relay::take(&self.relaying, self.config.max_relays) else {
            tracing::debug!(
                origin = from.0,
                most = self.config.max_relays,
                "as many requests as may be are being passed on; the origin is told Moved"
            );
            return None;
        };
        let wait = until.left(Instant::now());
        let message =
            Message::Forward(Routed { epoch, wait_ms: wait.as_millis() as u64, ..routed });
        let bytes = self.link.seal(message.encode().ok()?);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        // Longer than the manager will wait, so that its own `Late` comes back, and shorter
        // than the origin waits for this node, so that ours reaches it.
        let taken = self.link.call(to, bytes, wait + self.config.retry / 2).await;
        let reply = self.reply_from(to, taken);
        if matches!(reply, Reply::Late) {
            // The origin asks again now, rather than at the end of its attempt.
            tracing::debug!(node = to.0, origin = from.0, "forwarded request not answered");
        }
        Some(reply)
    }
}
