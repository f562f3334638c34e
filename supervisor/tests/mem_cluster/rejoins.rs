//! Rejoins as a new life: admitted though answers are lost, services afresh, renewed once.

use crate::harness::{
    a_follower_declared_failed, ask_in_background, assert_all_agree, cluster, kvdir, replay,
    three_voters, three_voters_hosting, until_active, until_all, until_back_as_second_life,
    until_begun_ahead_of_its_log, until_voters, Logs, Node,
};
use gobelins_adaptation::{Host, HostConfig, Registry};
use gobelins_locator::{Labels, NodeId};
use gobelins_supervisor::link::TransportLink;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::state::{ClusterState, NodeStatus};
use gobelins_supervisor::{store, Dispatch, Me, Parts, Supervisor, SupervisorConfig};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

#[test]
fn a_rejoin_committed_whose_answers_are_lost_is_admitted_by_the_change_in_its_own_log() {
    replay(async {
        let net = MemNetwork::new(13);
        let nodes = three_voters(&net).await;
        let (leader, x, _) = a_follower_declared_failed(&net, &nodes).await;

        // x hears it was declared failed (from the other node) and rejoins through the leader,
        // which commits the join; every answer the leader sends x is lost, but its log reaches
        // x, and the change the rejoin began admits it there: the change ends, answers lost.
        net.heal();
        net.mute(leader, x);
        let all: Vec<&Node> = nodes.iter().collect();
        until_back_as_second_life(&all, x).await;
        assert!(nodes[x as usize - 1].supervisor.life_admitted());
        assert_all_agree(&nodes, "after the rejoin");
    });
}

/// A node declared failed while it ran rejoins as a new life; the rejoin commits, but its answer
/// is lost, the leader's log does not reach it, and neither does the leader's word of the change
/// the rejoin began. Nothing tells it that it was taken: the fence check, finding this life
/// joining in the cluster's state though never admitted here, asks again, and that answer admits
/// it.
#[test]
fn a_rejoin_whose_answer_log_and_word_are_lost_is_admitted_when_the_fence_check_asks_again() {
    replay(async {
        let logs = Logs::default();
        let _capture = logs.capture();
        let net = MemNetwork::new(31);
        let config = SupervisorConfig::loopback();
        let nodes = three_voters_hosting(&net, kvdir, HostConfig::default()).await;
        let (leader, x, other) = a_follower_declared_failed(&net, &nodes).await;
        let at = |id: u64| &nodes[id as usize - 1];
        let majority = [at(leader), at(other)];
        let rejoiner = &at(x).supervisor;
        let life = rejoiner.host().life();

        // The cut heals, but for x: every answer the leader sends it is lost, the leader's log
        // does not reach it (its heartbeats do, so x keeps its leader), nor does the leader's
        // word of a change begun. x's fence check finds it failed and rejoins as a new life.
        net.heal();
        net.mute(leader, x);
        net.stall_log(leader, x);
        net.lose_begun(leader, x);
        let taken = |s: &ClusterState| {
            s.nodes.get(&x).is_some_and(|r| r.incarnation == 2 && r.status == NodeStatus::Joining)
                && s.in_progress.as_ref().is_some_and(|p| p.participants.contains(&x))
        };
        until_all(&majority, Duration::from_secs(30), "x's rejoin committed", taken).await;
        let epoch = at(leader).supervisor.state().in_progress.as_ref().expect("x's change").epoch;
        // Past the rejoin the fence check made on finding x failed: begun at most an RPC timeout
        // after the views it went by, it asks for five RPC timeouts, and its last call waits
        // three more.
        tokio::time::sleep(config.rpc_timeout * 12).await;
        assert_eq!(rejoiner.incarnation(), 2, "x rejoined as a new life");
        assert!(rejoiner.host().life() > life, "its services started afresh");
        assert!(
            !rejoiner.life_admitted(),
            "neither the rejoin's answer, nor x's log, nor the leader's word reached it"
        );
        assert!(rejoiner.state().epoch < epoch, "x's log does not have its rejoin");
        // The rejoin made on finding x failed has given up, so its answer cannot be what
        // admits x below: the sleep is a margin worked out from its timeouts, and this keeps it
        // honest if they grow.
        assert!(logs.contain("rejoin failed; will try again"), "the first rejoin gave up");

        // Answers get through again, and nothing else. That rejoin has given up, so only a new
        // ask can hear that the cluster took it: the fence check's, on finding this life
        // joining in the cluster's state and never admitted here.
        net.unmute(leader, x);
        let start = tokio::time::Instant::now();
        while !rejoiner.life_admitted() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "x asked again whether its rejoin was taken, and was answered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rejoiner.incarnation(), 2);
        assert!(
            logs.contain("the cluster took this node's rejoin but its answer never came"),
            "the fence check asked again"
        );
        // The answer's state, its log still stalled, has it take its part in its change. Its
        // report is not waited for while the log is stalled: behind the leader's log, x may not
        // know its leader (the heartbeats it cannot match), and that is not what this tests.
        until_begun_ahead_of_its_log(rejoiner, epoch).await;

        net.heal();
        let all: Vec<&Node> = nodes.iter().collect();
        until_back_as_second_life(&all, x).await;
        assert_all_agree(&nodes, "after the rejoin");
    });
}

