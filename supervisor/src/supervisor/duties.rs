//! Every node's duties as the replicated state changes: feeding the host, reporting its part of
//! a change, counting failures.

use super::holds::holds_out;
use super::{Lifecycle, Supervisor};
use crate::lane;
use crate::rpc::{Request, Response};
use crate::state::{ClusterState, Command, NodeRecord, NodeStatus};
use gobelins_adaptation::{Host, Progress, Update};
use gobelins_locator::{Change, Epoch, NodeId, Snapshot};
use openraft::ServerState;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Whether `applied` has come as far as `ahead` in what the host is fed: a later epoch, or the
/// same one with no fewer departed nodes and no more participants. The epoch alone moves only
/// when a change begins: a node failed during it would be fed as departed, then not.
pub(super) fn caught_up(applied: &ClusterState, ahead: &ClusterState) -> bool {
    let departed = |s: &ClusterState| -> BTreeSet<u64> {
        s.nodes.iter().filter(|(_, r)| !r.status.is_live()).map(|(&id, _)| id).collect()
    };
    let participants = |s: &ClusterState| s.in_progress.as_ref().map(|p| p.participants.clone());
    applied.epoch > ahead.epoch
        || (applied.epoch == ahead.epoch
            && departed(applied).is_superset(&departed(ahead))
            && match (participants(applied), participants(ahead)) {
                (Some(a), Some(b)) => a.is_subset(&b),
                (None, _) => true,
                (Some(_), None) => false,
            })
}

pub(super) type FeedKey = (u64, Option<(u64, usize)>, BTreeSet<u64>);

/// Hands the host each new word of the replicated state, once.
#[derive(Default)]
pub(super) struct HostFeed {
    /// Epoch, change in progress (epoch, participants) and departed nodes last handed over.
    last: Option<FeedKey>,
    snapshot: Option<Arc<Snapshot>>,
}

impl HostFeed {
    fn feed(&mut self, host: &Host, state: &ClusterState) {
        let departed: BTreeSet<u64> =
            state.nodes.iter().filter(|(_, r)| !r.status.is_live()).map(|(&id, _)| id).collect();
        let progress = state.in_progress.as_ref().map(|p| (p.epoch, p.participants.len()));
        let key = (state.epoch, progress, departed);
        if self.last.as_ref() == Some(&key) {
            return;
        }
        if self.snapshot.as_ref().is_none_or(|s| s.epoch().0 != state.epoch) {
            self.snapshot = state.tree.snapshot(Epoch(state.epoch)).ok().map(Arc::new);
        }
        host.update(Update {
            epoch: state.epoch,
            snapshot: self.snapshot.clone(),
            change: state.in_progress.as_ref().map(|p| Progress {
                epoch: p.epoch,
                change: p.change.clone(),
                participants: p.participants.iter().map(|&n| NodeId(n)).collect(),
                plan: p.plan.clone(),
                failed_moved_in: p.failed_moved_in,
                failed_kept_since: p.failed_kept_since,
                leave: match p.change {
                    Change::Evict(node) => state
                        .nodes
                        .get(&node.0)
                        .is_some_and(|r| r.removed_by == Some(crate::state::RemovedBy::Leave)),
                    _ => false,
                },
            }),
            departed: key.2.iter().map(|&n| NodeId(n)).collect(),
        });
        self.last = Some(key);
    }
}

