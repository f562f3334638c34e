//! The plug-in trait a service implements, and the type-erased form the registry holds.
//!
//! A service author writes one [`Service`] with its own request, response and entry types. The
//! layer keeps it as a [`Plugin`], which speaks bytes encoded by [`crate::codec`], so that one
//! registry holds any service and entries can cross the network.
//!
//! Its parts: `context` (a callback's [`Context`]), `change` ([`ChangeInfo`] and [`Moving`]),
//! `plugin` (the type-erased [`Plugin`]).

mod change;
mod context;
mod plugin;

pub use change::{ChangeInfo, Moving};
pub use context::Context;
pub use plugin::{plugin, Answer, Plugin};

use gobelins_locator::{Key, NodeId, ServiceSpec};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;

/// A distributed service, as its author writes it. Every method runs on every node that takes
/// part; none may block the thread (await instead).
///
/// In one change the layer calls, on each participant: `scan` (after a failure only),
/// `before_migration`, `send_out`, `receive` for each batch that arrives, `after_migration`,
/// then, with the requests it held released, `after_release`; once the change is stable,
/// `stable`. `receive` is the exception to that order: batches are taken as soon as the change
/// has begun on this node, so a faster sender's may arrive before, or while, this node's own
/// `scan`, `before_migration` and `send_out` run (a `before_migration` that clears a staging
/// area loses them). A service that wraps another forwards each of them.
///
/// Write the methods as `async fn`, with no attribute on the `impl`: each future must be
/// `Send`, so hold no `std` lock guard across an `.await`. The layer stores them inside its own
/// boxes, so a request costs no allocation of the service's own for its `handle`.
pub trait Service: Send + Sync + 'static {
    /// A request to the manager of a key.
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The manager's answer.
    type Response: Serialize + DeserializeOwned + Send + 'static;
    /// One directory entry, as it travels from its old manager to its new one.
    type Entry: Serialize + DeserializeOwned + Send + 'static;

    /// The service's declaration: id, name, slots, placement, size. Fixed for its lifetime.
    fn spec(&self) -> ServiceSpec;

    /// Acts as the manager of `key` (`ctx.from()` is `None`): called only on the node the
    /// locator names for the key in `ctx.epoch()`, never while the key is moving (such requests
    /// are held until it has moved), and at most once per request id, except: a
    /// [`Service::repeatable`] request, or one whose answer was
    /// [`Service::changed_nothing`], may run again on a retry; and across its manager's
    /// failure every request may, since the answers kept die with the manager; so may one
    /// whose answer its key pushed out of those it keeps (past 16 times
    /// `HostConfig::answers_per_key` unsettled, 64 by default), and one sent between nodes
    /// whose `HostConfig::request_deadline` differ. The layer hands the service no request id:
    /// a service whose requests add to an entry (a counter, an append) carries an id of its
    /// own in each request, chosen by its client and sent again with a retry after a
    /// `Deadline`, and the ids it applied in the entry (see docs/writing-a-service.md). A
    /// request this node manages runs in its caller's task, and a caller that stops waiting (a
    /// timeout around [`Context::request`]) drops it at an `.await`: leave the entry whole at
    /// each one.
    ///
    /// Or acts as this node's local server (`ctx.from()` is the sender) for a message sent
    /// with [`Context::tell`]: such messages are never held, deduplicated or retried, and come
    /// during a migration too, so a handler checks `ctx.from()` before it touches an entry as
    /// its manager would.
    /// A change begins by waiting for the managers' handlers running on this node: one that
    /// waits on something else also waits on [`Context::change_waits`], and answers when it
    /// returns.
    fn handle(
        &self,
        ctx: &Context,
        key: Key,
        request: Self::Request,
    ) -> impl Future<Output = Self::Response> + Send;

    /// Whether `response` says the request must be tried again: a write whose replica could not
    /// be stored, say, because the backup is dying or has already learned that this node was
    /// declared failed. The layer then neither remembers it as answered nor passes it on: the
    /// requester retries (with the same id, at whatever node manages the key by then) until its
    /// deadline, and each retry runs `handle` again. So what the first run did must make the
    /// second harmless: kvdir's unreplicated write stays written, and its retry writes the same
    /// value again; a counter would count twice. Should the retries run out, the requester gets
    /// an error although the first run's effect may be visible. It applies to requests for a key's manager; a [`Context::tell`]
    /// that gets such an answer fails with
    /// [`AdaptationError::Retry`](crate::AdaptationError::Retry)'s message as `Refused`, for its
    /// caller to handle. The default: every answer counts.
    fn must_retry(_response: &Self::Response) -> bool {
        false
    }

    /// Whether running `request` twice is harmless: a read, say, whose second run answers what
    /// is current by then. Its answer is then not remembered for a retry, which saves the
    /// manager a copy of every such answer (a DSM read fault's is a whole page) and lets a
    /// retry see the latest state rather than an answer that may have gone stale. Such a request
    /// also takes a shorter path: its sender does not count it in flight, and its manager lets
    /// two copies of it run side by side and never refuses a late one. Both ask this of their
    /// own registration, so it must depend on the request alone. The default: no request is,
    /// and every answer is remembered so that a retry runs nothing twice.
    fn repeatable(_request: &Self::Request) -> bool {
        false
    }

    /// Whether `response` says the request changed nothing (the resource is busy, ask again
    /// later): such an answer is given but not kept, since a retry may as well run again, and
    /// keeping it would push out of the few answers kept per key one that a retry needs. The
    /// default: every answer may have changed something.
    fn changed_nothing(_response: &Self::Response) -> bool {
        false
    }

    /// Prepares for a change. The locator still routes by the old epoch, except on a node that
    /// joins: it had no table, and has the new one already.
    fn before_migration(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
    ) -> impl Future<Output = ()> + Send;

    /// Exports the entries this node manages whose key `moving` sends elsewhere; from now on
    /// they are not this node's to serve. A service that keeps a copy (as a replica) lets a
    /// failure of the receiver roll forward: its `scan` can return it. It can take that copy in
    /// [`Service::sent`] rather than clone it here.
    fn send_out(
        &self,
        ctx: &Context,
        moving: &Moving,
    ) -> impl Future<Output = Vec<(Key, Self::Entry)>> + Send;

    /// Gives back what [`Service::send_out`] exported, once it is encoded for the wire (some
    /// of it may be on its way already; the change completes only after this returns and every
    /// batch is acknowledged): a service that keeps a copy of what leaves moves it in here, for
    /// nothing, instead of cloning every entry in `send_out` (cloning each of 16,700 1 KiB
    /// values was about 15% of kvdir's export). The default drops them.
    fn sent(
        &self,
        ctx: &Context,
        entries: Vec<(Key, Self::Entry)>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ctx, entries);
        std::future::ready(())
    }

    /// The change to `epoch` is stable: every participant finished it, and the cluster moved
    /// on. What this node kept of the entries it sent in that change (see
    /// [`Service::sent`]) is no longer needed should their receiver fail: their new managers
    /// have them, and have copied them on as the service does. Drop those copies here, or
    /// they stay for as long as the node runs; but not the copies whose new manager
    /// [`Context::gone`] says is gone: a receiver that died during the change was given up on,
    /// the change ended without it, and its recovery, still to come, rebuilds what it
    /// received from them (this node's `scan`). Keep those until a later `stable` finds their
    /// manager live (kvdir does). Called on the nodes that took part in the
    /// change, this one included when the cluster finished the change without it (it was
    /// presumed dead, or cut off): then its [`Service::after_migration`] or
    /// [`Service::after_release`] may not have run, or may still be running, and what they
    /// would have done must not be assumed done. Called too on a node that saw the change in
    /// progress without taking part in it (another cell's), and that the cluster counts as
    /// live: nothing of its own moved, and none of its other callbacks ran for that epoch. Not
    /// for a change it heard of only once it was over. The default does nothing.
    fn stable(&self, ctx: &Context, epoch: u64) -> impl Future<Output = ()> + Send {
        let _ = (ctx, epoch);
        std::future::ready(())
    }

    /// Stages entries received from `from`. They must not be visible to `handle` until
    /// [`Service::after_migration`] merges them (the layer holds their requests meanwhile).
    /// The same entries can come twice (a sender whose call timed out as its batch was staged
    /// sends it again): a key must end with one entry after the merge, and nothing may be
    /// counted twice (kvdir stages both copies; its merge keeps the newest version). It may run
    /// before this node's own `before_migration` and `scan` (see [`Service`]). It cannot
    /// refuse: the batch is acknowledged once it returns, and its senders drop their copies
    /// once the change is stable, so it stores all it is given.
    fn receive(
        &self,
        ctx: &Context,
        from: NodeId,
        entries: Vec<(Key, Self::Entry)>,
    ) -> impl Future<Output = ()> + Send;

    /// Merges what was staged; the node returns to its stable state. `ctx` routes by the new
    /// epoch. Entries rebuilt by several survivors after a failure may arrive more than once:
    /// the service keeps the newest.
    fn after_migration(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
    ) -> impl Future<Output = ()> + Send;

    /// Finishes the change once its held requests are released: work that must end before
    /// this node reports the change done, but that requests need not wait for, such as
    /// copying what was received to a backup. Until the report, the senders keep their copies
    /// of what they sent, so a failure meanwhile loses nothing; requests for the moved keys
    /// are served while it runs, by the merged entries (writes they make must reach a backup
    /// on their own, as at any time). Runs after every service's `after_migration`. The
    /// default does nothing.
    fn after_release(&self, ctx: &Context, change: &ChangeInfo) -> impl Future<Output = ()> + Send {
        let _ = (ctx, change);
        std::future::ready(())
    }

    /// After `failed` died, rebuilds from what this node holds locally (a replica, a page copy)
    /// the entries of the keys in `orphans`: those `failed` managed or had not yet handed over
    /// (`orphans.destination(key)` is `Some` for them, naming the new manager). Entries it
    /// cannot rebuild are simply not returned: they are lost, never invented. An entry of any
    /// other key is left out, with a warning: its manager lives, and a copy from here would
    /// reach it as if rebuilt, perhaps older than what it holds.
    fn scan(
        &self,
        ctx: &Context,
        failed: NodeId,
        orphans: &Moving,
    ) -> impl Future<Output = Vec<(Key, Self::Entry)>> + Send;

    /// How much this node has reported lost so far, in the service's own unit (kvdir counts
    /// slots whose entries may be lost, the DSM pages): what it rebuilt after failures that no
    /// survivor could vouch was whole. `gobelins stats` shows it per service, for an operator
    /// to act on. The default: nothing.
    fn reported_lost(&self) -> u64 {
        0
    }

    /// This node came back, its memory gone with its last life, as the only node of its
    /// cluster: no survivor rebuilt what that life managed, and this node manages every slot
    /// again. Called once, before it serves a request, for the service to report those entries
    /// lost rather than answer for them as never written (kvdir marks every slot as having
    /// lost entries, the DSM taints them). The context has no table and no epoch yet (0): the
    /// node is not fed the cluster's state before this returns. The default does nothing.
    fn restarted_alone(&self, ctx: &Context) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        std::future::ready(())
    }
}

