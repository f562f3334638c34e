//! Joiners: admitted through lost answers, a leader's word or a snapshot; leased from their ask.

use crate::harness::{
    ask_in_background, cluster, kvdir, node, node_hosting, replay, statuses, supervisor_on,
    three_voters_hosting, until_active, until_all, until_begun_ahead_of_its_log, Node,
};
use gobelins_adaptation::{HostConfig, Registry};
use gobelins_supervisor::lane;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::rpc::{Request, Response};
use gobelins_supervisor::state::{Applied, ClusterState, NodeStatus, Refusal};
use gobelins_supervisor::transport::Transport;
use gobelins_supervisor::{store, Dispatch, SupervisorConfig};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// Waits until `nodes` and `joiner` all hold a stable configuration with node 4 active.
async fn until_node_4_active(nodes: &[Node], joiner: &Node) {
    let mut all: Vec<&Node> = nodes.iter().collect();
    all.push(joiner);
    until_all(&all, Duration::from_secs(30), "node 4 active", |s| {
        s.is_stable() && s.nodes.get(&4).is_some_and(|r| r.status == NodeStatus::Active)
    })
    .await;
}

/// Node 4, hosting kvdir, asks to join through `seed`; returns it and the epoch its join began.
async fn node_4_begins_joining(net: &MemNetwork, seed: u64) -> (Node, u64) {
    let joiner =
        node_hosting(net, 4, SupervisorConfig::loopback(), kvdir, HostConfig::default()).await;
    let joined = joiner.supervisor.join_via(&format!("n{seed}"), Duration::from_secs(30)).await;
    let Ok(Ok(Applied::Began { epoch })) = joined else {
        panic!("the join begins a change: {joined:?}")
    };
    (joiner, epoch)
}

/// Three voters hosting kvdir, and a follower of theirs to join through.
async fn three_voters_and_a_follower(net: &MemNetwork) -> (Vec<Node>, u64, u64) {
    let nodes = three_voters_hosting(net, kvdir, HostConfig::default()).await;
    let leader = nodes[0].supervisor.leader().expect("a leader");
    let seed = (1..=3).find(|&id| id != leader).expect("a follower");
    (nodes, leader, seed)
}

#[test]
fn a_joiner_whose_answers_are_lost_begins_from_its_own_log_and_its_change_ends() {
    replay(async {
        let net = MemNetwork::new(17);
        let (nodes, _, seed) = three_voters_and_a_follower(&net).await;
        // Every answer the seed sends the joiner is lost: the join commits, and the joiner
        // hears of it only through the log the leader replicates to it.
        net.mute(seed, 4);
        let joiner =
            node_hosting(&net, 4, SupervisorConfig::loopback(), kvdir, HostConfig::default()).await;
        let asking = ask_in_background(&joiner.supervisor, seed);
        until_node_4_active(&nodes, &joiner).await;
        assert!(!asking.is_finished(), "no answer reached the joiner");
        assert!(joiner.supervisor.life_admitted(), "its change admitted it");

        net.heal();
        let joined = asking.await.expect("the join's task");
        assert!(matches!(joined, Ok(Ok(_))), "{joined:?}");
    });
}

#[test]
fn a_joiner_begins_its_change_from_its_join_answer_before_its_log_has_it() {
    replay(async {
        let net = MemNetwork::new(19);
        let (nodes, leader, seed) = three_voters_and_a_follower(&net).await;
        // The leader cannot replicate to the joiner: its own log stays empty, and the state
        // the answer carries, through the seed, is all it has of its change.
        net.partition(leader, 4);
        let (joiner, epoch) = node_4_begins_joining(&net, seed).await;
        until_begun_ahead_of_its_log(&joiner.supervisor, epoch).await;

        net.heal();
        until_node_4_active(&nodes, &joiner).await;
    });
}

