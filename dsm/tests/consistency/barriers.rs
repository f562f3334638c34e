//! Barriers: they wait as long as it takes, and keep their parties in step through changes.

use crate::harness::Cluster;
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, DsmError};
use gobelins_locator::NodeId;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A barrier waits for a slow node as long as it takes: a phase of 45 s is no fault, where
/// the access deadline (30 s) once failed it.
#[test]
fn a_barrier_waits_for_a_slow_node_past_the_access_deadline() {
    replay(async {
        let cluster = Cluster::start(2, DsmConfig::default()).await;
        let (one, two) = (cluster.dsm(NodeId(1)), cluster.dsm(NodeId(2)));
        let early = tokio::spawn(async move { one.barrier(3, 2).await });
        tokio::time::sleep(Duration::from_secs(45)).await;
        two.barrier(3, 2).await.expect("the slow node passes");
        early.await.expect("task").expect("the early node waited for it");
    });
}

/// A change does not wait out a barrier's poll. Its first step waits for the handlers running
/// on each node, and the barrier's manager keeps an arrival parked for 20 ms before it tells
/// the node to ask again: one join in three during MGS spent that in its before-migration
/// phase. The parked arrival now answers as the change begins, and asks again through it.
#[test]
fn a_change_does_not_wait_for_an_arrival_parked_at_a_barrier() {
    replay(async {
        let mut cluster = Cluster::start(2, DsmConfig::default()).await;
        let (one, two) = (cluster.dsm(NodeId(1)), cluster.dsm(NodeId(2)));
        let early = tokio::spawn(async move { one.barrier(3, 2).await });
        // Its arrival is parked at the barrier's manager by now.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let joined = cluster.mem.add().await;
        let mut befores = Vec::new();
        for node in [NodeId(1), NodeId(2), joined] {
            let history = cluster.mem.host(node).history();
            let record = history.last().expect("the join is in every participant's history");
            befores.push(record.before_ms);
        }
        assert!(
            befores.iter().all(|&ms| ms < 5.0),
            "before migration waited for the parked arrival: {befores:?} ms"
        );
        assert!(!early.is_finished(), "node 2 has not arrived yet");
        two.barrier(3, 2).await.expect("node 2 passes");
        early.await.expect("task").expect("node 1 asked again through the change and passes");
    });
}

/// A barrier that gave up (past its wait deadline, or dropped by its caller) and is called
/// again waits for the same passage: the nodes stay in step through the barriers after it.
#[test]
fn a_barrier_called_again_after_giving_up_keeps_the_nodes_in_step() {
    replay(async {
        let config =
            DsmConfig { wait_deadline: Some(Duration::from_secs(1)), ..DsmConfig::default() };
        let cluster = Cluster::start(2, config).await;
        let (one, two) = (cluster.dsm(NodeId(1)), cluster.dsm(NodeId(2)));
        let waited = one.barrier(3, 2).await;
        assert!(matches!(waited, Err(DsmError::WaitedTooLong { .. })), "{waited:?}");
        // Dropped by its caller, too.
        assert!(tokio::time::timeout(Duration::from_millis(300), one.barrier(3, 2)).await.is_err());
        for round in 0..3 {
            let (a, b) = tokio::join!(one.barrier(3, 2), async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                two.barrier(3, 2).await
            });
            a.unwrap_or_else(|e| panic!("round {round}: node 1: {e}"));
            b.unwrap_or_else(|e| panic!("round {round}: node 2: {e}"));
        }
    });
}

/// Barriers keep their parties in step while the entries behind them move (a node added, one
/// evicted) and while their manager dies: no party passes a round before every party has
/// reached it, and every round is passed.
#[test]
fn barriers_keep_their_parties_in_step_through_changes_and_their_managers_failure() {
    const IDS: u64 = 8;
    const ROUNDS: u64 = 60;
    replay(async {
        let mut cluster = Cluster::start(4, DsmConfig::default()).await;
        let parties = [NodeId(1), NodeId(2)];
        // The round each party has reached, set before it arrives at that round's barrier.
        let reached: Arc<Mutex<BTreeMap<NodeId, u64>>> = Arc::default();
        let mut tasks = Vec::new();
        for party in parties {
            let (dsm, reached) = (cluster.dsm(party), Arc::clone(&reached));
            tasks.push(tokio::spawn(async move {
                for round in 1..=ROUNDS {
                    reached.lock().expect("reached").insert(party, round);
                    dsm.barrier(round % IDS, parties.len() as u32)
                        .await
                        .unwrap_or_else(|e| panic!("{party:?}, round {round}: {e}"));
                    let behind: Vec<_> = reached
                        .lock()
                        .expect("reached")
                        .iter()
                        .filter(|(_, r)| **r < round)
                        .map(|(n, r)| (*n, *r))
                        .collect();
                    assert!(behind.is_empty(), "{party:?} passed round {round} before {behind:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let added = cluster.mem.add().await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        cluster.mem.evict(NodeId(4)).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        // The node that is not a party manages some of the barriers now: it dies with them.
        let managed: Vec<u64> = {
            let table = cluster.mem.snapshot();
            (0..IDS)
                .filter(|&id| {
                    table.locate(gobelins_dsm::DSM, gobelins_dsm::barrier_key(id))
                        == Some(NodeId(3))
                })
                .collect()
        };
        assert!(!managed.is_empty(), "node 3 manages none of the barriers");
        // A node keeps wake-ups only for the barriers it manages: the evicted node's and the
        // moved ones went with their entries.
        let table = cluster.mem.snapshot();
        for node in cluster.mem.nodes() {
            let managing = (0..IDS)
                .filter(|&id| {
                    table.locate(gobelins_dsm::DSM, gobelins_dsm::barrier_key(id)) == Some(node)
                })
                .count();
            let wakeups = cluster.made.lock().expect("made")[node.0 as usize].barrier_wakeups();
            assert!(wakeups <= managing, "{node:?}: {wakeups} wake-ups for {managing} barriers");
        }
        let least = reached.lock().expect("reached").values().min().copied();
        assert!(least < Some(ROUNDS / 2), "the changes came too late: round {least:?}");
        cluster.mem.fail(NodeId(3)).await;
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("every round passed")
                .expect("no party passed early");
        }
        assert_eq!(reached.lock().expect("reached").values().min(), Some(&ROUNDS));
        assert!(cluster.mem.nodes().contains(&added));
    });
}
