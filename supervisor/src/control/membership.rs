//! A change asked through the control socket (`join`, `leave`, `evict`): proposed, then
//! followed until the node it names gets where the change takes it.

use super::session::{flush, hung_up, status_json, Reader};
use crate::error::Result;
use crate::rpc::ProposeError;
use crate::rpc::View;
use crate::state::{Applied, ClusterState, Command, NodeStatus, Refusal};
use crate::supervisor::Supervisor;
use gobelins_locator::{Change, NodeId};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a leave, evict or join is followed while nothing carries it on (no leader
/// answers, or no change of the node is under way or queued) before the CLI is told to look
/// again. While the cluster works on it, it is followed to its end, however long its entries
/// take to move: a leave of a node that holds gigabytes took minutes, and its CLI gave up
/// after a minute, exiting in error while the leave went on.
pub(super) const CHANGE_DEADLINE: Duration = Duration::from_secs(60);

/// How often a change's progress is said again, with the time it has taken, when it has not
/// moved: within the CLI's patience between two lines
/// ([`NEXT_LINE_PATIENCE`](super::client::NEXT_LINE_PATIENCE)).
const SAID_AGAIN: Duration = Duration::from_secs(30);

/// How long a leave or evict is proposed again while no leader answers, or the one this node
/// knows cannot be reached.
const PROPOSE_WINDOW: Duration = Duration::from_secs(10);

pub(super) async fn change(
    (read, write): (&mut Reader, &mut tokio::net::unix::OwnedWriteHalf),
    node: &Supervisor,
    command: Command,
    target: u64,
    until: NodeStatus,
    now: bool,
) -> Result<()> {
    // At once: proposing may take a while (through an election, or a leader waiting for its
    // voters), and the CLI takes silence for an agent that stopped.
    flush(write, &[json!({ "progress": "asking the cluster's leader" })]).await?;
    if !now && !roll_call((read, write), node, &command, target).await? {
        tracing::info!(node = target, "the control client went away while its change waited for a silent member; it is not asked for");
        return Ok(());
    }
    // Through an election, whose leader is not known for a moment, or through a leader that
    // just died and that this node still takes for the leader, rather than refused (an `evict`
    // of a node that died with the leader failed in 17 ms). A proposal the unreachable leader
    // received may have committed: sent again, it is refused as `AlreadyLeaving`, which is
    // followed below, or, once the change has ended, as a node already out, which is told as
    // done.
    let give_up = tokio::time::Instant::now() + PROPOSE_WINDOW;
    let proposed = loop {
        match node.propose(command.clone()).await {
            Err(ProposeError::NoLeader | ProposeError::Unreachable(_))
                if tokio::time::Instant::now() < give_up =>
            {
                // An operator's Ctrl-C ends the tries: what is asked again is what nobody waits
                // for any more (one that reached a leader may still commit).
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = hung_up(read, write) => {
                        tracing::info!(node = target, "the control client went away while no leader answered; its change is not asked for again");
                        return Ok(());
                    }
                }
            }
            other => break other,
        }
    };
    match proposed {
        Ok(Ok(Applied::KeptOut)) => {
            let view = node.cluster_view().await;
            let said = format!("node {target} failed already: {KEPT_OUT}");
            flush(write, &[json!({ "progress": said }), json!({ "ok": status_json(&view) })]).await
        }
        Ok(Ok(applied)) => {
            flush(write, &[json!({ "progress": format!("accepted: {applied}") })]).await?;
            wait_for((read, write), node, target, until, renamed(&command, target)).await
        }
        // Told apart only now, from the state of the leader that refused: a node that failed
        // or left is no member, and had been said to be "not a member of this cluster".
        Ok(Err(Refusal::UnknownNode(node_id))) => {
            let view = node.cluster_view().await;
            let status = view.state.nodes.get(&node_id).map(|r| r.status);
            let kept = view.state.nodes.get(&node_id).is_some_and(|r| r.kept_out);
            let evicted = view
                .state
                .nodes
                .get(&node_id)
                .is_some_and(|r| r.removed_by == Some(crate::state::RemovedBy::Evict));
            let why = match status {
                Some(NodeStatus::Failed) if kept => format!("node {node_id} failed already, and is kept out: nothing to do (its entries were rebuilt from their replicas; `gobelins status` lists it)"),
                Some(NodeStatus::Failed) => format!("node {node_id} failed already: nothing to do (its entries were rebuilt from their replicas; `gobelins status` lists it)"),
                // Told as `status` shows it (a helper's run: "left" for a node it said evicted).
                Some(NodeStatus::Left) if evicted => {
                    format!("node {node_id} was evicted already: nothing to do")
                }
                Some(NodeStatus::Left) => format!("node {node_id} left already: nothing to do"),
                _ => Refusal::UnknownNode(node_id).to_string(),
            };
            // An eviction of a node already out got what it asked: a script's `evict 4 ||
            // page-someone` must not page anyone for it, as for a node already on its way out.
            // So did a leave of a node that left (its earlier try, retried through a leader
            // that did not answer, went through; or a `leave` typed again).
            let out = matches!(status, Some(NodeStatus::Failed | NodeStatus::Left));
            let left = status == Some(NodeStatus::Left);
            let done = match command {
                Command::Evict { .. } => out,
                Command::Leave { .. } => left,
                _ => false,
            };
            if done {
                let said = [json!({ "progress": why }), json!({ "ok": status_json(&view) })];
                return flush(write, &said).await;
            }
            flush(write, &[json!({ "error": why })]).await
        }
        // Asked twice (an `evict` through two members, a `leave` typed again after a Ctrl-C, an
        // `evict` of a node that runs `leave`): the node is on its way out already, which is
        // what was asked. Followed like the first ask, not refused: a script's `evict 4 ||
        // page-someone` paged someone for a removal that went through.
        Ok(Err(Refusal::AlreadyLeaving(id))) if id == target => {
            let said = format!("node {id} is already on its way out (a leave or an eviction under way): following it");
            flush(write, &[json!({ "progress": said })]).await?;
            wait_for((read, write), node, target, until, renamed(&command, target)).await
        }
        Ok(Err(refusal)) => flush(write, &[json!({ "error": refusal.to_string() })]).await,
        // A proposal that reached a leader but was not answered in time may still commit.
        Err(e) => {
            let why = format!(
                "{e}; is a majority of the cluster up? The change may still happen: see \
                 `gobelins status` before asking again"
            );
            flush(write, &[json!({ "error": why })]).await
        }
    }
}

