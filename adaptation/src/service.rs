//! The plug-in trait a service implements, and the type-erased form the registry holds.
//!
//! A service author writes one [`Service`] with its own request, response and entry types. The
//! layer keeps it as a [`Plugin`], which speaks bytes encoded by [`crate::codec`], so that one
//! registry holds any service and entries can cross the network.

use crate::codec;
use crate::error::AdaptationError;
use crate::host::Inner;
use crate::run::{Packed, Packer, Run};
use crate::wire::Message;
use async_trait::async_trait;
use gobelins_locator::{Change, Key, NodeId, ServiceId, ServiceSpec, SlotMove, Snapshot};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

/// Where a callback runs, and the way out of it: a service reaches other managers and other
/// nodes only through its context, never by naming addresses.
#[derive(Clone)]
pub struct Context {
    node: NodeId,
    epoch: u64,
    from: Option<NodeId>,
    snapshot: Option<Arc<Snapshot>>,
    /// The host it sends through. Held as itself, not as a trait object: a request's future
    /// is then part of its caller's. Through a trait it was boxed: 808 bytes allocated and
    /// freed for every request.
    peers: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.node)
            .field("epoch", &self.epoch)
            .field("from", &self.from)
            .finish()
    }
}

impl Context {
    pub(crate) fn new(
        node: NodeId,
        epoch: u64,
        from: Option<NodeId>,
        snapshot: Option<Arc<Snapshot>>,
        peers: Arc<Inner>,
    ) -> Self {
        Context { node, epoch, from, snapshot, peers: Some(peers) }
    }

    /// A context with no cluster behind it, for unit tests of a service: its requests fail
    /// with [`AdaptationError::Detached`].
    pub fn detached(node: NodeId, epoch: u64, snapshot: Option<Arc<Snapshot>>) -> Self {
        Context { node, epoch, from: None, snapshot, peers: None }
    }

    /// The same context as this node's local server sees a [`Context::tell`] from `from`: for
    /// unit tests of a service's local server, with [`Context::detached`].
    pub fn told_by(mut self, from: NodeId) -> Self {
        self.from = Some(from);
        self
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The epoch requests are routed by while the callback runs.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// For [`Service::handle`]: `None` when this node is called as the key's manager,
    /// `Some(sender)` when another node addressed this node's local server with
    /// [`Context::tell`].
    pub fn from(&self) -> Option<NodeId> {
        self.from
    }

    /// The locator's table at [`Context::epoch`]: who manages what, and the live nodes.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_deref()
    }

