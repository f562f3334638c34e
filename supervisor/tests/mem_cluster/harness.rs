//! What the scenarios share: nodes on the in-memory network, waits, logs and a watchdog.

use gobelins_adaptation::testing::test_seed;
use gobelins_adaptation::{Host, HostConfig, Registry};
use gobelins_locator::{Labels, NodeId};
use gobelins_supervisor::link::TransportLink;
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::state::{ClusterState, NodeStatus};
use gobelins_supervisor::transport::Handler;
use gobelins_supervisor::{store, Dispatch, Me, Parts, Supervisor, SupervisorConfig};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

pub(crate) struct Node {
    pub(crate) supervisor: Arc<Supervisor>,
    pub(crate) _dir: TempDir,
}

/// [`gobelins_adaptation::testing::replay`], with the rafts' election timeouts drawn from the
/// test's seed too: without it they came from the OS, and a scenario that depends on who wins
/// an election took different paths from one run of the same seed to the next.
pub(crate) fn replay<F: std::future::Future>(test: F) -> F::Output {
    gobelins_supervisor::runtime::seed_this_thread(test_seed());
    gobelins_adaptation::testing::replay(test)
}

pub(crate) async fn node(net: &MemNetwork, id: u64, config: SupervisorConfig) -> Node {
    node_hosting(net, id, config, Registry::new, HostConfig::default()).await
}

pub(crate) async fn node_hosting(
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

pub(crate) async fn node_on(
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
pub(crate) async fn supervisor_on(
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
pub(crate) async fn supervisor_behind(
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
        record_older_copy: Box::new(|| Ok(())),
        older_copy: false,
        ended_left: None,
        record_left: Box::new(|_| Ok(())),
        // Node 1 bootstraps; the others are started to join, as `--join` starts an agent.
        rejoin: id != 1,
        made_incarnation: made,
    })
    .await
    .expect("supervisor starts")
}

pub(crate) async fn cluster(net: &MemNetwork, size: u64, config: SupervisorConfig) -> Vec<Node> {
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
pub(crate) async fn until_all(
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
pub(crate) async fn until_active(nodes: &[Node], count: usize) {
    let all: Vec<&Node> = nodes.iter().collect();
    until_all(&all, Duration::from_secs(60), &format!("{count} active nodes"), |s| {
        s.is_stable() && s.with_status(NodeStatus::Active).count() == count
    })
    .await;
}

/// Waits until every node holds a stable configuration with `node` active as incarnation 2.
pub(crate) async fn until_back_as_second_life(nodes: &[&Node], node: u64) {
    until_all(nodes, Duration::from_secs(60), &format!("node {node} back as incarnation 2"), |s| {
        s.is_stable()
            && s.nodes[&node].status == NodeStatus::Active
            && s.nodes[&node].incarnation == 2
    })
    .await;
}

/// Waits until every node sees `count` raft voters.
pub(crate) async fn until_voters(nodes: &[&Node], count: usize) {
    let start = tokio::time::Instant::now();
    while !nodes.iter().all(|n| n.supervisor.voters().len() == count) {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {count} voters");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn statuses(state: &ClusterState) -> Vec<(u64, NodeStatus, u64)> {
    state.nodes.iter().map(|(&id, r)| (id, r.status, r.incarnation)).collect()
}

/// Every node sees the same members, statuses and incarnations as the first.
pub(crate) fn assert_all_agree(nodes: &[Node], when: &str) {
    let first = statuses(&nodes[0].supervisor.state());
    for n in &nodes[1..] {
        assert_eq!(statuses(&n.supervisor.state()), first, "every node agrees {when}");
    }
}

/// Cuts a follower of three voters off until the other two declare it failed and keep one
/// voter: the leader, which therefore stays the leader and the node the cut-off one rejoins
/// through. Returns (leader, the cut-off node, the other).
pub(crate) async fn a_follower_declared_failed(
    net: &MemNetwork,
    nodes: &[Node],
) -> (u64, u64, u64) {
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

/// Cuts node `x` off from `others` until `watchers` see it declared failed.
pub(crate) async fn cut_off_until_declared_failed(
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

/// A control socket served by `supervisor`, in a temporary directory kept with it.
pub(crate) async fn control_socket(
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

/// Three active nodes, all voting.
pub(crate) async fn three_voters(net: &MemNetwork) -> Vec<Node> {
    three_voters_hosting(net, Registry::new, HostConfig::default()).await
}

/// Three active nodes on the loopback timers, all voting, each hosting `services`.
pub(crate) async fn three_voters_hosting(
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

/// Registers kvdir's declaration through `node`, as an agent does when it starts.
pub(crate) async fn kvdir_registered(node: &Node) {
    let register =
        gobelins_supervisor::state::Command::Register(gobelins_kvdir::KvDir::declaration());
    let registered = node.supervisor.propose_until(register, Duration::from_secs(10)).await;
    assert!(matches!(registered, Ok(Ok(_))), "kvdir registered: {registered:?}");
}

pub(crate) fn kvdir() -> Registry {
    let mut registry = Registry::new();
    registry.register(gobelins_adaptation::plugin(gobelins_kvdir::KvDir::new())).expect("kvdir");
    registry
}

/// `supervisor` (node 4, mostly) asking to join through `seed`, in a task of its own.
pub(crate) fn ask_in_background(
    supervisor: &Arc<Supervisor>,
    seed: u64,
) -> tokio::task::JoinHandle<gobelins_supervisor::Result<gobelins_supervisor::state::Outcome>> {
    let supervisor = Arc::clone(supervisor);
    tokio::spawn(
        async move { supervisor.join_via(&format!("n{seed}"), Duration::from_secs(30)).await },
    )
}

/// Waits (1 s of paused time at most) until `node`'s host has begun the change of `epoch`, and
/// checks that its own applied state has not.
pub(crate) async fn until_begun_ahead_of_its_log(node: &Supervisor, epoch: u64) {
    let start = tokio::time::Instant::now();
    while node.host().epoch() < epoch {
        assert!(start.elapsed() < Duration::from_secs(1), "node {} began its part", node.id());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(node.state().epoch < epoch, "its own log does not have the change");
}

/// What the nodes log at warning level and above, kept for the test to read.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

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
    pub(crate) fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || logs.clone())
                .finish(),
        )
    }

    pub(crate) fn contain(&self, text: &str) -> bool {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).contains(text)
    }
}

/// Ends this test binary, saying `what`, unless dropped within `secs` seconds of real time. A
/// cluster that spins never lets its paused clock move: without this, a test of such a spin
/// would hang instead of failing.
pub(crate) struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    pub(crate) fn new(secs: u64, what: &'static str) -> Watchdog {
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
