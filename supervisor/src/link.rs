//! The adaptation layer's [`Link`] over the supervisor's authenticated transport: its messages
//! travel as [`Request::Adapt`], on the same connections as raft and the failure detector.

use crate::rpc::{Request, Response};
use crate::transport::Transport;
use async_trait::async_trait;
use bytes::Bytes;
use gobelins_adaptation::{codec, AdaptationError, Link};
use gobelins_locator::NodeId;
use std::sync::Arc;
use std::time::Duration;

/// Carries adaptation messages between agents.
pub struct TransportLink {
    transport: Arc<dyn Transport>,
}

impl TransportLink {
    /// A link over `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        TransportLink { transport }
    }
}

#[async_trait]
impl Link for TransportLink {
    async fn call(
        &self,
        to: NodeId,
        message: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, AdaptationError> {
        let unreachable = |reason: String| AdaptationError::Unreachable { node: to.0, reason };
        let request = Bytes::from(codec::encode(&Request::Adapt(message))?);
        let answer = self
            .transport
            .call(to.0, request, deadline)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        match codec::decode::<Response>(&answer)? {
            Response::Adapt(bytes) => Ok(bytes),
            Response::Malformed(why) => Err(unreachable(format!("peer refused: {why}"))),
            _ => Err(unreachable("peer answered something else".into())),
        }
    }
}
