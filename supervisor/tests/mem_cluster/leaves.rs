//! Leaves: a leaver cut off, or never told its leave ended, ends as left and is called no more.

use crate::harness::{replay, statuses, three_voters, three_voters_hosting, until_all, Node};
use gobelins_adaptation::{HostConfig, Registry};
use gobelins_locator::NodeId;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::SupervisorConfig;
use std::time::Duration;

#[test]
fn members_do_not_keep_calling_a_node_that_left() {
    replay(async {
        use gobelins_supervisor::state::Command;
        let net = MemNetwork::new(19);
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let leaver = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        let follower = (1..=3).find(|&id| id != leader && id != leaver).expect("another");
        let leave = Command::Leave { node: leaver };
        let at_leader = &nodes[leader as usize - 1].supervisor;
        assert!(matches!(at_leader.propose(leave).await, Ok(Ok(_))));
        let others: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != leaver).collect();
        until_all(&others, Duration::from_secs(30), "the leave ended", |s| {
            s.is_stable() && s.nodes[&leaver].status == NodeStatus::Left
        })
        .await;
        net.crash(leaver);
        // Past the calls already under way.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let before = (net.calls(follower, leaver), net.calls(leader, leaver));
        // Twenty fence checks' worth on the follower.
        tokio::time::sleep(SupervisorConfig::loopback().failure_timeout * 60).await;
        let after = (net.calls(follower, leaver), net.calls(leader, leaver));
        assert_eq!(after, before, "calls to the node that left, (follower, leader)");
    });
}

/// A leaver cut off from the leader after it learned of its leave, before it could report its
/// part, is declared failed; once the cut heals it ends as left rather than rejoining, which
/// would undo the leave.
#[test]
fn a_leaver_declared_failed_while_cut_off_from_the_leader_ends_as_left() {
    replay(async {
        use gobelins_supervisor::state::Command;
        use gobelins_supervisor::Lifecycle;
        let net = MemNetwork::new(29);
        let nodes = three_voters_hosting(&net, slow_merges_everywhere, HostConfig::default()).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let leaver_id = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        let leaver = nodes.iter().find(|n| n.supervisor.id() == leaver_id).expect("leaver");
        let mut seen = leaver.supervisor.watch_state();
        let at_leader = &nodes.iter().find(|n| n.supervisor.id() == leader).expect("leader");
        let leave = Command::Leave { node: leaver_id };
        assert!(matches!(at_leader.supervisor.propose(leave).await, Ok(Ok(_))));
        let learned = tokio::time::timeout(
            Duration::from_secs(30),
            seen.wait_for(|s| s.nodes[&leaver_id].status == NodeStatus::Leaving),
        )
        .await
        .is_ok_and(|seen| seen.is_ok());
        assert!(learned, "the leaver learns of its leave");
        // Its merge takes two seconds: cut off before it can report its part.
        net.partition(leaver_id, leader);

        let rest: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != leaver_id).collect();
        until_all(&rest, Duration::from_secs(30), "the leaver declared failed", |s| {
            s.is_stable() && s.nodes[&leaver_id].status == NodeStatus::Failed
        })
        .await;
        net.heal();
        let mut lifecycle = leaver.supervisor.lifecycle();
        // `is_ok` at once, here and above: the borrow `wait_for` returns holds the watch's
        // lock, and a sender on this thread would wait for it for ever.
        let ended = tokio::time::timeout(
            Duration::from_secs(30),
            lifecycle.wait_for(|l| *l == Lifecycle::Left),
        )
        .await
        .is_ok();
        assert!(ended, "the leaver's life ended as left");
        // And it did not come back.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let state = rest[0].supervisor.state();
        assert_eq!(
            (state.nodes[&leaver_id].status, state.nodes[&leaver_id].incarnation),
            (NodeStatus::Failed, 1),
            "{:?}",
            statuses(&state)
        );
    });
}

/// The node whose merges do not wait, in [`slow_merges`]: the leaver of the test below.
static QUICK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A service of no entries whose merge takes two seconds, except on node [`QUICK`] unless
/// `everywhere`.
struct SlowMerges {
    everywhere: bool,
}