/// A service registered as `plugin(Arc::clone(&service))` stays at hand to its author: to
/// read its counters, or, in a test, what each node holds.
impl<S: Service> Service for Arc<S> {
    type Request = S::Request;
    type Response = S::Response;
    type Entry = S::Entry;

    fn spec(&self) -> ServiceSpec {
        (**self).spec()
    }

    fn must_retry(response: &Self::Response) -> bool {
        S::must_retry(response)
    }

    fn repeatable(request: &Self::Request) -> bool {
        S::repeatable(request)
    }

    fn changed_nothing(response: &Self::Response) -> bool {
        S::changed_nothing(response)
    }

    fn handle(
        &self,
        ctx: &Context,
        key: Key,
        request: Self::Request,
    ) -> impl Future<Output = Self::Response> + Send {
        (**self).handle(ctx, key, request)
    }

    fn before_migration(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
    ) -> impl Future<Output = ()> + Send {
        (**self).before_migration(ctx, change)
    }

    fn send_out(
        &self,
        ctx: &Context,
        moving: &Moving,
    ) -> impl Future<Output = Vec<(Key, Self::Entry)>> + Send {
        (**self).send_out(ctx, moving)
    }

    fn sent(
        &self,
        ctx: &Context,
        entries: Vec<(Key, Self::Entry)>,
    ) -> impl Future<Output = ()> + Send {
        (**self).sent(ctx, entries)
    }

