//! How a supervisor stops: asked to, on a fatal error of raft or its storage, or refused by the
//! cluster (out of its voters, or a member of another secret).

use super::{Lifecycle, Supervisor};
use std::sync::Arc;

impl Supervisor {
    /// Stops the duties and raft.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.host.shutdown();
        // Raft may already be down after a fatal error; there is nothing more to do then.
        let _ = self.raft.shutdown().await;
    }

    /// Waits for raft to stop on its own (a storage error, typically a full disk), and then
    /// takes the node out of service: a node whose raft is gone can neither learn nor commit
    /// configurations, yet would go on answering pings, and the cluster would never replace it.
    pub(super) async fn watch_raft(self: Arc<Self>) {
        let mut metrics = self.raft.metrics();
        let fatal = loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                break fatal.to_string();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = metrics.changed() => if changed.is_err() {
                    // The raft core is gone without saying why (it panicked, say).
                    break "raft stopped without a reason".to_string();
                },
            }
        };
        if self.shutdown.is_cancelled() {
            return; // our own shutdown stopped raft
        }
        self.stop_on_storage(format!("raft stopped: {fatal}"));
    }

    /// Stops this node for good because its data directory cannot be written: it stops serving
    /// and answering its peers, so that the cluster declares it failed and rebuilds its entries
    /// elsewhere, and the agent exits saying so.
    pub(super) fn stop_on_storage(&self, why: String) {
        tracing::error!(
            node = self.me.id,
            error = %why,
            "this node's data directory cannot be written or read (is its disk full or \
             failing?). The node stops serving and answering its peers, so that the cluster \
             declares it failed and rebuilds its entries elsewhere. Mend the disk, then restart \
             the agent: it rejoins as a new life (should the restart say its raft store is \
             damaged, do as it says)"
        );
        self.shutdown.cancel();
        self.host.shutdown();
        self.lifecycle.send_replace(Lifecycle::Fatal(why));
    }

    /// Whether raft has committed a membership in which this node does not vote, as far as
    /// this node knows. Applied, not only written: a leader that leaves appends the last
    /// membership, without itself, before the others have it.
    pub fn out_of_voters(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = &metrics.membership_config;
        !membership.membership().voter_ids().any(|v| v == self.me.id)
            && membership.log_id() <= &metrics.last_applied
    }

    /// How many other members this node's state counts live, and how many of them proved, at
    /// the last dial to each, that they hold another secret than this node's.
    pub(crate) fn members_with_another_secret(&self) -> (usize, usize) {
        let state = self.state();
        let members: Vec<u64> = state
            .nodes
            .iter()
            .filter(|(&id, r)| id != self.me.id && r.status.is_live())
            .map(|(&id, _)| id)
            .collect();
        let differ = members.iter().filter(|&&id| self.transport.secret_differs(id)).count();
        (members.len(), differ)
    }

    /// Why the members refuse this node's connections, when every live member this node's
    /// state knows refused its last dial: a restart on an older copy of the data directory, or
    /// on another address, while the cluster counts a life of this node live elsewhere. Its own
    /// raft then finds no leader, and without this it said only that none answered.
    pub(crate) fn refused_by_members(&self) -> Option<String> {
        let state = self.state();
        let mut members = state
            .nodes
            .iter()
            .filter(|(&id, r)| id != self.me.id && r.status.is_live())
            .map(|(&id, _)| self.transport.refusal(id));
        let first = members.next()??;
        members.all(|r| r.is_some()).then_some(first)
    }

    /// Stops this node for good because the cluster refused what it is: it stops serving and
    /// answering its peers, which declare it failed and rebuild its entries elsewhere.
    pub fn stop_refused(&self, why: String) {
        tracing::error!(node = self.me.id, "{why}; this node stops");
        self.shutdown.cancel();
        self.host.shutdown();
        self.lifecycle.send_replace(Lifecycle::Refused(why));
    }

    /// Why this node stopped for good, if it did.
    pub(super) fn fatal(&self) -> Option<String> {
        match &*self.lifecycle.borrow() {
            Lifecycle::Fatal(why) | Lifecycle::Refused(why) => Some(why.clone()),
            _ => None,
        }
    }
}
