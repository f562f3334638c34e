//! A manager's word that its slots are whole, given to its replica holder and taken back.

use super::{DsmService, ABANDON_PAUSE};
use crate::cover::{kept_elsewhere, newest, vouches};
use crate::node::{Live, DSM};
use crate::page::{named, taint_key, Named};
use crate::protocol::{Entry, Request, Response};
use gobelins_adaptation::{ChangeInfo, Context};
use gobelins_locator::{Change, Key};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a word is looked for again when pages were exposed while it was: a program
/// reading a lost page over and over exposes one each time.
const WORD_TRIES: usize = 5;

/// How long after a stable epoch a manager whose word left slots out, or was taken back,
/// looks at its entries again to give it anew; the wait doubles each time, up to
/// [`WORD_REFRESH_MAX`]. Each look reads every entry the node manages.
const WORD_REFRESH: Duration = Duration::from_secs(1);
const WORD_REFRESH_MAX: Duration = Duration::from_secs(30);

/// How long after a forgive lifted a taint, and no other since, the word is given again: the
/// other slots of a forgive of every slot come meanwhile; at most [`WORD_SETTLE_MAX`] after
/// the first.
const WORD_SETTLE: Duration = Duration::from_millis(50);
const WORD_SETTLE_MAX: Duration = Duration::from_millis(500);

/// How long a manager asks its replica holder to take its word back before it answers the
/// request that exposed a page `Retry`.
const WORD_PATIENCE: Duration = Duration::from_secs(2);

impl DsmService {
    /// The taint markers of this recovery that the dead manager's word lets go, every node
    /// of the cluster having reported (see `crate::cover`).
    pub(super) fn vouched(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
        staged: &[(Key, Entry)],
    ) -> BTreeSet<Key> {
        if !matches!(change.change, Change::Fail(_) | Change::Recover(_)) {
            return BTreeSet::new();
        }
        // A holder before the last may still keep an older word: the latest counts.
        let words = newest(staged.iter().filter_map(|(key, entry)| match entry {
            Entry::Covered { seq, epoch } => Some((*key, *seq, *epoch)),
            _ => None,
        }));
        let cluster = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
        let since = change.failed_kept_since;
        let vouches = |word| vouches(word, change.epoch, since, &cluster, &change.acked);
        let vouched = words.into_iter().filter(|&(_, word)| word.is_some_and(vouches));
        vouched.map(|(key, _)| key).collect()
    }

    /// The slots this node manages that have an entry not kept elsewhere, or one being
    /// changed, or a taint of their own; and, of those, the ones with a taint.
    fn unclean_slots(&self, ctx: &Context) -> (BTreeSet<u32>, BTreeSet<u32>) {
        let st = self.state();
        let me = ctx.node();
        let (mut unclean, mut tainted) = (BTreeSet::new(), BTreeSet::new());
        for e in st.live.iter() {
            let slot = st.spec.slot_of(*e.key());
            // A marker is never locked long: by its key, not by its lock, so that one a change
            // holds still counts.
            if named(*e.key()) == Named::Taint {
                tainted.insert(slot);
            }
            let clean = match e.value().try_lock() {
                Ok(live) => match &*live {
                    Live::Page(entry) => kept_elsewhere(entry, me, |n| self.gone(ctx, n)),
                    Live::Taint => false,
                    Live::Lock(_) | Live::Barrier(_) => true,
                },
                // Being changed: not known.
                Err(_) => false,
            };
            if !clean {
                unclean.insert(slot);
            }
        }
        (unclean, tainted)
    }

    /// Gives this node's word to its replica holder, at stable `epoch`, for the slots whose
    /// every page has a copy on another live node (see `crate::cover`).
    async fn give_word(&self, ctx: &Context, epoch: u64) {
        let st = self.state();
        let me = ctx.node();
        // A node the cluster gave up on vouches for nothing: its slots' entries are rebuilt
        // without it, and what it holds may be what never reached it.
        if ctx.gone(me) {
            return;
        }
        let holder = ctx.snapshot().and_then(|s| s.replica_holder(me));
        let mut word = st.word.lock().await;
        // Only once this node carried the change out to its end (not cut short: its merge
        // may not have run), or took no part in it and carried out the last it began; and
        // before a later change begins: that one's stable epoch gives the word. (It counts for
        // a failure of this node until the cluster records a change that may make it untrue:
        // another node's removal, or slots moved here, see `crate::cover`.)
        let (finished, began) =
            (st.finished.load(Ordering::SeqCst), st.began.load(Ordering::SeqCst));
        let current = (finished == epoch || (began < epoch && finished == began))
            && word.epoch <= epoch
            && word.stale(epoch)
            && st.change.lock().expect("change").is_none();
        let Some(holder) = holder.filter(|_| current) else { return };
        // Pages exposed while the entries are looked at may have been looked at before: look
        // again, a few times, rather than give no word for this epoch.
        let mut unclean = None;
        for _ in 0..WORD_TRIES {
            let seen = st.exposures.load(Ordering::SeqCst);
            let found = self.unclean_slots(ctx);
            if st.exposures.load(Ordering::SeqCst) == seen {
                unclean = Some(found);
                break;
            }
            tokio::task::yield_now().await;
        }
        let Some((unclean, tainted)) = unclean else { return };
        // A change that began during the look may have taken entries out of `live` before
        // they were looked at (an eviction's `send_out` does, then places their second
        // copies): the look missed them, and the word, counted after that eviction, would
        // read a page with no copy left as zeros (the review of `011a321`). `send_out` runs
        // only after `before_migration` has set `change`.
        let began_since = st.began.load(Ordering::SeqCst) > began;
        if began_since || st.change.lock().expect("change").is_some() {
            return;
        }
        word.seq += 1;
        word.epoch = epoch;
        // Before the answer: the holder may take the word and its answer be lost, and a word
        // taken back that the holder never had costs nothing.
        word.holder = Some(holder);
        word.confirmed = false;
        let word_unclean = unclean.len();
        let request =
            Request::Cover { epoch, seq: word.seq, unclean: unclean.iter().copied().collect() };
        word.unclean = unclean;
        word.tainted = tainted;
        match ctx.tell::<_, Response>(holder, DSM, taint_key(0), &request).await {
            Ok(Response::Ok) => {
                word.confirmed = true;
                tracing::debug!(
                    node = me.0,
                    holder = holder.0,
                    epoch,
                    unclean = word_unclean,
                    "dsm: word given to the replica holder"
                );
            }
            answer => {
                tracing::debug!(node = me.0, holder = holder.0, ?answer, "dsm: the replica holder did not take this node's word; its slots stay tainted should it die");
            }
        }
    }

