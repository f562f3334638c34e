//! In-process clusters over the in-memory transport, with paused time: partitions, delays and
//! lost messages, and what the supervisors make of them.

use gobelins_adaptation::testing::test_seed;
use gobelins_adaptation::{Host, HostConfig, Registry};
use gobelins_locator::{Labels, NodeId};
use gobelins_supervisor::lane;
use gobelins_supervisor::link::TransportLink;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::rpc::{Request, Response};
use gobelins_supervisor::state::{Applied, ClusterState, NodeStatus, Refusal};
use gobelins_supervisor::transport::{Handler, Transport};
use gobelins_supervisor::{codec, store, Dispatch, Me, Parts, Supervisor, SupervisorConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

struct Node {
    supervisor: Arc<Supervisor>,
    _dir: TempDir,
}

/// [`gobelins_adaptation::testing::replay`], with the rafts' election timeouts drawn from the
/// test's seed too: without it they came from the OS, and a scenario that depends on who wins
/// an election took different paths from one run of the same seed to the next.
fn replay<F: std::future::Future>(test: F) -> F::Output {
    gobelins_supervisor::runtime::seed_this_thread(test_seed());
    gobelins_adaptation::testing::replay(test)
}

async fn node(net: &MemNetwork, id: u64, config: SupervisorConfig) -> Node {
    node_hosting(net, id, config, Registry::new, HostConfig::default()).await
}

async fn node_hosting(
    net: &MemNetwork,
    id: u64,
    config: SupervisorConfig,
    services: fn() -> Registry,
    host: HostConfig,
) -> Node {
    let dir = TempDir::new().expect("temporary directory");
    let store = store::open_with(&dir.path().join("raft.redb"), false).expect("store");
    node_on(net, id, config, services, host, store, dir).await
}

async fn node_on(
    net: &MemNetwork,
    id: u64,
    config: SupervisorConfig,
    services: fn() -> Registry,
    host: HostConfig,
    stores: (store::LogStore, store::StateMachine),
    dir: TempDir,
) -> Node {
    let supervisor = supervisor_on(net, id, config, services, host, stores, true).await;
    Node { supervisor, _dir: dir }
}

/// A supervisor for node `id` on `stores`; `made` says whether this process made its
/// incarnation (a new data directory) or found it (a restart).
async fn supervisor_on(
    net: &MemNetwork,
    id: u64,
    config: SupervisorConfig,
    services: fn() -> Registry,
    host: HostConfig,
    stores: (store::LogStore, store::StateMachine),
    made: bool,
) -> Arc<Supervisor> {
    supervisor_behind(net, id, config, services, host, stores, made, |d| d).await
}

/// [`supervisor_on`], with the requests to the node handled by what `front` makes of its
/// dispatch.
#[allow(clippy::too_many_arguments)]
async fn supervisor_behind(
    net: &MemNetwork,
    id: u64,
    config: SupervisorConfig,
    services: fn() -> Registry,
    host: HostConfig,
    (log, machine): (store::LogStore, store::StateMachine),
    made: bool,
    front: impl FnOnce(Arc<Dispatch>) -> Arc<dyn Handler>,
) -> Arc<Supervisor> {
    let dispatch = Arc::new(Dispatch::default());
    let transport = Arc::new(net.attach(id, &format!("n{id}"), front(dispatch.clone())));
    let link = Arc::new(TransportLink::new(transport.clone()));
    let host = Host::start(NodeId(id), services(), link, host);
    Supervisor::start(Parts {
        me: Me { id, addr: format!("n{id}"), labels: Labels::new() },
        incarnation: 1,
        transport,
        dispatch,
        log,
        machine,
        config,
        save_incarnation: Box::new(|_| Ok(())),
        host,
        services: Box::new(services),
        fresh: true,
        admitted_first: Box::new(|| Ok(())),
        ended_left: None,
        record_left: Box::new(|_| Ok(())),
        rejoin: false,
        made_incarnation: made,
    })
    .await
    .expect("supervisor starts")
}

async fn cluster(net: &MemNetwork, size: u64, config: SupervisorConfig) -> Vec<Node> {
    let mut nodes = vec![node(net, 1, config.clone()).await];
    nodes[0].supervisor.bootstrap().await.expect("bootstrap").expect("accepted");
    for id in 2..=size {
        let n = node(net, id, config.clone()).await;
        n.supervisor
            .join_via("n1", Duration::from_secs(30))
            .await
            .expect("join")
            .expect("accepted");
        nodes.push(n);
    }
    nodes
}

/// Waits (in paused time) until `check` holds on every node's own applied state.
async fn until_all(
    nodes: &[&Node],
    limit: Duration,
    what: &str,
    check: impl Fn(&ClusterState) -> bool,
) {
    let start = tokio::time::Instant::now();
    while !nodes.iter().all(|n| check(&n.supervisor.state())) {
        if start.elapsed() >= limit {
            for n in nodes {
                let s = n.supervisor.state();
                eprintln!(
                    "node {}: leader {:?}, epoch {}, in progress {:?}, {:?}",
                    n.supervisor.id(),
                    n.supervisor.leader(),
                    s.epoch,
                    s.in_progress,
                    statuses(&s)
                );
            }
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every node holds a stable configuration with `count` active nodes.
async fn until_active(nodes: &[Node], count: usize) {
    let all: Vec<&Node> = nodes.iter().collect();
    until_all(&all, Duration::from_secs(60), &format!("{count} active nodes"), |s| {
        s.is_stable() && s.with_status(NodeStatus::Active).count() == count
    })
    .await;
}

/// Waits until every node holds a stable configuration with `node` active as incarnation 2.
async fn until_back_as_second_life(nodes: &[&Node], node: u64) {
    until_all(nodes, Duration::from_secs(60), &format!("node {node} back as incarnation 2"), |s| {
        s.is_stable()
            && s.nodes[&node].status == NodeStatus::Active
            && s.nodes[&node].incarnation == 2
    })
    .await;
}

/// Waits until every node sees `count` raft voters.
async fn until_voters(nodes: &[&Node], count: usize) {
    let start = tokio::time::Instant::now();
    while !nodes.iter().all(|n| n.supervisor.voters().len() == count) {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {count} voters");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn statuses(state: &ClusterState) -> Vec<(u64, NodeStatus, u64)> {
    state.nodes.iter().map(|(&id, r)| (id, r.status, r.incarnation)).collect()
}

/// Every node sees the same members, statuses and incarnations as the first.
fn assert_all_agree(nodes: &[Node], when: &str) {
    let first = statuses(&nodes[0].supervisor.state());
    for n in &nodes[1..] {
        assert_eq!(statuses(&n.supervisor.state()), first, "every node agrees {when}");
    }
}

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

/// Cuts a follower of three voters off until the other two declare it failed and keep one
/// voter: the leader, which therefore stays the leader and the node the cut-off one rejoins
/// through. Returns (leader, the cut-off node, the other).
async fn a_follower_declared_failed(net: &MemNetwork, nodes: &[Node]) -> (u64, u64, u64) {
    let leader = nodes[0].supervisor.leader().expect("a leader");
    let (x, other) = match leader {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    let at = |id: u64| &nodes[id as usize - 1];
    let majority = [at(leader), at(other)];
    cut_off_until_declared_failed(net, x, [leader, other], &majority).await;
    until_voters(&majority, 1).await;
    (leader, x, other)
}

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

/// [`a_follower_declared_failed`], then, the follower back as its second life, cut off again
/// until the other two declare it failed once more; healed. The leader counted the first
/// failure without holding the node; its rejoin after the second is held.
async fn a_follower_declared_failed_twice(net: &MemNetwork, nodes: &[Node]) -> (u64, u64, u64) {
    let (leader, x, other) = a_follower_declared_failed(net, nodes).await;
    let at = |id: u64| &nodes[id as usize - 1];
    let once = at(leader).supervisor.view().held;
    assert_eq!(once, BTreeMap::from([(x, (1, 0))]), "x failed once: counted, held by nobody");
    net.heal();
    until_back_as_second_life(&nodes.iter().collect::<Vec<_>>(), x).await;
    cut_off_until_declared_failed(net, x, [leader, other], &[at(leader), at(other)]).await;
    net.heal();
    (leader, x, other)
}

/// Cuts node `x` off from `others` until `watchers` see it declared failed.
async fn cut_off_until_declared_failed(
    net: &MemNetwork,
    x: u64,
    others: impl IntoIterator<Item = u64>,
    watchers: &[&Node],
) {
    net.isolate(x, others);
    until_all(watchers, Duration::from_secs(30), "the cut-off node declared failed", |s| {
        s.is_stable() && s.nodes[&x].status == NodeStatus::Failed
    })
    .await;
}

/// Heals the network and waits for node `x` back as life `life + 1`, within 4 s: not held.
async fn healed_and_back_unheld(net: &MemNetwork, all: &[&Node], x: u64, life: u64) {
    net.heal();
    let back = tokio::time::Instant::now();
    until_all(all, Duration::from_secs(30), "the node back", |s| {
        s.is_stable()
            && s.nodes[&x].status == NodeStatus::Active
            && s.nodes[&x].incarnation == life + 1
    })
    .await;
    let took = back.elapsed();
    assert!(took < Duration::from_secs(4), "life {life}: back in {took:?}, not held");
}

/// A control socket served by `supervisor`, in a temporary directory kept with it.
async fn control_socket(
    supervisor: &Arc<Supervisor>,
) -> (TempDir, std::path::PathBuf, gobelins_supervisor::control::ControlSocket) {
    let dir = TempDir::new().expect("temporary directory");
    let path = dir.path().join("control.sock");
    let entering = gobelins_supervisor::entering::Entering::new(String::new());
    entering.done();
    let socket = gobelins_supervisor::control::serve(
        &path,
        Arc::clone(supervisor),
        gobelins_supervisor::console::Consoles::new(),
        entering,
    )
    .await
    .expect("control socket");
    (dir, path, socket)
}

/// A node declared failed twice is held out before its third life, so that the cluster stops
/// moving its entries out and back; the leader's view says so. Once the hold is over it rejoins
/// by itself.
#[test]
fn a_node_that_fails_again_is_held_out_for_a_while_then_rejoins_by_itself() {
    replay(async {
        let logs = Logs::default();
        let _capture = logs.capture();
        let net = MemNetwork::new(43);
        let nodes = three_voters(&net).await;
        let (leader, x, other) = a_follower_declared_failed_twice(&net, &nodes).await;
        let failed = tokio::time::Instant::now();
        let at = |id: u64| &nodes[id as usize - 1];
        let all: Vec<&Node> = nodes.iter().collect();
        let majority = [at(leader), at(other)];
        let leads = |n: &&&Node| n.supervisor.leader() == Some(n.supervisor.id());
        let view = majority.iter().find(leads).expect("a leader").supervisor.view();
        let (failures, left_ms) = view.held[&x];
        assert_eq!(failures, 2, "{:?}", view.held);
        let hold = SupervisorConfig::loopback().rejoin_hold.as_millis() as u64;
        assert!(left_ms > hold - 1000 && left_ms <= hold, "held {left_ms} ms of {hold}");

        // Healed, x finds itself failed within a few fence checks, and asks to rejoin: held.
        tokio::time::sleep(Duration::from_millis(left_ms - 500)).await;
        for n in majority {
            let record = &n.supervisor.state().nodes[&x];
            assert_eq!(
                (record.status, record.incarnation),
                (NodeStatus::Failed, 2),
                "x is still held out, as node {} sees it",
                n.supervisor.id()
            );
        }
        let x_node = &at(x).supervisor;
        assert!(!x_node.life_admitted(), "x serves nothing while held");
        assert!(logs.contain("rejoin held back: node"), "x asked and was told why");
        assert!(
            x_node.view().held.contains_key(&x),
            "x's own view says it is held: {:?}",
            x_node.view().held
        );
        // A request through x is refused at once, saying why, rather than left to time out.
        let (_dir, path, _socket) = control_socket(x_node).await;
        let failed_before = x_node.host().stats().requests_failed;
        let asked = tokio::time::Instant::now();
        let call = gobelins_supervisor::control::ControlRequest::Call {
            service: 1,
            key: 7,
            body: vec![0],
        };
        let refused = gobelins_supervisor::control::request(&path, &call, |_| {}).await;
        let said = refused.expect_err("refused").to_string();
        assert!(said.contains(&format!("node {x} is held out of the cluster")), "{said}");
        assert!(asked.elapsed() < Duration::from_millis(100), "at once: {:?}", asked.elapsed());
        let failed_now = x_node.host().stats().requests_failed;
        assert_eq!(failed_now, failed_before + 1, "counted failed in `stats`");
        until_all(&all, Duration::from_secs(30), "x back as its third life", |s| {
            s.is_stable()
                && s.nodes[&x].status == NodeStatus::Active
                && s.nodes[&x].incarnation == 3
        })
        .await;
        assert!(failed.elapsed() >= Duration::from_millis(left_ms), "not before the hold ended");
        assert_all_agree(&nodes, "after the third life joined");
    });
}

/// A request that reached a node before it learned of its hold, and waits there for a
/// configuration, is refused once the node learns, saying why and that it was not sent,
/// rather than left to wait until the hold ends (or out its deadline) for a configuration the
/// hold keeps away; `stats` counts it failed.
#[test]
fn a_request_waiting_on_a_node_as_it_learns_of_its_hold_is_refused_then() {
    use gobelins_supervisor::control::{request, ControlRequest};
    replay(async {
        let net = MemNetwork::new(59);
        let nodes = three_voters_hosting(&net, kvdir, HostConfig::default()).await;
        kvdir_registered(&nodes[0]).await;
        let (leader, x, other) = a_follower_declared_failed(&net, &nodes).await;
        let at = |id: u64| &nodes[id as usize - 1];
        let all: Vec<&Node> = nodes.iter().collect();
        net.heal();
        until_back_as_second_life(&all, x).await;
        cut_off_until_declared_failed(&net, x, [leader, other], &[at(leader), at(other)]).await;

        // Healed, x learns its second life was declared failed and begins its third, which
        // asks to rejoin; the members' answers are lost until a request has reached it. Slow
        // messages leave time to lose the first.
        let x_node = &at(x).supervisor;
        net.set_delay(Duration::from_millis(20));
        net.heal();
        let healed = tokio::time::Instant::now();
        while x_node.incarnation() < 3 {
            assert!(healed.elapsed() < Duration::from_secs(30), "x began no third life");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        net.mute(leader, x);
        net.mute(other, x);
        assert_eq!(x_node.held_back(), None, "x asked, and knows of no hold yet");
        let (_dir, path, _socket) = control_socket(x_node).await;
        let failed_before = x_node.host().stats().requests_failed;
        let get = codec::encode(&gobelins_kvdir::Request::Get).expect("encode");
        let call = ControlRequest::Call { service: gobelins_kvdir::KVDIR.0, key: 7, body: get };
        let asked = tokio::time::Instant::now();
        let waiting =
            tokio::spawn(
                async move { request(&path, &call, |_| {}).await.map_err(|e| e.to_string()) },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        if waiting.is_finished() {
            panic!("the request did not wait for x's admission: {:?}", waiting.await);
        }
        net.set_delay(Duration::ZERO);
        net.heal();
        let said = waiting.await.expect("the request's task").expect_err("refused");
        let took = asked.elapsed();
        assert!(said.contains(&format!("node {x} is held out of the cluster")), "{said}");
        assert!(said.starts_with("This request was not sent"), "refused as it waited: {said}");
        // Without the race it waited out the hold (5.4 s), and was served once x rejoined.
        assert!(took < Duration::from_secs(2), "refused as x learned of its hold: {took:?}");
        assert!(x_node.held_back().is_some(), "x is held");
        assert_eq!(x_node.host().stats().requests_failed, failed_before + 1, "counted failed");
    });
}

/// A node held out for failing twice is unheld through a member's control socket: every
/// member lifts its hold, and the node rejoins at its next try, long before the hold would
/// have ended.
#[test]
fn a_held_node_unheld_by_an_operator_rejoins_at_its_next_try() {
    replay(async {
        let net = MemNetwork::new(47);
        let nodes = three_voters(&net).await;
        let (leader, x, other) = a_follower_declared_failed_twice(&net, &nodes).await;
        let at = |id: u64| &nodes[id as usize - 1];
        let all: Vec<&Node> = nodes.iter().collect();
        let (_, left_ms) = at(leader).supervisor.view().held[&x];
        assert!(left_ms > 3000, "held for {left_ms} ms");

        // Through the member that does not lead: every member must forget, the leader too.
        let (_dir, path, _socket) = control_socket(&at(other).supervisor).await;
        let unhold = gobelins_supervisor::control::ControlRequest::Unhold { node: x };
        let answer =
            gobelins_supervisor::control::request(&path, &unhold, |_| {}).await.expect("unheld");
        assert_eq!(answer["held"], true, "{answer}");
        assert_eq!(answer["answered"], serde_json::json!([leader]), "{answer}");
        assert_eq!(answer["silent"], serde_json::json!([]), "{answer}");
        assert_eq!(at(leader).supervisor.view().held.get(&x), None, "the leader forgot");
        let again = gobelins_supervisor::control::request(&path, &unhold, |_| {}).await;
        assert_eq!(again.expect("asked again")["held"], false, "nothing left to lift");
        let forgiven = tokio::time::Instant::now();
        until_all(&all, Duration::from_secs(30), "x back as its third life", |s| {
            s.is_stable()
                && s.nodes[&x].status == NodeStatus::Active
                && s.nodes[&x].incarnation == 3
        })
        .await;
        let back = forgiven.elapsed();
        assert!(
            back < Duration::from_millis(left_ms - 1000),
            "back in {back:?}, held {left_ms} ms"
        );
        assert_all_agree(&nodes, "after the unheld node rejoined");
    });
}

/// In a cluster of two, a node that fails again and again is not held: the other would be
/// left alone, with no replica, and the leader says nothing of a hold it does not enforce.
#[test]
fn in_a_cluster_of_two_a_node_that_keeps_failing_is_not_held() {
    replay(async {
        let logs = Logs::default();
        let _capture = logs.capture();
        let net = MemNetwork::new(53);
        let nodes = cluster(&net, 2, SupervisorConfig::loopback()).await;
        until_active(&nodes, 2).await;
        let all: Vec<&Node> = nodes.iter().collect();
        for life in 1..=3u64 {
            cut_off_until_declared_failed(&net, 2, [1], &all[..1]).await;
            let view = nodes[0].supervisor.view();
            assert_eq!(view.held.get(&2).map(|&(_, left)| left), Some(0), "{:?}", view.held);
            healed_and_back_unheld(&net, &all, 2, life).await;
        }
        assert!(!logs.contain("keeps failing"), "no hold announced");
    });
}

/// A node an operator stops on purpose again and again (SIGTERM, then a start) tells the other
/// members each time: none counts its failures, and it is never held. Unannounced, the second
/// such stop held it out (see the test above).
#[test]
fn a_node_stopped_on_purpose_again_and_again_is_neither_counted_nor_held() {
    replay(async {
        let logs = Logs::default();
        let _capture = logs.capture();
        let net = MemNetwork::new(59);
        let nodes = three_voters(&net).await;
        let all: Vec<&Node> = nodes.iter().collect();
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let x = if leader == 3 { 2 } else { 3 };
        let (a, b) = match x {
            2 => (1, 3),
            _ => (1, 2),
        };
        let at = |id: u64| &nodes[id as usize - 1];
        for life in 1..=3u64 {
            let heard = at(x).supervisor.announce_stopping(Duration::from_millis(500)).await;
            assert_eq!(heard, (2, 2), "life {life}: both members heard it stops");
            let majority = [at(a), at(b)];
            cut_off_until_declared_failed(&net, x, [a, b], &majority).await;
            for n in majority {
                let held = n.supervisor.view().held;
                assert!(!held.contains_key(&x), "life {life}: counted: {held:?}");
            }
            healed_and_back_unheld(&net, &all, x, life).await;
        }
        assert!(!logs.contain("keeps failing"), "no hold announced");
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

/// Three active nodes, all voting.
async fn three_voters(net: &MemNetwork) -> Vec<Node> {
    three_voters_hosting(net, Registry::new, HostConfig::default()).await
}

/// Three active nodes on the loopback timers, all voting, each hosting `services`.
async fn three_voters_hosting(
    net: &MemNetwork,
    services: fn() -> Registry,
    host: HostConfig,
) -> Vec<Node> {
    let config = SupervisorConfig::loopback();
    let mut nodes = vec![node_hosting(net, 1, config.clone(), services, host.clone()).await];
    nodes[0].supervisor.bootstrap().await.expect("bootstrap").expect("accepted");
    for id in 2..=3 {
        let n = node_hosting(net, id, config.clone(), services, host.clone()).await;
        n.supervisor.join_via("n1", Duration::from_secs(30)).await.expect("join").expect("ok");
        nodes.push(n);
    }
    until_active(&nodes, 3).await;
    until_voters(&nodes.iter().collect::<Vec<_>>(), 3).await;
    nodes
}

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

/// Registers kvdir's declaration through `node`, as an agent does when it starts.
async fn kvdir_registered(node: &Node) {
    let register =
        gobelins_supervisor::state::Command::Register(gobelins_kvdir::KvDir::declaration());
    let registered = node.supervisor.propose_until(register, Duration::from_secs(10)).await;
    assert!(matches!(registered, Ok(Ok(_))), "kvdir registered: {registered:?}");
}

fn kvdir() -> Registry {
    let mut registry = Registry::new();
    registry.register(gobelins_adaptation::plugin(gobelins_kvdir::KvDir::new())).expect("kvdir");
    registry
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

/// `supervisor` (node 4, mostly) asking to join through `seed`, in a task of its own.
fn ask_in_background(
    supervisor: &Arc<Supervisor>,
    seed: u64,
) -> tokio::task::JoinHandle<gobelins_supervisor::Result<gobelins_supervisor::state::Outcome>> {
    let supervisor = Arc::clone(supervisor);
    tokio::spawn(
        async move { supervisor.join_via(&format!("n{seed}"), Duration::from_secs(30)).await },
    )
}

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

/// Waits (1 s of paused time at most) until `node`'s host has begun the change of `epoch`, and
/// checks that its own applied state has not.
async fn until_begun_ahead_of_its_log(node: &Supervisor, epoch: u64) {
    let start = tokio::time::Instant::now();
    while node.host().epoch() < epoch {
        assert!(start.elapsed() < Duration::from_secs(1), "node {} began its part", node.id());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(node.state().epoch < epoch, "its own log does not have the change");
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

        // The same word from a node that is not its leader is not heard.
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

/// What the nodes log at warning level and above, kept for the test to read.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's logs, every node's (they all run on the test's runtime), until
    /// the guard is dropped.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || logs.clone())
                .finish(),
        )
    }

    fn contain(&self, text: &str) -> bool {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).contains(text)
    }
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
    });
}

/// Ends this test binary, saying `what`, unless dropped within `secs` seconds of real time. A
/// cluster that spins never lets its paused clock move: without this, a test of such a spin
/// would hang instead of failing.
struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    fn new(secs: u64, what: &'static str) -> Watchdog {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&dropped);
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(secs);
            while std::time::Instant::now() < until {
                if seen.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("{what}: still running after {secs} s of real time");
            std::process::exit(101);
        });
        Watchdog(dropped)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A control client that hangs up while its change is under way (an operator's Ctrl-C) is not
/// followed any more: its agent asked the leader for the whole state every 10 ms, for up to a
/// minute, to tell nobody.
#[test]
fn a_control_client_that_hangs_up_is_not_followed_for_the_rest_of_the_minute() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    replay(async {
        let net = MemNetwork::new(14);
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let mut others = (1..=3).filter(|&id| id != leader);
        let (asker, evicted) =
            (others.next().expect("a follower"), others.next().expect("another"));
        // The evicted node never hears of its eviction, which therefore never ends.
        net.stall_log(leader, evicted);
        net.lose_begun(leader, evicted);
        let (_dir, path, _socket) = control_socket(&nodes[asker as usize - 1].supervisor).await;
        let asked = || net.calls(asker, leader);
        let before = asked();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = asked() - before;

        let client = tokio::net::UnixStream::connect(&path).await.expect("connects");
        let (client, mut sending) = client.into_split();
        let request = format!("{{\"cmd\":\"evict\",\"node\":{evicted}}}\n");
        sending.write_all(request.as_bytes()).await.expect("request sent");
        // Done sending, as `socat` is once its input ends: it still reads what comes.
        sending.shutdown().await.expect("half-closed");
        let mut lines = tokio::io::BufReader::new(client).lines();
        let asking = lines.next_line().await.expect("reads").expect("a line");
        assert!(asking.contains("asking the cluster's leader"), "said at once: {asking}");
        let first = lines.next_line().await.expect("reads").expect("a line");
        assert!(first.contains("accepted"), "{first}");
        let second = lines.next_line().await.expect("reads").expect("a line");
        assert!(second.contains("progress"), "the change is under way: {second}");
        let before = asked();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let followed = asked() - before;
        assert!(
            followed > idle + 50,
            "a client that only stopped sending is still followed: {followed} asks, {idle} when idle"
        );
        drop((lines, sending));

        let before = asked();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after_hang_up = asked() - before;
        assert!(
            after_hang_up <= idle + 5,
            "node {asker} asked the leader {after_hang_up} times in a second for a client gone, {idle} when idle"
        );
    });
}

/// `gobelins join` asked of an active member says there is nothing to do; asked of an agent
/// whose node left, it is refused: joined in the moment before that agent stopped, the node
/// was active, then declared failed.
#[test]
fn a_join_asked_of_an_active_node_does_nothing_and_of_a_node_that_left_is_refused() {
    use gobelins_supervisor::state::Command;
    use gobelins_supervisor::Lifecycle;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    replay(async {
        let net = MemNetwork::new(16);
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let asker = (1..=3).find(|&id| id != leader).expect("a follower");
        let supervisor = Arc::clone(&nodes[asker as usize - 1].supervisor);
        let (_dir, path, _socket) = control_socket(&supervisor).await;
        let join = |seed: u64| {
            let path = path.clone();
            async move {
                let client = tokio::net::UnixStream::connect(&path).await.expect("connects");
                let (client, mut sending) = client.into_split();
                let request = format!("{{\"cmd\":\"join\",\"seed\":\"n{seed}\"}}\n");
                sending.write_all(request.as_bytes()).await.expect("request sent");
                let mut lines = tokio::io::BufReader::new(client).lines();
                let mut said = Vec::new();
                while let Some(line) = lines.next_line().await.expect("reads") {
                    said.push(line);
                }
                said.join("\n")
            }
        };
        let said = join(leader).await;
        assert!(said.contains("already an active member: nothing to do"), "{said}");
        assert!(said.contains("\"ok\""), "{said}");

        let leave = Command::Leave { node: asker };
        let at_leader = &nodes[leader as usize - 1].supervisor;
        assert!(matches!(at_leader.propose(leave).await, Ok(Ok(_))));
        let mut lifecycle = supervisor.lifecycle();
        let left = tokio::time::timeout(
            Duration::from_secs(30),
            lifecycle.wait_for(|l| *l == Lifecycle::Left),
        )
        .await
        .is_ok();
        assert!(left, "the node left");
        let said = join(leader).await;
        assert!(said.contains("this agent is stopping"), "{said}");
        let state = at_leader.state();
        assert_eq!(state.nodes[&asker].status, NodeStatus::Left, "no join was asked");
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