    /// [`Context::snapshot`], shared rather than borrowed: for a service that keeps the table
    /// past the callback (kvdir keeps the one a change began from).
    pub fn shared_snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Whether nothing sent to `node` will land any more: the cluster has given up on it (it
    /// failed or left), or `node` is this node and its host has stopped or been given up on.
    /// A callback that retries a peer until it answers stops on it. `false` when detached.
    pub fn gone(&self, node: NodeId) -> bool {
        self.peers.as_ref().is_some_and(|p| p.gone(node))
    }

    /// How many times this node has heard the cluster give up on `node` (it failed or left).
    /// Unlike [`Context::gone`], the count stays moved on once `node` is back as a new life:
    /// a callback that waits, then acts for a peer, compares it with the count when it began,
    /// and does nothing for a life that ended meanwhile. 0 when detached.
    pub fn departures(&self, node: NodeId) -> u64 {
        self.peers.as_ref().map_or(0, |p| p.departures(node))
    }

    /// Whether this node's lease holds now. While it does, the cluster counts this node a
    /// member and has not rebuilt what it holds elsewhere; a node cut off from the cluster's
    /// leader loses it within half a failure timeout, before the cluster may declare it
    /// failed. The layer serves a key's manager only under it; a service that answers from
    /// what it keeps locally otherwise (a cached copy, a reply from its local server) checks
    /// it, or a node cut off answers what the cluster has since replaced. `true` when
    /// detached, or when the node was never given a lease; `false` once this life has stopped
    /// (the cluster declared the node failed and its host started afresh, or it shut down).
    pub fn leased(&self) -> bool {
        self.peers.as_ref().is_none_or(|p| p.leased())
    }

    /// Returns once a configuration change has begun on this node (at once if one is
    /// beginning now). A change's first step waits for every [`Service::handle`] running on
    /// this node as a key's manager. A handler that parks on something else (the other
    /// arrivals at a barrier, a long poll) waits on this too, and answers at once when it
    /// returns, for its caller to ask again: the request is then held through the change
    /// instead of holding the change up.
    ///
    /// Never returns for a message told to the local server ([`Context::from`] is `Some`),
    /// which a change does not wait for: a handler that answered at once would be asked again
    /// at once, over and over until the change's first step ended. Nor on a detached context.
    pub async fn change_waits(&self) {
        match (&self.peers, self.from) {
            (Some(peers), None) => peers.gate.held().await,
            _ => std::future::pending().await,
        }
    }

    /// Sends `request` to the manager of `key` of `service`, wherever it is, and waits for its
    /// answer: held through a migration, retried after a failure, run once (except across its
    /// manager's failure: the answers it kept die with it; see docs/writing-a-service.md). `Q` is `'static`
    /// so that, when it is the service's own `Request` type, [`Service::repeatable`] is asked
    /// of it as it is rather than of a second decoding.
    ///
    /// From inside [`Service::handle`], prefer [`Context::tell`] to a node the handler knows
    /// (a replica's holder, a page's owner), as the example services do. A handler's own
    /// request to a manager may wait for a change: when one begins, this node waits for the
    /// handlers already running before it lets new requests in, so a handler whose request
    /// needs this node as a manager, or a key that moves, waits until that request's
    /// deadline, and the change and this node's other requests wait with it.
    pub async fn request<Q, R>(
        &self,
        service: ServiceId,
        key: Key,
        request: &Q,
    ) -> Result<R, AdaptationError>
    where
        Q: Serialize + Sync + 'static,
        R: DeserializeOwned,
    {
        let peers = self.peers.as_ref().ok_or(AdaptationError::Detached)?;
        // `Service::repeatable` asked of the request in hand, when it is the service's own
        // type: the host would otherwise decode the body again to ask.
        let answer = match peers.repeatable_of(service, request) {
            Some(true) => peers.request_repeatable(service, key, request).await?,
            judged => peers.request(service, key, codec::encode(request)?, None, judged).await?,
        };
        codec::decode(&answer)
    }

    /// Sends `request` to the local server of `service` on `node` (a replica holder, say):
    /// its [`Service::handle`] runs with [`Context::from`] set, whatever the key's manager.
    pub async fn tell<Q, R>(
        &self,
        node: NodeId,
        service: ServiceId,
        key: Key,
        request: &Q,
    ) -> Result<R, AdaptationError>
    where
        Q: Serialize + Sync,
        R: DeserializeOwned,
    {
        let peers = self.peers.as_ref().ok_or(AdaptationError::Detached)?;
        let message = Message::encode_local(service, key, request)?;
        codec::decode(&peers.tell(node, service, key, message).await?)
    }
}

/// The configuration change a migration belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeInfo {
    /// The epoch the change leads to.
    pub epoch: u64,
    /// The change itself.
    pub change: Change,
    /// Every node taking part.
    pub participants: BTreeSet<NodeId>,
    /// The participants whose part has arrived here in full (their ack came, after all they
    /// sent this node), as of the callback. In `after_migration` of a node that receives, every
    /// participant that did not die during the change: one missing from it may have held what
    /// nobody else did (a recovery's only other copy of an entry, say).
    pub acked: BTreeSet<NodeId>,
}

/// The slots of one service that leave this node in a change, and where each goes.
#[derive(Clone, Debug)]
pub struct Moving {
    spec: ServiceSpec,
    moves: Vec<SlotMove>,
}

