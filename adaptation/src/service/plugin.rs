//! The type-erased form of a service that the registry holds, speaking encoded bytes.

use super::{ChangeInfo, Context, Moving, Service};
use crate::codec;
use crate::error::AdaptationError;
use crate::run::{Packer, Run};
use async_trait::async_trait;
use gobelins_locator::{Key, NodeId, ServiceSpec};
use serde::Serialize;
use std::any::Any;

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

/// Wraps a typed service as a [`Plugin`].
pub fn plugin<S: Service>(service: S) -> Box<dyn Plugin> {
    Box::new(Erased(service))
}

struct Erased<S>(S);

/// Encodes `entries` into `packer`, shipping each run as it fills; gives them back. Owned
/// rather than borrowed across the waits: an entry need not be `Sync`. An entry that does not
/// encode is left out, named in the log, and the others still go: stopping at it lost every
/// entry after it without a word. The first such error is returned.
pub(super) async fn pack<E: Serialize>(
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