/// Failure timeouts a leave or eviction waits for a member that does not answer to answer or
/// be declared failed: past a dead leader's (an election, then a full timeout, then its
/// witnesses: about 3 s of the default 1 s), short of an operator's patience.
const ROLL_CALL_TIMEOUTS: u32 = 6;

/// The longest a roll call waits, whatever the failure timeout (`--failure-timeout-ms` has no
/// bound): short of the CHANGE_DEADLINE a change is followed for while nothing carries it on.
const ROLL_CALL_MAX: Duration = Duration::from_secs(60);

/// Before a leave or an eviction is proposed: waits until every other live member answers,
/// or the cluster has declared the silent ones failed, so that a node killed a moment before
/// has its recovery begin first. Begun after the removal, the recovery could not count the
/// dead node's word that its DSM pages all had copies elsewhere (the removal may have taken
/// copies away), and every page of its slots with no copy reported read as lost, never
/// written ones too, until `gobelins dsm forgive` (1,024 of 4,096 slots in a helper's run).
/// A member silent only to this node is waited for [`ROLL_CALL_TIMEOUTS`], then the change is
/// proposed anyway. Only for a removal the cluster may carry out: one it refuses is refused
/// at once. `false` if the client hung up meanwhile.
async fn roll_call(
    (read, write): (&mut Reader, &mut tokio::net::unix::OwnedWriteHalf),
    node: &Supervisor,
    command: &Command,
    target: u64,
) -> Result<bool> {
    let removal = matches!(command, Command::Leave { .. } | Command::Evict { .. });
    let active = |state: &ClusterState| {
        state.nodes.get(&target).is_some_and(|r| r.status == NodeStatus::Active)
    };
    if !removal || !active(&node.state()) {
        return Ok(true);
    }
    let config = node.config();
    let patience = (config.failure_timeout * ROLL_CALL_TIMEOUTS).min(ROLL_CALL_MAX);
    let began = tokio::time::Instant::now();
    let what = match command {
        Command::Leave { .. } => format!("node {target}'s leave"),
        _ => format!("the eviction of node {target}"),
    };
    // The silent members said, with the life each had then, and when it was last said.
    let mut said: BTreeMap<u64, u64> = BTreeMap::new();
    let mut said_at = began;
    loop {
        let silent = node.unanswering(target).await;
        let state = node.state();
        let ended: Vec<(u64, u64)> =
            said.iter().filter(|(n, _)| !silent.contains(n)).map(|(&n, &l)| (n, l)).collect();
        if !ended.is_empty() {
            let lines: Vec<_> = ended
                .iter()
                .map(|&(n, life)| json!({ "progress": how_it_ended(&state, n, life) }))
                .collect();
            flush(write, &lines).await?;
            said.retain(|n, _| silent.contains(n));
        }
        if silent.is_empty() {
            return Ok(true);
        }
        let named = names(&silent);
        let its = if silent.len() == 1 { "its" } else { "their" };
        let now = tokio::time::Instant::now();
        if now - began >= patience {
            let why = format!(
                "{named} still not answering after {:.1} s, nor declared failed: {what} is asked \
                 for anyway (should {named} be dead, a DSM page of {its} slots that no other node \
                 holds may read as lost until `gobelins dsm forgive`)",
                patience.as_secs_f64()
            );
            tracing::warn!(node = target, silent = ?silent, "{why}");
            flush(write, &[json!({ "progress": why })]).await?;
            return Ok(true);
        }
        let new = silent.iter().any(|n| !said.contains_key(n));
        if new || now - said_at >= SAID_AGAIN {
            let does = if silent.len() == 1 { "does" } else { "do" };
            let so_far = match now - began {
                waited if waited >= SAID_AGAIN => format!(" ({} s so far)", waited.as_secs()),
                _ => String::new(),
            };
            let why = format!(
                "{named} {does} not answer: {what} waits for an answer or for the cluster to \
                 declare {named} failed (at most {:.1} s), so that a recovery goes first: a \
                 dead node's DSM pages are then rebuilt, not read as lost{so_far}",
                patience.as_secs_f64()
            );
            tracing::info!(node = target, silent = ?silent, "{why}");
            flush(write, &[json!({ "progress": why })]).await?;
            for &n in &silent {
                let life = state.nodes.get(&n).map_or(0, |r| r.incarnation);
                said.entry(n).or_insert(life);
            }
            said_at = now;
        }
        tokio::select! {
            () = tokio::time::sleep(config.ping_interval) => {}
            () = hung_up(read, write) => return Ok(false),
        }
    }
}

