//! What this node sees of the cluster's health: holds, silent members, a lost quorum, no leader.

use super::Supervisor;
use crate::rpc::{Request, Response, View};
use openraft::ServerState;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl Supervisor {
    /// While this node leads: the members its detector has not heard from for half the
    /// failure timeout or more, in milliseconds, and whether each is suspected. Between a
    /// node's death and its failure's commit the cluster still shows it active: this says so.
    pub fn silent_members(&self) -> BTreeMap<u64, (u64, bool)> {
        let live = self.state().live();
        let detector = self.detector.lock().unwrap_or_else(|p| p.into_inner());
        let Some(detector) = detector.as_ref() else { return BTreeMap::new() };
        // The detector forgets a node gone from the members only at its next tick.
        detector
            .silent(Instant::now(), self.config.failure_timeout / 2)
            .into_iter()
            .filter(|(n, _)| live.contains(n))
            .map(|(n, (age, suspected))| (n, (age.as_millis() as u64, suspected)))
            .collect()
    }

    /// While this node leads and has heard from no majority of the voters for longer than the
    /// failure timeout: for how long, as far as raft's metrics tell.
    pub fn quorum_lost(&self) -> Option<Duration> {
        let (leads, acked) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let alone = metrics.membership_config.membership().voter_ids().eq([self.me.id]);
            (metrics.state == ServerState::Leader && !alone, metrics.millis_since_quorum_ack)
        };
        let mut unacked = self.unacked_since.lock().unwrap_or_else(|p| p.into_inner());
        if !leads {
            *unacked = None;
            return None;
        }
        let age = match acked {
            Some(ms) => {
                *unacked = None;
                Duration::from_millis(ms)
            }
            // None on record yet: counted from when this node first saw none.
            None => unacked.get_or_insert_with(Instant::now).elapsed(),
        };
        (age >= self.config.failure_timeout).then_some(age)
    }

    /// Says that this leader hears from no majority of the voters, and which voters did not
    /// answer a ping just now.
    pub(super) async fn say_quorum_lost(self: Arc<Self>, lost: Duration) {
        let (voters, silent) = self.silent_voters().await;
        if silent.is_empty() {
            // Every voter answers its ping, and none acknowledges raft in time: the slowness is
            // in storing raft's entries (theirs, or this leader's), not in the network.
            tracing::warn!(
                node = self.me.id,
                lost_for_ms = lost.as_millis() as u64,
                ?voters,
                said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
                "this leader hears from no majority of the voters, though every voter answers its pings: they do not acknowledge raft's entries in time. A disk slow to store them (fsync), here or on the voters, or a node starved of CPU, does this; check their disks and load. Nothing commits meanwhile"
            );
            return;
        }
        tracing::warn!(
            node = self.me.id,
            lost_for_ms = lost.as_millis() as u64,
            ?silent,
            ?voters,
            said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
            "this leader hears from no majority of the voters, so it can commit nothing (no join, leave or eviction, no failure recovered). If the silent voters are down, nothing commits until enough of them are back: restart them with their data directories. If they are up but cut off from this node, and reach each other, they have elected another leader and go on without this node, which they will declare failed: mend the network"
        );
    }

    /// The other voters, and those of them that did not answer a ping just now.
    async fn silent_voters(&self) -> (Vec<u64>, Vec<u64>) {
        let voters: Vec<u64> = self.voters().into_iter().filter(|&v| v != self.me.id).collect();
        let deadline = self.config.ping_interval * 2;
        let pings = voters.iter().map(|&v| async move { (v, self.ping(v, deadline).await) });
        let silent = futures::future::join_all(pings)
            .await
            .into_iter()
            .filter_map(|(v, answered)| (!answered).then_some(v))
            .collect();
        (voters, silent)
    }

    /// Whether this node is a voter that knows no leader (it is not one itself).
    fn leaderless_voter(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader.is_none()
            && metrics.state != ServerState::Leader
            && metrics.membership_config.membership().voter_ids().any(|v| v == self.me.id)
    }

    /// While this node is a voter that knows no leader, for how long it has known none.
    pub fn leaderless_for(&self, now: Instant) -> Option<Duration> {
        // Held out, it was taken out of the voters by a leader it no longer hears from: its
        // own raft still lists it, and nothing is cut off.
        let leaderless = self.leaderless_voter() && self.held_back().is_none();
        self.leaderless.lock().unwrap_or_else(|p| p.into_inner()).observe(leaderless, now)
    }

    /// Says that this voter has known no leader for `lost`, and which voters did not answer a
    /// ping just now.
    pub(super) async fn say_leaderless(self: Arc<Self>, lost: Duration) {
        let (voters, silent) = self.silent_voters().await;
        // Refused by every member, it hears from no leader because they will not talk to it:
        // the network is not at fault (an older copy on another address, say).
        if let Some(reason) = self.refused_by_members() {
            tracing::warn!(
                node = self.me.id,
                leaderless_for_ms = lost.as_millis() as u64,
                said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
                "this voter has heard from no leader: the cluster's members refuse its \
                 connections, saying: {reason}"
            );
            return;
        }
        tracing::warn!(
            node = self.me.id,
            leaderless_for_ms = lost.as_millis() as u64,
            ?silent,
            ?voters,
            said_again_after_s = crate::quorum::SAY_EVERY.as_secs(),
            "this voter has heard from no leader, and its calls for votes win no majority: nothing it asks commits (no join, leave or eviction), and its `gobelins status` shows its own view. If the silent voters are down, restart them with their data directories. If they are up and reach each other, they go on without this node and will declare it failed: mend the network between them and this node"
        );
    }

    /// The freshest view available: the leader's if it answers, else our own.
    pub async fn cluster_view(&self) -> View {
        if let Some(leader) = self.leader().filter(|&l| l != self.me.id) {
            if let Ok(Response::View(view)) =
                self.call(leader, &Request::State, self.config.rpc_timeout).await
            {
                return *view;
            }
        }
        self.view()
    }
}