impl Moving {
    /// The moves out of this node for the service `spec` describes. Their slot ranges must not
    /// overlap: each slot has one new manager.
    pub fn new(spec: ServiceSpec, mut moves: Vec<SlotMove>) -> Self {
        moves.sort_unstable_by_key(|m| m.slots.start);
        debug_assert!(
            moves.windows(2).all(|w| w[0].slots.end <= w[1].slots.start),
            "overlapping slot moves: {moves:?}"
        );
        Moving { spec, moves }
    }

    /// The new manager of `key` if it leaves this node, `None` if it stays.
    pub fn destination(&self, key: Key) -> Option<NodeId> {
        // Called for every entry a node holds: a change can move thousands of scattered slot
        // ranges, so a linear search would make `send_out` quadratic.
        let slot = self.spec.slot_of(key);
        let at = self.moves.partition_point(|m| m.slots.end <= slot);
        self.moves.get(at).filter(|m| m.slots.contains(&slot)).map(|m| m.to)
    }

    /// Every slot that leaves, in ascending order. A service that keeps its entries grouped
    /// by slot can take these out whole, without looking at the entries that stay.
    pub fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.moves.iter().flat_map(|m| m.slots.clone())
    }

    /// The moves themselves, in ascending order of slots: which slots go to which node.
    pub fn moves(&self) -> &[SlotMove] {
        &self.moves
    }

    /// The slots that go to `node`.
    pub fn slots_to(&self, node: NodeId) -> impl Iterator<Item = u32> + '_ {
        self.moves.iter().filter(move |m| m.to == node).flat_map(|m| m.slots.clone())
    }

    /// Whether nothing leaves.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// What a scan packed, kept to the keys that leave, each in a run for its new manager; and
    /// how many entries were left out. A scan returns copies of the failed node's keys only,
    /// but a plug-in may pack others (a replica it holds of a live node's key), or hand a run
    /// to the wrong node: shipped as they were, such copies would replace what the keys' live
    /// managers hold, perhaps with older values, as if rebuilt. Runs that need no change are
    /// kept as they are; the others are split per destination, none larger than it was.
    pub(crate) fn keep_leaving(&self, runs: Vec<(NodeId, Packed)>) -> (Vec<(NodeId, Packed)>, u64) {
        let mut kept = Vec::with_capacity(runs.len());
        let mut left_out = 0;
        for (to, run) in runs {
            if run.entries().all(|(key, _)| self.destination(key) == Some(to)) {
                kept.push((to, run));
                continue;
            }
            let mut split: BTreeMap<NodeId, Packed> = BTreeMap::new();
            for (key, entry) in run.entries() {
                let Some(dest) = self.destination(key) else {
                    left_out += 1;
                    continue;
                };
                let packed = split.entry(dest).or_insert_with(|| Packed::with_capacity(run.size()));
                // Taken from a run that held it already: neither too large nor cut short.
                let _ = packed.push(key, entry);
            }
            // Each was sized for the whole run, and waits for the sending phase.
            kept.extend(split.into_iter().map(|(to, mut run)| {
                run.shrink();
                (to, run)
            }));
        }
        (kept, left_out)
    }
}

/// A distributed service, as its author writes it. Every method runs on every node that takes
/// part; none may block the thread (await instead).
///
/// In one change the layer calls, on each participant: `scan` (after a failure only),
/// `before_migration`, `send_out`, `receive` for each batch that arrives, `after_migration`,
/// then, with the requests it held released, `after_release`; once the change is stable,
/// `stable`. A service that wraps another forwards each of them.
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
    /// are held until it has moved), and at most once per request id unless the request is
    /// [`Service::repeatable`] (then a retry may run it again). Or acts as this node's
    /// local server (`ctx.from()` is the sender) for a message sent with [`Context::tell`].
    /// A change begins by waiting for the managers' handlers running on this node: one that
    /// waits on something else also waits on [`Context::change_waits`], and answers when it
    /// returns.
    fn handle(
        &self,
        ctx: &Context,
        key: Key,
        request: Self::Request,
    ) -> impl Future<Output = Self::Response> + Send;

    /// Whether `response` says the request did not take effect and must be tried again: a
    /// write whose replica could not be stored, say, because the backup is dying or has
    /// already learned that this node was declared failed. The layer then neither remembers
    /// it as answered nor passes it on: the requester retries (with the same id, at whatever
    /// node manages the key by then) until its deadline. It applies to requests for a key's
    /// manager; a [`Context::tell`] that gets such an answer fails with
    /// [`AdaptationError::Retry`]'s message as `Refused`, for its caller to handle. The
    /// default: every answer counts.
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

    /// Prepares for a change. The locator still routes by the old epoch.
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
    /// they stay for as long as the node runs. Called on the nodes that took part in the
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
    /// counted twice (kvdir stages both copies; its merge keeps the newest version).
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

