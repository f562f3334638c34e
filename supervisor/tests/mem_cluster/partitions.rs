//! Slow, lossy and cut networks: no false failure, and a node cut off is fenced and replaced.

use crate::harness::{
    assert_all_agree, cluster, kvdir, kvdir_registered, node, replay, statuses, three_voters,
    three_voters_hosting, until_active, until_all, until_back_as_second_life, until_voters, Node,
};
use gobelins_adaptation::HostConfig;
use gobelins_locator::NodeId;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::SupervisorConfig;
use std::time::Duration;

#[test]
fn a_slow_lossy_network_still_forms_one_cluster() {
    replay(async {
        let net = MemNetwork::new(7);
        net.set_delay(Duration::from_millis(5));
        net.set_drop_rate(0.05);
        let nodes = cluster(&net, 3, SupervisorConfig::default()).await;
        until_active(&nodes, 3).await;
        assert_all_agree(&nodes, "once formed");
    });
}

#[test]
fn a_slow_network_causes_no_false_failure() {
    replay(async {
        let net = MemNetwork::new(1);
        let nodes = cluster(&net, 3, SupervisorConfig::default()).await;
        until_active(&nodes, 3).await;
        // 40 ms each way: well within the default timers, so nobody is suspected for 30 s.
        net.set_delay(Duration::from_millis(40));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let state = nodes[0].supervisor.state();
        assert_eq!(state.with_status(NodeStatus::Active).count(), 3, "{:?}", statuses(&state));
        assert_eq!(state.with_status(NodeStatus::Failed).count(), 0);
    });
}

#[test]
fn a_cut_off_leader_is_replaced_declared_failed_and_rejoins_after_healing() {
    replay(async {
        let net = MemNetwork::new(3);
        let config = SupervisorConfig::loopback();
        let nodes = cluster(&net, 3, config).await;
        until_active(&nodes, 3).await;
        let all: Vec<&Node> = nodes.iter().collect();
        until_voters(&all, 3).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let others: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
        net.isolate(leader, others.clone());

        let majority: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != leader).collect();
        until_all(&majority, Duration::from_secs(30), "the old leader declared failed", |s| {
            s.is_stable() && s.nodes[&leader].status == NodeStatus::Failed
        })
        .await;
        assert!(
            majority.iter().all(|n| n.supervisor.leader() != Some(leader)),
            "a new leader took over"
        );

        net.heal();
        until_back_as_second_life(&all, leader).await;
        assert_all_agree(&nodes, "after healing");
    });
}

/// A node cut off from the leader alone, while the others still reach it, can neither hold a
/// lease nor learn a configuration. The witnesses' word used to clear it at every suspicion, so
/// it was never declared failed, and every change it took part in waited for the cut to heal.
/// Now the leader declares it failed after a few such rounds, the next change completes, and the
/// node comes back as a new life once the cut heals.
#[test]
fn a_node_cut_off_from_the_leader_alone_is_declared_failed_and_changes_go_on() {
    replay(async {
        let net = MemNetwork::new(23);
        let config = SupervisorConfig::loopback();
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let cut = (1..=3).find(|&id| id != leader).expect("a follower");
        net.partition(leader, cut);
        // A change that needs the node cut off: it never learns it.
        let joiner = node(&net, 4, config).await;
        let seed = format!("n{leader}");
        let joined = joiner.supervisor.join_via(&seed, Duration::from_secs(30)).await;
        assert!(matches!(joined, Ok(Ok(_))), "node 4's join is taken: {joined:?}");

        let mut rest: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != cut).collect();
        rest.push(&joiner);
        until_all(&rest, Duration::from_secs(30), "node 4 active, the node cut off failed", |s| {
            s.is_stable()
                && s.nodes[&cut].status == NodeStatus::Failed
                && s.nodes.get(&4).is_some_and(|r| r.status == NodeStatus::Active)
        })
        .await;
        assert!(
            rest.iter().all(|n| n.supervisor.leader() == Some(leader)),
            "the leader kept its place"
        );

        net.heal();
        let mut all: Vec<&Node> = nodes.iter().collect();
        all.push(&joiner);
        until_back_as_second_life(&all, cut).await;
    });
}

