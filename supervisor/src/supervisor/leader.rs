//! The leader's duties: the failure detector's verdicts carried out, and raft's voters kept in
//! step with the cluster.

use super::{Supervisor, MALFORMED, REJOINS, SEED_WAITS};
use crate::detector::{Action, Detector};
use crate::rpc::{Request, Response};
use crate::state::{ClusterState, Command, NodeStatus, RULES};
use crate::voters::{can_commit, desired_voters};
use openraft::{BasicNode, ChangeMembers, Membership, ServerState};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

impl Supervisor {
    /// The leader's periodic work: raft membership follows the cluster state, and the failure
    /// detector watches every member.
    pub(super) async fn leader_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.ping_interval);
        // After a pause, one tick and then the period again: not a burst of the ticks missed.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quorum = crate::quorum::QuorumWatch::default();
        let mut no_leader = crate::quorum::QuorumWatch::default();
        // When this node last came back from a pause of its own.
        let mut resumed: Option<Instant> = None;
        let leaderless_after = crate::quorum::leaderless_after(self.config.raft_election);
        loop {
            let due = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                due = tick.tick() => due,
            };
            // Back from a pause, raft's metrics may still be those from before it (a quorum's
            // acknowledgement fresh, though the others may have moved on), and every member
            // looks silent for the whole gap. Granted a lease on them, this node served as a
            // leader it may no longer be; judged on them, a live node resumed with it was
            // declared failed. One tick off, and the detector starts afresh, with a full
            // grace period for every member.
            if let Some(gap) = self.pauses.tick(due, Instant::now()) {
                tracing::warn!(
                    node = self.me.id,
                    gap_ms = gap.as_millis() as u64,
                    "this node was not running for a while (stopped, its machine paused, or \
                     starved of CPU): the others' silence over that time is not held against \
                     them"
                );
                *self.detector.lock().unwrap_or_else(|p| p.into_inner()) = None;
                resumed = Some(Instant::now());
                continue;
            }
            gobelins_adaptation::log_budget::say_ended(&self.malformed, MALFORMED);
            gobelins_adaptation::log_budget::say_ended(&self.rejoins, REJOINS);
            gobelins_adaptation::log_budget::say_ended(&self.seed_waits, SEED_WAITS);
            // After the pause check: raft's acknowledgement ages span a pause, which is this
            // node's own silence, not the voters'. They stay that old until raft's next round
            // is acknowledged, a tick after the pause or more: a leader back from 10 s stopped
            // said for 50 ms that it heard from no majority.
            let settled = resumed.is_none_or(|r| r.elapsed() >= self.config.failure_timeout);
            match self.quorum_lost() {
                Some(lost) if settled && quorum.lost(tokio::time::Instant::now()) => {
                    tokio::spawn(Arc::clone(&self).say_quorum_lost(lost));
                }
                None if quorum.back() => tracing::warn!(
                    node = self.me.id,
                    "this node hears from a majority of the voters again, or leads no more"
                ),
                _ => {}
            }
            let now = tokio::time::Instant::now();
            match self.leaderless_for(now) {
                Some(lost) if lost >= leaderless_after && no_leader.lost(now) => {
                    tokio::spawn(Arc::clone(&self).say_leaderless(lost));
                }
                None if no_leader.back() => tracing::warn!(
                    node = self.me.id,
                    leader = ?self.leader(),
                    "this node knows a leader again, or votes no more"
                ),
                _ => {}
            }
            let is_leader = self.raft.metrics().borrow().state == ServerState::Leader;
            // The leader serves while a quorum acknowledged it within half a lease (the others
            // ask it for theirs: `lease_duties`).
            if let Some(age) = self.leader_ack_age() {
                self.host.lease(Instant::now() + self.lease_span() - age);
            }
            // A leader that no quorum acknowledges may be the one cut off: its verdicts on the
            // others would be wrong, and could not commit anyway.
            if !is_leader || !self.in_touch() {
                *self.detector.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.lag.lock().unwrap_or_else(|p| p.into_inner()).clear();
                continue;
            }
            let (term, last_index) = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                (metrics.current_term, metrics.last_log_index.unwrap_or(0))
            };
            let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
            lag.sample(Instant::now(), term, last_index);
            drop(lag);
            let state = self.state();
            // Commands apply by this build's rules from the entry on, on every replica.
            if state.rules < RULES && !self.raising_rules.swap(true, Ordering::SeqCst) {
                let me = Arc::clone(&self);
                tokio::spawn(async move {
                    let raise = Command::Rules { version: RULES };
                    if let Err(error) = me.propose_here(raise).await {
                        tracing::debug!(%error, "raising the cluster's rules; asking again");
                    }
                    me.raising_rules.store(false, Ordering::SeqCst);
                });
            }
            if !self.reconciling.swap(true, Ordering::SeqCst) {
                let (me, state) = (Arc::clone(&self), Arc::clone(&state));
                tokio::spawn(async move {
                    me.reconcile_membership(&state).await;
                    me.reconciling.store(false, Ordering::SeqCst);
                });
            }
            let members: BTreeSet<u64> = state.live();
            // Voters whose life ended but who keep their seat while they answer (back after the
            // whole cluster stopped) witness for the members.
            let also: BTreeSet<u64> = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                let membership = metrics.membership_config.membership();
                let also: BTreeSet<u64> =
                    membership.voter_ids().filter(|id| !members.contains(id)).collect();
                // The transport forgot them when their life ended: a probe needs the address.
                for &id in &also {
                    if let Some(node) = membership.get_node(&id) {
                        self.transport.set_peer(id, node.addr.clone());
                    }
                }
                also
            };
            let actions = {
                let mut detector = self.detector.lock().unwrap_or_else(|p| p.into_inner());
                let detector = detector.get_or_insert_with(|| {
                    Detector::new(self.me.id, self.config.failure_timeout, 2)
                });
                detector.handle_tick_asking(Instant::now(), &members, &also)
            };
            for action in actions {
                let me = Arc::clone(&self);
                tokio::spawn(async move { me.carry_out(action).await });
            }
        }
    }

    async fn carry_out(self: Arc<Self>, action: Action) {
        match action {
            Action::Ping(node) => {
                if self.ping(node, self.config.ping_interval * 2).await {
                    if let Some(d) =
                        self.detector.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    {
                        d.handle_pong(node, Instant::now());
                    }
                }
            }
            Action::Confirm { suspect, witnesses } => {
                let probes = witnesses.iter().map(|&w| {
                    let me = Arc::clone(&self);
                    async move {
                        let deadline = me.config.probe_timeout * 2;
                        matches!(
                            me.call(w, &Request::Probe { target: suspect }, deadline).await,
                            Ok(Response::Probed(true))
                        )
                    }
                });
                let reached = futures::future::join_all(probes).await;
                let next = self
                    .detector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .and_then(|d| d.handle_probes(suspect, &reached, Instant::now()));
                if reached.iter().any(|&r| r) {
                    tracing::info!(node = suspect, "suspicion not confirmed by witnesses");
                }
                // Probes sent before a pause of this node ran out during it: their "not
                // reached" says nothing of the suspect. Asked again if it stays silent.
                if next.is_some() && !self.running_on_time() {
                    tracing::warn!(
                        node = suspect,
                        "verdict on a suspect dropped: this node was not running while its \
                         witnesses were asked"
                    );
                    return;
                }
                if let Some(next) = next {
                    Box::pin(self.carry_out(next)).await;
                }
            }
            Action::Withheld(nodes) => tracing::warn!(
                ?nodes,
                "this leader has not reached these nodes for several failure timeouts, though \
                 others do: its own links are the likelier fault, so none is declared failed; \
                 check this node's network"
            ),
            Action::DeclareFailed(node) | Action::DeclareCutOff(node) => {
                let state = self.state();
                let Some(record) = state.nodes.get(&node) else { return };
                let incarnation = record.incarnation;
                // A leaver whose part is done needs nothing more from the leader: its leave
                // ends on its peers' word. Declared failed, it would come back as a new life.
                let leaving_done = record.status == NodeStatus::Leaving
                    && state.in_progress.as_ref().is_some_and(|p| p.done.contains(&node));
                let cut_off = matches!(action, Action::DeclareCutOff(_));
                if cut_off && leaving_done {
                    tracing::debug!(node, "cut off from the leader while its leave ends; left be");
                    return;
                }
                // An operator's stop reads as one, not as a crash to look into.
                let on_purpose =
                    || self.flaps.lock().expect("flaps").said_stopping(node, incarnation);
                if !cut_off && on_purpose() {
                    tracing::warn!(
                        node,
                        incarnation,
                        "declaring node failed: it said it was stopping on purpose (SIGTERM or \
                         SIGINT) and is silent since; its entries are rebuilt from replicas, and \
                         started again it rejoins as a new life"
                    );
                } else if !cut_off {
                    tracing::warn!(
                        node,
                        incarnation,
                        "declaring node failed: silent and unreachable from witnesses"
                    );
                } else {
                    tracing::warn!(
                        node,
                        incarnation,
                        rounds = crate::detector::CUT_OFF_ROUNDS,
                        "declaring node failed: witnesses reach it but this leader has not for \
                         several failure timeouts, so it can neither hold a lease nor take part \
                         in changes; its entries are rebuilt elsewhere, and it rejoins as a new \
                         life once the link between it and the leader is mended"
                    );
                }
                // Only while still leader: a deposed leader's late verdict must not be forwarded
                // to its successor, which has its own, fresher view.
                if let Err(error) = self.propose_here(Command::Dead { node, incarnation }).await {
                    tracing::warn!(node, %error, "could not commit the failure");
                }
            }
        }
    }

    /// The followers that lag, or lagged within `crate::lag::LAG_MEMORY` (see `crate::lag`),
    /// and of the others, those not voting that have not stored the leader's whole log yet: a
    /// seat given to one before it shows whether it keeps up could be one it never votes from.
    /// Says when a node begins to lag, and when it stops.
    fn lagging(&self, state: &ClusterState, voters: &BTreeSet<u64>) -> BTreeSet<u64> {
        let (matched, last): (BTreeMap<u64, Option<u64>>, u64) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let Some(replication) = metrics.replication.as_ref() else { return BTreeSet::new() };
            // The leader's own entry is its own disk's: not a follower that lags.
            let followers = replication.iter().filter(|(&id, _)| id != self.me.id);
            let matched = followers.map(|(&id, stored)| (id, stored.map(|l| l.index))).collect();
            (matched, metrics.last_log_index.unwrap_or(0))
        };
        let look =
            self.lag.lock().unwrap_or_else(|p| p.into_inner()).look(Instant::now(), &matched);
        let crate::lag::Look { mut lagged, began, ended } = look;
        let behind = |id: &u64| matched.get(id).copied().flatten().is_none_or(|s| s < last);
        lagged.extend(matched.keys().filter(|id| !voters.contains(id) && behind(id)));
        // Said of active members only: one dead and not yet taken out of raft lags too.
        let active = |id: &u64| state.nodes.get(id).is_some_and(|r| r.status == NodeStatus::Active);
        // Nor of one that said it stops on purpose: it lags because it stopped (a helper's
        // soak: a node stopped with SIGTERM was said to have a slow disk 300 ms later).
        let flaps = self.flaps.lock().expect("flaps");
        let stopping =
            |id: &u64| state.nodes.get(id).is_some_and(|r| flaps.said_stopping(*id, r.incarnation));
        let began: Vec<u64> = began.into_iter().filter(|id| active(id) && !stopping(id)).collect();
        drop(flaps);
        for node in began {
            let stored = matched.get(&node).copied().flatten();
            tracing::warn!(node, ?stored, window_ms = crate::lag::LAG_WINDOW.as_millis() as u64, "this node has not stored raft's entries of the last window (its disk is slow, or it is starved of CPU): it gets no vote while it lags and for a while after, and its part in the cluster's changes may come late. Check its disk (fsync times) and its load");
        }
        for node in ended.into_iter().filter(active) {
            let for_s = crate::lag::LAG_MEMORY.as_secs();
            tracing::info!(
                node,
                for_s,
                "this node has kept up with raft's log for a while again: it may vote"
            );
        }
        lagged
    }

    /// Keeps raft's membership in line with the cluster: every live node a member, up to
    /// `max_voters` active nodes voting, always an odd number of them (voters are kept while
    /// they live and stay, so that a change of voters happens only when one is lost or leaves,
    /// or a join makes room for two more), failed and departed nodes removed.
    async fn reconcile_membership(&self, state: &ClusterState) {
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let known: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        let live = state.live();
        for (&id, record) in
            state.nodes.iter().filter(|(id, _)| live.contains(id) && !known.contains(id))
        {
            if let Err(error) = self.raft.add_learner(id, BasicNode::new(&record.addr), false).await
            {
                tracing::debug!(node = id, %error, "adding learner");
            }
        }
        // Who answers is asked only when a change looks due with the live nodes taken to
        // answer and the others not: most passes change nothing, and ask nobody.
        let (me, max) = (self.id(), self.config.max_voters);
        let lagging = self.lagging(state, &voters);
        let lags = |id: u64| lagging.contains(&id);
        let due = desired_voters(me, &voters, state, max, |id| live.contains(&id), lags);
        if due != voters && !due.is_empty() {
            let asked: BTreeSet<u64> = voters
                .iter()
                .chain(&due)
                .copied()
                .chain(state.with_status(NodeStatus::Active))
                .filter(|&id| id != me)
                .collect();
            let answering = self.answering(&asked, &membership).await;
            let answers = |id: u64| id == me || answering.contains(&id);
            let desired = desired_voters(me, &voters, state, max, answers, lags);
            if desired != voters && !desired.is_empty() {
                if !can_commit(&desired, answers) {
                    tracing::debug!(?voters, ?desired, ?answering, "voters not changed: too few of the new ones answer for the change to commit");
                    return;
                }
                // Kept as a learner: a leaver still follows the state until its leave is done.
                match self.raft.change_membership(desired.clone(), true).await {
                    Ok(_) => tracing::info!(?desired, "raft voters changed"),
                    Err(error) => tracing::debug!(%error, "changing voters"),
                }
                return;
            }
        }
        let admitting: BTreeSet<u64> = {
            let mut joining = self.joining.lock().expect("joining");
            // Long enough for a `Join` to commit; one that did not was refused or lost, and its
            // node asks again.
            joining.retain(|_, at| at.elapsed() < self.config.rpc_timeout * 4);
            joining.keys().copied().collect()
        };
        let gone: BTreeSet<u64> = known
            .iter()
            .copied()
            .filter(|id| !live.contains(id) && !voters.contains(id) && !admitting.contains(id))
            .collect();
        if !gone.is_empty() {
            if let Err(error) =
                self.raft.change_membership(ChangeMembers::RemoveNodes(gone), false).await
            {
                tracing::debug!(%error, "removing departed learners");
            }
        }
    }

    /// Which of `nodes` answer a ping now. A node declared failed was forgotten by the
    /// transport; its address comes back from raft's membership or the cluster's state.
    pub(super) async fn answering(
        &self,
        nodes: &BTreeSet<u64>,
        membership: &Membership<u64, BasicNode>,
    ) -> BTreeSet<u64> {
        let state = &self.state();
        let asks = nodes.iter().map(|&id| async move {
            self.know_address(id, membership, state);
            self.ping(id, self.config.ping_interval * 2).await.then_some(id)
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// Gives the transport `id`'s address, from raft's membership or the cluster's state: a
    /// node declared failed was forgotten by it.
    pub(super) fn know_address(
        &self,
        id: u64,
        membership: &Membership<u64, BasicNode>,
        state: &ClusterState,
    ) {
        let addr = membership
            .get_node(&id)
            .map(|n| n.addr.clone())
            .or_else(|| state.nodes.get(&id).map(|r| r.addr.clone()));
        if let Some(addr) = addr {
            self.transport.set_peer(id, addr);
        }
    }
}