#[test]
fn a_participant_begins_its_change_from_the_leaders_word_before_its_log_has_it() {
    replay(async {
        let net = MemNetwork::new(29);
        let (nodes, leader, seed) = three_voters_and_a_follower(&net).await;
        let index = |id: u64| nodes.iter().position(|n| n.supervisor.id() == id).expect("a node");
        let other = (1..=3).find(|&id| id != leader && id != seed).expect("another voter");
        // The leader's log stops reaching `other`, whose part in node 4's join comes from the
        // leader's word alone: the leader and the seed are a quorum without it.
        net.stall_log(leader, other);
        let (joiner, epoch) = node_4_begins_joining(&net, seed).await;
        let begun = nodes[index(leader)].supervisor.state();
        assert!(begun
            .in_progress
            .as_ref()
            .is_some_and(|p| p.epoch == epoch && p.participants.contains(&other)));
        let behind = &nodes[index(other)].supervisor;
        until_begun_ahead_of_its_log(behind, epoch).await;
        // Its part done, its report reaches the leader, and the change ends without its log:
        // in the change's own epoch, with it active, not declared failed.
        until_all(&[&nodes[index(leader)]], Duration::from_secs(30), "node 4 active", |s| {
            s.is_stable() && s.nodes.get(&4).is_some_and(|r| r.status == NodeStatus::Active)
        })
        .await;
        let ended = nodes[index(leader)].supervisor.state();
        assert_eq!(ended.epoch, epoch);
        assert_eq!(ended.nodes[&other].status, NodeStatus::Active);
        assert!(behind.state().epoch < epoch, "its log still does not have the change");
        assert_eq!(behind.leader(), Some(leader), "it kept its leader");

        // The same word from a node other than the leader it knows is not heard.
        let word = Request::Begun(Box::new(ClusterState::clone(&begun)));
        let stranger = net.attach(9, "n9", Arc::new(Dispatch::default()));
        let answer = stranger
            .call(other, lane::request(&word).expect("encoded"), Duration::from_secs(1))
            .await
            .and_then(lane::decode_response)
            .map(|r| matches!(r, Response::Heard(false)));
        assert!(matches!(answer, Ok(true)), "not heard, and said so: {answer:?}");

        net.heal();
        until_node_4_active(&nodes, &joiner).await;
    });
}

