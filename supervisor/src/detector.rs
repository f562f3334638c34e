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
mod tests {
    use super::*;

    fn members(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    fn confirms(actions: &[Action]) -> Vec<&Action> {
        actions.iter().filter(|a| !matches!(a, Action::Ping(_))).collect()
    }

    #[test]
    fn silence_is_shown_from_late_on_and_suspects_are_marked() {
        let start = Instant::now();
        let late = Duration::from_millis(500);
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3]);
        d.handle_tick(start, &m);
        let at = |ms| start + Duration::from_millis(ms);
        d.handle_pong(3, at(400));
        assert!(d.silent(at(450), late).is_empty(), "nobody late yet");
        let silent = d.silent(at(600), late);
        assert_eq!(silent, BTreeMap::from([(2, (Duration::from_millis(600), false))]));
        d.handle_pong(3, at(1000));
        assert_eq!(confirms(&d.handle_tick(at(1000), &m)).len(), 1, "node 2 is suspected");
        assert_eq!(d.silent(at(1000), late)[&2], (Duration::from_secs(1), true));
        assert!(!d.silent(at(1000), late).contains_key(&3), "node 3 answered");
        d.handle_probes(2, &[true], at(1100));
        assert!(d.silent(at(1100), late).is_empty(), "a witness reached node 2");
    }

    #[test]
    fn a_node_that_answers_is_never_suspected() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3]);
        for tick in 0..50u64 {
            let now = start + Duration::from_millis(tick * 100);
            let actions = d.handle_tick(now, &m);
            assert_eq!(actions, vec![Action::Ping(2), Action::Ping(3)]);
            d.handle_pong(2, now);
            d.handle_pong(3, now);
        }
    }

    #[test]
    fn a_silent_node_is_confirmed_by_witnesses_then_declared_failed() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3, 4]);
        d.handle_tick(start, &m);
        let later = start + Duration::from_millis(999);
        d.handle_pong(3, later);
        d.handle_pong(4, later);
        assert!(confirms(&d.handle_tick(later, &m)).is_empty(), "not yet: 999 ms");
        let at = start + Duration::from_secs(1);
        let actions = d.handle_tick(at, &m);
        assert_eq!(
            confirms(&actions),
            vec![&Action::Confirm { suspect: 2, witnesses: vec![3, 4] }]
        );
        // While confirming, the suspect is not confirmed twice.
        assert!(confirms(&d.handle_tick(at + Duration::from_millis(100), &m)).is_empty());
        assert_eq!(d.handle_probes(2, &[false, false], at), Some(Action::DeclareFailed(2)));
    }

    /// After the whole cluster stopped, the leader's life and another voter's have ended, and
    /// node 3 is the last member: it is judged by that voter's probe, not by the leader's
    /// silence alone.
    #[test]
    fn the_last_member_is_confirmed_by_a_voter_that_is_no_member() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let (m, also) = (members(&[3]), members(&[2]));
        d.handle_tick_asking(start, &m, &also);
        let at = start + Duration::from_secs(1);
        assert_eq!(
            confirms(&d.handle_tick_asking(at, &m, &also)),
            vec![&Action::Confirm { suspect: 3, witnesses: vec![2] }]
        );
        // With other members, all suspects at once, the verdicts wait: no voter outside them
        // decides.
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m2 = members(&[1, 2, 3]);
        d.handle_tick_asking(start, &m2, &members(&[4]));
        let actions = d.handle_tick_asking(at, &m2, &members(&[4]));
        assert_eq!(
            confirms(&actions),
            vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }],
            "node 3, a suspect too, waits for node 2's verdict"
        );
        // Asked nobody, the leader declares it at once.
        let mut alone = Detector::new(1, Duration::from_secs(1), 2);
        alone.handle_tick(start, &m);
        assert_eq!(confirms(&alone.handle_tick(at, &m)), vec![&Action::DeclareFailed(3)]);
    }

    #[test]
    fn a_suspect_a_witness_reaches_gets_another_full_timeout() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3]);
        d.handle_tick(start, &m);
        let at = start + Duration::from_secs(1);
        d.handle_pong(3, at);
        assert_eq!(
            confirms(&d.handle_tick(at, &m)),
            vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }]
        );
        assert_eq!(d.handle_probes(2, &[true], at), None);
        d.handle_pong(3, at + Duration::from_millis(900));
        assert!(confirms(&d.handle_tick(at + Duration::from_millis(900), &m)).is_empty());
    }

    #[test]
    fn a_suspect_only_witnesses_reach_is_declared_cut_off_after_a_few_rounds() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3]);
        d.handle_tick(start, &m);
        let mut at = start;
        for round in 1..=CUT_OFF_ROUNDS {
            at += Duration::from_secs(1);
            d.handle_pong(3, at);
            assert_eq!(
                confirms(&d.handle_tick(at, &m)),
                vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }],
                "round {round}"
            );
            let verdict = d.handle_probes(2, &[true], at);
            if round < CUT_OFF_ROUNDS {
                assert_eq!(verdict, None, "round {round}");
            } else {
                assert_eq!(verdict, Some(Action::DeclareCutOff(2)));
            }
        }
    }

    #[test]
    fn a_suspect_the_leader_hears_again_starts_its_count_afresh() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3]);
        d.handle_tick(start, &m);
        let mut at = start;
        for round in 0..CUT_OFF_ROUNDS * 3 {
            at += Duration::from_secs(1);
            d.handle_pong(3, at);
            assert!(!confirms(&d.handle_tick(at, &m)).is_empty(), "suspected in round {round}");
            assert_eq!(d.handle_probes(2, &[true], at), None, "round {round}");
            // Every other round, one ping gets through.
            if round % 2 == 1 {
                d.handle_pong(2, at);
            }
        }
    }

    #[test]
    fn several_nodes_only_the_leader_misses_are_not_declared() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3, 4, 5]);
        d.handle_tick(start, &m);
        let mut at = start;
        for round in 1..=CUT_OFF_ROUNDS * 2 {
            at += Duration::from_secs(1);
            d.handle_pong(4, at);
            d.handle_pong(5, at);
            let suspects: Vec<u64> = confirms(&d.handle_tick(at, &m))
                .iter()
                .filter_map(|a| match a {
                    Action::Confirm { suspect, .. } => Some(*suspect),
                    _ => None,
                })
                .collect();
            assert_eq!(suspects, vec![2, 3], "round {round}");
            let verdicts = [d.handle_probes(2, &[true], at), d.handle_probes(3, &[true], at)];
            for verdict in verdicts.into_iter().flatten() {
                assert_eq!(verdict, Action::Withheld(vec![2, 3]), "round {round}");
            }
        }
        // Node 3 leaves the members: node 2 is declared only after as many rounds alone.
        let m = members(&[1, 2, 4, 5]);
        for round in 1..=CUT_OFF_ROUNDS {
            at += Duration::from_secs(1);
            d.handle_pong(4, at);
            d.handle_pong(5, at);
            assert!(!confirms(&d.handle_tick(at, &m)).is_empty(), "suspected in round {round}");
            let verdict = d.handle_probes(2, &[true], at);
            let expected = (round == CUT_OFF_ROUNDS).then_some(Action::DeclareCutOff(2));
            assert_eq!(verdict, expected, "alone, round {round}");
        }
    }

    #[test]
    fn in_a_cluster_of_two_the_leader_decides_alone() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2]);
        d.handle_tick(start, &m);
        let actions = d.handle_tick(start + Duration::from_secs(2), &m);
        assert_eq!(confirms(&actions), vec![&Action::DeclareFailed(2)]);
    }

    /// Both other nodes of three silent: the first is confirmed through the second, and the
    /// second is not declared for want of a witness. Declared at once, as it was, a node
    /// resumed a moment after the leader lost its life with the one that had really died.
    #[test]
    fn a_node_is_not_declared_for_want_of_witnesses_while_the_others_are_suspects_too() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        let m = members(&[1, 2, 3]);
        let mut at = start;
        while at < start + Duration::from_secs(1) {
            assert!(confirms(&d.handle_tick(at, &m)).is_empty(), "not yet");
            at += Duration::from_millis(100);
        }
        assert_eq!(
            confirms(&d.handle_tick(at, &m)),
            vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }]
        );
        // Node 3 answers; node 2 is dead.
        d.handle_pong(3, at);
        assert_eq!(d.handle_probes(2, &[false], at), Some(Action::DeclareFailed(2)));
        at += Duration::from_millis(100);
        // Node 2 is asked about again until its failure commits; node 3 was heard.
        assert_eq!(
            confirms(&d.handle_tick(at, &m)),
            vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }]
        );
    }

    #[test]
    fn nodes_that_left_are_forgotten() {
        let start = Instant::now();
        let mut d = Detector::new(1, Duration::from_secs(1), 2);
        d.handle_tick(start, &members(&[1, 2, 3]));
        let actions = d.handle_tick(start + Duration::from_secs(5), &members(&[1, 3]));
        assert_eq!(confirms(&actions), vec![&Action::DeclareFailed(3)]);
        assert_eq!(d.handle_probes(2, &[false], start), None, "no longer a member");
    }
}
