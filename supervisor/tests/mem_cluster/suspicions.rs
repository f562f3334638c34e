//! Failure detection: the leader's view of silent and suspected nodes, and probes run out.

use crate::harness::{
    cluster, replay, statuses, supervisor_behind, until_active, until_all, until_voters, Logs, Node,
};
use gobelins_adaptation::{HostConfig, Registry};
use gobelins_supervisor::lane;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::rpc::Request;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::transport::Handler;
use gobelins_supervisor::{codec, store, Dispatch, SupervisorConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// Between a node's death and the commit of its failure the cluster's state still shows it
/// active: the leader's view says it is silent, then suspected, so that `status` does not call
/// such a cluster stable.
#[test]
fn the_leader_s_view_shows_a_dead_node_silent_then_suspected_before_its_failure_commits() {
    replay(async {
        let net = MemNetwork::new(5);
        let nodes = cluster(&net, 3, SupervisorConfig::loopback()).await;
        until_active(&nodes, 3).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let leading = &nodes[(leader - 1) as usize].supervisor;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(leading.view().silent, BTreeMap::new(), "every node answers");
        let killed = (1..=3).find(|&n| n != leader).expect("a follower");

        net.crash(killed);
        let (mut late, mut suspected) = (false, false);
        loop {
            let view = leading.view();
            if view.state.nodes[&killed].status != NodeStatus::Active {
                break;
            }
            match view.silent.get(&killed) {
                Some(&(_, false)) => late = true,
                Some(&(ms, true)) => {
                    suspected = true;
                    assert!(ms >= 300, "suspected after the failure timeout, not {ms} ms");
                }
                None => assert!(!late && !suspected, "silence is never forgotten meanwhile"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(late && suspected, "late: {late}, suspected: {suspected}");
        let at_leader = [&nodes[(leader - 1) as usize]];
        until_all(&at_leader, Duration::from_secs(30), "the failure recovered", |s| {
            s.is_stable() && s.nodes[&killed].status == NodeStatus::Failed
        })
        .await;
        let view = leading.view();
        assert!(!view.silent.contains_key(&killed), "a failed node is no member to hear from");
    });
}

/// A node's handler that can leave one probe unanswered until its caller's deadline, and says
/// when it holds it.
struct Spy {
    inner: Arc<Dispatch>,
    /// (caller, suspect): the next probe of `suspect` asked by `caller` is left unanswered.
    hold: std::sync::Mutex<Option<(u64, u64)>>,
    held: tokio::sync::Notify,
}

impl Spy {
    fn hold_probe(&self, caller: u64, suspect: u64) {
        *self.hold.lock().expect("hold") = Some((caller, suspect));
    }

    /// Whether `request` from `from` is the probe to leave unanswered; disarms if it is.
    fn holds(&self, from: u64, request: &bytes::Bytes) -> bool {
        let mut hold = self.hold.lock().expect("hold");
        let Some((caller, suspect)) = *hold else { return false };
        let probe = from == caller
            && match lane::Lane::open(request.clone()) {
                Ok((lane::Lane::Supervisor, body)) => matches!(
                    codec::decode::<Request>(&body),
                    Ok(Request::Probe { target }) if target == suspect
                ),
                _ => false,
            };
        if probe {
            *hold = None;
        }
        probe
    }
}

#[async_trait::async_trait]
impl Handler for Spy {
    async fn handle(self: Arc<Self>, from: u64, request: bytes::Bytes) -> bytes::Bytes {
        if self.holds(from, &request) {
            self.held.notify_one();
            // The caller's deadline ends the wait: the in-memory transport drops this future.
            std::future::pending::<()>().await;
        }
        Arc::clone(&self.inner).handle(from, request).await
    }
}

/// Three active voters on `config`, each behind a [`Spy`] (`spies[id - 1]`).
async fn spied_three_voters(
    net: &MemNetwork,
    config: SupervisorConfig,
) -> (Vec<Node>, Vec<Arc<Spy>>) {
    let (mut nodes, mut spies) = (Vec::new(), Vec::new());
    for id in 1..=3 {
        let dir = TempDir::new().expect("temporary directory");
        let stores = store::open_with(&dir.path().join("raft.redb"), false).expect("store");
        let mut spy = None;
        let front = |inner: Arc<Dispatch>| -> Arc<dyn Handler> {
            let made = Arc::new(Spy {
                inner,
                hold: std::sync::Mutex::new(None),
                held: tokio::sync::Notify::new(),
            });
            spy = Some(Arc::clone(&made));
            made
        };
        let supervisor = supervisor_behind(
            net,
            id,
            config.clone(),
            Registry::new,
            HostConfig::default(),
            stores,
            true,
            front,
        )
        .await;
        if id == 1 {
            supervisor.bootstrap().await.expect("bootstrap").expect("accepted");
        } else {
            let joined = supervisor.join_via("n1", Duration::from_secs(30)).await;
            joined.expect("join").expect("accepted");
        }
        nodes.push(Node { supervisor, _dir: dir });
        spies.push(spy.expect("the node's handler was made"));
    }
    until_active(&nodes, 3).await;
    until_voters(&nodes.iter().collect::<Vec<_>>(), 3).await;
    (nodes, spies)
}

/// A leader stopped (its process paused, its machine suspended) while a witness was asked
/// about a suspect finds, resumed, that its probe ran out: "not reached", which says nothing
/// of the suspect. Taken for a verdict, it would declare failed a node that only this leader
/// missed for a moment. Dropped, the suspect is asked about again if it stays silent; here it
/// is heard again and stays the life it is.
#[test]
fn probes_that_ran_out_while_the_leader_was_stopped_declare_no_node_failed() {
    replay(async {
        let logs = Logs::default();
        let _capture = logs.capture();
        let config = SupervisorConfig {
            // The probe's deadline (40 ms) comes before the leader loop's next tick (50 ms).
            // On resuming, tokio wakes the timers a pause overran in the order they were due,
            // so the leader reads its probe's verdict before its loop notices the pause and
            // starts its detector afresh: the order the guard is for. The warning checked at
            // the end says whether it still is.
            probe_timeout: Duration::from_millis(20),
            // No election for the pause (every node stops with the leader: they share the
            // runtime) or the partition to set off: the leader's verdict could commit.
            raft_election: Duration::from_secs(5),
            ..SupervisorConfig::loopback()
        };
        // Longer than a leader may go without a tick on time and still count as running (the
        // ping interval and half the failure timeout: 200 ms).
        let pause = Duration::from_millis(400);
        let net = MemNetwork::new(37);
        let (nodes, spies) = spied_three_voters(&net, config.clone()).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let suspect = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        let witness = (1..=3).find(|&id| id != leader && id != suspect).expect("another");
        let spy = &spies[witness as usize - 1];

        // Only the leader misses the suspect; the witness reaches it.
        spy.hold_probe(leader, suspect);
        net.partition(leader, suspect);
        let asked = tokio::time::timeout(config.failure_timeout * 3, spy.held.notified()).await;
        assert!(asked.is_ok(), "the leader suspects node {suspect} and asks node {witness}");
        // The process stops with the probe out, and resumes past its deadline.
        tokio::time::advance(pause).await;
        tokio::time::sleep(config.ping_interval * 2).await;
        net.heal();

        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < end {
            for n in &nodes {
                let state = n.supervisor.state();
                let record = &state.nodes[&suspect];
                assert!(
                    record.status == NodeStatus::Active && record.incarnation == 1,
                    "node {} has node {suspect} as {:?} (life {}): declared failed on a probe \
                     that ran out while the leader was stopped; {:?}",
                    n.supervisor.id(),
                    record.status,
                    record.incarnation,
                    statuses(&state)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            logs.contain("verdict on a suspect dropped"),
            "the leader's loop handled the pause before its probe's verdict was read: the test \
             no longer reaches the guard it is for"
        );
    });
}
