//! A node's data directory wiped, its disk full, or its bootstrap stopped half way.

use crate::harness::{
    cluster, node, node_on, replay, three_voters, until_active, until_all, until_voters, Node,
    Watchdog,
};
use gobelins_adaptation::{HostConfig, Registry};
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::{store, SupervisorConfig};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

#[test]
fn a_node_whose_data_directory_was_wiped_is_not_admitted_as_its_active_life_with_nothing() {
    replay(async {
        let net = MemNetwork::new(17);
        let config = SupervisorConfig::loopback();
        let mut nodes = cluster(&net, 4, config.clone()).await;
        until_active(&nodes, 4).await;
        let all: Vec<&Node> = nodes.iter().collect();
        until_voters(&all, 3).await;
        // The learner: its wiped log is raft's business only as a learner's.
        let voters = nodes[0].supervisor.voters();
        let wiped = (1..=4).find(|id| !voters.contains(id)).expect("a learner");
        let old = nodes.remove(wiped as usize - 1);
        old.supervisor.shutdown().await;
        net.crash(wiped);
        drop(old);

        // Started again at once, before anyone noticed, with an empty data directory: the same
        // id, address and first incarnation as the life the cluster counts as active.
        let fresh = node(&net, wiped, config).await;
        let joined = fresh.supervisor.join_via("n1", Duration::from_secs(10)).await;
        match joined {
            Err(error) => assert!(error.to_string().contains("never served it"), "{error}"),
            other => panic!("admitted as the active life it never served: {other:?}"),
        }
        assert!(!fresh.supervisor.life_admitted());

        // The agent exits on that refusal; the others, whose leader replicated to the wiped log
        // meanwhile, go on and recover the life it had.
        fresh.supervisor.shutdown().await;
        net.crash(wiped);
        let others: Vec<&Node> = nodes.iter().collect();
        until_all(&others, Duration::from_secs(30), "the wiped node's life declared failed", |s| {
            s.is_stable() && s.nodes[&wiped].status == NodeStatus::Failed
        })
        .await;
    });
}

/// The entry a wiped voter helped commit must survive: its empty log must not make up the
/// quorum that elects a node which never had the entry.
#[test]
fn a_voter_whose_data_directory_was_wiped_elects_no_leader_that_lacks_what_it_committed() {
    replay(async {
        use gobelins_supervisor::state::Command;
        let net = MemNetwork::new(23);
        let config = SupervisorConfig::loopback();
        let mut nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let wiped = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        let behind = (1..=3).find(|&id| id != leader && id != wiped).expect("another");

        // Committed by the leader and the node about to be wiped, while the third hears nothing.
        net.isolate(behind, [leader, wiped]);
        let spec = gobelins_kvdir::KvDir::declaration();
        let at_leader = Arc::clone(&nodes[leader as usize - 1].supervisor);
        let registered = at_leader.propose(Command::Register(spec.clone())).await;
        assert!(matches!(registered, Ok(Ok(_))), "{registered:?}");

        // The wiped node comes back at once on an empty directory; the leader dies.
        for id in [wiped, leader] {
            let old = &nodes[id as usize - 1];
            old.supervisor.shutdown().await;
            net.crash(id);
        }
        nodes[wiped as usize - 1] = node(&net, wiped, config).await;
        net.heal();

        tokio::time::sleep(Duration::from_secs(10)).await;
        for id in [behind, wiped] {
            let n = &nodes[id as usize - 1].supervisor;
            if n.leader() == Some(id) {
                assert!(
                    n.state().declared(spec.id).is_some(),
                    "node {id} leads without the registration the old quorum committed"
                );
            }
        }
    });
}