impl Supervisor {
    /// Follows the applied state: keeps peer addresses current, reports this node's part of
    /// each change, notices when it has left or been declared failed.
    pub(super) async fn duties(self: Arc<Self>) {
        let mut state = self.state.clone();
        let mut retry = tokio::time::interval(Duration::from_millis(100));
        // A node cut off long enough to be declared failed may never hear of it through raft
        // (it is no longer sent the log), so it asks a peer now and then.
        let mut fence_check = tokio::time::interval(self.config.failure_timeout * 3);
        let mut gone = BTreeSet::new();
        let mut done = self.host.done();
        let mut fed = HostFeed::default();
        let mut life = self.host.life();
        loop {
            // Raft's voters are known once its log is read: an older copy, or a process not
            // yet vouched for, that is the only voter must stand for election, or nothing
            // would ever commit.
            if self.older_copy.load(Ordering::SeqCst) || !self.vouched.load(Ordering::SeqCst) {
                self.stand_for_election();
            }
            if !self.vouched.load(Ordering::SeqCst) {
                tokio::spawn(Arc::clone(&self).vouch());
            }
            if self.host.life() != life {
                // A new life of the host: it has reported nothing and been fed nothing.
                life = self.host.life();
                done = self.host.done();
                fed = HostFeed::default();
                self.reported.store(0, Ordering::SeqCst);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = state.changed() => if changed.is_err() { return },
                _ = done.changed() => {}
                _ = self.wake.notified() => {}
                _ = retry.tick() => {}
                _ = fence_check.tick() => {
                    // A leader too, once the cluster has ended its life: declared failed while
                    // paused, say, then elected once it ran again.
                    let ended = self.state().nodes.get(&self.me.id).is_some_and(|r| {
                        r.status == NodeStatus::Failed && r.incarnation == self.incarnation()
                    });
                    if !self.in_touch() || self.leader() != Some(self.me.id) || ended {
                        let me = Arc::clone(&self);
                        tokio::spawn(async move { me.check_fenced().await });
                    }
                }
            }
            let current = self.ahead(state.borrow_and_update().clone());
            for (&id, record) in &current.nodes {
                match record.status {
                    // Once, on the way out: forgetting on every pass would also cut the
                    // connections a departed node opens to ask to come back.
                    NodeStatus::Failed | NodeStatus::Left => {
                        if gone.insert(id) {
                            self.transport.forget(id);
                        }
                    }
                    _ => {
                        gone.remove(&id);
                        self.transport.set_peer(id, record.addr.clone());
                    }
                }
            }
            self.count_failures(&current);
            if let Some(mine) = current.nodes.get(&self.me.id) {
                self.end_if_left(mine);
            }
            if !self.life_admitted() && self.own_join_begun(&current) {
                self.admit_life_asked(self.asked_since(self.incarnation()));
            }
            // Before this node's own part: its senders' packing would hold the calls back.
            if self.tell_participants(&current) {
                // Lets the calls go out before this node's own part keeps the workers busy:
                // without it, the participants began 5 to 10 ms after this node, not 2.
                tokio::task::yield_now().await;
            }
            if self.life_admitted() {
                fed.feed(&self.host, &current);
            }
            self.report_progress(&current);
        }
    }

    /// Takes the lives `state` shows begun and failed, to hold out a node whose lives keep
    /// failing soon after they began; a leader says when one is held.
    pub(super) fn count_failures(&self, state: &ClusterState) {
        let held = {
            let mut flaps = self.flaps.lock().expect("flaps");
            flaps.watch(&state.nodes, self.life_admitted(), Instant::now())
        };
        // Said by the leader, which enforces it, and only where it does (`holds_out`).
        if self.leader() != Some(self.me.id) {
            return;
        }
        for (node, hold) in held.into_iter().filter(|(node, _)| holds_out(state, *node)) {
            tracing::warn!(
                node,
                failures = hold.failures,
                "node {node} keeps failing: {} short lives in a row, {:.1} s from the first \
                 failure to the last, each declared failed soon after it began. It is held out \
                 for {:.1} s before it may rejoin, longer at each such failure, so that its \
                 entries stop moving out and back; it rejoins by itself then (`--rejoin-hold-ms` \
                 sets the first hold). {}",
                hold.failures,
                hold.within.as_secs_f64(),
                hold.left.as_secs_f64(),
                crate::flaps::advice(node)
            );
        }
    }

    /// Whether `state` has the change begun that the join this process is asking for began,
    /// for a life this process made. Committed, it admits this life as the join's answer
    /// will: on a machine under load, the answer can come milliseconds after the change
    /// reached this node's log, while the other participants have begun to send to it. Only a
    /// life made here: a restarted process's own log, read from disk, may hold the join of a
    /// life an earlier run served and the cluster has since declared failed.
    pub(super) fn own_join_begun(&self, state: &ClusterState) -> bool {
        let life = self.incarnation();
        let me = self.me.id;
        self.life_made_here()
            && self.asking.lock().expect("asking").contains_key(&life)
            && state.nodes.get(&me).is_some_and(|r| {
                r.incarnation == life && r.status == NodeStatus::Joining && r.addr == self.me.addr
            })
            && state
                .in_progress
                .as_ref()
                .is_some_and(|p| matches!(p.change, Change::Add { node, .. } if node == NodeId(me)))
    }

