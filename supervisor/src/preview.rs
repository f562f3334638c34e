//! What a change would move if it were asked for now (`gobelins plan`): the cluster's own
//! state machine run on a copy of the state, so that the plan shown is the one the cluster
//! would carry out, not a second computation of it that could drift from the first.

use crate::state::{ClusterState, Command, Refusal};
use gobelins_locator::{Change, MigrationPlan};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A change the cluster would carry out, and what it would move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    /// The epoch the cluster is at.
    pub epoch_now: u64,
    /// Changes in progress or queued that would run first, in order. Each one's plan is made
    /// when it begins, so this one's is made against the configuration they leave.
    pub ahead: Vec<Change>,
    /// The change.
    pub change: Change,
    /// The epoch it would lead to.
    pub epoch: u64,
    /// The nodes that would take part: send, receive, or rebuild.
    pub participants: BTreeSet<u64>,
    /// What would move, per service.
    pub plan: MigrationPlan,
}

/// Changes ahead past which a preview gives up: a queue this long is not waiting on one
/// change but on an operator.
const AHEAD_AT_MOST: usize = 64;

/// What `command` would do to the cluster in `state`: every change ahead of it carried out as
/// if each participant reported done, then its own begun. `state` is left as it was. Refused
/// as the cluster would refuse the command itself (an unknown node, the last one); `None`
/// when it would begin no change (the same life asking to join again, say).
pub fn preview(state: &ClusterState, command: &Command) -> Result<Option<Preview>, Refusal> {
    let mut state = state.clone();
    let epoch_now = state.epoch;
    let mut ahead: Vec<Change> = state.in_progress.iter().map(|p| p.change.clone()).collect();
    ahead.extend(state.queue.iter().cloned());
    let asked = ahead.len();
    state.apply(command)?;
    let Some(target) = command_node(command) else { return Ok(None) };
    for _ in 0..=asked.min(AHEAD_AT_MOST) {
        let Some(progress) = state.in_progress.as_ref() else { break };
        if progress.change.node().is_some_and(|n| n.0 == target) {
            return Ok(Some(Preview {
                epoch_now,
                ahead: ahead
                    .into_iter()
                    .filter(|c| c.node().is_none_or(|n| n.0 != target))
                    .collect(),
                change: progress.change.clone(),
                epoch: progress.epoch,
                participants: progress.participants.clone(),
                plan: progress.plan.clone(),
            }));
        }
        let (epoch, participants) = (progress.epoch, progress.participants.clone());
        for node in participants {
            // A participant's report, as it would come; a refusal would leave it waiting,
            // which the bound on the loop ends.
            let _ = state.apply(&Command::MigrationDone { node, epoch });
        }
    }
    Ok(None)
}

/// The node a command that plans a change is about.
fn command_node(command: &Command) -> Option<u64> {
    match command {
        Command::Join { node, .. }
        | Command::Leave { node }
        | Command::Evict { node }
        | Command::Fail { node, .. }
        | Command::Dead { node, .. } => Some(*node),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NodeStatus;
    use gobelins_locator::{Labels, NodeId, ServiceId, ServiceSpec};

    fn join(node: u64) -> Command {
        Command::Join { node, addr: format!("n{node}"), labels: Labels::new(), incarnation: 1 }
    }

    /// Nodes `1..=n` active, with a service registered, every change carried out.
    fn stable(n: u64) -> ClusterState {
        let mut state = ClusterState::default();
        let spec = ServiceSpec::new(ServiceId(1), "kv");
        state.apply(&Command::Register(spec)).expect("registered");
        for node in 1..=n {
            state.apply(&join(node)).expect("joins");
            settle(&mut state);
        }
        state
    }

    fn settle(state: &mut ClusterState) {
        while let Some(progress) = state.in_progress.clone() {
            for node in progress.participants {
                let _ = state.apply(&Command::MigrationDone { node, epoch: progress.epoch });
            }
        }
    }

    #[test]
    fn an_eviction_previewed_is_the_change_the_cluster_then_carries_out() {
        let state = stable(4);
        let evict = Command::Evict { node: 3 };
        let preview = preview(&state, &evict).expect("accepted").expect("a plan");
        assert_eq!(preview.change, Change::Evict(NodeId(3)));
        assert!(preview.ahead.is_empty());
        assert_eq!(preview.epoch_now, state.epoch);
        assert_eq!(preview.epoch, state.epoch + 1);
        // Only node 3's slots move, to the others.
        assert_eq!(preview.plan.senders(), BTreeSet::from([NodeId(3)]));
        assert!(!preview.plan.receivers().contains(&NodeId(3)));
        let held = state.tree.snapshot(gobelins_locator::Epoch(state.epoch)).expect("snapshot");
        let of_3 = held.table(ServiceId(1)).expect("kv").owners().filter(|&o| o == NodeId(3));
        assert_eq!(preview.plan.moved_slots(), of_3.count() as u64);
        // The state asked about is left as it was; carried out, the change is the same.
        assert_eq!(state.nodes[&3].status, NodeStatus::Active);
        let mut carried = state.clone();
        carried.apply(&evict).expect("evicts");
        let progress = carried.in_progress.expect("begun");
        assert_eq!(progress.plan, preview.plan);
        assert_eq!(progress.participants, preview.participants);
    }

    #[test]
    fn a_change_queued_behind_another_is_planned_against_what_that_one_leaves() {
        let mut state = stable(4);
        state.apply(&join(5)).expect("joins");
        assert!(state.in_progress.is_some(), "node 5's join under way");
        let preview =
            preview(&state, &Command::Evict { node: 2 }).expect("accepted").expect("a plan");
        assert_eq!(preview.ahead.len(), 1, "{:?}", preview.ahead);
        assert!(matches!(preview.ahead[0], Change::Add { node: NodeId(5), .. }));
        assert_eq!(preview.epoch, state.epoch + 1);
        // Node 5 is in the configuration node 2 leaves: it may receive.
        settle(&mut state);
        state.apply(&Command::Evict { node: 2 }).expect("evicts");
        assert_eq!(state.in_progress.expect("begun").plan, preview.plan);
    }

    #[test]
    fn a_join_and_a_failure_are_previewed_and_refusals_are_the_cluster_s_own() {
        let state = stable(3);
        let joined = preview(&state, &join(9)).expect("accepted").expect("a plan");
        assert_eq!(joined.plan.receivers(), BTreeSet::from([NodeId(9)]));
        let failed = preview(&state, &Command::Dead { node: 2, incarnation: 1 });
        let failed = failed.expect("accepted").expect("a plan");
        assert_eq!(failed.change, Change::Fail(NodeId(2)));
        assert!(!failed.participants.contains(&2), "the dead take no part");
        assert_eq!(preview(&state, &Command::Evict { node: 7 }), Err(Refusal::UnknownNode(7)));
        assert_eq!(preview(&state, &join(2)), Ok(None), "the same life asking again");
        let alone = stable(1);
        assert_eq!(preview(&alone, &Command::Evict { node: 1 }), Err(Refusal::LastNode(1)));
    }
}
