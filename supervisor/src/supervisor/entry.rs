//! How a node enters the cluster: a bootstrap, a join through a seed, a new life after a failure.

use super::{Lifecycle, Supervisor, SEED_WAITS};
use crate::error::{Result, SupervisorError};
use crate::lane;
use crate::rpc::{Request, Response};
use crate::state::{Applied, Command, NodeStatus, Outcome, Refusal};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One call of [`Supervisor::join_via`] asking for `incarnation`, until it ends or is dropped.
pub(super) struct Asking<'a> {
    supervisor: &'a Supervisor,
    incarnation: u64,
}

impl<'a> Asking<'a> {
    pub(super) fn new(supervisor: &'a Supervisor, incarnation: u64) -> Self {
        let mut asking = supervisor.asking.lock().expect("asking");
        asking.entry(incarnation).or_insert((0, Instant::now())).0 += 1;
        Asking { supervisor, incarnation }
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut asking = self.supervisor.asking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((count, _)) = asking.get_mut(&self.incarnation) {
            *count -= 1;
            if *count == 0 {
                asking.remove(&self.incarnation);
            }
        }
    }
}

impl Supervisor {
    /// Makes this node the first member of a new cluster.
    pub async fn bootstrap(&self) -> Result<Outcome> {
        self.start_raft_alone().await?;
        self.join_own_cluster().await
    }

    /// Gives the new cluster's tree its label levels, if any, and joins it as its first
    /// member. A refusal (a `--label` that is not a level, say) is an error: taken for an
    /// admission, it left a cluster without a member that said it was bootstrapped.
    async fn join_own_cluster(&self) -> Result<Outcome> {
        let refused = |refusal: Refusal| {
            SupervisorError::Refused(format!(
                "{refusal}. The bootstrap stopped half-way, before this node was a member: \
                 start the agent again with the same --data-dir, mended flags and without \
                 --bootstrap to finish it"
            ))
        };
        if !self.config.label_levels.is_empty() {
            let levels = self.config.label_levels.clone();
            let shape = Command::Shape { levels };
            self.propose_until(shape, Duration::from_secs(10)).await?.map_err(refused)?;
        }
        let outcome = self.propose_until(self.join_command(), Duration::from_secs(10)).await?;
        let outcome = outcome.map_err(refused)?;
        self.admit_life();
        Ok(Ok(outcome))
    }

    /// The first half of [`Supervisor::bootstrap`]: raft started with this node its only
    /// voter, and no node in the cluster's state yet.
    pub async fn start_raft_alone(&self) -> Result<()> {
        let members = BTreeMap::from([(self.me.id, BasicNode::new(&self.me.addr))]);
        self.raft.initialize(members).await.map_err(|e| SupervisorError::Raft(e.to_string()))
    }

    /// Finishes a bootstrap that stopped between its two halves (killed, or its own join not
    /// committed in time): raft holds this node alone and the cluster's state no node at all,
    /// which no other history leaves. A joiner's raft always lists the node it joined through.
    /// `None` if there is nothing to finish.
    pub async fn finish_bootstrap(&self) -> Result<Option<Outcome>> {
        let alone = self.voters_in_store().await? == [self.me.id];
        if !alone || !self.state().nodes.is_empty() {
            return Ok(None);
        }
        self.join_own_cluster().await.map(Some)
    }

    /// [`Supervisor::finish_bootstrap`] for a node whose data directory says it began a
    /// bootstrap (see [`crate::datadir::DataDir::mark_bootstrapping`]): one that stopped before
    /// raft kept anything, which left raft without members and the state without nodes, is
    /// run again whole.
    pub async fn finish_begun_bootstrap(&self) -> Result<Option<Outcome>> {
        let memberless = self.voters_in_store().await?.is_empty();
        if memberless && self.state().nodes.is_empty() {
            return self.bootstrap().await.map(Some);
        }
        self.finish_bootstrap().await
    }

    /// The voters of the membership raft loaded from its store, asked of raft's core. Its
    /// metrics may not show that membership yet just after a start: read there, a bootstrap
    /// refused and started again looked memberless, was initialized a second time, and the
    /// agent exited on raft's refusal.
    async fn voters_in_store(&self) -> Result<Vec<u64>> {
        self.raft
            .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
            .await
            .map_err(|e| SupervisorError::Raft(e.to_string()))
    }

    /// Lets this process's life serve: its host is fed the cluster's state from now on, and
    /// its lease runs from now. For a node alone in its cluster, which nobody can declare
    /// failed; a join's admission leases from its ask.
    pub fn admit_life(&self) {
        self.admit_life_asked(Instant::now());
    }

