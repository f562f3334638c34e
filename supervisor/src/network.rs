//! openraft's network, carried by a [`Transport`].

use crate::error::SupervisorError;
use crate::lane;
use crate::rpc::{Request, Response};
use crate::transport::Transport;
use crate::types::TypeConfig;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use std::sync::Arc;
use std::time::Duration;

/// The first pause of raft's replication to a peer that did not take its messages.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Makes raft clients that talk through the transport.
#[derive(Clone)]
pub struct Network {
    transport: Arc<dyn Transport>,
}

impl Network {
    /// Raft over `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Network { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Client;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Client {
        self.transport.set_peer(target, node.addr.clone());
        Client { target, transport: Arc::clone(&self.transport), refusals: Default::default() }
    }
}

/// Raft's link to one peer.
pub struct Client {
    target: u64,
    transport: Arc<dyn Transport>,
    /// Since when the peer has refused raft's messages, and when that was last said
    /// (`Client::say_refused`).
    refusals: std::sync::Mutex<Refusals>,
}

/// A peer's refusals of raft's messages.
#[derive(Default)]
struct Refusals {
    since: Option<std::time::Instant>,
    said_at: Option<std::time::Instant>,
}

/// How long a peer refuses raft's messages before it is said: a node refuses them for a moment
/// as it starts.
const REFUSED_PATIENCE: Duration = Duration::from_secs(5);
/// Said again at most this often while it lasts.
const REFUSED_SAY_EVERY: Duration = Duration::from_secs(30);

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl Client {
    async fn send<E: std::error::Error>(
        &self,
        request: Request,
        option: &RPCOption,
    ) -> RpcResult<Response, E> {
        let bytes =
            lane::request(&request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self.transport.call(self.target, bytes, option.hard_ttl()).await;
        let reply = reply.map_err(|e| match e {
            // Dial failures make raft back off; a dropped or slow call is retried at once.
            SupervisorError::Unreachable(_) | SupervisorError::Handshake { .. } => {
                RPCError::Unreachable(Unreachable::new(&e))
            }
            other => RPCError::Network(NetworkError::new(&other)),
        })?;
        // An answer that does not decode, or says the peer stopped, will be the same the next
        // time: raft backs off, as from a node it cannot dial.
        let answer = lane::decode_response(reply).map_err(|e| {
            if !matches!(e, SupervisorError::PeerStopped(_)) {
                self.say_refused(&e);
            }
            RPCError::Unreachable(Unreachable::new(&e))
        })?;
        if !matches!(answer, Response::Malformed(_)) {
            self.refusals.lock().unwrap_or_else(|p| p.into_inner()).since = None;
        }
        Ok(answer)
    }

    /// Says that the peer has answered raft's messages with something other than their
    /// answers for [`REFUSED_PATIENCE`], then at most every [`REFUSED_SAY_EVERY`]. The default
    /// log leaves out raft's replication errors, one per failed message, which for an
    /// unreachable peer would only repeat what the failure detector says; this is the case the
    /// detector cannot see, since such a peer answers its pings.
    fn say_refused(&self, error: &SupervisorError) {
        let now = std::time::Instant::now();
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let since = *refusals.since.get_or_insert(now);
        if now < since + REFUSED_PATIENCE
            || refusals.said_at.is_some_and(|at| now < at + REFUSED_SAY_EVERY)
        {
            return;
        }
        refusals.said_at = Some(now);
        let for_s = (now - since).as_secs();
        let said_again_after_s = REFUSED_SAY_EVERY.as_secs();
        tracing::warn!(node = self.target, %error, for_s, said_again_after_s, "a peer has answered raft's messages with something else for a while (a node of another build, or one that cannot read them); raft keeps asking it");
    }

    /// A peer that refused the message (it is starting, or cannot read it) or answered
    /// something else. Unreachable, not a network error: raft sends again at once after a
    /// network error, and a peer that cannot read the message refuses it as fast as it comes.
    fn unexpected<E: std::error::Error>(
        &self,
        answer: &Response,
    ) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        let error = match answer {
            Response::Malformed(why) => {
                SupervisorError::Codec(format!("node {} refused the message: {why}", self.target))
            }
            _ => SupervisorError::Codec(format!(
                "node {} answered with the wrong message",
                self.target
            )),
        };
        self.say_refused(&error);
        RPCError::Unreachable(Unreachable::new(&error))
    }
}

impl RaftNetwork<TypeConfig> for Client {
    /// After a peer was unreachable or refused: 50 ms, doubling up to 500 ms (openraft's own
    /// is 500 ms from the first). Replication, heartbeats included, waits it out, and a node
    /// that refused only while it was starting is taken up again soon, before it times out
    /// its leader.
    fn backoff(&self) -> openraft::network::Backoff {
        let pauses =
            (0..).map(|n: u32| (BACKOFF_FIRST * 2u32.saturating_pow(n.min(8))).min(BACKOFF_MAX));
        openraft::network::Backoff::new(pauses)
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        match self.send(Request::AppendEntries(rpc), &option).await? {
            Response::AppendEntries(Ok(r)) => Ok(r),
            Response::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        match self.send(Request::InstallSnapshot(rpc), &option).await? {
            Response::InstallSnapshot(Ok(r)) => Ok(r),
            Response::InstallSnapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        match self.send(Request::Vote(rpc), &option).await? {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(&other)),
        }
    }
}