/// A join asked of a node the cluster declared failed (`gobelins join`), before its own check
/// noticed: the new life starts with fresh services, as the check's rejoin does. It came back
/// with what its old life held, which the cluster had rebuilt elsewhere meanwhile.
#[test]
fn a_join_asked_of_a_node_declared_failed_starts_its_services_afresh() {
    replay(async {
        let net = MemNetwork::new(5);
        let nodes = cluster(&net, 3, SupervisorConfig::loopback()).await;
        until_active(&nodes, 3).await;
        until_voters(&nodes.iter().collect::<Vec<_>>(), 3).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let cut = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        let others: Vec<u64> = (1..=3).filter(|&id| id != cut).collect();
        net.isolate(cut, others.clone());
        let majority: Vec<&Node> = nodes.iter().filter(|n| n.supervisor.id() != cut).collect();
        until_all(&majority, Duration::from_secs(30), "the cut node declared failed", |s| {
            s.is_stable() && s.nodes[&cut].status == NodeStatus::Failed
        })
        .await;
        let node = &nodes[cut as usize - 1].supervisor;
        let life = node.host().life();
        net.heal();
        let joined = node.join_cluster(&format!("n{leader}"), Duration::from_secs(30), true).await;
        assert!(matches!(joined, Ok(Ok(_))), "{joined:?}");
        assert!(node.host().life() > life, "its services started afresh");
        assert_eq!(node.incarnation(), 2);
    });
}

/// A restarted node asks to rejoin as its last life through a seed whose answers are lost,
/// while its fence check finds that life ended and rejoins as the next one through the leader.
/// The first ask, answered at last, must not read the new life it was overtaken by as a clash
/// of ids: it asked again as its last life, was told "already a member", and the agent exited.
#[test]
fn a_join_overtaken_by_this_process_s_own_rejoin_as_a_new_life_is_no_clash() {
    replay(async {
        let net = MemNetwork::new(7);
        let nodes = three_voters(&net).await;
        let (leader, x, other) = a_follower_declared_failed(&net, &nodes).await;
        let node = &nodes[x as usize - 1].supervisor;
        assert_eq!(node.incarnation(), 1);
        // Asked as life 1, through the node whose answers to x are lost once the links heal.
        let asked = ask_in_background(node, other);
        tokio::time::sleep(Duration::from_millis(200)).await;
        net.heal();
        net.mute(other, x);
        let all: Vec<&Node> = nodes.iter().collect();
        until_back_as_second_life(&all, x).await;
        assert_eq!(node.incarnation(), 2, "the fence check rejoined through the leader {leader}");
        net.unmute(other, x);
        let answered = asked.await.expect("the ask ends");
        assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
        assert_all_agree(&nodes, "after the rejoin");
    });
}

/// A restart's join and the fencing check can both find this node's last life dead at once.
/// The new incarnation is written once: two writers raced on the file's temporary copy, and the
/// second, finding it renamed away, logged an error for a rejoin that went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_renewals_of_one_dead_life_save_the_new_incarnation_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Mutex};
    let net = MemNetwork::new(1);
    let dir = TempDir::new().expect("temporary directory");
    let (log, machine) = store::open_with(&dir.path().join("raft.redb"), false).expect("store");
    let dispatch = Arc::new(Dispatch::default());
    let transport = Arc::new(net.attach(1, "n1", dispatch.clone()));
    let link = Arc::new(TransportLink::new(transport.clone()));
    let host = Host::start(NodeId(1), Registry::new(), link, HostConfig::default());
    // The first save waits (at most half a second) for a second one to begin beside it.
    let saves = Arc::new(AtomicUsize::new(0));
    let (first_began, began) = mpsc::channel();
    let (second_began, second) = mpsc::channel::<()>();
    let (second, counted) = (Mutex::new(second), Arc::clone(&saves));
    let save = move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            first_began.send(()).expect("test waits");
            let _ = second.lock().expect("one first save").recv_timeout(Duration::from_millis(500));
        } else {
            let _ = second_began.send(());
        }
        Ok(())
    };
    let supervisor = Supervisor::start(Parts {
        me: Me { id: 1, addr: "n1".into(), labels: Labels::new() },
        incarnation: 3,
        transport,
        dispatch,
        log,
        machine,
        config: SupervisorConfig::default(),
        save_incarnation: Box::new(save),
        host,
        services: Box::new(Registry::new),
        fresh: false,
        admitted_first: Box::new(|| Ok(())),
        record_older_copy: Box::new(|| Ok(())),
        older_copy: false,
        ended_left: None,
        record_left: Box::new(|_| Ok(())),
        rejoin: false,
        made_incarnation: false,
    })
    .await
    .expect("supervisor starts");
    let renewing = |s: &Arc<Supervisor>| {
        let s = Arc::clone(s);
        std::thread::spawn(move || s.renew_incarnation(3).expect("renewed"))
    };
    let first = renewing(&supervisor);
    began.recv().expect("the first save begins");
    let second = renewing(&supervisor);
    assert_eq!((first.join().expect("first"), second.join().expect("second")), (4, 4));
    assert_eq!(saves.load(Ordering::SeqCst), 1, "the new incarnation is saved once");
    assert_eq!(supervisor.incarnation(), 4);
    supervisor.shutdown().await;
}
