//! What the adaptation layer needs from the network: one call to one node.
//!
//! The supervisor implements [`Link`] over its authenticated transport; tests implement it in
//! memory. Keeping it to one call keeps the layer free of sockets.

use crate::error::AdaptationError;
use async_trait::async_trait;
use bytes::Bytes;
use gobelins_locator::NodeId;
use std::time::Duration;
use tokio::time::Instant;

/// Carries a message of the layer to the layer on another node and brings its answer back.
#[async_trait]
pub trait Link: Send + Sync + 'static {
    /// The bytes the link needs behind every message it carries (the supervisor marks the
    /// lane a message is for); none by default. [`crate::codec::encode`] leaves room for one,
    /// so that sealing does not copy the message.
    fn trailer(&self) -> &[u8] {
        &[]
    }

    /// Makes an encoded message ready for [`Link::call`], once however many times it is sent
    /// (a retried migration batch is not copied again): the message, then [`Link::trailer`].
    fn seal(&self, mut message: Vec<u8>) -> Bytes {
        message.extend_from_slice(self.trailer());
        Bytes::from(message)
    }

    /// Ends the calls in flight to `to` at once, as failed: the cluster has given up on it
    /// (declared it failed, or it left). A node cut off may hold a request until its
    /// deadline, and the request's sender should ask the key's new manager instead. The host
    /// calls it once per departure; it costs the calls themselves nothing, where a call that
    /// watched for departures paid a registration each time. The default does nothing, and
    /// such calls end at their deadline.
    fn abandon(&self, _to: NodeId) {}

    /// Sends `message`, sealed, to `to`'s [`crate::Host::handle`] and returns what it answered
    /// (as `Bytes`: the transport's frame, not a copy of it).
    /// Fails with [`AdaptationError::Unreachable`] when `to` cannot be reached within
    /// `deadline`.
    async fn call(
        &self,
        to: NodeId,
        message: Bytes,
        deadline: Duration,
    ) -> Result<Bytes, AdaptationError>;

    /// [`Link::call`] for a caller that read the clock already: the call began at `started`,
    /// and `deadline` runs from then. The default reads the clock again.
    async fn call_at(
        &self,
        to: NodeId,
        message: Bytes,
        started: Instant,
        deadline: Duration,
    ) -> Result<Bytes, AdaptationError> {
        let _ = started;
        self.call(to, message, deadline).await
    }
}