/// A service as the layer holds it: the same methods, in bytes.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// The service's declaration.
    fn spec(&self) -> ServiceSpec;
    /// [`Service::handle`], with the request and the response encoded.
    async fn handle(
        &self,
        ctx: &Context,
        key: Key,
        request: &[u8],
    ) -> Result<Answer, AdaptationError>;
    /// [`Service::repeatable`], with the request encoded; false for one that does not decode.
    /// Such a request takes the short path: neither its sender nor its manager keeps a record
    /// of it, since running it twice is harmless. The default: none is.
    fn repeatable(&self, request: &[u8]) -> bool {
        let _ = request;
        false
    }
    /// [`Service::repeatable`] of a request not yet encoded; `None` when `request` is not of
    /// the service's request type. The default: no judgement.
    fn repeatable_typed(&self, request: &dyn Any) -> Option<bool> {
        let _ = request;
        None
    }
    /// [`Service::before_migration`].
    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo);
    /// [`Service::send_out`], each entry encoded into `packer`'s run for its destination.
    async fn send_out(
        &self,
        ctx: &Context,
        moving: &Moving,
        packer: &mut Packer,
    ) -> Result<(), AdaptationError>;
    /// [`Service::receive`], entries encoded; a batch that does not decode is refused whole.
    async fn receive(
        &self,
        ctx: &Context,
        from: NodeId,
        entries: &Run,
    ) -> Result<(), AdaptationError>;
    /// [`Service::after_migration`].
    async fn after_migration(&self, ctx: &Context, change: &ChangeInfo);
    /// [`Service::after_release`]. The default does nothing.
    async fn after_release(&self, ctx: &Context, change: &ChangeInfo) {
        let _ = (ctx, change);
    }
    /// [`Service::stable`]. The default does nothing.
    async fn stable(&self, ctx: &Context, epoch: u64) {
        let _ = (ctx, epoch);
    }
    /// [`Service::scan`], each entry encoded into `packer`'s run for its destination. The
    /// layer then keeps only entries of keys `orphans` names, each for its new manager,
    /// whatever run it was packed in.
    async fn scan(
        &self,
        ctx: &Context,
        failed: NodeId,
        orphans: &Moving,
        packer: &mut Packer,
    ) -> Result<(), AdaptationError>;
    /// [`Service::reported_lost`]. The default: nothing.
    fn reported_lost(&self) -> u64 {
        0
    }
    /// [`Service::restarted_alone`]. The default does nothing.
    async fn restarted_alone(&self, ctx: &Context) {
        let _ = ctx;
    }
}

/// What [`Plugin::handle`] answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The encoded response.
    pub response: Vec<u8>,
    /// Remember it for retries of the request: false when the request is
    /// [`Service::repeatable`] or the answer [`Service::changed_nothing`].
    pub keep: bool,
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

/// Wraps a typed service as a [`Plugin`].
pub fn plugin<S: Service>(service: S) -> Box<dyn Plugin> {
    Box::new(Erased(service))
}

struct Erased<S>(S);

