//! How an agent's start ends when it cannot enter its cluster: refused before it enters (a
//! build that declares a service otherwise than its cluster holds it, which would map that
//! service's keys to other slots than every other node does), or failed once its supervisor
//! runs, leaving nothing running behind it.

use gobelins_adaptation::{plugin, Context, HostConfig, Registry};
use gobelins_kvdir::{KvDir, KVDIR};
use gobelins_locator::{Key, Labels, NodeId, ServiceSpec};
use gobelins_supervisor::agent::{Agent, AgentOptions, Start};
use gobelins_supervisor::datadir::DataDir;
use gobelins_supervisor::net::TokioNet;
use gobelins_supervisor::secret::ClusterSecret;
use gobelins_supervisor::{SupervisorConfig, SupervisorError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// kvdir's id, declared with twice kvdir's slots: another build of it.
struct Resized;

impl gobelins_adaptation::Service for Resized {
    type Request = ();
    type Response = ();
    type Entry = ();

    fn spec(&self) -> ServiceSpec {
        let kvdir = KvDir::declaration();
        kvdir.clone().with_slots(kvdir.slots * 2)
    }

    async fn handle(&self, _: &Context, _: Key, _: ()) {}

    async fn before_migration(&self, _: &Context, _: &gobelins_adaptation::ChangeInfo) {}

    async fn send_out(&self, _: &Context, _: &gobelins_adaptation::Moving) -> Vec<(Key, ())> {
        Vec::new()
    }

    async fn receive(&self, _: &Context, _: NodeId, _: Vec<(Key, ())>) {}

    async fn after_migration(&self, _: &Context, _: &gobelins_adaptation::ChangeInfo) {}

    async fn scan(
        &self,
        _: &Context,
        _: NodeId,
        _: &gobelins_adaptation::Moving,
    ) -> Vec<(Key, ())> {
        Vec::new()
    }
}

fn options(
    dir: &Path,
    id: u64,
    listen: &str,
    start: Start,
    secret: Option<PathBuf>,
) -> AgentOptions {
    AgentOptions {
        data_dir: dir.to_path_buf(),
        listen: listen.to_string(),
        advertise: None,
        start,
        secret_file: secret,
        labels: Labels::new(),
        node_id: Some(id),
        config: SupervisorConfig::loopback(),
        durable: true,
        host: HostConfig::default(),
    }
}

/// Node `id` bootstrapping a cluster of its own in `dir`, listening on `addr`.
async fn bootstrapped(dir: &Path, id: u64, addr: &str) -> Agent<TokioNet> {
    let bootstrap = options(dir, id, addr, Start::Bootstrap, None);
    Agent::start(TokioNet, &bootstrap, Registry::new).await.expect("bootstrap")
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").to_string()
}

/// A join refused at the handshake (the secret file of another cluster) returns an error
/// once raft, the transport and the store are open: they stop with it. Before, they ran on,
/// holding the port and the store's lock, and the same join with the right secret, in the
/// same process, was refused for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_at_the_handshake_leaves_its_port_and_store_free_for_the_next_try() {
    let root = tempfile::tempdir().expect("temporary directory");
    let seed = free_addr();
    let first = bootstrapped(&root.path().join("n1"), 1, &seed).await;
    let wrong = root.path().join("other.secret");
    ClusterSecret::generate().save(&wrong).expect("another cluster's secret");

    let (dir, listen) = (root.path().join("n2"), free_addr());
    let join = |secret: PathBuf| options(&dir, 2, &listen, Start::Join(seed.clone()), Some(secret));
    let refused = Agent::start(TokioNet, &join(wrong.clone()), Registry::new).await;
    assert!(
        matches!(refused, Err(SupervisorError::Handshake { .. })),
        "the wrong secret is refused at the handshake: {:?}",
        refused.as_ref().err()
    );
    // Never admitted: the next start, a restart by its incarnation, still grants no vote.
    assert!(DataDir::open(&dir).expect("dir").unadmitted().expect("read"), "still unadmitted");

    // The same wrong file again: a restart by that incarnation, which asks the seed about
    // its last life first, and is refused there. It used to be told to bring the node back
    // to its own cluster, the one of the wrong file, which it never belonged to.
    let said = async {
        loop {
            match Agent::start(TokioNet, &join(wrong.clone()), Registry::new).await {
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(other) => return other.to_string(),
                Ok(_) => panic!("admitted with another cluster's secret"),
            }
        }
    };
    let said = tokio::time::timeout(Duration::from_secs(20), said).await.expect("refused");
    assert!(said.contains("never admitted"), "{said}");
    assert!(said.contains("Copy cluster.secret unchanged from a member"), "{said}");

    // The store is free once raft's tasks have let it go, a moment after the error: asked
    // again until it is. Left running, they held it for as long as the process lived.
    let right = first.dir.secret_path();
    let again = async {
        loop {
            match Agent::start(TokioNet, &join(right.clone()), Registry::new).await {
                Ok(agent) => return agent,
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(other) => panic!("the same join, with the right secret: {other}"),
            }
        }
    };
    let second = tokio::time::timeout(Duration::from_secs(20), again)
        .await
        .expect("the store and the port free again");
    assert!(first.supervisor.state().nodes.contains_key(&2), "node 2 is a member");
    assert!(!second.supervisor.fresh(), "admitted: it votes");
    until_recorded(&dir).await;
    until_recorded(first.dir.path()).await;
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_build_declares_a_service_otherwise_is_refused_before_it_enters() {
    let root = tempfile::tempdir().expect("temporary directory");
    let dir = root.path().join("n1");
    let kvdir = || {
        let mut registry = Registry::new();
        registry.register(plugin(KvDir::new())).expect("kvdir");
        registry
    };
    let agent =
        Agent::start(TokioNet, &options(&dir, 1, &free_addr(), Start::Bootstrap, None), kvdir)
            .await
            .expect("bootstrap");
    let registered = async {
        while !agent.supervisor.state().tree.services().any(|s| s.id == KVDIR) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), registered).await.expect("kvdir registered");
    agent.stop().await;
    drop(agent);

    let resized = || {
        let mut registry = Registry::new();
        registry.register(plugin(Resized)).expect("resized kvdir");
        registry
    };
    // The store is free once raft's tasks have let it go: asked again until it is.
    let refused = async {
        loop {
            match Agent::start(
                TokioNet,
                &options(&dir, 1, &free_addr(), Start::Resume, None),
                resized,
            )
            .await
            {
                Err(SupervisorError::Refused(why)) => return why,
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(_) => panic!("admitted with kvdir declared otherwise"),
                Err(other) => panic!("{other}"),
            }
        }
    };
    let why = tokio::time::timeout(Duration::from_secs(30), refused).await.expect("an answer");
    assert!(why.contains("declaration cannot change"), "{why}");
}