    /// As leader, tells the other participants of the change `state` began, once per change.
    /// Each would learn of it from its own log one replication round after this node applied
    /// it. Under load, with the senders packing, that round took 1 to 9 ms, and every sender's
    /// batches wait for their receiver to begin. Only the beginning is told: a failure during
    /// the change, which keeps its epoch, reaches each node through its log.
    fn tell_participants(self: &Arc<Self>, state: &Arc<ClusterState>) -> bool {
        let Some(progress) = &state.in_progress else { return false };
        let epoch = progress.epoch;
        if self.leader() != Some(self.me.id)
            || self.told.fetch_max(epoch, Ordering::SeqCst) >= epoch
        {
            return false;
        }
        let request = match lane::request(&Request::Begun(Box::new(ClusterState::clone(state)))) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(epoch, %error, "cannot encode a change's beginning; participants will learn of it from their logs");
                return false;
            }
        };
        // Receivers first: every sender's batches wait on theirs.
        let received = |n: u64| {
            let moves = progress.plan.services.iter().flat_map(|s| &s.moves);
            moves.filter(|m| m.to == NodeId(n)).count()
        };
        let mut told: Vec<u64> =
            progress.participants.iter().copied().filter(|&n| n != self.me.id).collect();
        told.sort_by_key(|&n| std::cmp::Reverse(received(n)));
        let any = !told.is_empty();
        for node in told {
            let me = Arc::clone(self);
            let request = request.clone();
            tokio::spawn(async move {
                let answer = me.transport.call(node, request, me.config.rpc_timeout).await;
                match answer.and_then(lane::decode_response) {
                    Ok(Response::Heard(_)) => {}
                    Ok(_) => tracing::debug!(node, epoch, "a change's beginning not understood"),
                    Err(error) => {
                        tracing::debug!(node, epoch, %error, "a change's beginning not told")
                    }
                }
            });
        }
        any
    }

    /// Begins from `state`, a change's beginning told by `from`, if `from` is the leader this
    /// node knows (or, for a joiner that knows none yet, a live member), this life takes part
    /// in the change, and its own applied state has not come that far. A leader tells only a
    /// committed state (its applied state, or a head start it was told), so beginning from it
    /// is applying it early. A joiner still asking for its life is admitted by it as by its
    /// join's answer ([`Supervisor::own_join_begun`]).
    pub(super) fn hear_begun(&self, from: u64, state: ClusterState) -> bool {
        let life = self.incarnation();
        let me = self.me.id;
        let takes_part = state.in_progress.as_ref().is_some_and(|p| p.participants.contains(&me))
            && state.nodes.get(&me).is_some_and(|r| r.incarnation == life && r.status.is_live())
            && (self.life_admitted() || self.own_join_begun(&state));
        // A joiner learns its leader from the leader's first append to it, which the word
        // often outruns: refused then, the joiner began only at its join's answer, 1 to 3 ms
        // later, and every sender's batches waited for it (BENCHMARKS.md, stop 65). Until it
        // knows one, it takes the word of a node the state names live. What is told is
        // committed whoever tells it: only a node that believes it leads tells
        // (`tell_participants`), and it tells its applied state or a head start it was given
        // (a join's answer, or an earlier leader's word). The check on `from` reads the told
        // state: a sanity check, not the safety, which rests on what tellers tell.
        let teller = match self.leader() {
            Some(leader) => leader == from,
            None => {
                !self.life_admitted() && state.nodes.get(&from).is_some_and(|r| r.status.is_live())
            }
        };
        if !teller || !takes_part || caught_up(&self.state.borrow(), &state) {
            return false;
        }
        self.keep_head_start(life, Box::new(state));
        self.wake.notify_one();
        true
    }

    /// Keeps `state`, for `life`, as the head start, unless the one kept is newer: two join
    /// calls may ask at once, and the leader's word may come before or after an answer.
    pub(super) fn keep_head_start(&self, life: u64, state: Box<ClusterState>) {
        let mut head_start = self.head_start.lock().expect("head start");
        if head_start
            .as_ref()
            .is_none_or(|(kept_for, kept)| *kept_for != life || kept.epoch < state.epoch)
        {
            *head_start = Some((life, Arc::from(state)));
        }
    }

    /// `applied`, or the head start (a join's answer, the leader's word) while `applied` has
    /// not caught up with it: a participant begins its part of a change from it.
    pub(super) fn ahead(&self, applied: Arc<ClusterState>) -> Arc<ClusterState> {
        let mut head_start = self.head_start.lock().expect("head start");
        match head_start.as_ref() {
            Some((life, ahead)) if *life == self.incarnation() && !caught_up(&applied, ahead) => {
                Arc::clone(ahead)
            }
            Some(_) => {
                *head_start = None;
                applied
            }
            None => applied,
        }
    }

    /// Ends this life as left if `record`, this node's in some copy of the state, says this
    /// life has left. Returns whether this call ended it.
    pub(super) fn end_if_left(&self, record: &NodeRecord) -> bool {
        record.status == NodeStatus::Left && self.end_as_left(record.incarnation)
    }

    /// Ends life `incarnation` as left, if it is this node's and it has not ended yet.
    pub(super) fn end_as_left(&self, incarnation: u64) -> bool {
        self.lifecycle.send_if_modified(|lifecycle| {
            let ended = *lifecycle == Lifecycle::Member && incarnation == self.incarnation();
            if ended {
                *lifecycle = Lifecycle::Left;
            }
            ended
        })
    }

    /// Whether this node hears from a working leader: a follower knows one, a leader has had
    /// a quorum acknowledge it lately. A leader cut off from the rest believes it still leads,
    /// so the second test is what lets it notice it was replaced.
    pub(super) fn in_touch(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        match metrics.state {
            ServerState::Leader => metrics
                .millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < self.config.failure_timeout.as_millis()),
            _ => metrics.current_leader.is_some(),
        }
    }

    fn report_progress(self: &Arc<Self>, state: &ClusterState) {
        let Some(progress) = &state.in_progress else { return };
        if !progress.participants.contains(&self.me.id) || progress.done.contains(&self.me.id) {
            return;
        }
        // Only once this node's adaptation layer has carried out its part.
        if *self.host.done().borrow() < progress.epoch {
            return;
        }
        // One report in flight per epoch; a failed one clears the mark so the next tick retries.
        if self.reported.swap(progress.epoch, Ordering::SeqCst) == progress.epoch {
            return;
        }
        let me = Arc::clone(self);
        let epoch = progress.epoch;
        tokio::spawn(async move {
            let command = Command::MigrationDone { node: me.me.id, epoch };
            if let Err(error) = me.propose(command).await {
                tracing::debug!(epoch, %error, "MigrationDone not recorded yet; will retry");
                let _ = me.reported.compare_exchange(epoch, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
        });
    }

    /// Starts the services afresh, once per life `dead` the cluster ended: what they hold is
    /// stale, for the cluster rebuilt those entries elsewhere. The host serves nothing until the
    /// new life is admitted.
    pub(super) fn start_services_afresh(&self, dead: u64) {
        if self.renewed_for.swap(dead, Ordering::SeqCst) != dead {
            // A life this process served ended under it (declared failed while cut off or
            // frozen): worth a warning. One that ended before this process began (a node that
            // left, or was killed, started again) is routine, and its services hold nothing.
            if self.admitted.load(Ordering::SeqCst) {
                tracing::warn!(
                    node = self.me.id,
                    incarnation = dead,
                    "the cluster ended this node's life: starting services afresh"
                );
            } else {
                tracing::info!(
                    node = self.me.id,
                    incarnation = dead,
                    "this node's last life is over (it left, or the cluster declared it failed): its services start empty"
                );
            }
            self.admitted.store(false, Ordering::SeqCst);
            *self.head_start.lock().expect("head start") = None;
            self.host.renew(&self.services);
            self.host.lease(Instant::now());
        }
    }
}
