//! How supervisors talk: request/response calls between nodes, whatever carries them.
//!
//! The transport moves opaque bytes; the layers above (raft, the failure detector, the control
//! forwarding) encode their own messages with [`crate::codec`]. Two implementations: [`crate::tcp`]
//! for the product and the seeded simulation, [`crate::mem`] with fault injection for tests.

use crate::error::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Sends requests to other nodes.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to `to` and waits for its response until `deadline` has passed. Fails
    /// with `Unreachable` if the node cannot be reached, `Timeout` if it does not answer in time.
    async fn call(&self, to: u64, request: Bytes, deadline: Duration) -> Result<Bytes>;

    /// [`Transport::call`] for a caller that read the clock already: the call began at
    /// `started`, and ends at `started + deadline`. The adaptation layer reads the clock when a
    /// request starts, and a second read cost each request about 24 ns here, a tenth of what
    /// the layer adds to it. The default reads the clock again.
    async fn call_at(
        &self,
        to: u64,
        request: Bytes,
        started: Instant,
        deadline: Duration,
    ) -> Result<Bytes> {
        let _ = started;
        self.call(to, request, deadline).await
    }

    /// Like [`Transport::call`], to an address whose node is not known yet (a seed to join
    /// through). Returns the responder's node id with the response. A peer that holds another
    /// secret is [`crate::SupervisorError::SecretDiffers`], not `Handshake`.
    async fn call_addr(
        &self,
        addr: &str,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)>;

    /// Like [`Transport::call_addr`], to an address this node holds for `node`: the handshake
    /// names it, so that another node reached there (its address moved, or a relay in
    /// between) refuses before either side proves anything. A transport without handshakes
    /// calls the address.
    async fn call_addr_as(
        &self,
        node: u64,
        addr: &str,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)> {
        let _ = node;
        self.call_addr(addr, request, deadline).await
    }

    /// Records where `node` listens, so that calls to it can dial.
    fn set_peer(&self, node: u64, addr: String);

    /// Forgets `node` and closes any connection to it.
    fn forget(&self, node: u64);

    /// Whether the last dial to `node` found it holding another secret than this node's
    /// (until a dial succeeds). The default: never.
    fn secret_differs(&self, node: u64) -> bool {
        let _ = node;
        false
    }

    /// Why `node` refused the last dial's handshake, if it did (until a dial succeeds). The
    /// default: never refused.
    fn refusal(&self, node: u64) -> Option<String> {
        let _ = node;
        None
    }
}

/// Answers requests that arrive from peers. Runs concurrently for many requests; must not block.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from node `from`. Takes the handler by `Arc`, so that the answer's
    /// future owns what it needs and can outlive the reader that started it: borrowed, it had
    /// to be boxed a second time to be spawned.
    async fn handle(self: Arc<Self>, from: u64, request: Bytes) -> Bytes;
}

/// Decides whether a peer that passed the handshake may talk to this node.
pub trait Admission: Send + Sync + 'static {
    /// `Err(reason)` refuses the peer that says it is `node`, in `incarnation`, at `addr`.
    fn admit(&self, node: u64, incarnation: u64, addr: &str) -> std::result::Result<(), String>;
}

/// Admits every peer that holds the secret.
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _node: u64, _incarnation: u64, _addr: &str) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Admits peers according to the replicated cluster state: a process that claims the id of a
/// live member from another address, or an older life of it, is refused. Otherwise a second
/// process with a reused `--node-id` would take over the member's connections, and raft would
/// hear two different logs from one node.
pub struct StateAdmission {
    state: tokio::sync::watch::Receiver<std::sync::Arc<crate::state::ClusterState>>,
}

impl StateAdmission {
    /// Admission following `state`.
    pub fn new(
        state: tokio::sync::watch::Receiver<std::sync::Arc<crate::state::ClusterState>>,
    ) -> Self {
        StateAdmission { state }
    }
}

impl Admission for StateAdmission {
    fn admit(&self, node: u64, incarnation: u64, addr: &str) -> std::result::Result<(), String> {
        use crate::state::NodeStatus;
        let state = self.state.borrow();
        let Some(record) = state.nodes.get(&node) else { return Ok(()) };
        let live =
            matches!(record.status, NodeStatus::Joining | NodeStatus::Active | NodeStatus::Leaving);
        if live && record.addr != addr {
            return Err(format!(
                "node id {node} is in use by the member at {}; give this node another \
                 --node-id. If that member is this node, restarted on another address, wait \
                 until the cluster declares its last life failed (`gobelins status` on a \
                 member), then start it again",
                record.addr
            ));
        }
        if live && incarnation < record.incarnation {
            return Err(format!(
                "node {node} is a member in its life (incarnation) {}, and this agent starts \
                 life {incarnation}: its data directory is not that node's last (wiped, or \
                 restored from an old copy). If that node is dead, wait until the cluster \
                 declares it failed (`gobelins status` on a member), or `gobelins evict \
                 {node}` there, then start this agent again; if it runs, give this agent \
                 another --node-id",
                record.incarnation
            ));
        }
        Ok(())
    }
}