impl gobelins_adaptation::Service for SlowMerges {
    type Request = ();
    type Response = ();
    type Entry = ();

    fn spec(&self) -> gobelins_locator::ServiceSpec {
        gobelins_locator::ServiceSpec::new(gobelins_locator::ServiceId(40), "slow").with_slots(64)
    }

    async fn handle(&self, _: &gobelins_adaptation::Context, _: gobelins_locator::Key, _: ()) {}

    async fn before_migration(
        &self,
        _: &gobelins_adaptation::Context,
        _: &gobelins_adaptation::ChangeInfo,
    ) {
    }

    async fn send_out(
        &self,
        _: &gobelins_adaptation::Context,
        _: &gobelins_adaptation::Moving,
    ) -> Vec<(gobelins_locator::Key, ())> {
        Vec::new()
    }

    async fn receive(
        &self,
        _: &gobelins_adaptation::Context,
        _: NodeId,
        _: Vec<(gobelins_locator::Key, ())>,
    ) {
    }

    async fn after_migration(
        &self,
        ctx: &gobelins_adaptation::Context,
        _: &gobelins_adaptation::ChangeInfo,
    ) {
        if self.everywhere || ctx.node().0 != QUICK.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn scan(
        &self,
        _: &gobelins_adaptation::Context,
        _: NodeId,
        _: &gobelins_adaptation::Moving,
    ) -> Vec<(gobelins_locator::Key, ())> {
        Vec::new()
    }
}

fn slow_merges() -> Registry {
    let mut registry = Registry::new();
    registry.register(gobelins_adaptation::plugin(SlowMerges { everywhere: false })).expect("slow");
    registry
}

fn slow_merges_everywhere() -> Registry {
    let mut registry = Registry::new();
    registry.register(gobelins_adaptation::plugin(SlowMerges { everywhere: true })).expect("slow");
    registry
}

/// A leaver cut off from the leader once it has done its part never applies the entry that
/// ends its leave (the leader takes it out of raft first): its own state says "leaving" for
/// ever. The other nodes' say "left", and it ends its life on their word, rather than staying
/// up doing nothing (and, restarted, proposing its own failure every few seconds).
#[test]
fn a_leaver_that_never_hears_the_end_of_its_leave_ends_on_the_word_of_its_peers() {
    replay(async {
        use gobelins_supervisor::state::Command;
        use gobelins_supervisor::Lifecycle;
        let net = MemNetwork::new(21);
        let nodes = three_voters_hosting(&net, slow_merges, HostConfig::default()).await;
        let leader_id = nodes[0].supervisor.leader().expect("a leader");
        let by_id = |id: u64| nodes.iter().find(|n| n.supervisor.id() == id).expect("node");
        let leaver_id = (1..=3).rev().find(|&id| id != leader_id).expect("a follower");
        let other_id = (1..=3).find(|&id| id != leader_id && id != leaver_id).expect("another");
        let (leader, leaver, other) = (by_id(leader_id), by_id(leaver_id), by_id(other_id));
        QUICK.store(leaver_id, std::sync::atomic::Ordering::SeqCst);

        let mut seen = leaver.supervisor.watch_state();
        let leave = Command::Leave { node: leaver_id };
        assert!(matches!(leader.supervisor.propose(leave).await, Ok(Ok(_))));
        // The leaver's part is done (its merge does not wait) while the others still merge.
        seen.wait_for(|s| s.in_progress.as_ref().is_some_and(|p| p.done.contains(&leaver_id)))
            .await
            .expect("the leaver reports its part");
        net.partition(leaver_id, leader_id);

        until_all(&[leader, other], Duration::from_secs(30), "the leave ended", |s| {
            s.is_stable() && s.nodes[&leaver_id].status == NodeStatus::Left
        })
        .await;
        let mut lifecycle = leaver.supervisor.lifecycle();
        let ended = tokio::time::timeout(
            Duration::from_secs(30),
            lifecycle.wait_for(|l| *l == Lifecycle::Left),
        )
        .await;
        let own = leaver.supervisor.state().nodes[&leaver_id].status;
        assert_eq!(own, NodeStatus::Leaving, "its own state never heard the end of the leave");
        assert!(ended.is_ok(), "its life ended on the peers' word");
    });
}
