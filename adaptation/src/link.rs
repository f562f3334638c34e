//! What the adaptation layer needs from the network: one call to one node.
//!
//! The supervisor implements [`Link`] over its authenticated transport; tests implement it in
//! memory. Keeping it to one method keeps the layer free of sockets.

use crate::error::AdaptationError;
use async_trait::async_trait;
use gobelins_locator::NodeId;
use std::time::Duration;

/// Carries a message of the layer to the layer on another node and brings its answer back.
#[async_trait]
pub trait Link: Send + Sync + 'static {
    /// Sends `message` to `to`'s [`crate::Host::handle`] and returns what it answered. Fails
    /// with [`AdaptationError::Unreachable`] when `to` cannot be reached within `deadline`.
    async fn call(
        &self,
        to: NodeId,
        message: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, AdaptationError>;
}
