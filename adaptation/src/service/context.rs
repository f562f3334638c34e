//! A callback's context: where it runs, and its only way to other managers and nodes.

use crate::codec;
use crate::error::AdaptationError;
use crate::host::Inner;
use crate::wire::Message;
use gobelins_locator::{Key, NodeId, ServiceId, Snapshot};
use serde::de::DeserializeOwned;
use serde::Serialize;
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

    /// For [`Service::handle`](super::Service::handle): `None` when this node is called as the
    /// key's manager, `Some(sender)` when another node addressed this node's local server with
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

    /// Returns once the cluster has given up on `node` (at once if it has), or this node's host
    /// is dropped; never on a detached context. A callback waiting on a peer that may have
    /// died races its wait with this: the cluster may declare the peer failed in well under
    /// the wait (half a second on loopback timers).
    pub async fn until_gone(&self, node: NodeId) {
        match &self.peers {
            Some(peers) => {
                let mut departed = peers.departed.subscribe();
                let _ = departed.wait_for(|d| d.contains(&node)).await;
            }
            None => std::future::pending().await,
        }
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

    /// Returns once a configuration change has begun on this node (at once if one is beginning
    /// now). A change's first step waits for every [`Service::handle`](super::Service::handle)
    /// running on this node as a key's manager. A handler that parks on something else (the other
    /// arrivals at a barrier, a long poll) waits on this too, and answers at once when it returns,
    /// for its caller to ask again: the request is then held through the change instead of holding
    /// the change up.
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
    /// manager's failure: the answers it kept die with it; see docs/writing-a-service.md). `Q` is
    /// `'static` so that, when it is the service's own `Request` type,
    /// [`Service::repeatable`](super::Service::repeatable) is asked of it as it is rather than of a
    /// second decoding.
    ///
    /// From inside [`Service::handle`](super::Service::handle), prefer [`Context::tell`] to a node
    /// the handler knows (a replica's holder, a page's owner), as the example services do. A
    /// handler's own request to a manager may wait for a change: when one begins, this node waits
    /// for the handlers already running before it lets new requests in, so a handler whose request
    /// needs this node as a manager, or a key that moves, waits until that request's deadline, and
    /// the change and this node's other requests wait with it.
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

    /// Sends `request` to the local server of `service` on `node` (a replica holder, say): its
    /// [`Service::handle`](super::Service::handle) runs with [`Context::from`] set, whatever the
    /// key's manager.
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
