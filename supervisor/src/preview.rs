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
    /// The nodes that would take part: send, receive, rebuild, or copy or hold replicas.
    pub participants: BTreeSet<u64>,
    /// What would move, per service.
    pub plan: MigrationPlan,
}

/// What a preview found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Previewed {
    /// The change would begin, with this plan.
    Begins(Preview),
    /// The command would begin no change now: the same life asking to join again, a node not
    /// yet in the tree failing, or a change that waits (the last node's failure waits for a
    /// joiner; the locator may refuse a change when its turn comes).
    Nothing,
    /// A change ahead could not be played out (one of its participants' reports refused):
    /// the preview cannot tell what would come after it.
    Unknown {
        /// The change that did not end.
        stuck: Change,
    },
}

/// What `command` would do to the cluster in `state`: every change ahead of it carried out as
/// if each participant reported done, then its own begun. `state` is left as it was. Refused
/// as the cluster would refuse the command itself (an unknown node, the last one).
pub fn preview(state: &ClusterState, command: &Command) -> Result<Previewed, Refusal> {
    let mut state = state.clone();
    let epoch_now = state.epoch;
    state.apply(command)?;
    let mut ahead = Vec::new();
    while let Some(progress) = state.in_progress.as_ref() {
        // Begun by this command, not one under way before it that names the same node (a
        // failure previewed while that node's join goes on).
        if progress.epoch > epoch_now && is_its_change(command, &progress.change) {
            return Ok(Previewed::Begins(Preview {
                epoch_now,
                ahead,
                change: progress.change.clone(),
                epoch: progress.epoch,
                participants: progress.participants.clone(),
                plan: progress.plan.clone(),
            }));
        }
        let (epoch, change) = (progress.epoch, progress.change.clone());
        for node in progress.participants.clone() {
            // Each participant's report, as it would come.
            let _ = state.apply(&Command::MigrationDone { node, epoch });
        }
        if state.in_progress.as_ref().is_some_and(|p| p.epoch == epoch) {
            return Ok(Previewed::Unknown { stuck: change });
        }
        ahead.push(change);
    }
    Ok(Previewed::Nothing)
}

/// Whether `change` is the one `command` asks for.
fn is_its_change(command: &Command, change: &Change) -> bool {
    match (command, change) {
        (Command::Join { node, .. }, Change::Add { node: n, .. }) => n.0 == *node,
        (Command::Leave { node } | Command::Evict { node }, Change::Evict(n)) => n.0 == *node,
        (
            Command::Fail { node, .. } | Command::Dead { node, .. },
            Change::Fail(n) | Change::Recover(n),
        ) => n.0 == *node,
        _ => false,
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

    fn begins(previewed: Result<Previewed, Refusal>) -> Preview {
        match previewed {
            Ok(Previewed::Begins(preview)) => preview,
            other => panic!("no change would begin: {other:?}"),
        }
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
        let preview = begins(preview(&state, &evict));
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
        let preview = begins(preview(&state, &Command::Evict { node: 2 }));
        assert_eq!(preview.ahead.len(), 1, "{:?}", preview.ahead);
        assert!(matches!(preview.ahead[0], Change::Add { node: NodeId(5), .. }));
        assert_eq!(preview.epoch, state.epoch + 1);
        // Node 5 is in the configuration node 2 leaves: it may receive.
        settle(&mut state);
        state.apply(&Command::Evict { node: 2 }).expect("evicts");
        assert_eq!(state.in_progress.expect("begun").plan, preview.plan);
    }

    /// A failure goes to the head of the queue, and a node's own join under way is not its
    /// failure's plan.
    #[test]
    fn a_failure_of_a_node_still_joining_is_planned_as_its_recovery_ahead_of_the_queue() {
        let mut state = stable(4);
        state.apply(&join(5)).expect("joins");
        state.apply(&Command::Evict { node: 2 }).expect("queued");
        let failed = begins(preview(&state, &Command::Dead { node: 5, incarnation: 1 }));
        assert!(matches!(failed.change, Change::Fail(NodeId(5)) | Change::Recover(NodeId(5))));
        assert!(failed.epoch > state.epoch, "{failed:?}");
        assert!(!failed.ahead.contains(&Change::Evict(NodeId(2))), "{:?}", failed.ahead);
        assert!(!failed.participants.contains(&5), "the dead take no part");
    }

    #[test]
    fn a_join_and_a_failure_are_previewed_and_refusals_are_the_cluster_s_own() {
        let state = stable(3);
        let joined = begins(preview(&state, &join(9)));
        assert_eq!(joined.plan.receivers(), BTreeSet::from([NodeId(9)]));
        let failed = begins(preview(&state, &Command::Dead { node: 2, incarnation: 1 }));
        assert_eq!(failed.change, Change::Fail(NodeId(2)));
        assert!(!failed.participants.contains(&2), "the dead take no part");
        assert_eq!(preview(&state, &Command::Evict { node: 7 }), Err(Refusal::UnknownNode(7)));
        assert_eq!(preview(&state, &join(2)), Ok(Previewed::Nothing), "the same life asking again");
        // A node that failed comes back as its next life (`gobelins plan join --node-id`).
        let mut lost_2 = state.clone();
        lost_2.apply(&Command::Dead { node: 2, incarnation: 1 }).expect("fails");
        settle(&mut lost_2);
        let again =
            Command::Join { node: 2, addr: "n2".into(), labels: Labels::new(), incarnation: 2 };
        assert_eq!(
            begins(preview(&lost_2, &again)).change,
            Change::Add { node: NodeId(2), labels: Labels::new() }
        );
        assert!(matches!(preview(&lost_2, &join(2)), Err(Refusal::StaleIncarnation { .. })));
        let alone = stable(1);
        assert_eq!(preview(&alone, &Command::Evict { node: 1 }), Err(Refusal::LastNode(1)));
    }
}