#[test]
fn a_node_cut_off_stops_serving_its_keys_before_the_cluster_declares_it_failed() {
    replay(async {
        use gobelins_adaptation::{codec, AdaptationError};
        use gobelins_kvdir::{Request, Response, KVDIR};
        use gobelins_locator::Key;

        let net = MemNetwork::new(7);
        let host =
            HostConfig { request_deadline: Duration::from_millis(100), ..HostConfig::default() };
        let nodes = three_voters_hosting(&net, kvdir, host).await;
        kvdir_registered(&nodes[0]).await;
        let cut = nodes
            .iter()
            .find(|n| n.supervisor.leader() != Some(n.supervisor.id()))
            .expect("a follower");
        let id = cut.supervisor.id();
        let mut key = None;
        for _ in 0..200 {
            key = cut.supervisor.host().context().snapshot().and_then(|s| {
                let table = s.table(KVDIR)?;
                (0..).map(Key).find(|k| table.locate(*k) == NodeId(id))
            });
            if key.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let key = key.expect("kvdir routed, with a key on the node to cut off");
        let get = codec::encode(&Request::Get).expect("encode");
        let put = codec::encode(&Request::Put(b"v1".to_vec())).expect("encode");
        let host = cut.supervisor.host().clone();
        let mut stored = false;
        for _ in 0..50 {
            if host.request(KVDIR, key, put.clone()).await.is_ok() {
                stored = true;
                break;
            }
        }
        assert!(stored, "the node serves its keys while in touch");

        net.isolate(id, (1..=3).filter(|&n| n != id));
        // Past the lease (half the failure timeout), before the failure timeout itself.
        tokio::time::sleep(SupervisorConfig::loopback().failure_timeout * 2 / 3).await;
        let others: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != id).collect();
        assert!(
            others.iter().all(|n| n.supervisor.state().nodes[&id].status == NodeStatus::Active),
            "not declared failed yet"
        );
        let answer = host.request(KVDIR, key, get).await;
        assert!(
            matches!(answer, Err(AdaptationError::Deadline { .. })),
            "a node cut off must not answer for keys the cluster may be rebuilding elsewhere: \
             {:?}",
            answer.map(|a| codec::decode::<Response>(&a))
        );
        net.heal();
    });
}

/// A leader cut off from both other voters (which cannot elect one of their own, cut off from
/// each other too) keeps its last committed state, which still says every node is active: its
/// view says that it has heard from no majority, once that has lasted a failure timeout, and no
/// more once the network heals.
#[test]
fn a_leader_that_hears_from_no_majority_says_so_in_its_view() {
    replay(async {
        let net = MemNetwork::new(3);
        let config = SupervisorConfig::loopback();
        let nodes = cluster(&net, 3, config.clone()).await;
        until_active(&nodes, 3).await;
        let all: Vec<&Node> = nodes.iter().collect();
        until_voters(&all, 3).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let of_leader = &nodes[(leader - 1) as usize].supervisor;
        assert_eq!(of_leader.view().quorum_lost_ms, None, "a majority hears it");
        for node in (1..=3).filter(|&n| n != leader) {
            net.isolate(node, (1..=3).filter(|&n| n != node));
        }
        tokio::time::sleep(config.failure_timeout * 3).await;
        let view = of_leader.view();
        assert_eq!(view.leader, Some(leader), "it still leads, alone");
        let lost = view.quorum_lost_ms.expect("it says it hears from no majority");
        assert!(lost >= config.failure_timeout.as_millis() as u64, "lost for {lost} ms");
        net.heal();
        tokio::time::sleep(config.failure_timeout * 3).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let view = nodes[(leader - 1) as usize].supervisor.view();
        assert_eq!(view.quorum_lost_ms, None, "a majority hears it again");
    });
}