    /// [`Supervisor::admit_life`], the lease running from `asked`, when this process began to
    /// ask to be admitted: the cluster watches the node from the join's commit, after that,
    /// and declares it failed a failure timeout later if it stays silent. Leased from the
    /// answer's arrival, a process frozen while the answer waited served for half a failure
    /// timeout after it woke, when the cluster may have rebuilt its entries elsewhere.
    pub(super) fn admit_life_asked(&self, asked: Instant) {
        self.admitted.store(true, Ordering::SeqCst);
        self.vouched.store(true, Ordering::SeqCst);
        self.asked_back.store(false, Ordering::SeqCst);
        self.held_back.send_replace(None);
        // Admitted, its log is caught up to what the cluster committed before its join.
        self.older_copy.store(false, Ordering::SeqCst);
        self.stand_for_election();
        if self.fresh.swap(false, Ordering::SeqCst) {
            let (record, node) = (Arc::clone(&self.admitted_first), self.me.id);
            let record = move || {
                if let Err(error) = record() {
                    // Kept, the mark only makes the next start refuse votes until it is admitted.
                    tracing::warn!(node, %error, "cannot record in the data directory that this node was admitted");
                }
            };
            // Off the workers where that is safe: the disk's sync would hold one while the
            // change that admits this node sends it its entries.
            if crate::disk::off_workers() {
                tokio::task::spawn_blocking(record);
            } else {
                record();
            }
        }
        // The cluster just vouched for this node: it may serve until the leader's pings take over.
        self.host.lease(asked + self.lease_span());
        self.wake.notify_one();
    }

    /// When the calls still asking the cluster to admit `life` began to; now if none is (its
    /// callers hold an ask, or saw one).
    pub(super) fn asked_since(&self, life: u64) -> Instant {
        let asking = self.asking.lock().expect("asking");
        asking.get(&life).map_or_else(Instant::now, |&(_, since)| since)
    }

