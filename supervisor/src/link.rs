//! The adaptation layer's [`Link`] over the supervisor's authenticated transport: its messages
//! travel in their own [`Lane`], on the same connections as raft and the failure detector.

use crate::error::SupervisorError;
use crate::lane::Lane;
use crate::rpc::Response;
use crate::transport::Transport;
use async_trait::async_trait;
use bytes::Bytes;
use gobelins_adaptation::{codec, AdaptationError, Link};
use gobelins_locator::NodeId;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

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
    fn trailer(&self) -> &[u8] {
        Lane::Adaptation.trailer()
    }

    /// Closes the connections to `to`, failing the calls on them. The supervisor forgets a
    /// departed node in the same pass as it tells the host; this keeps the link's promise
    /// whoever drives the host.
    fn abandon(&self, to: NodeId) {
        self.transport.forget(to.0);
    }

    async fn call(
        &self,
        to: NodeId,
        message: Bytes,
        deadline: Duration,
    ) -> Result<Bytes, AdaptationError> {
        let answer =
            self.transport.call(to.0, message, deadline).await.map_err(|e| not_sent(to, e))?;
        opened(to, answer)
    }

    async fn call_at(
        &self,
        to: NodeId,
        message: Bytes,
        started: Instant,
        deadline: Duration,
    ) -> Result<Bytes, AdaptationError> {
        let called = self.transport.call_at(to.0, message, started, deadline);
        opened(to, called.await.map_err(|e| not_sent(to, e))?)
    }
}

/// The layer's answer in what `to` sent back, or why there is none: the peer's supervisor
/// answered instead (it refused the message, or its node stopped).
fn opened(to: NodeId, answer: Bytes) -> Result<Bytes, AdaptationError> {
    let unreachable = |reason: String| AdaptationError::Unreachable { node: to.0, reason };
    let codec_error = |e: SupervisorError| AdaptationError::Codec(e.to_string());
    match Lane::open(answer).map_err(codec_error)? {
        (Lane::Adaptation, reply) => Ok(reply),
        (Lane::Supervisor, body) => match codec::decode::<Response>(&body)? {
            Response::Malformed(why) => Err(unreachable(format!("peer refused: {why}"))),
            Response::Stopped(why) => Err(unreachable(format!("peer stopped: {why}"))),
            _ => Err(unreachable("peer answered something else".into())),
        },
    }
}

/// What the layer makes of a message the transport could not carry to `to`: a message larger
/// than a frame will never go (sending it again cannot help); anything else is `to` out of
/// reach for now.
fn not_sent(to: NodeId, error: SupervisorError) -> AdaptationError {
    match error {
        SupervisorError::FrameTooLarge { len, max } => {
            AdaptationError::TooLarge { bytes: len as u64, max: max as u64 }
        }
        e => AdaptationError::Unreachable { node: to.0, reason: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_too_large_for_a_frame_is_not_taken_for_a_peer_out_of_reach() {
        let too_large = SupervisorError::FrameTooLarge { len: 20 << 20, max: 16 << 20 };
        assert!(matches!(
            not_sent(NodeId(3), too_large),
            AdaptationError::TooLarge { bytes, max } if bytes == 20 << 20 && max == 16 << 20
        ));
        assert!(matches!(
            not_sent(NodeId(3), SupervisorError::Closed),
            AdaptationError::Unreachable { node: 3, .. }
        ));
    }
}
