//! A page entry as its manager's handler holds it: on release, whether the page is still
//! kept elsewhere is noted for the handler, which takes its node's word back before it
//! answers if not (see `crate::cover`).

use crate::cover::kept_elsewhere;
use crate::node::Live;
use gobelins_locator::NodeId;
use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::MutexGuard;

tokio::task_local! {
    /// Set when an entry a handler held was left not kept elsewhere.
    pub(crate) static EXPOSED: Cell<bool>;
}

/// The guard of a page entry's lock, for a handler of its manager.
pub(crate) struct Held<'a> {
    pub(crate) guard: MutexGuard<'a, Live>,
    pub(crate) me: NodeId,
    /// The node's count of exposed entries; `None` with backups off, where no word is given.
    pub(crate) exposures: Option<&'a AtomicU64>,
    /// A node on its way out, whose copies do not count as kept elsewhere: the leaver a
    /// handler serves (`Abandon`), or that of the change this node has begun.
    pub(crate) leaving: Option<NodeId>,
}

impl Deref for Held<'_> {
    type Target = Live;

    fn deref(&self) -> &Live {
        &self.guard
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Live {
        &mut self.guard
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Nodes that left did so in a change, after which the word is given again: a page
        // entry only needs its own fields looked at here, but for a leaver's copies, which
        // are on their way out. Counted as elsewhere, a manager whose owner could not move the
        // page's backup off a leaver answered it with its word standing, the page's only
        // other copy leaving (a helper's review).
        let Some(exposures) = self.exposures else { return };
        if let Live::Page(entry) = &*self.guard {
            if !kept_elsewhere(entry, self.me, |n| Some(n) == self.leaving) {
                exposures.fetch_add(1, Ordering::SeqCst);
                let _ = EXPOSED.try_with(|e| e.set(true));
            }
        }
    }
}