/// How the wait for `node`, silent in its life `life`, ended, as `state` tells.
fn how_it_ended(state: &ClusterState, node: u64, life: u64) -> String {
    match state.nodes.get(&node) {
        Some(r) if r.incarnation == life && r.status == NodeStatus::Left => {
            format!("node {node} left meanwhile")
        }
        Some(r) if r.incarnation == life && r.status.is_live() => format!("node {node} answered"),
        // Failed, or failed and back as a new life already.
        _ => format!("node {node} was declared failed: recovered first"),
    }
}

/// "node 3", or "nodes 3, 5".
fn names(nodes: &BTreeSet<u64>) -> String {
    let listed: Vec<String> = nodes.iter().map(u64::to_string).collect();
    match listed.len() {
        1 => format!("node {}", listed[0]),
        _ => format!("nodes {}", listed.join(", ")),
    }
}

/// What becomes of a node asked out that had failed, or failed before it was out.
const KEPT_OUT: &str = "the cluster rebuilds its entries from their replicas (`gobelins stats` \
     counts any it could not), and keeps it out: started again from its data directory, its \
     agent stops as left (start it with --join ADDR to bring it back)";

/// The cluster records a leave as the eviction of the leaver, which the operator who typed
/// `leave` would not recognise: the change as recorded, and as shown.
pub(super) fn renamed(command: &Command, target: u64) -> Option<(String, String)> {
    let leaving = matches!(command, Command::Leave { .. });
    leaving.then(|| (format!("evict n{target}"), format!("leave n{target}")))
}