    fn stable(&self, ctx: &Context, epoch: u64) -> impl Future<Output = ()> + Send {
        (**self).stable(ctx, epoch)
    }

    fn receive(
        &self,
        ctx: &Context,
        from: NodeId,
        entries: Vec<(Key, Self::Entry)>,
    ) -> impl Future<Output = ()> + Send {
        (**self).receive(ctx, from, entries)
    }

    fn after_migration(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
    ) -> impl Future<Output = ()> + Send {
        (**self).after_migration(ctx, change)
    }

    fn after_release(&self, ctx: &Context, change: &ChangeInfo) -> impl Future<Output = ()> + Send {
        (**self).after_release(ctx, change)
    }

    fn scan(
        &self,
        ctx: &Context,
        failed: NodeId,
        orphans: &Moving,
    ) -> impl Future<Output = Vec<(Key, Self::Entry)>> + Send {
        (**self).scan(ctx, failed, orphans)
    }

    fn reported_lost(&self) -> u64 {
        (**self).reported_lost()
    }

    fn restarted_alone(&self, ctx: &Context) -> impl Future<Output = ()> + Send {
        (**self).restarted_alone(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::plugin::pack;
    use super::*;
    use crate::run::{Packed, Packer};
    use gobelins_locator::{ServiceId, SlotMove};

    /// An entry whose value refuses to encode.
    struct Refuses(bool);

    impl Serialize for Refuses {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.0 {
                return Err(serde::ser::Error::custom("this entry does not encode"));
            }
            s.serialize_u8(1)
        }
    }

    #[tokio::test]
    async fn an_entry_that_does_not_encode_is_left_out_and_the_others_still_go() {
        let entries: Vec<(Key, Refuses)> = (0..10).map(|k| (Key(k), Refuses(k == 3))).collect();
        let mut packer = Packer::new(|_| NodeId(2), 1 << 20);
        let (back, packed) = pack(entries, &mut packer).await;
        assert!(packed.is_err(), "the failure is reported");
        assert_eq!(back.len(), 10, "every entry comes back to the service");
        let shipped: Vec<u64> = packer
            .finish()
            .into_iter()
            .flat_map(|(_, run)| run.into_run().entries().map(|(k, _)| k.0).collect::<Vec<_>>())
            .collect();
        assert_eq!(shipped, vec![0, 1, 2, 4, 5, 6, 7, 8, 9], "all but the one that failed");
    }

    #[test]
    fn a_scan_s_entries_are_kept_to_the_failed_node_s_keys_each_for_its_new_manager() {
        let spec = ServiceSpec::new(ServiceId(3), "s").with_slots(64);
        let moves = vec![
            SlotMove { slots: 0..16, from: NodeId(1), to: NodeId(2) },
            SlotMove { slots: 16..32, from: NodeId(1), to: NodeId(3) },
        ];
        let orphans = Moving::new(spec.clone(), moves);
        // As a hand-written plug-in might pack them: every key, all for node 2.
        let mut all = Packed::with_capacity(1 << 16);
        for k in 0..200u64 {
            all.push(Key(k), &k.to_le_bytes()).expect("packed");
        }
        // And one run packed right, kept as it is.
        let mut right = Packed::with_capacity(1 << 10);
        let to_3 = (0..200).map(Key).find(|&k| (16..32).contains(&spec.slot_of(k))).unwrap();
        right.push(to_3, b"x").expect("packed");
        let (kept, left_out) = orphans.keep_leaving(vec![(NodeId(2), all), (NodeId(3), right)]);
        let orphaned = (0..200).filter(|&k| spec.slot_of(Key(k)) < 32).count() as u64;
        assert!(orphaned > 0 && orphaned < 200, "both kinds among 200 keys");
        assert_eq!(left_out, 200 - orphaned, "the live nodes' keys are left out");
        let mut seen = Vec::new();
        for (to, packed) in kept {
            for (key, _) in packed.into_run().entries() {
                assert_eq!(orphans.destination(key), Some(to), "key {key:?} for its new manager");
                seen.push(key.0);
            }
        }
        seen.sort_unstable();
        let mut expected: Vec<u64> = (0..200).filter(|&k| spec.slot_of(Key(k)) < 32).collect();
        expected.push(to_3.0);
        expected.sort_unstable();
        assert_eq!(seen, expected, "every orphan's entry kept, once per run that held it");
    }

    #[test]
    fn a_key_s_destination_is_found_among_scattered_moves_in_any_order() {
        let spec = ServiceSpec::new(ServiceId(3), "s").with_slots(64);
        // Every third slot moves, to one of two nodes, listed out of order.
        let mut moves: Vec<SlotMove> = (0..64)
            .step_by(3)
            .map(|s| SlotMove {
                slots: s..s + 1,
                from: NodeId(1),
                to: NodeId(2 + u64::from(s % 2)),
            })
            .collect();
        moves.reverse();
        let moving = Moving::new(spec.clone(), moves);
        for k in 0..1000u64 {
            let slot = spec.slot_of(Key(k));
            let expected = slot.is_multiple_of(3).then(|| NodeId(2 + u64::from(slot % 2)));
            assert_eq!(moving.destination(Key(k)), expected, "key {k}, slot {slot}");
        }
        let every_third: Vec<u32> = (0..64).step_by(3).collect();
        assert_eq!(moving.slots().collect::<Vec<_>>(), every_third, "every slot that leaves");
    }
}