/// Encodes `entries` into `packer`, shipping each run as it fills; gives them back. Owned
/// rather than borrowed across the waits: an entry need not be `Sync`. An entry that does not
/// encode is left out, named in the log, and the others still go: stopping at it lost every
/// entry after it without a word. The first such error is returned.
async fn pack<E: Serialize>(
    entries: Vec<(Key, E)>,
    packer: &mut Packer,
) -> (Vec<(Key, E)>, Result<(), AdaptationError>) {
    let mut first = None;
    let mut failed = 0usize;
    // By index: an iterator would hold a borrow of `entries` across the waits, which needs
    // the entries to be `Sync`.
    #[allow(clippy::needless_range_loop)]
    for i in 0..entries.len() {
        let (key, entry) = &entries[i];
        if let Err(e) = packer.push(*key, entry) {
            tracing::error!(key = key.0, error = %e, "an entry that does not encode was left out of the migration: its new manager will not have it (fix the service's Entry type; the copy this node keeps, if any, is all that is left)");
            failed += 1;
            first.get_or_insert(e);
            continue;
        }
        packer.flush().await;
    }
    let packed = match first {
        None => Ok(()),
        Some(e) if failed == 1 => Err(e),
        Some(e) => {
            Err(AdaptationError::Codec(format!("{failed} entries did not encode; the first: {e}")))
        }
    };
    (entries, packed)
}

#[async_trait]
impl<S: Service> Plugin for Erased<S> {
    fn spec(&self) -> ServiceSpec {
        self.0.spec()
    }

    fn reported_lost(&self) -> u64 {
        self.0.reported_lost()
    }

    async fn handle(
        &self,
        ctx: &Context,
        key: Key,
        request: &[u8],
    ) -> Result<Answer, AdaptationError> {
        let request: S::Request = codec::decode(request)?;
        let keep = !S::repeatable(&request);
        let response = self.0.handle(ctx, key, request).await;
        if S::must_retry(&response) {
            return Err(AdaptationError::Retry { service: self.0.spec().id.0, key: key.0 });
        }
        let keep = keep && !S::changed_nothing(&response);
        Ok(Answer { response: codec::encode_leaving(&response, crate::wire::RESPONSE_ROOM)?, keep })
    }

    fn repeatable(&self, request: &[u8]) -> bool {
        codec::decode::<S::Request>(request).is_ok_and(|r| S::repeatable(&r))
    }

    fn repeatable_typed(&self, request: &dyn Any) -> Option<bool> {
        request.downcast_ref::<S::Request>().map(S::repeatable)
    }

    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.0.before_migration(ctx, change).await;
    }

    async fn send_out(
        &self,
        ctx: &Context,
        moving: &Moving,
        packer: &mut Packer,
    ) -> Result<(), AdaptationError> {
        let entries = self.0.send_out(ctx, moving).await;
        let (entries, packed) = pack(entries, packer).await;
        // On the wire before the service keeps its copies, which takes a while for many.
        packer.ship_open().await;
        // Given back even if one did not encode: the copy the service keeps is all that is left.
        self.0.sent(ctx, entries).await;
        packed
    }

    async fn receive(
        &self,
        ctx: &Context,
        from: NodeId,
        entries: &Run,
    ) -> Result<(), AdaptationError> {
        let decoded = entries.decode::<S::Entry>()?;
        self.0.receive(ctx, from, decoded).await;
        Ok(())
    }

    async fn after_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.0.after_migration(ctx, change).await;
    }

    async fn after_release(&self, ctx: &Context, change: &ChangeInfo) {
        self.0.after_release(ctx, change).await;
    }

    async fn stable(&self, ctx: &Context, epoch: u64) {
        self.0.stable(ctx, epoch).await;
    }

    async fn restarted_alone(&self, ctx: &Context) {
        self.0.restarted_alone(ctx).await;
    }

    async fn scan(
        &self,
        ctx: &Context,
        failed: NodeId,
        orphans: &Moving,
        packer: &mut Packer,
    ) -> Result<(), AdaptationError> {
        pack(self.0.scan(ctx, failed, orphans).await, packer).await.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
