//! The plug-in trait a service implements, and the type-erased form the registry holds.
//!
//! A service author writes one [`Service`] with its own request, response and entry types. The
//! layer keeps it as a [`Plugin`], which speaks bytes encoded by [`crate::codec`], so that one
//! registry holds any service and entries can cross the network.

use crate::codec;
use crate::error::AdaptationError;
use async_trait::async_trait;
use gobelins_locator::{Change, Key, NodeId, ServiceSpec, SlotMove};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;

/// Where the call happens: which node, in which epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    /// This node.
    pub node: NodeId,
    /// The epoch requests are routed by.
    pub epoch: u64,
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
}

/// The slots of one service that leave this node in a change, and where each goes.
#[derive(Clone, Debug)]
pub struct Moving {
    spec: ServiceSpec,
    moves: Vec<SlotMove>,
}

impl Moving {
    /// The moves out of this node for the service `spec` describes.
    pub fn new(spec: ServiceSpec, moves: Vec<SlotMove>) -> Self {
        Moving { spec, moves }
    }

    /// The new manager of `key` if it leaves this node, `None` if it stays.
    pub fn destination(&self, key: Key) -> Option<NodeId> {
        let slot = self.spec.slot_of(key);
        self.moves.iter().find(|m| m.slots.contains(&slot)).map(|m| m.to)
    }

    /// Whether nothing leaves.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }
}

/// A distributed service, as its author writes it. Every method runs on every node that takes
/// part; none may block the thread (await instead).
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// A request to the manager of a key.
    type Request: Serialize + DeserializeOwned + Send + 'static;
    /// The manager's answer.
    type Response: Serialize + DeserializeOwned + Send + 'static;
    /// One directory entry, as it travels from its old manager to its new one.
    type Entry: Serialize + DeserializeOwned + Send + 'static;

    /// The service's declaration: id, name, slots, placement, size. Fixed for its lifetime.
    fn spec(&self) -> ServiceSpec;

    /// Acts as the manager of `key`. Called only on the node the locator names for the key in
    /// `ctx.epoch`, never for a key that is moving (such requests are held until it has moved).
    async fn handle(&self, ctx: &Context, key: Key, request: Self::Request) -> Self::Response;

    /// Prepares for a change. The locator still routes by the old epoch.
    async fn before_migration(&self, change: &ChangeInfo);

    /// Exports the entries this node manages whose key `moving` sends elsewhere. The service
    /// must keep them until [`Service::after_migration`] of a later, stable epoch allows it to
    /// forget them: the layer may ask again if the change rolls forward after a failure.
    async fn send_out(&self, moving: &Moving) -> Vec<(Key, Self::Entry)>;

    /// Stages entries received from `from`. They must not be visible to `handle` until
    /// [`Service::after_migration`] merges them.
    async fn receive(&self, from: NodeId, entries: Vec<(Key, Self::Entry)>);

    /// Merges what was staged; the node returns to its stable state.
    async fn after_migration(&self, change: &ChangeInfo);

    /// After `failed` died, rebuilds from what this node holds locally (a replica, a page copy)
    /// the entries that `failed` managed. Entries it cannot rebuild are simply not returned:
    /// the layer reports them lost, never invents them.
    async fn scan(&self, failed: NodeId) -> Vec<(Key, Self::Entry)>;
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
    ) -> Result<Vec<u8>, AdaptationError>;
    /// [`Service::before_migration`].
    async fn before_migration(&self, change: &ChangeInfo);
    /// [`Service::send_out`], entries encoded.
    async fn send_out(&self, moving: &Moving) -> Result<Vec<(Key, Vec<u8>)>, AdaptationError>;
    /// [`Service::receive`], entries encoded; a batch that does not decode is refused whole.
    async fn receive(
        &self,
        from: NodeId,
        entries: Vec<(Key, Vec<u8>)>,
    ) -> Result<(), AdaptationError>;
    /// [`Service::after_migration`].
    async fn after_migration(&self, change: &ChangeInfo);
    /// [`Service::scan`], entries encoded.
    async fn scan(&self, failed: NodeId) -> Result<Vec<(Key, Vec<u8>)>, AdaptationError>;
}

/// Wraps a typed service as a [`Plugin`].
pub fn plugin<S: Service>(service: S) -> Box<dyn Plugin> {
    Box::new(Erased(service))
}

struct Erased<S>(S);

fn encode_entries<E: Serialize>(
    entries: Vec<(Key, E)>,
) -> Result<Vec<(Key, Vec<u8>)>, AdaptationError> {
    entries.into_iter().map(|(key, entry)| Ok((key, codec::encode(&entry)?))).collect()
}

#[async_trait]
impl<S: Service> Plugin for Erased<S> {
    fn spec(&self) -> ServiceSpec {
        self.0.spec()
    }

    async fn handle(
        &self,
        ctx: &Context,
        key: Key,
        request: &[u8],
    ) -> Result<Vec<u8>, AdaptationError> {
        let request: S::Request = codec::decode(request)?;
        codec::encode(&self.0.handle(ctx, key, request).await)
    }

    async fn before_migration(&self, change: &ChangeInfo) {
        self.0.before_migration(change).await;
    }

    async fn send_out(&self, moving: &Moving) -> Result<Vec<(Key, Vec<u8>)>, AdaptationError> {
        encode_entries(self.0.send_out(moving).await)
    }

    async fn receive(
        &self,
        from: NodeId,
        entries: Vec<(Key, Vec<u8>)>,
    ) -> Result<(), AdaptationError> {
        // Decode the whole batch first: half a batch staged would be half an entry set.
        let decoded = entries
            .into_iter()
            .map(|(key, bytes)| Ok((key, codec::decode::<S::Entry>(&bytes)?)))
            .collect::<Result<Vec<_>, AdaptationError>>()?;
        self.0.receive(from, decoded).await;
        Ok(())
    }

    async fn after_migration(&self, change: &ChangeInfo) {
        self.0.after_migration(change).await;
    }

    async fn scan(&self, failed: NodeId) -> Result<Vec<(Key, Vec<u8>)>, AdaptationError> {
        encode_entries(self.0.scan(failed).await)
    }
}