/// Waits until the data directory at `dir` records its node as admitted: on a blocking
/// thread, a moment after the admission.
async fn until_recorded(dir: &std::path::Path) {
    let recorded = async {
        while DataDir::open(dir).expect("dir").unadmitted().expect("read") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), recorded).await.expect("admitted, recorded");
}

/// Waits until `agent`'s own state holds node `id` active, and its life is admitted.
async fn until_active_alone(agent: &Agent<TokioNet>, id: u64, what: &str) {
    let active = async {
        loop {
            let state = agent.supervisor.state();
            let on = state.nodes.get(&id).is_some_and(|r| r.status.is_live());
            if on && state.is_stable() && agent.supervisor.life_admitted() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(15), active).await.is_err() {
        panic!("{what}: node {id} is not an active member: {:?}", agent.supervisor.state().nodes);
    }
}

/// A bootstrap killed after it kept the secret but before raft kept anything: started again
/// without --bootstrap, as the refusal of a second --bootstrap advises, the node finishes it.
/// Before, it waited for ever for a cluster with no member, saying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_killed_before_raft_kept_anything_is_finished_by_the_next_start() {
    let root = tempfile::tempdir().expect("temporary directory");
    let path = root.path().join("n1");
    // What the bootstrap had written when it was killed, in its order.
    let dir = DataDir::open(&path).expect("dir");
    dir.save_node_id(1).expect("id");
    dir.mark_unadmitted().expect("mark");
    dir.save_incarnation(1).expect("incarnation");
    dir.mark_bootstrapping().expect("bootstrapping");
    dir.save_secret(&ClusterSecret::generate()).expect("secret");

    let again = options(&path, 1, &free_addr(), Start::Bootstrap, None);
    let refused = Agent::start(TokioNet, &again, Registry::new).await;
    assert!(
        matches!(refused, Err(SupervisorError::AlreadyBootstrapped { .. })),
        "a second --bootstrap is refused: {:?}",
        refused.as_ref().err()
    );
    let resumed = options(&path, 1, &free_addr(), Start::Resume, None);
    let agent = Agent::start(TokioNet, &resumed, Registry::new).await.expect("the start resumes");
    until_active_alone(&agent, 1, "the bootstrap finished").await;
    assert!(!dir.bootstrapping().expect("read"), "the bootstrapping mark is removed");
    until_recorded(&path).await;
    agent.stop().await;
}

