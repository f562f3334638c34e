//! How supervisors talk: request/response calls between nodes, whatever carries them.
//!
//! The transport moves opaque bytes; the layers above (raft, the failure detector, the control
//! forwarding) encode their own messages with [`crate::codec`]. Two implementations: [`crate::tcp`]
//! for the product and the seeded simulation, [`crate::mem`] with fault injection for tests.

use crate::error::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::time::Duration;

/// Sends requests to other nodes.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to `to` and waits for its response until `deadline` has passed. Fails
    /// with `Unreachable` if the node cannot be reached, `Timeout` if it does not answer in time.
    async fn call(&self, to: u64, request: Bytes, deadline: Duration) -> Result<Bytes>;

    /// Like [`Transport::call`], to an address whose node is not known yet (a seed to join
    /// through). Returns the responder's node id with the response.
    async fn call_addr(
        &self,
        addr: &str,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)>;

    /// Records where `node` listens, so that calls to it can dial.
    fn set_peer(&self, node: u64, addr: String);

    /// Forgets `node` and closes any connection to it.
    fn forget(&self, node: u64);
}

/// Answers requests that arrive from peers. Runs concurrently for many requests; must not block.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from node `from`.
    async fn handle(&self, from: u64, request: Bytes) -> Bytes;
}

/// Decides whether a peer that passed the handshake may talk to this node: the cluster refuses a
/// fenced node's old incarnation here.
pub trait Admission: Send + Sync + 'static {
    /// `Err(reason)` refuses the peer.
    fn admit(&self, node: u64, incarnation: u64) -> std::result::Result<(), String>;
}

/// Admits every peer that holds the secret.
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _node: u64, _incarnation: u64) -> std::result::Result<(), String> {
        Ok(())
    }
}