/// Streams progress until `target` reaches `until`, which the cluster records as the change
/// that takes it there ends. Not until the cluster is stable too: the changes queued after
/// it (a rebalance, another node's leave) may take longer than a leaver's agent stays up, and
/// its CLI then read "connection closed" for a leave that had succeeded.
pub(super) async fn wait_for(
    (read, write): (&mut Reader, &mut tokio::net::unix::OwnedWriteHalf),
    node: &Supervisor,
    target: u64,
    until: NodeStatus,
    renamed: Option<(String, String)>,
) -> Result<()> {
    let began = tokio::time::Instant::now();
    // Since when nothing has carried the change on, as far as a leader says.
    let mut idle_since = began;
    let (mut last, mut said_at) = (String::new(), began);
    let mut seen = false;
    loop {
        let view = node.cluster_view().await;
        let status = view.state.nodes.get(&target).map(|r| r.status);
        if status == Some(until) {
            return flush(write, &[json!({ "ok": status_json(&view) })]).await;
        }
        // On its way out, a node that fails is out for good: its entries are rebuilt from
        // their replicas instead of handed over, and "left" never comes.
        if until == NodeStatus::Left && status == Some(NodeStatus::Failed) {
            let why = format!(
                "node {target} failed before it was out (its leave or eviction had not ended): \
                 {KEPT_OUT}"
            );
            return flush(
                write,
                &[json!({ "progress": why }), json!({ "ok": status_json(&view) })],
            )
            .await;
        }
        // Only once the change was seen under way: a leader new since the proposal may not
        // have applied it yet, and its state would then read as a refusal.
        seen |= pending(&view.state, target);
        if let Some(why) = ended_otherwise(&view, target, until).filter(|_| seen) {
            return flush(write, &[json!({ "error": why })]).await;
        }
        let now = tokio::time::Instant::now();
        match idle(&view, target) {
            None => idle_since = now,
            Some(why) if now - idle_since >= CHANGE_DEADLINE => {
                let said = format!(
                    "nothing has carried node {target}'s change on for {} s ({why}); it may \
                     still happen: see `gobelins status`",
                    CHANGE_DEADLINE.as_secs()
                );
                return flush(write, &[json!({ "error": said })]).await;
            }
            Some(_) => {}
        }
        let progress = progress(&view.state, target, renamed.as_ref());
        if progress != last || now - said_at >= SAID_AGAIN {
            let taken = now - began;
            let shown = match taken >= SAID_AGAIN {
                true => format!("{progress} ({} s so far)", taken.as_secs()),
                false => progress.clone(),
            };
            flush(write, &[json!({ "progress": shown })]).await?;
            (last, said_at) = (progress, now);
        }
        // A client gone (an operator's Ctrl-C) is not followed for the rest of the change: each
        // pass asks the leader for the whole state.
        tokio::select! {
            _ = tokio::time::sleep(poll_after(now - began)) => {}
            _ = hung_up(read, write) => {
                tracing::info!(node = target, "the control client went away; the change goes on without it (`gobelins status` follows it)");
                return Ok(());
            }
        }
    }
}

/// How long to wait before asking the leader again, `taken` into a change: every 10 ms at
/// first, where most changes end (a test's, a small node's), then less often: each ask carries
/// the whole state, and a leave that moves gigabytes is followed for minutes.
fn poll_after(taken: Duration) -> Duration {
    match taken.as_secs() {
        0..2 => Duration::from_millis(10),
        2..30 => Duration::from_millis(100),
        _ => Duration::from_millis(500),
    }
}

/// Why nothing carries `target`'s change on in `view`, if so: no leader answered (the view is
/// this node's own), the leader hears from no majority, or no change is under way for the
/// node (its own, or one queued before its own, or a recovery it stays for). A change waiting
/// for a joiner (a dead node last in the tree) carries nothing on.
fn idle(view: &View, target: u64) -> Option<&'static str> {
    if view.leader != Some(view.node) {
        return Some("no leader answers");
    }
    if view.quorum_lost_ms.is_some() {
        return Some("the leader hears from no majority of the voters");
    }
    let state = &view.state;
    let working = state.in_progress.is_some() && pending(state, target);
    (!working).then_some("no change is under way for it")
}

/// Whether a change of `target` is under way or queued, or it stays for a recovery.
fn pending(state: &ClusterState, target: u64) -> bool {
    let its = |c: &Change| c.node() == Some(NodeId(target));
    state.in_progress.as_ref().is_some_and(|p| its(&p.change))
        || state.queue.iter().any(its)
        || state.lingering.contains_key(&target)
}