/// A disk in memory that can fill up: every write then fails as a full disk's does.
#[derive(Debug)]
struct Disk {
    bytes: redb::backends::InMemoryBackend,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl Disk {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

impl redb::StorageBackend for Disk {
    fn len(&self) -> std::io::Result<u64> {
        self.bytes.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.bytes.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.bytes.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.bytes.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.bytes.write(offset, data)
    }
}

/// A bootstrap stopped after raft started and before the node's own join committed left a
/// directory that refused `--bootstrap` and, started without it, was never admitted.
#[test]
fn a_bootstrap_stopped_half_way_is_finished_and_nothing_else_is_taken_for_one() {
    replay(async {
        let net = MemNetwork::new(12);
        let config = SupervisorConfig::loopback();
        let first = node(&net, 1, config.clone()).await;
        first.supervisor.start_raft_alone().await.expect("raft started");
        let finished = first.supervisor.finish_bootstrap().await.expect("finished");
        assert!(matches!(finished, Some(Ok(_))), "{finished:?}");
        let nodes = vec![first, node(&net, 2, config).await];
        nodes[1]
            .supervisor
            .join_via("n1", Duration::from_secs(30))
            .await
            .expect("join")
            .expect("ok");
        until_active(&nodes, 2).await;
        for node in &nodes {
            let again = node.supervisor.finish_bootstrap().await.expect("asked");
            assert!(
                again.is_none(),
                "node {}: a finished bootstrap, or a joiner",
                node.supervisor.id()
            );
        }
    });
}

#[test]
fn a_node_whose_disk_fills_up_stops_and_the_cluster_declares_it_failed() {
    replay(async {
        use gobelins_supervisor::Lifecycle;
        let net = MemNetwork::new(11);
        let config = SupervisorConfig::loopback();
        let mut nodes = cluster(&net, 2, config.clone()).await;
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let disk = Disk { bytes: redb::backends::InMemoryBackend::new(), full: Arc::clone(&full) };
        let store = store::open_on(disk, true).expect("store on the disk");
        let dir = TempDir::new().expect("temporary directory");
        let third =
            node_on(&net, 3, config.clone(), Registry::new, HostConfig::default(), store, dir)
                .await;
        third.supervisor.join_via("n1", Duration::from_secs(30)).await.expect("join").expect("ok");
        nodes.push(third);
        until_active(&nodes, 3).await;
        let all: Vec<&Node> = nodes.iter().collect();
        until_voters(&all, 3).await;
        let mut lifecycle = nodes[2].supervisor.lifecycle();
        assert_eq!(*lifecycle.borrow(), Lifecycle::Member);

        full.store(true, std::sync::atomic::Ordering::SeqCst);
        // Any change must reach node 3's log.
        let spec = gobelins_kvdir::KvDir::declaration();
        let registered = nodes[0]
            .supervisor
            .propose_until(
                gobelins_supervisor::state::Command::Register(spec),
                Duration::from_secs(10),
            )
            .await;
        assert!(matches!(registered, Ok(Ok(_))), "the other two commit without node 3");
        let stopped = tokio::time::timeout(
            Duration::from_secs(10),
            lifecycle.wait_for(|l| matches!(l, Lifecycle::Fatal(_))),
        )
        .await
        .is_ok();
        assert!(stopped, "node 3 saw its raft stop: {:?}", *lifecycle.borrow());

        let others = [&nodes[0], &nodes[1]];
        until_all(&others, config.failure_timeout * 20, "node 3 declared failed", |s| {
            s.is_stable() && s.nodes[&3].status == NodeStatus::Failed
        })
        .await;

        // A node stopped so still answers, to say why: a join through it is told so at once,
        // not "the wrong message" after its whole window.
        let fourth = node(&net, 4, config).await;
        let joining = fourth.supervisor.join_via("n3", Duration::from_secs(30));
        let joined = tokio::time::timeout(Duration::from_secs(5), joining).await;
        let error = joined.expect("told at once").expect_err("node 3 takes no joins").to_string();
        assert!(
            error.contains("stopped on a fatal error") && error.contains("another member"),
            "{error}"
        );
        // Nor does raft ask it again at once, over and over: it took the answer for a network
        // error and retried without a pause, and the cluster's paused clock never moved again.
        let asked = || net.calls(1, 3) + net.calls(2, 3);
        let before = asked();
        let _spin = Watchdog::new(120, "node 3's answers were taken for network errors");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let again = asked() - before;
        assert!(again < 30, "node 3 was asked {again} times in a second");
    });
}
