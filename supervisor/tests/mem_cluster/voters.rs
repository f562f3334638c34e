//! Raft's voters: quorums, a lost voter replaced, and a voter that refuses every message.

use crate::harness::{
    cluster, replay, three_voters, until_active, until_all, until_voters, Node, Watchdog,
};
use gobelins_supervisor::lane;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::rpc::Response;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::transport::Handler;
use gobelins_supervisor::SupervisorConfig;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_minority_cannot_change_the_configuration() {
    replay(async {
        let net = MemNetwork::new(5);
        let nodes = three_voters(&net).await;
        let all: Vec<&Node> = nodes.iter().collect();
        // Cut node 3 off; alone, it cannot commit anything (here: evicting node 2).
        net.isolate(3, [1, 2]);
        let epoch = nodes[0].supervisor.state().epoch;
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            nodes[2].supervisor.propose(gobelins_supervisor::state::Command::Evict { node: 2 }),
        )
        .await;
        assert!(!matches!(result, Ok(Ok(Ok(_)))), "a minority committed a change: {result:?}");
        net.heal();
        until_all(&all, Duration::from_secs(60), "one configuration after healing", |s| {
            s.is_stable() && s.nodes[&2].status == NodeStatus::Active
        })
        .await;
        assert!(nodes[0].supervisor.state().epoch >= epoch);
    });
}

#[test]
fn a_leader_cut_off_from_the_majority_answers_a_proposal_with_an_error_instead_of_waiting() {
    replay(async {
        let net = MemNetwork::new(5);
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        net.isolate(leader, (1..=3).filter(|&n| n != leader));
        let at_leader = &nodes[leader as usize - 1].supervisor;
        let other = (1..=3).find(|&n| n != leader).expect("another node");
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            at_leader.propose(gobelins_supervisor::state::Command::Evict { node: other }),
        )
        .await;
        match answer {
            Ok(Err(error)) => assert!(error.to_string().contains("majority"), "{error}"),
            other => panic!("an answer saying why was expected: {other:?}"),
        }
        net.heal();
    });
}

#[test]
fn five_nodes_vote_and_a_lost_voter_is_replaced_by_a_learner() {
    replay(async {
        let net = MemNetwork::new(11);
        let nodes = cluster(&net, 6, SupervisorConfig::loopback()).await;
        until_active(&nodes, 6).await;
        let all: Vec<&Node> = nodes.iter().collect();
        until_voters(&all, 5).await;
        let voters = nodes[0].supervisor.voters();
        let learner = (1..=6).find(|n| !voters.contains(n)).expect("one learner");
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let lost = *voters.iter().find(|&&v| v != leader).expect("a voter that is not the leader");

        net.crash(lost);
        let survivors: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != lost).collect();
        until_all(&survivors, Duration::from_secs(30), "the lost voter declared failed", |s| {
            s.is_stable() && s.nodes[&lost].status == NodeStatus::Failed
        })
        .await;
        let start = tokio::time::Instant::now();
        while survivors
            .iter()
            .any(|n| n.supervisor.voters().contains(&lost) || n.supervisor.voters().len() != 5)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "voters never replaced: {:?}",
                survivors[0].supervisor.voters()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let voters = survivors[0].supervisor.voters();
        assert!(voters.contains(&learner), "the learner was promoted: {voters:?}");
    });
}

/// In a cluster of two, one node votes, and a node killed there is declared failed by the
/// other. With both voting, a survivor had lost its quorum and declared nothing, for ever.
#[test]
fn in_a_cluster_of_two_one_votes_and_the_other_killed_is_declared_failed() {
    replay(async {
        let net = MemNetwork::new(3);
        let nodes = cluster(&net, 2, SupervisorConfig::loopback()).await;
        until_active(&nodes, 2).await;
        // Long enough for a second voter to have been added, had it been.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let voters = nodes[0].supervisor.voters();
        assert_eq!(voters.len(), 1, "two nodes, one voter: {voters:?}");
        let (survivor, killed) = match voters.contains(&1) {
            true => (&nodes[0], 2),
            false => (&nodes[1], 1),
        };
        net.crash(killed);
        until_all(&[survivor], Duration::from_secs(30), "the killed node declared failed", |s| {
            s.is_stable() && s.nodes[&killed].status == NodeStatus::Failed
        })
        .await;
    });
}

/// A peer that refuses whatever it is sent, as a node still starting does, or one that cannot
/// read what it is sent.
struct Refuser;

#[async_trait::async_trait]
impl Handler for Refuser {
    async fn handle(self: Arc<Self>, _: u64, _: bytes::Bytes) -> bytes::Bytes {
        lane::response(&Response::Malformed("cannot read it".into())).expect("encodes")
    }
}

/// A voter that refuses every message is backed off from, as one that cannot be dialled is.
/// Raft took a refusal for a network error and sent again at once: the leader's replication to
/// it left no time for anything else, and the paused clock of the cluster never moved again.
#[test]
fn a_voter_that_refuses_every_message_is_not_asked_again_at_once() {
    replay(async {
        let net = MemNetwork::new(13);
        let nodes = three_voters(&net).await;
        nodes[2].supervisor.shutdown().await;
        net.crash(3);
        net.attach(3, "n3", Arc::new(Refuser));
        let asked = || net.calls(1, 3) + net.calls(2, 3);
        let before = asked();
        let _spin = Watchdog::new(120, "node 3's refusals were answered at once, over and over");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let again = asked() - before;
        assert!(again < 30, "node 3 was asked {again} times in a second");
        assert!(again > 0, "node 3 was not asked at all: nothing here was backed off from");
    });
}