/// Why `target` will not get to `until` now, if the cluster says so: its change was refused
/// (a leaver put back to work, a joiner forgotten), or it failed while it joined.
fn ended_otherwise(view: &View, target: u64, until: NodeStatus) -> Option<String> {
    let state = &view.state;
    // Only a leader's word: a view of this node's own may predate the change.
    if pending(state, target) || view.leader != Some(view.node) {
        return None;
    }
    let status = state.nodes.get(&target).map(|r| r.status);
    match (until, status) {
        (NodeStatus::Left, Some(NodeStatus::Active)) => Some(format!(
            "the cluster refused to take node {target} out, and it is active again: the \
             leader's log says why (the locator had nowhere to put its entries, say)"
        )),
        (NodeStatus::Active, None) => Some(format!(
            "the cluster refused node {target}'s join and forgot it: the leader's log says why \
             (the locator had no room for it, say)"
        )),
        (NodeStatus::Active, Some(NodeStatus::Failed)) => Some(format!(
            "node {target} failed while it joined: its agent stopped or was cut off (its log \
             says which); started again, it rejoins as a new life"
        )),
        _ => None,
    }
}

/// What the change that takes `target` where it goes is doing now, as one line of progress.
fn progress(state: &ClusterState, target: u64, renamed: Option<&(String, String)>) -> String {
    let stays_for = state.lingering.get(&target).map(|dead| {
        let dead: Vec<String> = dead.iter().map(|n| format!("node {n}")).collect();
        dead.join(", ")
    });
    let own = state.in_progress.as_ref().filter(|p| p.change.node() == Some(NodeId(target)));
    match (&state.in_progress, stays_for) {
        // Its own change ended, yet it is not gone: its leave would otherwise look stuck
        // behind another node's recovery (or behind nothing, while a dead node last in the
        // tree waits for a joiner to be recovered to).
        (_, Some(dead)) if own.is_none() => format!(
            "epoch {}: node {target} has handed over its entries and stays until the recovery \
             of {dead} ends: it holds copies that recovery rebuilds from",
            state.epoch
        ),
        // Its own change under way (a receiver dead already: it will stay once it ends), or
        // another change before it.
        (Some(p), stays_for) => {
            let change = p.change.to_string();
            let change = match renamed {
                Some((recorded, shown)) if *recorded == change => shown.clone(),
                _ => change,
            };
            let then = stays_for.map_or(String::new(), |dead| {
                format!(
                    "; then node {target} stays until the recovery of {dead} ends: it holds \
                     copies that recovery rebuilds from"
                )
            });
            // The last few by name: a change that does not end waits for them.
            let waiting: Vec<String> =
                p.participants.difference(&p.done).map(|n| format!("node {n}")).collect();
            let waiting = match waiting.len() {
                1..=2 => format!(", waiting for {}", waiting.join(" and ")),
                _ => String::new(),
            };
            format!(
                "epoch {}: {change} — {}/{} participants done{waiting}{then}",
                p.epoch,
                p.done.len(),
                p.participants.len()
            )
        }
        (None, _) => {
            let status = state.nodes.get(&target).map(|r| r.status);
            format!("node {target} is {}", status.map_or("unknown".into(), |s| s.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command::{Fail, Join, Leave, MigrationDone, Register};
    use gobelins_locator::{Epoch, ServiceId, ServiceSpec};

    /// Reports every participant of every change done, as the nodes would.
    fn settle(state: &mut ClusterState) {
        while let Some(p) = state.in_progress.clone() {
            for node in p.participants {
                state.apply(&MigrationDone { node, epoch: p.epoch }).expect("a participant");
            }
        }
    }

    /// A stable cluster of nodes 1 to 3 with one service.
    fn three_nodes() -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(&Register(ServiceSpec::new(ServiceId(1), "s").with_slots(64))).unwrap();
        for node in 1..=3 {
            let addr = format!("127.0.0.{node}:7000");
            state.apply(&Join { node, addr, labels: Default::default(), incarnation: 1 }).unwrap();
            settle(&mut state);
        }
        state
    }

    /// `state` as node `node` shows it, `leader` its leader.
    fn view_of(node: u64, leader: Option<u64>, state: &ClusterState) -> View {
        View {
            node,
            leader,
            voters: vec![1, 2, 3],
            state: state.clone(),
            quorum_lost_ms: None,
            silent: Default::default(),
            held: Default::default(),
        }
    }

    #[test]
    fn a_leave_that_stays_for_a_recovery_says_so_and_whose() {
        let mut state = three_nodes();
        let table = state.tree.snapshot(Epoch(state.epoch)).expect("a table");
        let leaver = table.replica_holder(NodeId(1)).expect("a holder").0;
        state.apply(&Leave { node: leaver }).unwrap();
        let renamed = renamed(&Leave { node: leaver }, leaver);
        let said = progress(&state, leaver, renamed.as_ref());
        assert!(said.contains(&format!("leave n{leaver} — 0/")), "{said}");
        // The last participants by name: a change that does not end waits for them.
        let leave = state.in_progress.clone().expect("the leave");
        let last = *leave.participants.iter().next_back().expect("participants");
        let mut most = state.clone();
        for &node in leave.participants.iter().filter(|&&n| n != last) {
            most.apply(&MigrationDone { node, epoch: leave.epoch }).expect("a participant");
        }
        let said = progress(&most, leaver, renamed.as_ref());
        assert!(said.ends_with(&format!("participants done, waiting for node {last}")), "{said}");
        state.apply(&Fail { node: 1, incarnation: 1 }).unwrap();
        // Its leave still under way: said as it is, with what comes after.
        let said = progress(&state, leaver, renamed.as_ref());
        assert!(said.contains(&format!("leave n{leaver} — 0/")), "{said}");
        assert!(said.contains(&format!("then node {leaver} stays until the recovery of node 1")));
        assert!(!said.contains("has handed over"), "{said}");
        // Its leave ends as the others report it done; it stays for node 1's recovery.
        let leave = state.in_progress.clone().expect("the leave");
        for node in leave.participants {
            state.apply(&MigrationDone { node, epoch: leave.epoch }).expect("a participant");
        }
        assert_eq!(state.nodes[&leaver].status, NodeStatus::Leaving);
        let said = progress(&state, leaver, renamed.as_ref());
        assert!(
            said.contains(&format!(
                "node {leaver} has handed over its entries and stays until the recovery of \
                 node 1 ends"
            )),
            "{said}"
        );
        let view = view_of(2, Some(2), &state);
        let shown = status_json(&view);
        let stays = |id: u64| {
            let nodes = shown["nodes"].as_array().expect("nodes");
            nodes.iter().find(|n| n["id"] == id).expect("listed")["stays_for"].clone()
        };
        assert_eq!(stays(leaver), json!([1]), "{shown}");
        assert_eq!(stays(1), serde_json::Value::Null, "{shown}");
        // Staying for a recovery is the cluster working on its leave, not nothing.
        assert_eq!(idle(&view, leaver), None);
        settle(&mut state);
        assert_eq!(progress(&state, leaver, renamed.as_ref()), format!("node {leaver} is left"));
    }

    /// A leave is followed as long as the cluster works on it, and given up on only once
    /// nothing carries it on: no leader answers, or no change of the node is left.
    #[test]
    fn a_change_is_followed_while_the_cluster_works_on_it() {
        let mut state = three_nodes();
        let view = |state: &ClusterState, leader: Option<u64>| view_of(1, leader, state);
        assert_eq!(idle(&view(&state, Some(1)), 3), Some("no change is under way for it"));
        // Staying for a recovery that waits for a joiner (a dead node last in the tree) carries
        // nothing on either: it would be followed for good.
        let mut waiting = state.clone();
        waiting.lingering.insert(3, [1].into());
        assert_eq!(idle(&view(&waiting, Some(1)), 3), Some("no change is under way for it"));
        // A node that failed while it joined will not get there.
        let mut failed = state.clone();
        failed.nodes.get_mut(&3).expect("node 3").status = NodeStatus::Failed;
        let said = ended_otherwise(&view(&failed, Some(1)), 3, NodeStatus::Active);
        assert!(said.is_some_and(|s| s.contains("failed while it joined")));
        assert_eq!(
            ended_otherwise(&view(&state, Some(1)), 3, NodeStatus::Left).map(|_| ()),
            Some(()),
            "as a refused leave leaves it"
        );
        assert_eq!(
            ended_otherwise(&view(&state, Some(2)), 3, NodeStatus::Left),
            None,
            "not a leader's word"
        );
        state.apply(&Leave { node: 3 }).unwrap();
        assert_eq!(idle(&view(&state, Some(1)), 3), None, "its leave under way");
        assert_eq!(ended_otherwise(&view(&state, Some(1)), 3, NodeStatus::Left), None);
        assert_eq!(idle(&view(&state, Some(2)), 3), Some("no leader answers"), "our own view");
        let mut lost = view(&state, Some(1));
        lost.quorum_lost_ms = Some(1500);
        assert_eq!(idle(&lost, 3), Some("the leader hears from no majority of the voters"));
    }
}
