//! Which nodes vote in raft: a pure function of raft's voters, the cluster's state and which
//! nodes answer the leader.

use crate::state::{ClusterState, NodeStatus};
use std::collections::BTreeSet;

/// The voters raft should have, for leader `me` whose raft has `voters`, given the cluster's
/// `state`, at most `max` voters, `answers`, whether a node's process answers, and `lags`,
/// whether a node has not kept up with the leader's log of late:
///
/// - a voter keeps its seat while its life is live and not leaving. Its life ended, it keeps
///   it while its process answers: after the whole cluster stopped, each voter started again
///   ends its last life before it rejoins as a new one, with the same id and the same raft
///   log, and its vote is what lets the others recover;
/// - active nodes that answer and keep up fill the empty seats;
/// - a live voter that answers and lags (a disk that takes longer to store an entry than raft
///   waits for its answer) gives its seat to such a node: it counts toward every majority and
///   acknowledges nothing in time, so with one other voter down nothing commits, not even the
///   change that would replace them. With no node to take its seat, it keeps it. A voter that
///   does not answer is the failure detector's to judge: the leader's own link to it may be
///   what fails;
/// - the number is kept odd: a voter more in an even set survives no more failures, and of two
///   voters neither may fail. One that lags steps out first, then one that only just came in,
///   `me` last.
///
/// Asked with `answers` true of the live nodes only, it says whether a change may be due
/// before anyone is pinged.
pub(crate) fn desired_voters(
    me: u64,
    voters: &BTreeSet<u64>,
    state: &ClusterState,
    max: usize,
    answers: impl Fn(u64) -> bool,
    lags: impl Fn(u64) -> bool,
) -> BTreeSet<u64> {
    let status = |id: u64| state.nodes.get(&id).map(|r| r.status);
    let live = |id: u64| status(id).is_some_and(|s| s != NodeStatus::Leaving && s.is_live());
    let slow = |id: u64| id != me && live(id) && answers(id) && lags(id);
    // A leaving node stops voting when its leave begins, not once it has left: it stops its
    // process soon after, and a change of voters needs the votes of the old ones.
    let keeps = |id: u64| match status(id) {
        Some(NodeStatus::Leaving) => false,
        Some(s) if s.is_live() => true,
        Some(NodeStatus::Failed) => id == me || answers(id),
        _ => false,
    };
    let kept = voters.iter().filter(|&&id| keeps(id)).count();
    let mut desired: BTreeSet<u64> =
        voters.iter().copied().filter(|&id| keeps(id) && !slow(id)).collect();
    for id in state.with_status(NodeStatus::Active) {
        if desired.len() >= max {
            break;
        }
        if id == me || (answers(id) && !lags(id)) {
            desired.insert(id);
        }
    }
    // The seats of slow voters nobody took go back to them: fewer voters survive no more.
    for &id in voters.iter().filter(|&&id| slow(id)) {
        if desired.len() >= kept.min(max) {
            break;
        }
        desired.insert(id);
    }
    if desired.len().is_multiple_of(2) {
        let step_out = (desired.iter().rev())
            .find(|&&id| slow(id))
            .or_else(|| desired.iter().rev().find(|&&id| !voters.contains(&id) && id != me))
            .or_else(|| desired.iter().rev().find(|&&id| id != me))
            .copied();
        if let Some(id) = step_out {
            desired.remove(&id);
        }
    }
    desired
}