/// A bootstrap that finished, but whose mark stayed (the disk failed as it was removed): the
/// next start resumes the node as any restart does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_bootstrap_whose_mark_stayed_restarts_as_usual() {
    let root = tempfile::tempdir().expect("temporary directory");
    let path = root.path().join("n1");
    let first = options(&path, 1, &free_addr(), Start::Bootstrap, None);
    let agent = Agent::start(TokioNet, &first, Registry::new).await.expect("bootstrap");
    let dir = DataDir::open(&path).expect("dir");
    assert!(!dir.bootstrapping().expect("read"), "the mark goes once the bootstrap is done");
    until_recorded(&path).await;
    agent.stop().await;
    drop(agent);

    dir.mark_bootstrapping().expect("the mark, left behind");
    let agent = resumed(&path, 1, &free_addr()).await;
    until_active_alone(&agent, 1, "the restart").await;
    assert!(!dir.bootstrapping().expect("read"), "the mark is removed");
    assert_eq!(
        agent.supervisor.incarnation(),
        1,
        "a lone node keeps its life: {:?}",
        agent.supervisor.state().nodes
    );
    agent.stop().await;
}

/// An address that, until `opens`, reads what each connection sends and closes it without a
/// word (a seed at its limit of handshakes does so), then passes each new one both ways to `to`.
fn seed_closing_until(opens: std::time::Instant, to: &str) -> String {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = listener.local_addr().expect("address").to_string();
    let to = to.to_string();
    std::thread::spawn(move || {
        for mut client in listener.incoming().flatten() {
            if std::time::Instant::now() < opens {
                let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = client.read(&mut [0u8; 1024]);
                let _ = client.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let Ok(server) = std::net::TcpStream::connect(&to) else { continue };
            let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else { continue };
            for (mut from, mut into) in [(c, s), (server, client)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// A seed that closes the join's handshakes without a word for a while (busy: at its limit of
/// handshakes) is asked again until it lets the join in. Before, the first such close ended the
/// join for good, as a refusal of the secret does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_through_a_seed_that_closes_its_handshakes_for_a_while_gets_in() {
    let root = tempfile::tempdir().expect("temporary directory");
    let first = bootstrapped(&root.path().join("n1"), 1, &free_addr()).await;
    let seed = seed_closing_until(
        std::time::Instant::now() + Duration::from_secs(2),
        &first.supervisor.view().state.nodes[&1].addr,
    );
    let secret = Some(first.dir.secret_path());
    let join = options(&root.path().join("n2"), 2, &free_addr(), Start::Join(seed), secret);
    let second = Agent::start(TokioNet, &join, Registry::new).await.expect("the join gets in");
    assert!(first.supervisor.state().nodes.contains_key(&2), "node 2 is a member");
    second.stop().await;
    first.stop().await;
}

/// A member's directory whose raft store is gone is refused, resumed or joined, saying how
/// to come back: resumed, it knew no peer and waited for good, and a voter voted with an
/// empty log. On an empty directory, as the error says, the node joins as a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_raft_store_is_gone_is_refused_and_comes_back_as_a_new_node() {
    let root = tempfile::tempdir().expect("temporary directory");
    let seed = free_addr();
    let first = bootstrapped(&root.path().join("n1"), 1, &seed).await;
    let (dir, listen) = (root.path().join("n2"), free_addr());
    let secret = Some(first.dir.secret_path());
    let join = options(&dir, 2, &listen, Start::Join(seed.clone()), secret);
    let second = Agent::start(TokioNet, &join, Registry::new).await.expect("joined");
    until_recorded(&dir).await;
    second.stop().await;
    drop(second);
    // A member that died between its admission and keeping the secret, its store whole, may
    // not bootstrap another cluster: that wrote a new cluster's secret over its membership.
    let secret_file = dir.join("cluster.secret");
    let kept = std::fs::read(&secret_file).expect("the secret");
    std::fs::remove_file(&secret_file).expect("secret removed");
    let bootstrap = options(&dir, 2, &listen, Start::Bootstrap, None);
    // Refused before the store is opened: raft's tasks, which let it go a moment after the
    // stop, do not matter here.
    match Agent::start(TokioNet, &bootstrap, Registry::new).await {
        Err(SupervisorError::Config(why)) => {
            assert!(why.contains("cannot bootstrap another") && why.contains("--join"), "{why}")
        }
        other => panic!("a member's directory bootstrapped: {:?}", other.err()),
    }
    assert!(!secret_file.exists(), "no secret written");
    std::fs::write(&secret_file, kept).expect("the secret back");
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret_file, private).expect("kept private");
    let store = dir.join("raft.redb");
    let removed = async {
        while std::fs::remove_file(&store).is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), removed).await.expect("store removed");

    let resumed = options(&dir, 2, &listen, Start::Resume, None);
    for start in [&resumed, &join] {
        match Agent::start(TokioNet, start, Registry::new).await {
            Err(SupervisorError::Config(why)) => {
                assert!(why.contains("raft store") && why.contains("empty --data-dir"), "{why}")
            }
            other => panic!("a start without its store: {:?}", other.err()),
        }
    }
    // Emptied rather than gone (truncated): redb would take it for a new store.
    std::fs::File::create(&store).expect("an empty store");
    for start in [&resumed, &join] {
        match Agent::start(TokioNet, start, Registry::new).await {
            Err(SupervisorError::Config(why)) => {
                assert!(why.contains("missing from this data directory, or empty"), "{why}")
            }
            other => panic!("a start on an empty store: {:?}", other.err()),
        }
    }
    let fresh = root.path().join("n2-new");
    let mut anew = options(&fresh, 2, &listen, Start::Join(seed.clone()), join.secret_file);
    anew.node_id = None;
    let back = Agent::start(TokioNet, &anew, Registry::new).await.expect("joined as a new node");
    until_recorded(&fresh).await;
    let id = back.supervisor.id();
    assert_ne!(id, 2, "a new node");
    assert!(first.supervisor.state().nodes.contains_key(&id), "node {id} is a member");
    back.stop().await;
    first.stop().await;
}

/// A member's directory started with --join through a seed of another cluster is refused,
/// naming its own cluster (a seed tells no stranger its cluster's id): it resumed its own
/// cluster alone, its entries all lost, and only the seed's log said why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_s_directory_joined_through_another_cluster_s_seed_is_refused() {
    let root = tempfile::tempdir().expect("temporary directory");
    let seed = free_addr();
    let first = bootstrapped(&root.path().join("n1"), 1, &seed).await;
    let (dir, listen) = (root.path().join("n3"), free_addr());
    let other = bootstrapped(&dir, 3, &listen).await;
    let theirs = other.dir.secret().expect("read").expect("a secret").cluster;
    until_recorded(&dir).await;
    other.stop().await;
    drop(other);

    let join = options(&dir, 3, &listen, Start::Join(seed.clone()), None);
    let refused = async {
        loop {
            match Agent::start(TokioNet, &join, Registry::new).await {
                // raft's tasks let the store go a moment after the stop.
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(SupervisorError::Config(why)) => return why,
                Ok(_) => panic!("resumed its own cluster through another's seed"),
                Err(other) => panic!("{other}"),
            }
        }
    };
    let why =
        tokio::time::timeout(Duration::from_secs(20), refused).await.expect("refused at once");
    assert!(why.contains(&theirs.to_string()) && why.contains("empty --data-dir"), "{why}");
    first.stop().await;
}

/// A bootstrap node whose `bootstrapping` mark stayed and whose raft store is gone is refused
/// when started with --join too: "finished" on the empty store, its bootstrap made a second
/// cluster of one node under the same secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_node_without_its_store_does_not_bootstrap_again() {
    let root = tempfile::tempdir().expect("temporary directory");
    let (dir, listen) = (root.path().join("n1"), free_addr());
    let first = bootstrapped(&dir, 1, &listen).await;
    until_recorded(&dir).await;
    first.stop().await;
    drop(first);
    let marked = DataDir::open(&dir).expect("dir");
    marked.mark_bootstrapping().expect("the mark, left behind");
    std::fs::remove_file(dir.join("raft.redb")).expect("store removed");
    let back = options(&dir, 1, &listen, Start::Join(free_addr()), None);
    match Agent::start(TokioNet, &back, Registry::new).await {
        Err(SupervisorError::Config(why)) => assert!(why.contains("raft store"), "{why}"),
        other => {
            panic!("a bootstrap node without its store: {:?}", other.err().map(|e| e.to_string()))
        }
    }
    assert!(!dir.join("raft.redb").exists(), "no store made, no cluster bootstrapped");
}

