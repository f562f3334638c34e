//! Whether this node's life is still the cluster's: a node cut off or declared failed learns
//! that it was, and starts afresh or ends as left.

use super::entry::Asking;
use super::{Supervisor, REJOINS};
use crate::error::SupervisorError;
use crate::rpc::{Request, Response, View};
use crate::state::{Command, NodeRecord, NodeStatus, Outcome, Refusal};
use gobelins_adaptation::log_budget::budgeted;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How long after no peer answered [`Supervisor::vouch`] asks again.
const VOUCH_AGAIN: std::time::Duration = std::time::Duration::from_secs(1);

impl Supervisor {
    /// Asks the peers whether the cluster declared this node failed; if so, fences: rejoins
    /// under a new incarnation, as a new life of the same node, through the freshest leader.
    /// The newest view the peers give decides, since a peer that left or was cut off holds a
    /// frozen view. Asks again, too, when this process's rejoin was taken but not answered.
    pub(crate) async fn check_fenced(self: Arc<Self>) {
        let state = self.state();
        let Some(view) = self.peers_view().await else { return };
        self.judge_copy(&view).await;
        // Only a view newer than or as new as ours may tell us we were declared failed.
        let ours = self.state().epoch;
        if view.state.epoch < ours {
            return;
        }
        let record = view.state.nodes.get(&self.me.id);
        // A leaver the leader took out of raft before it sent the entry that ends the leave
        // never applies that entry: its own state says "leaving" for ever, and the peers' say
        // "left". Without this, it stayed up doing nothing, and at each restart proposed the
        // end of a life already ended, refused for want of a leader, every few seconds.
        let left =
            |r: &&NodeRecord| r.status == NodeStatus::Left && r.incarnation == self.incarnation();
        if let Some(record) = record.filter(left) {
            if self.end_if_left(record) {
                // The usual end of a leave, not news: the agent's stopping line follows.
                tracing::info!(
                    node = self.me.id,
                    peer_epoch = view.state.epoch,
                    "the cluster has this node as left: raft took it out before it heard the entry that ends its leave, which the peers have"
                );
            }
            return;
        }
        // A node that left, started again from an older copy of its data directory (a life
        // before the one that left): it waited for ever for the cluster to end a life that had
        // ended (a helper's black-box test). It stays out, as a start of the newest copy does,
        // unless asked back with `--join`.
        let left_since = |r: &&NodeRecord| {
            r.status == NodeStatus::Left
                && r.incarnation > self.incarnation()
                && !self.life_admitted()
                && !self.asked_back.load(Ordering::SeqCst)
        };
        if let Some(record) = record.filter(left_since) {
            if self.end_as_left(self.incarnation()) {
                tracing::warn!(
                    node = self.me.id,
                    left = record.incarnation,
                    "this data directory is an older copy of this node's: the node left the \
                     cluster in a later life, and stays out. This start ends as left; to bring \
                     the node back, start it with --join ADDR (a member's address)"
                );
            }
            return;
        }
        // A later life of this node, at this node's address, live, that this process never
        // served: its data directory is an older copy (restored from a backup) of the one
        // that life ran on. That life is over, for this process holds its address, but it
        // answers for it, so no detector ends it: the cluster waited on it for ever, a change
        // queued behind (a helper's black-box test: more than ten minutes).
        let later_here = |r: &&NodeRecord| {
            r.incarnation > self.incarnation() && r.status.is_live() && r.addr == self.me.addr
        };
        let later = record.filter(later_here).filter(|_| !self.life_admitted());
        if let Some(later) = later {
            if !self.end_later_life(later.incarnation).await {
                return;
            }
        }
        let fenced = later.is_some()
            || match record {
                Some(r) => r.status == NodeStatus::Failed,
                None => view.state.epoch > ours,
            };
        // This process's rejoin was committed but its answer lost (the leader crashed before it
        // replied, or the attempts ran out): the cluster waits for this life, which, never
        // admitted, serves nothing and reports nothing. The same life asking again is answered
        // with where its join stands.
        let unanswered = !self.life_admitted()
            && self.renewed_to.load(Ordering::SeqCst) == self.incarnation()
            && record.is_some_and(|r| r.incarnation == self.incarnation() && r.status.is_live());
        if !fenced && !unanswered {
            return;
        }
        // A leaver declared failed while it ran (cut off as it left) leaves: the survivors
        // rebuilt what it still held. Rejoining would undo the operator's leave, which the CLI
        // had already reported as under way. Judged by this process's own state only for a
        // life it served: one restarted ends its last life itself (`start_new_life`), and its
        // state shows that end, not the leave, once applied.
        let leaving = self.life_admitted()
            && state.nodes.get(&self.me.id).is_some_and(|r| {
                r.status == NodeStatus::Leaving && r.incarnation == self.incarnation()
            });
        // A process restarted in the middle of its node's leave: its state, read before raft
        // ran, had the life leaving. Rejoining, it undid the leave (the audit's kill -9 during
        // `gobelins leave`, restarted by a unit): the node stayed a member. A leave the
        // restart's state had not applied yet is not seen, and the node rejoins.
        let restarted_leaving = self.leaving_when_started == Some(self.incarnation());
        // Asked out by its operator, and failed before it was: killed, then evicted while
        // dead, its own log never had the eviction, and it came back as a member. So for a
        // life this process served, paused as it was evicted. A process that serves no life
        // yet stays out whatever life it renewed to since (evicted while it asked to rejoin,
        // which a recovery may make it do for minutes), unless it was started with `--join`:
        // its operator asked for the node back.
        let kept_out = record.filter(|r| r.kept_out).is_some_and(|r| match self.life_admitted() {
            true => r.incarnation == self.incarnation(),
            false => !self.asked_back.load(Ordering::SeqCst),
        });
        let dead_here = record.is_some_and(|r| r.incarnation == self.incarnation());
        if fenced && ((leaving || restarted_leaving) && dead_here || kept_out) {
            let life = self.incarnation();
            // Kept: the cluster's record says "failed", and the next start of this directory
            // would rejoin from it, its own log showing that end rather than the leave. Once.
            if self.left_recorded.swap(life, Ordering::SeqCst) != life {
                let record = Arc::clone(&self.record_left);
                match crate::disk::on_disk(move || record(life)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cannot record in the data directory that this node's leave ended: a later start of it would rejoin the cluster")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "recording that this node's leave ended did not finish")
                    }
                }
            }
            if self.end_as_left(life) {
                if !self.life_admitted() {
                    tracing::warn!(
                        node = self.me.id,
                        peer_epoch = view.state.epoch,
                        "this node's last life was asked out of the cluster (a leave it was in \
                         the middle of, or an eviction while it was down) and ended before it \
                         was out: it stays out, and this start ends as left. The entries that \
                         life held were rebuilt from replicas. To bring the node back, start it \
                         with --join ADDR (a member's address)"
                    );
                } else if !leaving {
                    tracing::warn!(
                        node = self.me.id,
                        peer_epoch = view.state.epoch,
                        "the cluster took this node out while it could not answer (evicted \
                         while paused or cut off, then declared failed): it stays out, its \
                         entries rebuilt from replicas. To bring it back, start it with --join \
                         ADDR (a member's address)"
                    );
                } else {
                    tracing::warn!(
                        node = self.me.id,
                        peer_epoch = view.state.epoch,
                        "declared failed while leaving; the leave ends here, and the entries \
                         this node still held were rebuilt from replicas"
                    );
                }
            }
            return;
        }
        if fenced {
            let dead = record.map_or(0, |r| r.incarnation);
            self.start_services_afresh(dead);
            // A life the cluster has not seen yet: above both ours and the one it declared dead.
            if let Err(error) = self.renew_incarnation(dead) {
                // Asked again and again, it failed every ping interval for as long as the disk
                // stayed full, and said meanwhile that it waited for a quorum.
                self.stop_on_storage(format!("cannot persist the new incarnation: {error}"));
                return;
            }
            // Made here even when the incarnation did not move (no record of this node in the
            // newest view): its services were started afresh, so asking again is safe.
            self.renewed_to.store(self.incarnation(), Ordering::SeqCst);
        } else {
            // Asked again every ping interval while the answer does not come.
            gobelins_adaptation::log_budget::budgeted(&self.rejoins, REJOINS, || {
                tracing::warn!(
                    node = self.me.id,
                    incarnation = self.incarnation(),
                    "the cluster took this node's rejoin but its answer never came; asking again"
                )
            });
        }
        // Through the leader of the newest view, whatever its own life's status (after the
        // whole cluster stopped, the leader may be a restarted node whose last life ended as
        // this one's did), else through any member it lists as live. A leader asks itself.
        let live = view.state.live();
        let joined = if self.leader() == Some(self.me.id) {
            let _asking = Asking::new(&self, self.incarnation());
            self.join_here().await
        } else {
            let via = view
                .leader
                .into_iter()
                .chain(live.iter().copied())
                .filter(|n| *n != self.me.id)
                .find_map(|n| view.state.nodes.get(&n).map(|r| r.addr.clone()));
            let Some(via) = via else { return };
            self.join_via(&via, self.config.rpc_timeout * 5).await.map_err(|e| (via, e))
        };
        match joined {
            Ok(Ok(applied)) => tracing::info!(?applied, "rejoining"),
            // An earlier attempt got through though its answer was lost.
            Ok(Err(Refusal::AlreadyMember(_))) => tracing::debug!("rejoin already under way"),
            // Asked again at each check until the hold ends; said once per hold, as several
            // checks can ask at once.
            Ok(Err(refusal @ Refusal::Held { .. })) => {
                if self.note_held(&refusal) {
                    tracing::warn!(node = self.me.id, "rejoin held back: {refusal}");
                }
            }
            // Its labels: asking again changes nothing.
            Ok(Err(refusal @ Refusal::Labels(_))) => self.stop_refused(format!(
                "the cluster refused this node's rejoin: {refusal}. Start it again with --label \
                 values the cluster takes"
            )),
            // Asked again every ping interval: a seed kept busy said so three times a second.
            Ok(Err(refusal)) => budgeted(
                &self.rejoins,
                REJOINS,
                || tracing::warn!(%refusal, "rejoin refused; will try again"),
            ),
            Err((via, error)) => budgeted(
                &self.rejoins,
                REJOINS,
                || tracing::warn!(%via, %error, "rejoin failed; will try again"),
            ),
        }
    }

    /// Ends `later`, a life of this node that a newer copy of its data directory served, from
    /// a process on an older copy: the cluster then rebuilds that life's entries from
    /// replicas, as for any restart, and this process rejoins as a life after it.
    async fn end_later_life(&self, later: u64) -> bool {
        let fail = Command::Fail { node: self.me.id, incarnation: later };
        let ended = match self.propose_until(fail, self.config.failure_timeout).await {
            Ok(Ok(_)) => None,
            // Ended already: most often by an earlier attempt of this proposal, whose answer
            // was lost.
            Ok(Err(refusal @ (Refusal::UnknownNode(_) | Refusal::WrongIncarnation { .. }))) => {
                Some(refusal)
            }
            // The cluster's last live node: ended as a restarted last node's life is.
            Ok(Err(Refusal::LastNode(_))) => {
                let dead = Command::Dead { node: self.me.id, incarnation: later };
                match self.propose_until(dead, self.config.failure_timeout).await {
                    Ok(Ok(_)) => None,
                    _ => return false,
                }
            }
            Ok(Err(refusal)) => {
                tracing::debug!(%refusal, later, "the later life not ended yet");
                return false;
            }
            Err(error) => {
                budgeted(
                    &self.rejoins,
                    REJOINS,
                    || tracing::warn!(%error, later, "cannot end this node's later life yet (it ran on a newer copy of this data directory); asking again"),
                );
                return false;
            }
        };
        tracing::warn!(
            node = self.me.id,
            incarnation = self.incarnation(),
            later,
            refused = ended.map(|r| r.to_string()),
            "this data directory is an older copy of this node's: the cluster had life {later} \
             of it, which ran on a newer one, and counted it live. That life is ended, its \
             entries rebuilt from replicas, and this node rejoins as a new one. If the newer \
             directory still exists, it is out of date now: do not start it"
        );
        true
    }

    /// The newest view of the cluster its peers give, or this node's own if it leads and none
    /// answers.
    async fn peers_view(&self) -> Option<Box<View>> {
        // The members first. Nodes this node's state has as departed only when no member
        // answers with a view as new as this node's own (a member may be cut off too, or a
        // leaver whose view froze): one may have come back as a new life this node has not
        // heard of. Asking them on every check had every follower dial every node that ever
        // left, every few seconds, for ever.
        let state = self.state();
        let (members, departed): (Vec<_>, Vec<_>) = state
            .nodes
            .iter()
            .filter(|(&id, _)| id != self.me.id)
            .partition(|(_, r)| r.status.is_live());
        let mut view = self.newest_view(&members).await;
        if view.as_ref().is_none_or(|v| v.state.epoch < state.epoch) {
            let theirs = self.newest_view(&departed).await;
            view = [view, theirs].into_iter().flatten().max_by_key(|v| v.state.epoch);
        }
        // A leader that nobody else answers (a lone voter back, the others down) reads its own:
        // its state is the cluster's.
        view.or_else(|| (self.leader() == Some(self.me.id)).then(|| Box::new(self.view())))
    }

    /// Judges from `view` whether this process's data directory is an older copy of its
    /// node's, and marks it so if it is; then this process may vote and stand for election as
    /// far as that goes (see [`Supervisor::vouch`]).
    async fn judge_copy(&self, view: &View) {
        // The cluster had a life of this node after this directory's: it ran on a newer copy
        // of it (this one restored from a backup, or copied to another address).
        let record = view.state.nodes.get(&self.me.id);
        if let Some(later) = record.filter(|r| r.incarnation > self.incarnation()) {
            if !self.life_admitted() {
                self.refuse_votes_as_older_copy(later).await;
            }
        }
        if !self.vouched.swap(true, Ordering::SeqCst) {
            self.stand_for_election();
        }
    }

    /// Asks the peers what the cluster holds of this node, once at a time, until one answers:
    /// until then this process grants no raft vote and stands for no election. A directory
    /// restored from an older copy learns that it is one only from them, and voted before it
    /// did (a helper's black-box run: its vote elected a leader 50 ms before it knew).
    pub(super) async fn vouch(self: Arc<Self>) {
        if self.vouching.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.peers_view().await {
            Some(view) => self.judge_copy(&view).await,
            // Asked again in a while, not at the next turn of the duties' loop: refused by
            // every member (an older copy on another address), it dialed each of them four
            // times a second for as long as it ran (the review of `b66dc7a`).
            None => tokio::time::sleep(VOUCH_AGAIN).await,
        }
        self.vouching.store(false, Ordering::SeqCst);
    }

    /// Refuses raft votes until this node is admitted again, in this process and, through a
    /// mark in the data directory, in the next ones: a later life of the node ran on a newer
    /// copy of the directory, so this raft store is behind what the node voted and
    /// acknowledged since. A vote from it could elect a leader that lacks entries the cluster
    /// committed, or be a second vote in a term that life voted in. Marked in memory only, a
    /// process that died before its admission voted again at its next start.
    async fn refuse_votes_as_older_copy(&self, later: &NodeRecord) {
        self.fresh.store(true, Ordering::SeqCst);
        self.older_copy.store(true, Ordering::SeqCst);
        self.stand_for_election();
        // Every caller waits for the mark: a second fence check, running beside the first,
        // went on to end the later life and rejoin before the mark was on disk.
        self.older_copy_kept
            .get_or_init(|| async {
                tracing::warn!(
                    node = self.me.id,
                    incarnation = self.incarnation(),
                    later = later.incarnation,
                    at = %later.addr,
                    status = %later.status,
                    "this data directory is an older copy of this node's: the cluster had a later \
                     life of it, which ran on a newer copy. Until the cluster admits this node \
                     again, it grants no raft vote and stands for no election, for its log and \
                     vote are behind what that life voted"
                );
                let record = Arc::clone(&self.record_older_copy);
                let kept = crate::disk::on_disk(move || record()).await;
                if let Some(error) = match kept {
                    Ok(kept) => kept.err().map(|e| e.to_string()),
                    Err(error) => Some(error.to_string()),
                } {
                    tracing::warn!(
                        node = self.me.id,
                        %error,
                        "cannot record in the data directory that it is an older copy: this \
                         process refuses raft votes until admitted, but were it restarted \
                         before, the next start would grant them on its older log. Free the \
                         disk, or let this process run until it rejoins"
                    );
                }
            })
            .await;
    }

    /// Lets raft stand this node for election, or not: not while its data directory is an
    /// older copy not admitted since, whose older log could win an election and elect a
    /// leader that lacks entries the cluster committed. Unless it is raft's only voter: then
    /// nothing newer survives elsewhere, and without it nothing would ever commit.
    pub(super) fn stand_for_election(&self) {
        let alone = self.voters() == [self.me.id];
        let unsure = self.older_copy.load(Ordering::SeqCst) || !self.vouched.load(Ordering::SeqCst);
        self.raft.runtime_config().elect(!unsure || alone);
    }

    /// Whether this process grants raft votes: admitted, or its directory known not to be an
    /// older copy (see [`Supervisor::vouch`]).
    pub(super) fn grants_votes(&self) -> bool {
        !self.fresh.load(Ordering::SeqCst) && self.vouched.load(Ordering::SeqCst)
    }

    /// [`Supervisor::ask_to_join`] of this node, which leads: once, through its own raft.
    async fn join_here(&self) -> std::result::Result<Outcome, (String, SupervisorError)> {
        let join = self.join_request();
        let asked = join.incarnation;
        match self.admit(join).await {
            (Ok(outcome), state) => {
                if outcome.is_ok() && self.incarnation() == asked {
                    if let Some(state) = state {
                        self.keep_head_start(asked, state);
                    }
                    self.admit_life_asked(self.asked_since(asked));
                }
                Ok(outcome)
            }
            (Err(error), _) => Err(("this node".into(), SupervisorError::Raft(error.to_string()))),
        }
    }

    /// The newest view of the cluster among those `peers` give.
    async fn newest_view(&self, peers: &[(&u64, &NodeRecord)]) -> Option<Box<View>> {
        let asks = peers.iter().map(|&(&peer, record)| {
            self.transport.set_peer(peer, record.addr.clone());
            async move {
                match self.call(peer, &Request::State, self.config.rpc_timeout).await {
                    Ok(Response::View(view)) => Some(view),
                    Ok(_) => None,
                    Err(error) => {
                        tracing::debug!(node = self.me.id, peer, %error, "fence check: peer did not answer");
                        None
                    }
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().max_by_key(|v| v.state.epoch)
    }
}
