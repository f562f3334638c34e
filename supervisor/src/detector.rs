//! The leader's failure detector, as a pure state machine.
//!
//! ```text
//!  handle_tick(now, members) ──▶ Ping(n) for each member; Confirm(n) for each silent too long
//!  handle_pong(n, now)       ──▶ n is alive
//!  handle_probes(n, answers) ──▶ DeclareFailed(n) if no witness reached n; otherwise n gets
//!                                 another full timeout (the leader's own link may be the problem),
//!                                 up to CUT_OFF_ROUNDS times in a row: then DeclareCutOff(n),
//!                                 or Withheld(..) if other nodes only the leader misses too
//! ```
//!
//! Only the leader runs it; a new leader starts with a full grace period for every node, so an
//! election never turns into a false failure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// Suspicions in a row that witnesses clear before a node the leader still cannot reach is
/// declared failed anyway. Such a node is alive but of no use to the cluster: it cannot renew
/// its lease (so it serves nothing), nor learn a configuration (so every change it takes part
/// in waits for it). Cleared for ever, it stalled every later change, the failures of other
/// nodes included, until the cut healed. A few rounds first: a leader's link that drops pings
/// for a moment must not cost a node its life.
pub const CUT_OFF_ROUNDS: u32 = 3;

/// What the detector asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ping this node.
    Ping(u64),
    /// Ask these witnesses whether they can reach the suspect.
    Confirm {
        /// The silent node.
        suspect: u64,
        /// Other members that will try it.
        witnesses: Vec<u64>,
    },
    /// Commit the failure of this node.
    DeclareFailed(u64),
    /// Commit the failure of this node, which witnesses still reach but the leader has not
    /// reached for `CUT_OFF_ROUNDS` suspicions in a row.
    DeclareCutOff(u64),
    /// Nothing is declared: these nodes are all out of the leader's reach while witnesses
    /// reach them, which points at the leader's own links rather than theirs.
    Withheld(Vec<u64>),
}

/// Heartbeat bookkeeping of the leader.
#[derive(Debug)]
pub struct Detector {
    me: u64,
    timeout: Duration,
    witnesses: usize,
    last_heard: BTreeMap<u64, Instant>,
    confirming: BTreeSet<u64>,
    /// Suspicions in a row that witnesses cleared, per node; gone when the leader hears it.
    cleared: BTreeMap<u64, u32>,
}

impl Detector {
    /// A detector for leader `me` that suspects a node silent for `timeout` and asks up to
    /// `witnesses` other members to confirm.
    pub fn new(me: u64, timeout: Duration, witnesses: usize) -> Self {
        Detector {
            me,
            timeout,
            witnesses,
            last_heard: BTreeMap::new(),
            confirming: BTreeSet::new(),
            cleared: BTreeMap::new(),
        }
    }

    /// Called every ping interval with the current members.
    pub fn handle_tick(&mut self, now: Instant, members: &BTreeSet<u64>) -> Vec<Action> {
        self.handle_tick_asking(now, members, &BTreeSet::new())
    }

    /// [`Detector::handle_tick`], with `also` asked to witness for the last member left (the
    /// only one besides the leader): nodes that are no members but may answer (voters whose
    /// life ended, back after the whole cluster stopped). Without them, that member would be
    /// judged on the leader's silence alone. Never while other members are there: when they
    /// are all suspects too, the verdicts wait, and a witness from `also` must not decide.
    pub fn handle_tick_asking(
        &mut self,
        now: Instant,
        members: &BTreeSet<u64>,
        also: &BTreeSet<u64>,
    ) -> Vec<Action> {
        self.last_heard.retain(|n, _| members.contains(n));
        self.confirming.retain(|n| members.contains(n));
        let missed = self.cleared.len();
        self.cleared.retain(|n, _| members.contains(n));
        if self.cleared.len() < missed {
            self.start_counts_afresh();
        }
        let mut actions = Vec::new();
        for &node in members.iter().filter(|&&n| n != self.me) {
            let heard = *self.last_heard.entry(node).or_insert(now);
            actions.push(Action::Ping(node));
            if now.saturating_duration_since(heard) >= self.timeout && self.confirming.insert(node)
            {
                let others = members.iter().any(|&w| w != self.me && w != node);
                let asked = if others { &BTreeSet::new() } else { also };
                let witnesses: Vec<u64> = members
                    .iter()
                    .chain(asked.iter().filter(|w| !members.contains(w)))
                    .copied()
                    .filter(|&w| w != self.me && w != node)
                    .filter(|w| !self.confirming.contains(w))
                    .take(self.witnesses)
                    .collect();
                if witnesses.is_empty() && others {
                    // Every other member is a suspect too. With a quorum acknowledging the
                    // leader that cannot be true of them all: the leader itself was not
                    // listening (its process stopped, its metrics not yet fresh). Asked again
                    // once the others' verdicts are in; declared now, a live node was taken
                    // out alongside a dead one, and the entries they both held were lost.
                    self.confirming.remove(&node);
                } else if witnesses.is_empty() {
                    // Nobody else to ask: the leader's own silence is all the evidence there is.
                    self.confirming.remove(&node);
                    actions.push(Action::DeclareFailed(node));
                } else {
                    actions.push(Action::Confirm { suspect: node, witnesses });
                }
            }
        }
        actions
    }

    /// The members this leader has not heard from for `late` or longer, with for how long, and
    /// whether witnesses are being asked about each (a suspect). Silence is counted from the
    /// last answer, or from when this node began to lead.
    pub fn silent(&self, now: Instant, late: Duration) -> BTreeMap<u64, (Duration, bool)> {
        self.last_heard
            .iter()
            .map(|(&n, &heard)| (n, now.saturating_duration_since(heard)))
            .filter(|&(n, age)| age >= late || self.confirming.contains(&n))
            .map(|(n, age)| (n, (age, self.confirming.contains(&n))))
            .collect()
    }

    /// A node answered a ping.
    pub fn handle_pong(&mut self, node: u64, now: Instant) {
        if let Some(heard) = self.last_heard.get_mut(&node) {
            *heard = now;
            if self.cleared.remove(&node).is_some() {
                self.start_counts_afresh();
            }
        }
    }

    /// After a verdict withheld, or when one of the nodes only the leader missed is heard or
    /// gone: the others must each be the only one missed for `CUT_OFF_ROUNDS` rounds of their
    /// own before they are declared, not carry the rounds they were missed alongside it.
    fn start_counts_afresh(&mut self) {
        self.cleared.values_mut().for_each(|count| *count = 0);
    }

    /// The witnesses answered whether they reached `suspect`.
    pub fn handle_probes(
        &mut self,
        suspect: u64,
        reached: &[bool],
        now: Instant,
    ) -> Option<Action> {
        if !self.confirming.remove(&suspect) {
            return None;
        }
        if reached.iter().any(|&r| r) {
            self.last_heard.insert(suspect, now);
            let cleared = self.cleared.entry(suspect).or_insert(0);
            *cleared += 1;
            if *cleared < CUT_OFF_ROUNDS {
                return None;
            }
            // More than one node only the leader misses: the leader is the odd one out.
            // Declaring them all failed would take healthy nodes out one by one.
            let missed: Vec<u64> = self.cleared.keys().copied().collect();
            if missed.len() > 1 {
                self.start_counts_afresh();
                return Some(Action::Withheld(missed));
            }
            self.cleared.remove(&suspect);
            Some(Action::DeclareCutOff(suspect))
        } else {
            Some(Action::DeclareFailed(suspect))
        }
    }
}

#[cfg(test)]
#[path = "detector_tests.rs"]
mod tests;