/// Whether raft can commit a change from its voters to `desired`: joint consensus needs a
/// majority of each, and a change that cannot commit blocks every later one. Only the new
/// majority is asked here; the old one acknowledged the leader, or it would not reconcile.
pub(crate) fn can_commit(desired: &BTreeSet<u64>, answers: impl Fn(u64) -> bool) -> bool {
    desired.iter().filter(|&&id| answers(id)).count() * 2 > desired.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use gobelins_locator::Labels;

    /// A state of nodes `1..=n`, all active, then those in `failed` declared failed.
    fn state(n: u64, failed: &[u64]) -> ClusterState {
        let mut state = ClusterState::default();
        for node in 1..=n {
            let join = Command::Join {
                node,
                addr: format!("n{node}"),
                labels: Labels::new(),
                incarnation: 1,
            };
            state.apply(&join).expect("accepted");
            while let Some(epoch) = state.in_progress.as_ref().map(|p| p.epoch) {
                let participants = state.in_progress.as_ref().expect("change").participants.clone();
                for p in participants {
                    let _ = state.apply(&Command::MigrationDone { node: p, epoch });
                }
            }
        }
        for &node in failed {
            state.apply(&Command::Dead { node, incarnation: 1 }).expect("fails");
        }
        state
    }

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    /// No node lags.
    fn none(_: u64) -> bool {
        false
    }

    /// A node whose disk takes seconds per write answers its pings, and never stores raft's
    /// entries in the time raft waits. Before, it took the seat of a voter that failed, and
    /// the next failure of a voter stopped every commit (a slow-disk audit: a `kill -9` of
    /// node 3, node 4 made a voter, then a `kill -9` of node 2, and the cluster stood still).
    #[test]
    fn a_node_that_lags_is_given_no_seat_and_a_voter_that_lags_gives_its_own_up() {
        let everyone = |_: u64| true;
        let lags = |n: u64| n == 4;
        // Node 3 failed: node 4 answers but lags; better one voter than a seat that never
        // votes in time.
        let failed = state(4, &[3]);
        assert_eq!(desired_voters(1, &set(&[1, 2, 3]), &failed, 5, |n| n != 3, lags), set(&[1]));
        // Node 4, a voter that lags, gives its seat up to nodes that keep up.
        let five = state(5, &[]);
        let voters = set(&[1, 2, 4]);
        assert_eq!(desired_voters(1, &voters, &five, 5, everyone, lags), set(&[1, 2, 3]));
        // With nobody to take their seats, voters that lag keep them: a seat given up for
        // nothing leaves fewer voters, not more that answer.
        let lag = |n: u64| n == 3 || n == 4;
        let all = set(&[1, 2, 3, 4, 5]);
        assert_eq!(desired_voters(1, &all, &five, 5, everyone, lag), all);
        let three = set(&[1, 2, 3]);
        assert_eq!(desired_voters(1, &three, &state(3, &[]), 5, everyone, |n| n == 3), three);
        // One that lags and does not answer is the detector's: the leader's link may be the
        // fault, and its seat stays.
        assert_eq!(desired_voters(1, &voters, &five, 5, |n| n != 4, lags), all);
        // The leader never lags in its own eyes; a voter that stops lagging is given a seat.
        assert_eq!(desired_voters(4, &voters, &five, 5, everyone, lags), set(&[1, 2, 3, 4, 5]));
        assert_eq!(
            desired_voters(1, &set(&[1, 2, 5]), &five, 5, everyone, none),
            set(&[1, 2, 3, 4, 5])
        );
    }

    #[test]
    fn a_voter_lost_is_replaced_by_an_active_node_that_answers() {
        let state = state(4, &[3]);
        let desired = desired_voters(1, &set(&[1, 2, 3]), &state, 5, |n| n != 3, none);
        assert_eq!(desired, set(&[1, 2, 4]));
        // Node 4 silent (dead, not declared yet): not given the seat.
        let desired = desired_voters(1, &set(&[1, 2, 3]), &state, 5, |n| n == 2, none);
        assert_eq!(desired, set(&[1]), "two voters are one too many to lose none");
    }

    /// The whole cluster stopped; nodes 1 and 2 came back and ended their last lives, node 3
    /// is still down and counted live, node 4 (no voter) never comes back. Before, the seats of
    /// 1 and 2 went to node 4, and the change waited for a majority of {2, 3, 4}.
    #[test]
    fn restarted_voters_keep_their_seats_and_silent_nodes_are_given_none() {
        let state = state(4, &[1, 2]);
        let answers = |n: u64| n == 2;
        let voters = set(&[1, 2, 3]);
        // Without asking, a change looks due.
        assert_eq!(
            desired_voters(1, &voters, &state, 5, |n| state.live().contains(&n), none),
            set(&[1, 3, 4])
        );
        // Asked, nothing changes.
        assert_eq!(desired_voters(1, &voters, &state, 5, answers, none), voters);
    }

    #[test]
    fn a_change_only_a_minority_of_its_voters_answer_cannot_commit() {
        assert!(!can_commit(&set(&[2, 3, 4]), |n| n == 2));
        assert!(can_commit(&set(&[2, 3, 4]), |n| n != 4));
        assert!(!can_commit(&set(&[1, 2]), |n| n == 1));
    }
}