    /// Gives this node's word at the stable `epoch`, then again, less and less often, while it
    /// leaves slots out that a later look may find clean (not a slot's taint: that stays), or
    /// was taken back, until a later change begins. A word is otherwise
    /// given once per change: a page exposed for a moment (a backup that did not answer, in a
    /// stable cluster) left its manager without a word, or with its slot left out, until the
    /// next change. Its death then tainted those slots, and a page never written read as lost
    /// (a soak saw one after a single failure).
    pub(super) async fn keep_word(&self, ctx: &Context, epoch: u64) {
        self.give_word(ctx, epoch).await;
        let st = self.state();
        let mut pause = WORD_REFRESH;
        loop {
            let wanted = tokio::select! {
                () = tokio::time::sleep(pause) => {
                    pause = (pause * 2).min(WORD_REFRESH_MAX);
                    false
                }
                () = st.word_wanted.notified() => {
                    self.settle(st).await;
                    true
                }
            };
            // A keeper of an earlier stable epoch (this node took no part in the changes
            // since, or one began and is stable) ends, and passes on a forgive's wake-up it
            // took: the keeper of the latest epoch gives the word.
            let superseded = st.keeping.load(Ordering::SeqCst) > epoch;
            if superseded || st.began.load(Ordering::SeqCst) > epoch || ctx.gone(ctx.node()) {
                if wanted {
                    st.word_wanted.notify_one();
                }
                return;
            }
            let stale = st.word.lock().await.stale(epoch);
            if stale {
                self.give_word(ctx, epoch).await;
            }
        }
    }

    /// Waits for a forgive's other slots: a forgive of every slot lifts this node's taints
    /// one by one, and one word serves them all. [`WORD_SETTLE`] after the last, or
    /// [`WORD_SETTLE_MAX`] after the first.
    async fn settle(&self, st: &crate::node::NodeState) {
        let until = tokio::time::Instant::now() + WORD_SETTLE_MAX;
        loop {
            let settled = tokio::time::sleep(WORD_SETTLE);
            tokio::select! {
                () = settled => return,
                () = st.word_wanted.notified() => {}
            }
            if tokio::time::Instant::now() >= until {
                return;
            }
        }
    }

    /// The entry of `key`, a page this node manages, left not kept elsewhere by a request:
    /// takes this node's word back, before the answer goes, unless the word leaves the slot
    /// out. `false` when the holder, still in the cluster, did not answer in time: the answer
    /// must not go then (a write it grants would be the page's only copy, which the holder's
    /// word would have read as zeros after this node's death).
    pub(super) async fn take_word_back(&self, ctx: &Context, key: Key) -> bool {
        let st = self.state();
        let mut word = st.word.lock().await;
        let Some(holder) = word.holder else { return true };
        // Only a word the holder confirmed (see `Word::leaves_out`): a page written now with
        // no copy elsewhere would otherwise read as zeros after this node's death.
        if word.leaves_out(st.spec.slot_of(key)) {
            return true;
        }
        word.seq += 1;
        let request = Request::Uncover { seq: word.seq };
        let deadline = tokio::time::Instant::now() + WORD_PATIENCE;
        loop {
            match ctx.tell::<_, Response>(holder, DSM, taint_key(0), &request).await {
                Ok(_) => break,
                Err(_) if ctx.gone(holder) || ctx.gone(ctx.node()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(node = ctx.node().0, holder = holder.0, error = %e, "dsm: could not take this node's word back from its replica holder; the request is answered `Retry` until the holder answers or the cluster gives up on it");
                    return false;
                }
                Err(e) => {
                    tracing::debug!(holder = holder.0, error = %e, "dsm: the replica holder did not take this node's word back; asking again");
                    tokio::time::sleep(ABANDON_PAUSE).await;
                }
            }
        }
        word.holder = None;
        tracing::debug!(
            node = ctx.node().0,
            holder = holder.0,
            ?key,
            "dsm: word taken back: a page may have no copy elsewhere"
        );
        true
    }
}
