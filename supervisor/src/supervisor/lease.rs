//! The lease under which a member serves as a manager, granted by a leader that hears from a
//! quorum.

use super::Supervisor;
use crate::rpc::{Request, Response};
use openraft::ServerState;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl Supervisor {
    /// [`SupervisorConfig::lease_span`](super::SupervisorConfig::lease_span).
    pub(super) fn lease_span(&self) -> Duration {
        self.config.lease_span()
    }

    /// Whether the leader loop has ticked on time lately. Just back from a pause it has not,
    /// whatever ran first when this process resumed, and what was measured across the pause
    /// (raft's metrics, probes that ran out) says nothing of the others.
    pub(super) fn running_on_time(&self) -> bool {
        let within = self.config.ping_interval + self.lease_span();
        self.pauses.ticked_on_time(within, Instant::now())
    }

    /// Whether this node, as a leader a quorum acknowledged within half a lease, counts
    /// `node` (at `incarnation`) as a member that may serve.
    pub(super) fn grants_lease(&self, node: u64, incarnation: u64) -> bool {
        // Just back from a pause, raft's metrics may predate it: no grant until a tick on time.
        self.running_on_time()
            && self.leader_ack_age().is_some()
            && self
                .state()
                .nodes
                .get(&node)
                .is_some_and(|r| r.incarnation == incarnation && r.status.is_live())
    }

    /// As a leader a quorum acknowledged within half a lease, how long ago it did (zero for the
    /// only voter); `None` otherwise.
    pub(super) fn leader_ack_age(&self) -> Option<Duration> {
        // Asked by every member each ping interval: read the metrics in place, not cloned.
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != ServerState::Leader {
            return None;
        }
        let acked = metrics.millis_since_quorum_ack.map(Duration::from_millis);
        let alone = metrics.membership_config.membership().voter_ids().eq([self.me.id]);
        acked.filter(|&age| age < self.lease_span()).or(alone.then_some(Duration::ZERO))
    }

    /// A follower's lease: renewed each ping interval by asking the leader, and running from
    /// the moment it asked. A node cut off, or frozen, stops serving half a failure timeout
    /// after its last granted ask at the latest, before any leader can declare it failed.
    pub(super) async fn lease_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.ping_interval);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(leader) = self.leader().filter(|&l| l != self.me.id) else { continue };
            let asked = Instant::now();
            let request = Request::Lease { incarnation: self.incarnation() };
            if let Ok(Response::Leased(true)) =
                self.call(leader, &request, self.config.ping_interval * 2).await
            {
                self.host.lease(asked + self.lease_span());
            }
        }
    }
}