    /// Whether this process's life was admitted by the cluster.
    pub fn life_admitted(&self) -> bool {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Whether this process made its current incarnation (renewed it, or wrote it at its first
    /// start): a restarted process's own log, read from disk, holds the life an earlier run
    /// served, which it did not make.
    pub fn life_made_here(&self) -> bool {
        let life = self.incarnation();
        self.renewed_to.load(Ordering::SeqCst) == life || self.made_at_start == Some(life)
    }

    /// Asks the cluster at `seed` to admit this node; retries until `deadline`.
    pub async fn join_via(&self, seed: &str, deadline: Duration) -> Result<Outcome> {
        let _asking = Asking::new(self, self.incarnation());
        self.ask_to_join(seed, deadline).await
    }

    /// [`Supervisor::join_via`], the asking.
    pub(super) async fn ask_to_join(&self, seed: &str, deadline: Duration) -> Result<Outcome> {
        let until = Instant::now() + deadline;
        let mut last = String::from("no attempt");
        // The seed answered, and only the cluster's recovery of this node's last life stood in
        // the way: the seed is fine, and the advice must say so.
        let mut recovering = false;
        let mut warned = false;
        while Instant::now() < until {
            if !warned && last != "no attempt" {
                warned = true;
                gobelins_adaptation::log_budget::budgeted(
                    &self.seed_waits,
                    SEED_WAITS,
                    || tracing::warn!(%seed, error = %last, "cannot join through the seed yet; retrying for {} s", deadline.as_secs()),
                );
            }
            // Built again for every attempt: this process may have moved to a new life
            // meanwhile (its fence check found the last one ended and rejoined as the next).
            let join = self.join_request();
            let asked = join.incarnation;
            // This call asks as that life now, whatever life it began asking as: a change that
            // admits it as it begins looks for an ask of it (`own_join_begun`).
            let _asking = Asking::new(self, asked);
            let bytes = lane::request(&Request::Join(join))?;
            // The answer vouches for this node as of no earlier than now: a lease counted from
            // later would outlast it. (This call's own ask may be for a life it has left.)
            let sent = Instant::now();
            match self.transport.call_addr(seed, bytes, self.config.rpc_timeout * 3).await {
                Ok((_, reply)) => {
                    match lane::decode_response(reply).map_err(|e| match e {
                        // The seed will not get better by asking it again, but the cluster may
                        // take the join through another member.
                        SupervisorError::PeerStopped(_) => SupervisorError::Refused(format!(
                        "{seed} takes no joins: {e}. Join through another member of the cluster"
                    )),
                        e => e,
                    })? {
                        // An answer for a life this process left while it was on its way (its
                        // fence check found it ended and rejoined as the next): what it says of
                        // that life, even "already a member" (the new one, admitted meanwhile),
                        // is no word on this one. Asked again as the new life, the cluster says
                        // where its join stands.
                        Response::Admitted { outcome, .. } if self.incarnation() != asked => {
                            // Not kept as the last error: the seed refuses nothing.
                            tracing::debug!(asked, ?outcome, "answered for a life left since");
                            continue;
                        }
                        // The cluster is still recovering this node's last life: it will take
                        // the new one once that is done.
                        Response::Admitted {
                            outcome: Ok(Err(refusal @ Refusal::Recovering(_))),
                            ..
                        } => {
                            recovering = true;
                            last = refusal.to_string();
                        }
                        // A join always begins a change or waits for one, which this process must
                        // take part in: a life whose join ended already was served by another run
                        // of this node, whose memory this one does not have.
                        Response::Admitted {
                            outcome: Ok(Ok(Applied::Recorded { .. })), ..
                        } if !self.life_admitted() => {
                            return Err(SupervisorError::Refused(format!(
                            "node {}'s life {} is already active in the cluster, but this process \
                             never served it: its entries are elsewhere, and serving them empty \
                             would lose them. An agent restarted from its data directory (this \
                             one, started again) recovers that life by itself and rejoins as a new \
                             one: no join is needed",
                            self.me.id,
                            self.incarnation()
                        )));
                        }
                        Response::Admitted { outcome: Ok(outcome), state } => {
                            // Renewed since the arm above looked, it is the new life's join
                            // that admits it.
                            if outcome.is_ok() && self.incarnation() == asked {
                                if let Some(state) = state {
                                    self.keep_head_start(asked, state);
                                }
                                self.admit_life_asked(self.asked_since(asked).min(sent));
                            }
                            return Ok(outcome);
                        }
                        Response::Admitted { outcome: Err(e), .. } => {
                            (recovering, last) = (false, e.to_string())
                        }
                        _ => {
                            (recovering, last) =
                                (false, "seed answered with the wrong message".into())
                        }
                    }
                }
                // A refused handshake will not get better by retrying: wrong secret or cluster.
                Err(e @ SupervisorError::Handshake { .. }) => return Err(e),
                Err(SupervisorError::SecretDiffers { peer, reason }) => {
                    return Err(SupervisorError::Handshake { peer, reason })
                }
                Err(e) => (recovering, last) = (false, e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let advice = if recovering {
            "the seed answered, but the change that deals with this node's last life has not \
             finished: `gobelins status` on a member shows the change under way and what it \
             waits for"
        } else {
            "is an agent of this cluster running there?"
        };
        Err(SupervisorError::Config(format!("could not join through {seed}: {last}; {advice}")))
    }

    /// Whether the cluster counts this node's current life as a member, asked through `seed`
    /// and the members this node's own state lists, all at once; `None` if none gave an answer
    /// to trust before `deadline`. Silence is asked again rather than taken for "no": a seed
    /// that answers a join a moment later would admit the same life again, served from empty
    /// services. An answer from a copy of the state older than this node's own is asked again
    /// too: it may not have heard of this node's join yet. A seed that holds another secret
    /// is an error: one of another cluster than this directory's was taken for a seed down,
    /// and the node resumed its old cluster alone on its own state, instead of the one asked
    /// for.
    pub async fn last_life_is_member(
        &self,
        seed: &str,
        deadline: Duration,
    ) -> Result<Option<bool>> {
        let until = Instant::now() + deadline;
        let own = self.state();
        // The members by id too: the handshake names each, so that a node that now holds one's
        // address, or a relay, refuses rather than admits this node's proof.
        let mut asked: Vec<(String, Option<u64>)> = vec![(seed.to_string(), None)];
        asked.extend(
            own.nodes
                .iter()
                .filter(|(&id, r)| id != self.me.id && r.status.is_live() && r.addr != seed)
                .map(|(&id, r)| (r.addr.clone(), Some(id))),
        );
        // The seed alone first: every answer carries the whole state.
        let mut round = 1;
        loop {
            let answers =
                futures::future::join_all(asked[..round].iter().map(|(addr, id)| async move {
                    let Ok(bytes) = lane::request(&Request::State) else { return Ok(None) };
                    let timeout = self.config.rpc_timeout;
                    let called = match *id {
                        Some(id) => self.transport.call_addr_as(id, addr, bytes, timeout).await,
                        None => self.transport.call_addr(addr, bytes, timeout).await,
                    };
                    let reply = match called {
                        Ok((_, reply)) => reply,
                        // A seed of another cluster (what matters of the seed's answer below),
                        // not a refusal for now: a member's id on another address until the
                        // cluster declares that life failed, or an address another node took.
                        Err(SupervisorError::SecretDiffers { peer, reason }) => {
                            return Err(SupervisorError::Handshake { peer, reason })
                        }
                        Err(_) => return Ok(None),
                    };
                    Ok(match lane::decode_response(reply) {
                        Ok(Response::View(view)) => Some(view.state),
                        _ => None,
                    })
                }))
                .await;
            let mut answers = answers.into_iter();
            // Only the seed's: a member of this node's own state that proves another secret
            // is the odd one (see `members_with_another_secret`).
            let seed_said = answers.next().expect("the seed is asked first");
            let answers = seed_said?.into_iter().chain(answers.flatten().flatten());
            round = asked.len();
            // The first of the newest: the seed's, when it is as new as any.
            let newest = answers.reduce(|a, b| if b.epoch > a.epoch { b } else { a });
            if let Some(state) = newest.filter(|s| s.epoch >= own.epoch) {
                return Ok(Some(
                    state
                        .nodes
                        .get(&self.me.id)
                        .is_some_and(|r| r.incarnation == self.incarnation() && r.status.is_live()),
                ));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            tracing::debug!(%seed, "no answer to trust yet on this node's last life; asking again");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether this node's own copy of the state counts its current life as joining or active.
    /// A leaving life is left out: a node removed from raft as it left never applies the entry
    /// that ends it, so its own copy may say "leaving" for ever.
    pub fn last_life_is_member_here(&self) -> bool {
        self.state().nodes.get(&self.me.id).is_some_and(|r| {
            r.incarnation == self.incarnation()
                && matches!(r.status, NodeStatus::Joining | NodeStatus::Active)
        })
    }

    /// Joins through `seed`; a node the cluster remembers as departed comes back as a new life
    /// of itself (a higher incarnation, persisted first). With `wait_holds`, a node held out
    /// for failing again and again waits its hold out (at most five minutes) and asks again,
    /// rather than stop: its operator started it to have it back.
    pub async fn join_cluster(
        &self,
        seed: &str,
        deadline: Duration,
        wait_holds: bool,
    ) -> Result<Outcome> {
        let mut renewed = false;
        loop {
            match self.join_via(seed, deadline).await? {
                // Asked again every few seconds rather than at the end: an operator's
                // `unhold`, or a leader that never saw the failures, may let it in sooner.
                Err(refusal @ Refusal::Held { left_ms, .. }) if wait_holds => {
                    if self.note_held(&refusal) {
                        tracing::warn!(node = self.me.id, "rejoin held back: {refusal}");
                    }
                    let wait = Duration::from_millis(left_ms) + self.config.ping_interval;
                    tokio::time::sleep(wait.min(self.config.failure_timeout * 3)).await;
                }
                // Noted all the same (`gobelins join` on a held node): requests waiting here
                // learn of it now, not at the next fence check.
                Err(refusal @ Refusal::Held { .. }) => {
                    self.note_held(&refusal);
                    return Ok(Err(refusal));
                }
                Err(Refusal::StaleIncarnation { last, .. }) if !renewed => {
                    // The life that ended may be this process's own (`gobelins join` asked of
                    // an agent declared failed before its own check noticed): its services'
                    // memory must not come back with the new life.
                    if last >= self.incarnation() {
                        self.start_services_afresh(last);
                    }
                    self.renew_incarnation(last)?;
                    renewed = true;
                }
                outcome => return Ok(outcome),
            }
        }
    }

    /// Moves to an incarnation above `seen` (the last one the cluster knows), persisted before it
    /// is used; returns the incarnation now in force.
    pub fn renew_incarnation(&self, seen: u64) -> Result<u64> {
        let _renewing = self.renewing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = self.incarnation().max(seen + 1);
        if next != self.incarnation() {
            // Routine for a node started again once it left or failed; the line that says a
            // life ended under this process is the warning.
            tracing::info!(node = self.me.id, incarnation = next, "joining as a new incarnation");
            (self.save_incarnation)(next)?;
            self.renewed_to.store(next, Ordering::SeqCst);
            // Under the lifecycle's lock, which the duties take to judge "left" by the
            // incarnation: a node restarted with --join replays the record of its last life as
            // left, and that must not end the new life.
            self.lifecycle.send_modify(|lifecycle| {
                self.incarnation.store(next, Ordering::SeqCst);
                if *lifecycle == Lifecycle::Left {
                    *lifecycle = Lifecycle::Member;
                }
            });
        }
        Ok(next)
    }
}
