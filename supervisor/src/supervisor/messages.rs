//! Proposals to the replicated state, and what this node answers its peers.

use super::holds::holds_out;
use super::{encode_response, Supervisor, MALFORMED};
use crate::error::{Result, SupervisorError};
use crate::lane::{self, Lane};
use crate::rpc::{JoinRequest, ProposeError, Request, Response};
use crate::state::{Applied, ClusterState, Command, Outcome};
use bytes::Bytes;
use gobelins_adaptation::codec;
use gobelins_adaptation::log_budget::budgeted;
use gobelins_locator::NodeId;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::raft::VoteResponse;
use openraft::{BasicNode, ServerState};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Failure timeouts a proposal waits to commit on this node as leader: well past a healthy
/// commit (milliseconds) or a leader change (which answers at once), well short of an operator
/// waiting on a silent command.
const COMMIT_WAIT_TIMEOUTS: u32 = 5;

impl Supervisor {
    /// Proposes a command, through the leader, retrying while no leader is known.
    pub async fn propose_until(&self, command: Command, deadline: Duration) -> Result<Outcome> {
        let until = Instant::now() + deadline;
        loop {
            match self.propose(command.clone()).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if Instant::now() >= until => {
                    return Err(SupervisorError::Raft(e.to_string()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Proposes a command once: locally if leader, else forwarded to the leader.
    pub async fn propose(&self, command: Command) -> std::result::Result<Outcome, ProposeError> {
        // A follower that knows the leader asks it at once. Its own raft would say it is no
        // leader only once it is free: storing entries on a slow disk (seconds a write), it
        // never said so within the wait, and a participant's report of its part in a change
        // never reached the leader, which held the change up for as long as the disk was slow.
        if let Some(leader) = self.leader().filter(|&l| l != self.me.id) {
            return self.forward(leader, command).await;
        }
        match self.propose_here(command.clone()).await {
            Err(ProposeError::NoLeader) => {}
            other => return other,
        }
        let Some(leader) = self.leader().filter(|&l| l != self.me.id) else {
            return Err(ProposeError::NoLeader);
        };
        self.forward(leader, command).await
    }

    /// Has `leader` propose `command`.
    async fn forward(
        &self,
        leader: u64,
        command: Command,
    ) -> std::result::Result<Outcome, ProposeError> {
        match self.call(leader, &Request::Propose(command), self.config.rpc_timeout).await {
            Ok(Response::Proposed(result)) => result,
            Ok(_) => Err(ProposeError::Unreachable("wrong answer".into())),
            Err(e) => Err(ProposeError::Unreachable(e.to_string())),
        }
    }

    /// Proposes through this node's raft; `NoLeader` if this node is not the leader. A leader
    /// cut off from the majority keeps believing it leads, and its proposals wait for a quorum
    /// that does not come: they are given up after a while, with what to check.
    pub(super) async fn propose_here(
        &self,
        command: Command,
    ) -> std::result::Result<Outcome, ProposeError> {
        let wait = self.config.failure_timeout * COMMIT_WAIT_TIMEOUTS;
        let Ok(written) = tokio::time::timeout(wait, self.raft.client_write(command)).await else {
            return Err(ProposeError::Raft(format!(
                "not committed within {} ms: a majority of the voters must be up, reachable \
                 from this leader, and quick enough to store its entries (a slow disk is not); \
                 `gobelins status` lists them. It may still commit once they are",
                wait.as_millis()
            )));
        };
        match written {
            Ok(response) => {
                response.data.0.ok_or_else(|| ProposeError::Raft("entry had no outcome".into()))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(ProposeError::NoLeader)
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    pub(super) fn join_request(&self) -> JoinRequest {
        JoinRequest {
            node: self.me.id,
            addr: self.me.addr.clone(),
            labels: self.me.labels.clone(),
            incarnation: self.incarnation(),
        }
    }

    pub(super) fn join_command(&self) -> Command {
        let j = self.join_request();
        Command::Join { node: j.node, addr: j.addr, labels: j.labels, incarnation: j.incarnation }
    }

    pub(super) async fn call(
        &self,
        to: u64,
        request: &Request,
        deadline: Duration,
    ) -> Result<Response> {
        lane::decode_response(self.transport.call(to, lane::request(request)?, deadline).await?)
    }

    /// What a node stopped on a fatal error answers to everything, so that the cluster
    /// declares it failed.
    pub(super) fn stopped(&self) -> Option<Bytes> {
        let why = self.fatal()?;
        let message = format!("node {} stopped on a fatal error: {why}", self.me.id);
        Some(encode_response(&Response::Stopped(message)))
    }

    async fn adapt(&self, from: u64, message: Bytes) -> Bytes {
        if let Some(stopped) = self.stopped() {
            return stopped;
        }
        Lane::Adaptation.seal(self.host.handle(NodeId(from), message).await)
    }

    pub(super) async fn handle(&self, from: u64, message: Bytes) -> Bytes {
        match Lane::open(message) {
            Ok((Lane::Adaptation, bytes)) => self.adapt(from, bytes).await,
            // Boxed: the supervisor's own messages are the rarer ones, and their future would
            // make every message's future (allocated once per message) larger.
            Ok((Lane::Supervisor, bytes)) => Box::pin(self.supervise(from, bytes)).await,
            Err(e) => {
                budgeted(&self.malformed, MALFORMED, || {
                    tracing::warn!(node = from, error = %e, "a message from this node could not be decoded, and was answered Malformed: is it running another gobelins build? (`gobelins --version` on both; a cluster's nodes must run builds of one protocol version)");
                });
                encode_response(&Response::Malformed(e.to_string()))
            }
        }
    }

    /// Answers a message of the supervisor's own lane.
    async fn supervise(&self, from: u64, bytes: Bytes) -> Bytes {
        let request = match codec::decode::<Request>(&bytes) {
            Ok(request) => request,
            Err(e) => {
                budgeted(&self.malformed, MALFORMED, || {
                    tracing::warn!(node = from, error = %e, "a request from this node could not be decoded, and was answered Malformed: is it running another gobelins build? (`gobelins --version` on both; a cluster's nodes must run builds of one protocol version)");
                });
                return encode_response(&Response::Malformed(e.to_string()));
            }
        };
        if let Some(stopped) = self.stopped() {
            return stopped;
        }
        // The raft calls, proposals, joins and probes are boxed: their futures run to
        // kilobytes, and inline they would make the future of every message of this lane
        // (pings and leases included, allocated one per message) that large, past the
        // allocator's per-thread cache.
        let response = match request {
            Request::AppendEntries(r) => {
                Response::AppendEntries(Box::pin(self.raft.append_entries(r)).await)
            }
            Request::Vote(r) if !self.grants_votes() => {
                let candidate = r.vote.leader_id().voted_for();
                if self.older_copy.load(Ordering::SeqCst) {
                    budgeted(&self.refused_votes, "votes refused", || {
                        tracing::warn!(
                        node = self.me.id,
                        candidate,
                        "vote refused: this node's data directory was found to be an older copy of its node's (it holds the file older-copy), and the cluster has not admitted it since: its log and vote are behind what the node voted in a later life. The other voters elect a leader without it. If too few of them are up for that, and the rest are lost for good, delete older-copy in its data directory and start this agent again: it votes then, at the cost of entries only its later life held"
                    )
                    });
                } else if self.fresh.load(Ordering::SeqCst) {
                    budgeted(&self.refused_votes, "votes refused", || {
                        tracing::warn!(
                        node = self.me.id,
                        candidate,
                        "vote refused: this node's data directory is new and the cluster has not admitted it; if it was a voter's, wiped, its log no longer holds what it voted on"
                    )
                    });
                } else {
                    tracing::debug!(node = self.me.id, ?candidate, "vote refused: no peer has yet said what the cluster holds of this node (its data directory could be an older copy)");
                }
                Response::Vote(Ok(VoteResponse {
                    vote: r.vote,
                    vote_granted: false,
                    last_log_id: None,
                }))
            }
            Request::Vote(r) => Response::Vote(Box::pin(self.raft.vote(r)).await),
            Request::InstallSnapshot(r) => {
                Response::InstallSnapshot(Box::pin(self.raft.install_snapshot(r)).await)
            }
            // A peer reports only its own part of a change.
            Request::Propose(Command::MigrationDone { node, .. }) if node != from => {
                Response::Proposed(Err(ProposeError::Raft(format!(
                    "node {from} may not report for node {node}"
                ))))
            }
            Request::Propose(command) => {
                Response::Proposed(Box::pin(self.propose_here(command)).await)
            }
            Request::Join(join) => {
                let (outcome, state) = Box::pin(self.admit(join)).await;
                Response::Admitted { outcome, state }
            }
            Request::Ping => Response::Pong,
            Request::Life => {
                Response::Life { incarnation: self.incarnation(), admitted: self.life_admitted() }
            }
            Request::Lease { incarnation } => {
                let granted = self.grants_lease(from, incarnation);
                // A node that renews its lease is heard, whatever became of the leader's
                // pings to it (queued behind other calls on the same connection, say): it is
                // in touch, and must not be declared cut off.
                if granted {
                    if let Some(d) =
                        self.detector.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    {
                        d.handle_pong(from, Instant::now());
                    }
                }
                Response::Leased(granted)
            }
            Request::Probe { target } => {
                Response::Probed(Box::pin(self.ping(target, self.config.probe_timeout)).await)
            }
            Request::State => Response::View(Box::new(self.view())),
            Request::Begun(state) => Response::Heard(self.hear_begun(from, *state)),
            Request::Unhold(node) => {
                let (held, counted) = self.unhold_here(node, from);
                Response::Unheld { held, counted }
            }
            Request::Stopping(life) => {
                // Only the life the cluster has live for the sender: a restarted process that
                // has not rejoined yet must not excuse the life that crashed.
                let live = self
                    .state()
                    .nodes
                    .get(&from)
                    .is_some_and(|r| r.incarnation == life && r.status.is_live());
                if live {
                    tracing::info!(node = from, life, "node {from} is stopping on purpose: its failure will not count as a short life (the first {} such in {} min)", crate::flaps::STOPS_FORGIVEN, crate::flaps::FLAP_MEMORY.as_secs() / 60);
                    self.flaps.lock().expect("flaps").stopping(from, life);
                }
                Response::Heard(live)
            }
        };
        encode_response(&response)
    }

    /// Admits a joining node: as leader, makes it a raft learner (so it receives the entry that
    /// adds it) and proposes its `Join`; otherwise hands the request to the leader. A join that
    /// began a change comes back with the state it began, which the joiner begins from.
    pub(super) async fn admit(
        &self,
        join: JoinRequest,
    ) -> (std::result::Result<Outcome, ProposeError>, Option<Box<ClusterState>>) {
        let is_leader = self.raft.metrics().borrow().state == ServerState::Leader;
        if !is_leader {
            let Some(leader) = self.leader().filter(|&l| l != self.me.id) else {
                return (Err(ProposeError::NoLeader), None);
            };
            return match self.call(leader, &Request::Join(join), self.config.rpc_timeout * 2).await
            {
                Ok(Response::Admitted { outcome, state }) => (outcome, state),
                Ok(_) => (Err(ProposeError::Unreachable("wrong answer".into())), None),
                Err(e) => (Err(ProposeError::Unreachable(e.to_string())), None),
            };
        }
        let node = join.node;
        let outcome = self.admit_here(join).await;
        // Applied here before the proposal returned, so this state has the change begun (or
        // a later one, which the joiner's part would still be in: it cannot end without it).
        let state = match &outcome {
            Ok(Ok(Applied::Began { .. })) => Some(Box::new((*self.state()).clone()))
                .filter(|s| s.in_progress.as_ref().is_some_and(|p| p.participants.contains(&node))),
            _ => None,
        };
        (outcome, state)
    }

    /// [`Supervisor::admit`] on the leader.
    async fn admit_here(&self, join: JoinRequest) -> std::result::Result<Outcome, ProposeError> {
        // Counted first: the duties loop, which counts failures as the state changes, may not
        // have seen this one yet, and a join let in unheld would record the new life over it.
        let state = self.state();
        // Here, before it is proposed, not as it is applied: see `check_label_texts`.
        if let Err(e) = state.tree.config().check_label_texts(&join.labels) {
            return Ok(Err(crate::state::Refusal::Labels(e.to_string())));
        }
        self.count_failures(&state);
        if holds_out(&state, join.node) {
            if let Some(hold) = self.flaps.lock().expect("flaps").hold(join.node, Instant::now()) {
                return Ok(Err(hold.refusal(join.node)));
            }
        }
        self.transport.set_peer(join.node, join.addr.clone());
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&join.node)
            .is_some();
        self.joining.lock().expect("joining").insert(join.node, Instant::now());
        if !known {
            self.raft.add_learner(join.node, BasicNode::new(&join.addr), false).await.map_err(
                |e| match e {
                    // Passing (a change of voters under way); the joiner asks again, and its
                    // operator needs no raft log id.
                    RaftError::APIError(ClientWriteError::ChangeMembershipError(
                        ChangeMembershipError::InProgress(_),
                    )) => ProposeError::Raft(
                        "the cluster is changing its raft voters; ask again shortly".into(),
                    ),
                    e => ProposeError::Raft(e.to_string()),
                },
            )?;
        }
        let JoinRequest { node, addr, labels, incarnation } = join;
        self.propose_here(Command::Join { node, addr, labels, incarnation }).await
    }

    /// The live members, but `except`, whose life the cluster counts live and that does not
    /// answer now: a node killed a moment ago, which the leader has not declared failed yet, or
    /// restarted since (the new process answers, as a life not admitted). This node too, when
    /// it is such a restarted process.
    pub(crate) async fn unanswering(&self, except: u64) -> BTreeSet<u64> {
        let state = self.state();
        let mut asked = state.live();
        asked.retain(|&n| n != except);
        let me = self.me.id;
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let asks = asked.iter().map(|&id| {
            let (state, membership) = (&state, &membership);
            async move {
                let life = state.nodes.get(&id).map(|r| r.incarnation);
                if id == me {
                    return self.life_admitted() && life == Some(self.incarnation());
                }
                self.know_address(id, membership, state);
                let deadline = self.config.ping_interval * 2;
                match self.call(id, &Request::Life, deadline).await {
                    Ok(Response::Life { incarnation, admitted }) => {
                        admitted && life == Some(incarnation)
                    }
                    // A build before `Life`, or a process whose supervisor is not up yet (a
                    // restart: "node is starting"), which answers a ping alike. A ping's `Pong`
                    // tells the first, which is up; taken as up, the second let a removal go
                    // ahead of the recovery of the life that died (a helper's black-box run).
                    Ok(Response::Malformed(_)) => self.ping(id, deadline).await,
                    _ => false,
                }
            }
        });
        let answers = futures::future::join_all(asks).await;
        asked.into_iter().zip(answers).filter(|&(_, answered)| !answered).map(|(n, _)| n).collect()
    }

    pub(super) async fn ping(&self, node: u64, deadline: Duration) -> bool {
        matches!(self.call(node, &Request::Ping, deadline).await, Ok(Response::Pong))
    }
}