/// A joiner that knows no leader yet (none of the leader's appends has reached it) begins
/// from the leader's word all the same. Refused for want of a leader, it began at its join's
/// answer, 1 to 3 ms later on loopback, while every sender's batches waited for it; here, with
/// that answer lost too, it would not begin before the leader's log reached it.
#[test]
fn a_joiner_that_knows_no_leader_yet_begins_from_the_leaders_word() {
    replay(async {
        let net = MemNetwork::new(31);
        let (nodes, leader, seed) = three_voters_and_a_follower(&net).await;
        net.mute(seed, 4);
        net.lose_raft(leader, 4);
        let joiner =
            node_hosting(&net, 4, SupervisorConfig::loopback(), kvdir, HostConfig::default()).await;
        let asking = ask_in_background(&joiner.supervisor, seed);
        let leading = &nodes.iter().find(|n| n.supervisor.id() == leader).expect("leader");
        let start = tokio::time::Instant::now();
        let epoch = loop {
            let state = leading.supervisor.state();
            if let Some(p) = state.in_progress.as_ref().filter(|p| p.participants.contains(&4)) {
                break p.epoch;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "node 4's join began");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        until_begun_ahead_of_its_log(&joiner.supervisor, epoch).await;
        assert_eq!(joiner.supervisor.leader(), None, "it began knowing no leader");
        assert!(!asking.is_finished(), "no answer reached it");

        net.heal();
        until_node_4_active(&nodes, &joiner).await;
    });
}

#[test]
fn a_restarted_joiner_is_not_admitted_by_the_join_its_last_run_left_in_its_log() {
    replay(async {
        let net = MemNetwork::new(23);
        let (nodes, leader, seed) = three_voters_and_a_follower(&net).await;
        let dir = TempDir::new().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        let run = |made| {
            let stores = store::open_with(&path, true).expect("store");
            let config = SupervisorConfig::loopback();
            supervisor_on(&net, 4, config, kvdir, HostConfig::default(), stores, made)
        };
        let joining = |s: &ClusterState| {
            s.in_progress.as_ref().is_some_and(|p| p.participants.contains(&4))
                && s.nodes.get(&4).is_some_and(|r| r.status == NodeStatus::Joining)
        };
        // A run that found its incarnation on disk (this node's second, say) and never hears
        // its join's answer: its join begins, in its own log too, and it never takes part.
        net.mute(seed, 4);
        let first = run(false).await;
        let asking = ask_in_background(&first, seed);
        let start = tokio::time::Instant::now();
        while !joining(&first.state()) {
            assert!(start.elapsed() < Duration::from_secs(10), "its join began");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!first.life_admitted());
        let old_life = first.incarnation();
        // It dies there, and the cluster ends that life.
        asking.abort();
        net.crash(4);
        first.shutdown().await;
        drop(first);
        let majority: Vec<&Node> = nodes.iter().collect();
        until_all(&majority, Duration::from_secs(30), "node 4 declared failed", |s| {
            s.is_stable() && s.nodes[&4].status == NodeStatus::Failed
        })
        .await;

        // Started again from its data directory, it asks to join as the same life. Its own
        // log, read from disk, still shows that life's join begun: that must not admit it.
        net.heal();
        let second = run(false).await;
        assert!(joining(&second.state()), "its log shows its last run's join begun");
        let joined = second.join_via(&format!("n{leader}"), Duration::from_secs(10)).await;
        match joined {
            Ok(Err(Refusal::StaleIncarnation { .. })) => {
                assert!(
                    !second.life_admitted(),
                    "not admitted by what its last run left in its log"
                );
            }
            // Its own rejoin got there first: having learned that its life ended, it renewed
            // its incarnation and asked as a new life while this old one was on its way. This
            // ask, refused as the old life, asked again as the new one (before, it ended with
            // "already a member", and the agent exited).
            Ok(Ok(_)) => {
                let leader = nodes.iter().find(|n| n.supervisor.id() == leader).expect("leader");
                let record = leader.supervisor.state().nodes[&4].clone();
                assert!(
                    record.incarnation > old_life && second.incarnation() == record.incarnation,
                    "only a new life is under way, never the ended one: {record:?}"
                );
            }
            other => panic!("the cluster ended that life: {other:?}"),
        }
        second.shutdown().await;
    });
}

/// A cluster that snapshots every few entries and keeps no log behind its snapshots: a joiner
/// cannot be brought up from logs, only from a snapshot, and it restarts from the one it
/// installed.
#[test]
fn a_joiner_behind_the_purged_logs_is_brought_up_by_a_snapshot_and_restarts_from_it() {
    replay(async {
        let net = MemNetwork::new(29);
        let config =
            SupervisorConfig { snapshot_every: 4, logs_kept: 0, ..SupervisorConfig::loopback() };
        let nodes = cluster(&net, 3, config.clone()).await;
        until_active(&nodes, 3).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let leading = &nodes[leader as usize - 1].supervisor;
        let start = tokio::time::Instant::now();
        while leading.snapshot_index().is_none() {
            assert!(start.elapsed() < Duration::from_secs(10), "the leader built no snapshot");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // The joiner never builds a snapshot of its own: one it has, it was sent.
        let joiners = SupervisorConfig { snapshot_every: 1_000_000, ..config };
        let dir = TempDir::new().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        let run = |made| {
            let stores = store::open_with(&path, true).expect("store");
            supervisor_on(
                &net,
                4,
                joiners.clone(),
                Registry::new,
                HostConfig::default(),
                stores,
                made,
            )
        };
        let first = run(true).await;
        first.join_via("n1", Duration::from_secs(30)).await.expect("join").expect("accepted");
        let all: Vec<&Node> = nodes.iter().collect();
        let joined = |s: &ClusterState| {
            s.is_stable() && s.nodes.get(&4).is_some_and(|r| r.status == NodeStatus::Active)
        };
        until_all(&all, Duration::from_secs(30), "node 4 active", joined).await;
        let start = tokio::time::Instant::now();
        while !joined(&first.state()) {
            assert!(start.elapsed() < Duration::from_secs(10), "node 4 sees itself active");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(first.snapshot_index().is_some(), "node 4 was brought up without a snapshot");
        let before = (first.state().epoch, statuses(&first.state()));

        // Stopped and started again on its store: its state is what it had, rebuilt from the
        // installed snapshot and the logs after it.
        first.shutdown().await;
        drop(first);
        let second = run(false).await;
        let after = (second.state().epoch, statuses(&second.state()));
        assert_eq!(after, before, "the restart did not rebuild the state it had");
        second.shutdown().await;
    });
}

/// A joiner's first lease runs from its ask, not from when it learned it was admitted: the
/// cluster watches it from its join's commit, which came after the ask, and a process frozen
/// meanwhile would have served for half a failure timeout after it woke, when the cluster may
/// have declared it failed and rebuilt its entries elsewhere.
#[test]
fn a_joiners_first_lease_runs_from_its_ask() {
    replay(async {
        let net = MemNetwork::new(15);
        let config = SupervisorConfig::loopback();
        let nodes = cluster(&net, 1, config.clone()).await;
        let joiner = node(&net, 2, config.clone()).await;
        // Slow messages, and no answer from node 1 ever reaches node 2: it learns that it was
        // admitted from its log, and no lease is granted to it.
        let delay = Duration::from_millis(25);
        net.set_delay(delay);
        net.mute(1, 2);
        let asked = tokio::time::Instant::now();
        let asking = tokio::spawn({
            let supervisor = Arc::clone(&joiner.supervisor);
            async move { supervisor.join_via("n1", Duration::from_secs(60)).await }
        });
        let start = tokio::time::Instant::now();
        while !joiner.supervisor.life_admitted() {
            assert!(start.elapsed() < Duration::from_secs(30), "node 2 admitted from its log");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let admitted = tokio::time::Instant::now();
        assert!(admitted >= asked + delay * 2, "the join took its round trip");
        let lease = joiner.supervisor.host().leased_until().expect("a lease");
        assert!(
            lease <= asked + config.failure_timeout / 2,
            "leased {:?} past the ask, admitted {:?} after it",
            lease - asked,
            admitted - asked
        );
        asking.abort();
        drop(nodes);
    });
}

/// A join whose labels hold what `status` would print as they are (a newline forged a row of
/// its table, an escape coloured the terminal) is refused by the leader before it is proposed:
/// the joiner's labels come over the network, not through `--label`'s checks.
#[test]
fn a_join_with_labels_of_control_characters_is_refused_before_it_is_proposed() {
    replay(async {
        let net = MemNetwork::new(29);
        let (nodes, leader, _) = three_voters_and_a_follower(&net).await;
        let epoch = nodes[0].supervisor.state().epoch;
        let labels = [("zone".to_string(), "a\n  1  n1  active".to_string())].into();
        let join = gobelins_supervisor::rpc::JoinRequest {
            node: 9,
            addr: "n9".into(),
            labels,
            incarnation: 1,
        };
        let stranger = net.attach(9, "n9", Arc::new(Dispatch::default()));
        let answer = stranger
            .call(
                leader,
                lane::request(&Request::Join(join)).expect("encoded"),
                Duration::from_secs(5),
            )
            .await
            .and_then(lane::decode_response);
        let Ok(Response::Admitted { outcome: Ok(Err(Refusal::Labels(why))), .. }) = answer else {
            panic!("refused for its labels: {:?}", answer.map(|_| "another answer"));
        };
        assert!(why.contains("ASCII letters") && !why.contains('\n'), "{why}");
        assert_eq!(nodes[0].supervisor.state().epoch, epoch, "nothing proposed");
        assert!(!nodes[0].supervisor.state().nodes.contains_key(&9));
    });
}