/// Starts the agent of `options` until it is refused for its configuration, waiting out the
/// store a stopped agent's raft tasks still hold for a moment.
async fn refused_config(options: &AgentOptions) -> String {
    let refused = async {
        loop {
            match Agent::start(TokioNet, options, Registry::new).await {
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(SupervisorError::Config(why)) => return why,
                Ok(_) => panic!("started"),
                Err(other) => panic!("{other}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), refused).await.expect("refused at once")
}

/// A member's directory put together from parts is refused, naming the file to put back: with
/// another cluster's `cluster.secret` copied in, it ran as a member of that cluster with this
/// one's votes and log (a helper's test saw it win an election there and declare the others
/// failed); with its `node.id` edited, it ran as another node on this one's store. With its
/// `node.id` gone (it took an id of chance before), it takes its id back from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_s_directory_with_another_cluster_s_secret_or_another_id_is_refused() {
    let root = tempfile::tempdir().expect("temporary directory");
    let (dir, listen) = (root.path().join("n1"), free_addr());
    let mine = bootstrapped(&dir, 1, &listen).await;
    let other_dir = root.path().join("n2");
    let other = bootstrapped(&other_dir, 2, &free_addr()).await;
    until_recorded(&dir).await;
    until_recorded(&other_dir).await;
    mine.stop().await;
    other.stop().await;
    drop((mine, other));
    let secret = dir.join("cluster.secret");
    let own = std::fs::read(&secret).expect("the secret");
    std::fs::copy(other_dir.join("cluster.secret"), &secret).expect("another cluster's secret");

    let mut resume = options(&dir, 1, &listen, Start::Resume, None);
    resume.node_id = None;
    let why = refused_config(&resume).await;
    assert!(why.contains("two clusters") && why.contains("put back"), "{why}");

    std::fs::write(&secret, own).expect("its own secret back");
    std::fs::write(dir.join("node.id"), "9\n").expect("node.id edited");
    let why = refused_config(&resume).await;
    assert!(why.contains("Write 1 into"), "{why}");

    std::fs::write(dir.join("node.id"), "1\n").expect("node.id back");
    // Its secret gone, it is no directory that "holds no cluster" (and should bootstrap one).
    let own = std::fs::read(&secret).expect("the secret");
    std::fs::remove_file(&secret).expect("cluster.secret removed");
    let why = refused_config(&resume).await;
    assert!(
        why.contains("no cluster.secret") && why.contains("Copy the cluster's secret"),
        "{why}"
    );
    std::fs::write(&secret, own).expect("its secret back");
    // Its node.id gone, it takes its id back from its raft store, not one of chance.
    std::fs::remove_file(dir.join("node.id")).expect("node.id removed");
    let agent = Agent::start(TokioNet, &resume, Registry::new).await.expect("restarted");
    until_active_alone(&agent, 1, "the restart").await;
    assert_eq!(DataDir::open(&dir).expect("dir").node_id().expect("read"), Some(1));
    agent.stop().await;
}

/// Nodes 1 (the bootstrap) to 3, in directories `n1` to `n3` under `root`, each admitted:
/// their addresses, directories and agents.
async fn three_members(root: &Path) -> (Vec<String>, Vec<PathBuf>, Vec<Agent<TokioNet>>) {
    let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let dirs: Vec<PathBuf> = (1..=3).map(|i| root.join(format!("n{i}"))).collect();
    let mut agents = vec![bootstrapped(&dirs[0], 1, &addrs[0]).await];
    let secret = dirs[0].join("cluster.secret");
    for i in 1..3 {
        let seed = Start::Join(addrs[0].clone());
        let join = options(&dirs[i], i as u64 + 1, &addrs[i], seed, Some(secret.clone()));
        agents.push(Agent::start(TokioNet, &join, Registry::new).await.expect("join"));
        until_recorded(&dirs[i]).await;
    }
    (addrs, dirs, agents)
}

/// Starts node `id` again on its data directory at `dir`, once raft's tasks of its last start
/// have let the store go.
async fn resumed(dir: &Path, id: u64, addr: &str) -> Agent<TokioNet> {
    let resume = options(dir, id, addr, Start::Resume, None);
    let again = async {
        loop {
            match Agent::start(TokioNet, &resume, Registry::new).await {
                Ok(agent) => return agent,
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(other) => panic!("node {id} started again: {other}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), again).await.expect("the store free")
}

/// Waits until the data directory at `dir` holds the older-copy mark, or no longer does.
async fn until_older_copy(dir: &Path, marked: bool) {
    let there = async {
        while DataDir::open(dir).expect("dir").older_copy().expect("read") != marked {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let what = if marked { "marked an older copy" } else { "the mark cleared" };
    tokio::time::timeout(Duration::from_secs(20), there).await.expect(what);
}

/// Waits until `agent`'s life is admitted, showing its state if it is not within 30 s.
async fn until_admitted(agent: &Agent<TokioNet>, what: &str) {
    let admitted = async {
        while !agent.supervisor.life_admitted() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), admitted).await.is_err() {
        panic!("{what}: not admitted: {:?}", agent.supervisor.state().nodes);
    }
}

/// A data directory found to be an older copy of its node's, marked so by an earlier start
/// that died before its node was admitted again: the next start grants no raft vote either,
/// until the cluster admits the node, and the mark goes then. Only the mark says so: before,
/// a start after such a death voted on the older store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_marked_an_older_copy_grants_no_vote_until_admitted_again() {
    let root = tempfile::tempdir().expect("temporary directory");
    let (addrs, dirs, mut agents) = three_members(root.path()).await;
    for agent in agents.drain(..).rev() {
        agent.stop().await;
    }
    DataDir::open(&dirs[2]).expect("dir").mark_older_copy().expect("mark");

    // Alone, it cannot be admitted: it refuses votes whatever time passes.
    let three = resumed(&dirs[2], 3, &addrs[2]).await;
    assert!(three.supervisor.fresh(), "marked: it refuses votes");
    // The others elect a leader between them, and admit it as a new life.
    let others = [resumed(&dirs[0], 1, &addrs[0]).await, resumed(&dirs[1], 2, &addrs[1]).await];
    until_admitted(&three, "node 3, marked").await;
    assert!(!three.supervisor.fresh(), "admitted: it votes");
    until_older_copy(&dirs[2], false).await;
    three.stop().await;
    for agent in others {
        agent.stop().await;
    }
}

/// A data directory marked an older copy whose node is raft's only voter leads all the same,
/// and is admitted: nothing newer survives elsewhere, and without it nothing would commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_that_is_the_only_voter_leads_and_is_admitted() {
    let root = tempfile::tempdir().expect("temporary directory");
    let (path, addr) = (root.path().join("n1"), free_addr());
    let agent = bootstrapped(&path, 1, &addr).await;
    until_recorded(&path).await;
    agent.stop().await;
    drop(agent);
    DataDir::open(&path).expect("dir").mark_older_copy().expect("mark");
    let agent = resumed(&path, 1, &addr).await;
    until_active_alone(&agent, 1, "the only voter, an older copy").await;
    assert!(!agent.supervisor.fresh(), "admitted: it votes");
    until_older_copy(&path, false).await;
    agent.stop().await;
}

/// Copies the regular files of directory `from` into `to`, made if missing (an operator's
/// backup of a stopped agent's data directory).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("make the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("an entry");
        if entry.file_type().expect("its type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a file");
        }
    }
}

/// A data directory restored from an older copy, started while a candidate asks for votes:
/// it grants none before a peer has told it what the cluster holds of its node. Before, it
/// voted at once, on its older log, and learned it was an older copy a moment later: its vote
/// elected a leader (a helper's black-box run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_grants_no_vote_before_it_learns_that_it_is_one() {
    let root = tempfile::tempdir().expect("temporary directory");
    let (addrs, dirs, mut agents) = three_members(root.path()).await;
    let three = agents.pop().expect("node 3");
    three.stop().await;
    let backup = root.path().join("backup");
    copy_files(&dirs[2], &backup);
    // A later life of node 3, on the newer directory.
    let three = resumed(&dirs[2], 3, &addrs[2]).await;
    until_admitted(&three, "node 3's later life").await;
    assert!(three.supervisor.incarnation() > 1, "a later life");
    // Node 3 votes again, or node 2 would ask nobody but node 1 for a vote.
    let seated = async {
        while agents[1].supervisor.voters() != [1, 2, 3] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), seated).await.expect("three voters again");
    // Its leader and that life gone, node 2 asks for votes again and again; only node 3's
    // older copy is there to grant one.
    let one = agents.remove(0);
    three.stop().await;
    one.stop().await;
    let copy = resumed(&backup, 3, &addrs[2]).await;
    until_older_copy(&backup, true).await;
    let two = &agents[0];
    assert_ne!(two.supervisor.leader(), Some(2), "elected with the older copy's vote");
    // Node 1 back, the cluster elects a leader without the copy, and admits it as a new life.
    let one = resumed(&dirs[0], 1, &addrs[0]).await;
    until_admitted(&copy, "the older copy").await;
    until_older_copy(&backup, false).await;
    copy.stop().await;
    one.stop().await;
    agents.remove(0).stop().await;
}
