//! `gobelins agent`: a supervisor process on one node.

use crate::console::Consoles;
use crate::control;
use crate::datadir::DataDir;
use crate::entering::Entering;
use crate::error::{Result, SupervisorError};
use crate::link::TransportLink;
use crate::net::{Net, TokioNet};
use crate::secret::ClusterSecret;
use crate::state::{check_declaration, Command, NodeStatus, Refusal};
use crate::store;
use crate::supervisor::{Dispatch, Lifecycle, Me, Parts, Supervisor, SupervisorConfig};
use crate::tcp::{Identity, TcpConfig, TcpTransport};
use crate::transport::{StateAdmission, Transport};
use gobelins_adaptation::{Host, HostConfig, Registry};
use gobelins_locator::{Labels, NodeId};
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a join keeps asking its seed, and how long a restarted node asks the seed whether
/// its last life is still a member.
const JOIN_WINDOW: Duration = Duration::from_secs(30);

/// How long one proposal of a restarted node's last life's failure waits for a leader before
/// it is made again.
const FAIL_WINDOW: Duration = Duration::from_secs(5);

/// How long a node that left waits, before it stops, to be out of raft's voters.
const VOTER_WAIT: Duration = Duration::from_secs(5);

/// How the agent enters the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Create a new cluster with this node as its first member.
    Bootstrap,
    /// Join the cluster that the agent at this address belongs to.
    Join(String),
    /// Resume from the data directory (after a restart).
    Resume,
}

/// Everything `gobelins agent` was told.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where the agent keeps its state.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: String,
    /// Address peers should dial, if not `listen`.
    pub advertise: Option<String>,
    /// How to enter the cluster.
    pub start: Start,
    /// The cluster secret to join with (copied from the bootstrap node).
    pub secret_file: Option<PathBuf>,
    /// This node's labels.
    pub labels: Labels,
    /// This node's id, if the operator chooses it.
    pub node_id: Option<u64>,
    /// Timers.
    pub config: SupervisorConfig,
    /// Whether each raft write is synced to disk before it is acknowledged. Only simulations,
    /// whose "crashes" cannot lose the page cache, turn it off.
    pub durable: bool,
    /// Timers of the adaptation layer (request deadline, retries, batch size).
    pub host: HostConfig,
}

/// A started agent: its supervisor and transport.
pub struct Agent<N: Net> {
    /// The node's supervisor.
    pub supervisor: Arc<Supervisor>,
    /// Its transport.
    pub transport: TcpTransport<N>,
    /// Its data directory.
    pub dir: DataDir,
}

/// An agent whose supervisor runs and that has yet to enter the cluster
/// ([`Launched::enter`]): its control socket can answer meanwhile, since a join may take a
/// minute.
pub struct Launched<N: Net> {
    supervisor: Arc<Supervisor>,
    transport: TcpTransport<N>,
    dir: DataDir,
    secret: ClusterSecret,
    restarted: bool,
}

impl<N: Net> Launched<N> {
    /// The node's supervisor.
    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    /// Its data directory.
    pub fn dir(&self) -> &DataDir {
        &self.dir
    }

    /// Enters the cluster as `options.start` says. Returns once this node is admitted (or
    /// bootstrapped); its services are registered with the cluster in the background.
    /// Whatever stops it stops raft, the transport and their tasks too: left running, they
    /// kept the port and the store's lock, and a caller that started the agent again in the
    /// same process (a join retried with the right secret) was refused.
    pub async fn enter(self, options: &AgentOptions) -> Result<Agent<N>> {
        let Launched { supervisor, transport, dir, secret, restarted } = self;
        let node = supervisor.id();
        if let Err(error) = enter(&supervisor, &dir, options, &secret, node, restarted).await {
            supervisor.shutdown().await;
            transport.shutdown();
            return Err(error);
        }
        tokio::spawn(register(Arc::clone(&supervisor)));
        Ok(Agent { supervisor, transport, dir })
    }
}

impl<N: Net> Agent<N> {
    /// Opens the data directory, starts the transport, the adaptation layer hosting `services`
    /// and raft, and enters the cluster as `options.start` says: [`Agent::launch`], then
    /// [`Launched::enter`].
    pub async fn start(
        net: N,
        options: &AgentOptions,
        services: impl Fn() -> Registry + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::launch(net, options, services).await?.enter(options).await
    }

    /// Opens the data directory (taking its store's lock), starts the transport, the
    /// adaptation layer hosting `services` and raft: everything but entering the cluster.
    pub async fn launch(
        net: N,
        options: &AgentOptions,
        services: impl Fn() -> Registry + Send + Sync + 'static,
    ) -> Result<Launched<N>> {
        let addr = advertised(options)?;
        let dir = DataDir::open(&options.data_dir)?;
        // Until the raft store's lock is taken, which then keeps a second agent out.
        let starting = dir.lock()?;
        fits_a_socket(&dir.socket_path())?;
        // Said first: a --bootstrap was told the directory holds a cluster, and anything else
        // learned it from the raft store's lock, in the store's words.
        // Not a blocking connect on the runtime: a hung agent with a full backlog would hold it
        // for good. One that does not accept within the second counts as running.
        let asked = tokio::net::UnixStream::connect(dir.socket_path());
        if tokio::time::timeout(Duration::from_secs(1), asked).await.map_or(true, |c| c.is_ok()) {
            return Err(SupervisorError::Config(format!(
                "an agent is already running with --data-dir {} (its control socket answers): \
                 stop it first, or give this one another --data-dir",
                options.data_dir.display()
            )));
        }
        let existing = dir.secret()?;
        // A directory that holds a secret was admitted to its cluster before (a joining node
        // keeps the secret only once admitted): a join from it is a restart. So is one that
        // holds an incarnation, written at the first start: a node that died after its first
        // join was accepted but before it kept the secret (a crash, a full disk) is a member
        // the cluster may have handed entries to, and asked again as the same life it was let
        // back in with empty services. Asking the seed first costs a refused one nothing.
        let restarted = existing.is_some() || dir.incarnation()?.is_some();
        let secret = match (&options.start, existing, &options.secret_file) {
            (Start::Bootstrap, Some(secret), _) => {
                return Err(SupervisorError::AlreadyBootstrapped {
                    dir: options.data_dir.clone(),
                    cluster: secret.cluster.to_string(),
                });
            }
            // Kept once the node listens: a bootstrap that fails before (its port taken, say)
            // must leave a directory that can bootstrap again.
            (Start::Bootstrap, None, _) => ClusterSecret::generate(),
            // Kept only once the cluster has admitted this node: a wrong file must not stick.
            (Start::Join(_), None, Some(file)) => ClusterSecret::load(file)?,
            (Start::Join(_), None, None) => {
                return Err(SupervisorError::Config(
                "--join needs --secret-file: copy cluster.secret from the bootstrap node's data directory".into(),
            ));
            }
            (_, Some(secret), Some(file)) => {
                if ClusterSecret::load(file)? != secret {
                    return Err(SupervisorError::Config(format!(
                        "{} belongs to cluster {}, but --secret-file is for another cluster",
                        options.data_dir.display(),
                        secret.cluster
                    )));
                }
                secret
            }
            (_, Some(secret), None) => secret,
            (Start::Resume, None, _) => {
                return Err(SupervisorError::Config(format!(
                "{} holds no cluster: start with --bootstrap for a new cluster or --join ADDR to join one",
                options.data_dir.display()
            )));
            }
        };
        let node = match (dir.node_id()?, options.node_id) {
            (Some(saved), Some(asked)) if saved != asked => {
                return Err(SupervisorError::Config(format!(
                    "{} belongs to node {saved}, not {asked}: start it with --node-id {saved} \
                     (or none), or give node {asked} a data directory of its own",
                    options.data_dir.display()
                )));
            }
            (Some(saved), _) => saved,
            (None, asked) => {
                let id = asked.unwrap_or_else(|| rand::rng().random_range(1..1_000_000));
                // A first join keeps its id only once admitted, as it does the secret: refused
                // (the id is in use, say), the node may be started again with another.
                if !matches!(options.start, Start::Join(_)) {
                    dir.save_node_id(id)?;
                }
                id
            }
        };
        let (incarnation, made_incarnation) = match dir.incarnation()? {
            Some(i) => (i, false),
            None => {
                // First: a crash between the two leaves a directory that starts afresh again.
                dir.mark_unadmitted()?;
                dir.save_incarnation(1)?;
                (1, true)
            }
        };
        // A member's directory whose raft store is gone (deleted, or moved aside after an
        // error opening it): the store held the votes this node cast and the log it
        // acknowledged. Voting again with an empty log, it elected a leader that lacked a
        // committed change, and the cluster lost it; resumed, it knew no peer and waited for
        // good, saying nothing. Started with --join, as the cluster still counted its life a
        // member, it resumed on an empty state and could wait for good too (a test, 2 CI runs
        // of 5): it starts afresh instead, as a new node.
        if restarted && !dir.unadmitted()? && !dir.store_path().exists() {
            return Err(SupervisorError::Config(format!(
                "the raft store {} is missing from this data directory, whose node was a member \
                 of cluster {}: this node no longer knows its peers, nor what it voted. Put the \
                 file back if you have it. Otherwise move this data directory aside and start \
                 the agent on an empty --data-dir with --join ADDR (a member's address) and the \
                 cluster's --secret-file: it joins as a new node (without --node-id), and the \
                 cluster declares this one failed and rebuilds its entries from replicas",
                dir.store_path().display(),
                secret.cluster
            )));
        }
        // Not `!restarted`: a start refused (its join, say) leaves an incarnation behind, and
        // a wiped voter started twice must not vote on its second start either.
        let fresh = dir.unadmitted()?;
        let me = Me { id: node, addr: addr.clone(), labels: options.labels.clone() };

        let (log, machine) = store::open_with(&dir.store_path(), options.durable)?;
        drop(starting);
        let admission = Arc::new(StateAdmission::new(machine.subscribe()));
        let dispatch = Arc::new(Dispatch::default());
        let tcp = TcpTransport::start(
            net,
            TcpConfig::default(),
            Identity { secret: secret.clone(), node, addr: addr.clone() },
            incarnation,
            Some(&options.listen),
            dispatch.clone(),
            admission,
        )
        .await?;
        let transport: Arc<dyn Transport> = Arc::new(tcp.clone());
        let link = Arc::new(TransportLink::new(Arc::clone(&transport)));
        let host = Host::start(NodeId(node), services(), link, options.host.clone());
        let saver = dir.clone();
        let tcp_for_incarnation = tcp.clone();
        let supervisor = Supervisor::start(Parts {
            me,
            incarnation,
            transport,
            dispatch,
            log,
            machine,
            config: options.config.clone(),
            save_incarnation: Box::new(move |i| {
                saver.save_incarnation(i)?;
                tcp_for_incarnation.set_incarnation(i);
                Ok(())
            }),
            host,
            services: Box::new(services),
            fresh,
            admitted_first: {
                let dir = dir.clone();
                Box::new(move || dir.clear_unadmitted())
            },
            made_incarnation,
            ended_left: dir.ended_left()?,
            rejoin: matches!(options.start, Start::Join(_)),
            record_left: {
                let dir = dir.clone();
                Box::new(move |life| dir.mark_left(life))
            },
        })
        .await;
        let supervisor = match supervisor {
            Ok(supervisor) => supervisor,
            Err(error) => {
                tcp.shutdown();
                return Err(error);
            }
        };
        tracing::info!(node, %addr, cluster = %secret.cluster, "agent started");
        Ok(Launched { supervisor, transport: tcp, dir, secret, restarted })
    }

    /// Stops raft and closes every connection.
    pub async fn stop(&self) {
        self.supervisor.shutdown().await;
        self.transport.shutdown();
    }
}

/// Enters the cluster as `options.start` says, once the supervisor of node `node` runs:
/// bootstraps, joins (`restarted`: from a data directory admitted before), or resumes.
async fn enter(
    supervisor: &Arc<Supervisor>,
    dir: &DataDir,
    options: &AgentOptions,
    secret: &ClusterSecret,
    node: u64,
    restarted: bool,
) -> Result<()> {
    // A restart rejoins with the labels given now: a unit that lost them moves the node
    // elsewhere in the tree, which must not go unsaid.
    if let Some(last) = supervisor.state().nodes.get(&node).filter(|_| restarted) {
        if last.labels != options.labels {
            tracing::warn!(before = ?last.labels, now = ?options.labels, "this node's labels differ from its last life's: it rejoins in another place of the cell tree");
        }
    }
    // A service this build declares otherwise than the cluster this node belonged to: the
    // node is refused here, before it enters again, rather than admitted, stopped and
    // recovered at every restart (a unit restarting it on failure, say).
    for spec in supervisor.host().specs() {
        if let Err(refusal) = check_declaration(&supervisor.state(), &spec) {
            return Err(SupervisorError::Refused(refusal.to_string()));
        }
    }

    // Restarted with --join, as by a unit that always passes it, while the cluster still
    // counts this node's last life as a member: the services lost their memory with the
    // process, so that life is recovered like a crash, as a restart without --join does,
    // rather than answered as the same life and served from empty services. A node that
    // left, or was declared failed, joins as a new life.
    let start = match &options.start {
        Start::Join(seed) if restarted => {
            let asked = supervisor.last_life_is_member(seed, JOIN_WINDOW).await;
            let asked = asked.map_err(|refused| {
                SupervisorError::Config(format!(
                    "{refused}. The seed holds another secret than this data directory's \
                     cluster ({}): to move this node to the seed's cluster, start it with an \
                     empty --data-dir and that cluster's --secret-file; to bring it back to its \
                     own, give --join a member of cluster {}",
                    secret.cluster, secret.cluster
                ))
            })?;
            match asked {
                Some(true) => {
                    tracing::info!(%seed, "this node's last life is still a member: resuming as a new life (--join is not needed)");
                    // The seed answered through the secret given: it is the cluster's, and
                    // a node that died before it kept it keeps it now.
                    keep_identity(dir, secret, node)?;
                    Start::Resume
                }
                Some(false) => options.start.clone(),
                // The seed may be down: this node's own state decides, and the other
                // members it knows end its last life.
                None if supervisor.last_life_is_member_here() => {
                    tracing::warn!(%seed, "the seed did not answer; this node's own state counts its last life as a member: resuming as a new life through the other members");
                    // Its id, which its own state counts as a member; not the secret, which
                    // no peer has vouched for in this run.
                    if dir.node_id()?.is_none() {
                        dir.save_node_id(node)?;
                    }
                    Start::Resume
                }
                None => options.start.clone(),
            }
        }
        start => start.clone(),
    };
    match &start {
        Start::Bootstrap => {
            // Marked before the secret is kept: a bootstrap stopped from here on is finished
            // by the next start, which needs no --bootstrap since the secret is there.
            dir.mark_bootstrapping()?;
            dir.save_secret(secret)?;
            let outcome = supervisor.bootstrap().await?;
            tracing::info!(?outcome, "cluster bootstrapped");
            bootstrap_done(dir).await;
        }
        Start::Join(seed) => {
            // The cluster decides, not our own state, which may be stale: a node removed
            // from raft right after it left never applies the entry that says so. A join
            // repeated by the same life is answered with where it stands.
            {
                let outcome = supervisor.join_cluster(seed, JOIN_WINDOW, true).await?;
                if let Err(refusal) = outcome {
                    return Err(SupervisorError::Refused(format!(
                        "the cluster refused this node: {refusal}"
                    )));
                }
                tracing::info!(?outcome, %seed, "join accepted");
            }
            // Off the runtime's workers: the join has begun, and the other nodes are sending
            // this one its entries, which these workers receive while the disk syncs.
            let (dir, secret) = (dir.clone(), secret.clone());
            on_data_dir(move || {
                if dir.node_id()?.is_none() {
                    dir.save_node_id(node)?;
                }
                if dir.secret()?.is_none() {
                    dir.save_secret(&secret)?;
                }
                Ok(())
            })
            .await?;
        }
        Start::Resume => {}
    }
    if start == Start::Resume {
        let begun = dir.bootstrapping()?;
        let finished = if begun {
            supervisor.finish_begun_bootstrap().await?
        } else {
            supervisor.finish_bootstrap().await?
        };
        if let Some(outcome) = finished {
            tracing::warn!(?outcome, "this node's bootstrap had stopped before the node joined its own cluster; finished it");
        } else {
            let (asked, held) = (&supervisor.config().label_levels, supervisor.state());
            let held = &held.tree.config().label_levels;
            if !asked.is_empty() && asked != held {
                tracing::warn!(asked = ?asked, held = ?held, "--levels ignored: the cluster's label levels were set at its bootstrap and do not change");
            }
            tokio::spawn(start_new_life(Arc::clone(supervisor)));
        }
        if begun {
            bootstrap_done(dir).await;
        }
    }
    Ok(())
}

/// Removes the bootstrapping mark. Only warns if it cannot: a mark left behind is harmless,
/// since the next start finds the bootstrap done and resumes as usual.
async fn bootstrap_done(dir: &DataDir) {
    let owned = dir.clone();
    if let Err(error) = on_data_dir(move || owned.clear_bootstrapping()).await {
        tracing::warn!(%error, dir = %dir.path().display(), "cannot remove the bootstrapping mark; harmless, the next start finds the bootstrap done");
    }
}

/// Keeps the node's id and the secret, if missing, for a node the cluster (through a seed that
/// proved the secret) counts as a member: one that died after its first join was accepted but
/// before it kept them. A later start without `--node-id` or `--join` then resumes as this
/// node, in this cluster.
fn keep_identity(dir: &DataDir, secret: &ClusterSecret, node: u64) -> Result<()> {
    if dir.node_id()?.is_none() {
        dir.save_node_id(node)?;
    }
    if dir.secret()?.is_none() {
        dir.save_secret(secret)?;
    }
    Ok(())
}

/// The address peers reach this node at: `--advertise`, else `--listen`, which must then be
/// one they can dial.
fn advertised(options: &AgentOptions) -> Result<String> {
    host_and_port("--listen", &options.listen)?;
    if let Start::Join(seed) = &options.start {
        host_and_port("--join", seed)?;
    }
    if let Some(advertise) = &options.advertise {
        host_and_port("--advertise", advertise)?;
        return Ok(advertise.clone());
    }
    match options.listen.parse::<std::net::SocketAddr>() {
        Ok(listen) if listen.ip().is_unspecified() => Err(SupervisorError::Config(format!(
            "--listen {} takes every address of this machine, which peers cannot dial: add \
             --advertise HOST:PORT, the address the other nodes reach this one at",
            options.listen
        ))),
        _ => Ok(options.listen.clone()),
    }
}

/// What a stop by signal leaves to the cluster, said as the agent stops.
const STOPPED: &str = "The cluster's other members declare this node failed and rebuild its \
     entries from replicas; started again with the same --data-dir, it rejoins as a new life. \
     `gobelins leave` takes a node out without a failure";

/// What stopping now leaves to the cluster, by this node's own state: a node that left has
/// nothing to hand over, and the last member takes the cluster down with it.
fn stopped(supervisor: &Supervisor) -> String {
    let state = supervisor.state();
    let me = supervisor.id();
    let live = state.nodes.get(&me).is_some_and(|r| r.status.is_live());
    if !live {
        return "This node is no member any more (it left, or the cluster declared it failed \
                and rebuilt its entries): its stop changes nothing for the cluster. To take \
                part again, start it with --join ADDR (a member's address)"
            .to_string();
    }
    if state.live().len() == 1 {
        return "This node is the cluster's only member: the cluster and its services are down \
                until it is started again with the same --data-dir"
            .to_string();
    }
    STOPPED.to_string()
}

/// How long a stopping agent waits for the members to hear that it stops on purpose.
const STOPPING_WAIT: Duration = Duration::from_millis(500);

/// Tells the other members that this live member stops on purpose, so that its failure is not
/// counted against it as a short life (`crate::flaps`).
async fn announce_stopping(supervisor: &Supervisor) {
    // A life this process made: a restarted process replays a crashed life as live, and must
    // not excuse it. Whether the cluster admitted it is for each member to judge, from its
    // own record of the life: this node hears of its admission a moment after the cluster's
    // state shows it, and an operator may stop it in between.
    if !supervisor.life_made_here() {
        return;
    }
    let (heard, others) = supervisor.announce_stopping(STOPPING_WAIT).await;
    if heard < others {
        tracing::info!(heard, of = others, "not every member took this stop as one on purpose: if the cluster had admitted this life, those count it as a short life");
    }
}

/// What a stop by signal before the node entered its cluster leaves behind.
const STOPPED_ENTERING: &str = "If the cluster had admitted this node already, it declares it \
     failed and rebuilds its entries from replicas; started again with the same command line, \
     the agent asks again (a first join stopped so, without --node-id, may come back under \
     another id)";

/// Refuses an address without a port (`--listen localhost`) before anything is written: found
/// when binding, it came after the data directory was made, in words that named no remedy.
/// `flag` names where the address was given.
pub fn host_and_port(flag: &str, addr: &str) -> Result<()> {
    // An IPv6 host is bracketed: `::1` would otherwise read as host `:` and port 1.
    let host_ok = |host: &str| {
        !host.is_empty() && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
    };
    let port = addr.rsplit_once(':').filter(|(host, _)| host_ok(host)).map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(port)) if port != 0 => Ok(()),
        _ => Err(SupervisorError::Config(format!(
            "{flag} {addr} is not HOST:PORT: give an address with its port (not 0), such as \
             127.0.0.1:7400, [::1]:7400 or node-3.example:7400"
        ))),
    }
}

/// Refuses, before the node joins anything, a data directory whose control socket's path is
/// longer than a Unix socket's address holds: found only once admitted, it stopped the node.
fn fits_a_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    // `sun_path` holds 108 bytes on Linux, its terminating zero included.
    const MOST: usize = 107;
    let len = path.as_os_str().as_bytes().len();
    if len > MOST {
        return Err(SupervisorError::Config(format!(
            "the control socket {} would be {len} bytes long, more than a Unix socket's {MOST}: \
             use a --data-dir with a shorter path",
            path.display()
        )));
    }
    Ok(())
}

/// After a restart the services' memory of the last life is gone, so that life must end the
/// way a crash does: the cluster commits its failure (and rebuilds its entries from the
/// survivors' replicas), and this process joins as a new life. Until then its host serves
/// nothing.
///
/// Its failure is proposed again and again while this node's own state counts it live: a
/// restart while the cluster has no quorum (a whole rack powered back up one machine at a
/// time) must not give up, for this process answers pings, so no detector will end that life
/// for it, and every change that waits on it would wait for ever.
async fn start_new_life(supervisor: Arc<Supervisor>) {
    let (me, incarnation) = (supervisor.id(), supervisor.incarnation());
    let pause = supervisor.config().failure_timeout;
    let mut ended = false;
    // Rounds in a row in which every member proved another secret than this node's.
    let mut refused = 0;
    while !supervisor.life_admitted() {
        let live = supervisor
            .state()
            .nodes
            .get(&me)
            .is_some_and(|r| r.incarnation == incarnation && r.status.is_live());
        if live && !ended {
            let fail = Command::Fail { node: me, incarnation };
            match supervisor.propose_until(fail, FAIL_WINDOW).await {
                Ok(Ok(_)) => {
                    ended = true;
                    tracing::warn!(
                        node = me,
                        incarnation,
                        "restarted: the cluster recovers this node's last life from replicas; rejoining as a new one"
                    );
                }
                // The cluster's only node ever, or the others all left: ended, its life's
                // recovery would wait for another node to join (its entries need somewhere to
                // go), and none is expected. It carries on alone, its services empty.
                Ok(Err(Refusal::LastNode(_))) if others_left(&supervisor) => {
                    tracing::warn!(
                        node = me,
                        "restarted as the only node of the cluster: its services start empty, and report what its last life held as lost"
                    );
                    supervisor.host().restarted_alone().await;
                    supervisor.admit_life();
                    return;
                }
                // The last life counted live, but others failed and may come back (the whole
                // cluster stopped, say): carried on, its empty services would answer for the
                // entries of its last life as never written. Ended, their loss is reported, and
                // it rejoins as a new life. Should it be the locator's last node, its recovery
                // waits for another node's join (a failed one back as a new life, or a new one),
                // and its own rejoin with it.
                Ok(Err(Refusal::LastNode(_))) => {
                    match supervisor
                        .propose_until(Command::Dead { node: me, incarnation }, FAIL_WINDOW)
                        .await
                    {
                        Ok(Ok(_)) => {
                            ended = true;
                            tracing::warn!(node = me, incarnation, "restarted as the last member counted live, others having failed: this node's last life ends, its entries are reported lost where no copy survives, and it rejoins as a new one");
                            if alone_in_tree(&supervisor) {
                                tracing::warn!(node = me, "this node's last life was the last the locator held: its recovery, and this node's rejoin, wait for another node to join (start a failed node again, or a new one with --join)");
                            }
                        }
                        Ok(Err(refusal)) => tracing::debug!(%refusal, "last life already ended"),
                        Err(error) => {
                            tracing::warn!(%error, "could not end this node's last life yet; asking again")
                        }
                    }
                }
                Ok(Err(refusal)) => {
                    ended = true;
                    tracing::debug!(%refusal, "last life already ended");
                }
                Err(error) => tracing::warn!(
                    %error,
                    "could not end this node's last life yet: no leader answers (is a majority of the cluster down?); asking again"
                ),
            }
        }
        Arc::clone(&supervisor).check_fenced().await;
        if *supervisor.lifecycle().borrow() == Lifecycle::Left {
            return;
        }
        // Asking again changes nothing: the secret file does not change under a running node.
        // A few rounds, not one: a member dialed as it restarts with its own file unchanged
        // proves the same secret as ever. Only several members that agree with one another
        // show this node's file to be the odd one: a single one (or whatever answers at its
        // address: another cluster's agent on a reused port) may be the wrong one itself.
        let (members, differ) = supervisor.members_with_another_secret();
        refused = if differ > 0 && differ == members { refused + 1 } else { 0 };
        if refused >= SECRET_ROUNDS && members >= 2 {
            supervisor.stop_refused(format!("every member of the cluster ({members}) proves another secret than this node's: this data directory's cluster.secret differs from the cluster's (replaced, or copied from another cluster). Copy cluster.secret unchanged from a member's data directory, then start this node again"));
            return;
        }
        if refused == SECRET_ROUNDS {
            tracing::error!(node = me, "the only other member proves another secret than this node's, and this node keeps asking: one of the two cluster.secret files differs (replaced, or copied from another cluster), or another program answers at that member's address. Compare the two files; copy the right one unchanged, then start the wrong node again");
        }
        tokio::time::sleep(pause).await;
    }
}

/// Rounds of a restarted node's attempts to rejoin in which every member proves another secret
/// before it stops, rather than ask again for ever.
const SECRET_ROUNDS: u32 = 3;

/// Whether every other node the cluster has known has left it: none will come back as a
/// member without joining anew.
fn others_left(supervisor: &Supervisor) -> bool {
    let me = supervisor.id();
    supervisor.state().nodes.iter().all(|(&id, r)| id == me || r.status == NodeStatus::Left)
}

/// Whether this node is the only one the locator's tree holds.
fn alone_in_tree(supervisor: &Supervisor) -> bool {
    let me = NodeId(supervisor.id());
    supervisor.state().tree.nodes().all(|n| n == me)
}

/// What a restarted node whose last life was the last the locator held waits for.
const WAITS_FOR_A_JOIN: &str = "restarted as the last node the locator held: its last life has \
     ended, and its recovery, with this node's rejoin, waits for another node to join (start a \
     failed node again, or a new one with --join)";

/// Ends `entering` once this node's life is admitted, or is over (it left, or stopped).
async fn entered_once_admitted(supervisor: Arc<Supervisor>, entering: Entering) {
    let lifecycle = supervisor.lifecycle();
    let me = supervisor.id();
    let mut told = false;
    let mut held = false;
    while !supervisor.life_admitted() && *lifecycle.borrow() == Lifecycle::Member {
        // Held out for failing again and again: not the majority it would otherwise seem to
        // wait for.
        match supervisor.held_back() {
            Some((failures, left)) => {
                entering.now_doing(format!(
                    "restarted, and held out of the cluster for {:.1} s more: it keeps failing \
                     ({failures} short lives in a row); it rejoins by itself then",
                    left.as_secs_f64()
                ));
                held = true;
            }
            None if held => {
                entering.now_doing("restarted; its hold is over: rejoining as a new life".into());
                held = false;
            }
            None => {}
        }
        // Its last life ended as the last node the locator held: a majority of the voters is
        // up (this one), and nothing happens until another node joins.
        let ended = supervisor.state().nodes.get(&me).is_some_and(|r| !r.status.is_live());
        if !told && ended && alone_in_tree(&supervisor) {
            entering.now_doing(WAITS_FOR_A_JOIN.to_string());
            told = true;
        }
        // Admission has no signal to wait on; this is what a status asked meanwhile may lag.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    entering.done();
}

/// Registers the services this node hosts that the cluster does not know yet. Every agent
/// does it; the first registration of an id wins and the others change nothing.
///
/// A service this node declares otherwise than the cluster holds it stops the node: hosting
/// it would map keys to other slots than every other node does.
async fn register(supervisor: Arc<Supervisor>) {
    for spec in supervisor.host().specs() {
        let state = supervisor.state();
        if let Err(refusal) = check_declaration(&state, &spec) {
            supervisor.stop_refused(refusal.to_string());
            return;
        }
        if state.declared(spec.id).is_some() {
            continue;
        }
        let name = spec.name.clone();
        match supervisor.propose_until(Command::Register(spec), Duration::from_secs(60)).await {
            Ok(Ok(_)) => tracing::info!(service = %name, "service registered"),
            Ok(Err(refusal @ Refusal::ServiceDeclaredOtherwise { .. })) => {
                supervisor.stop_refused(refusal.to_string());
                return;
            }
            Ok(Err(refusal)) => {
                tracing::error!(service = %name, %refusal, "the cluster refused the service")
            }
            Err(error) => tracing::warn!(
                service = %name,
                %error,
                "service not registered yet; it will be on this agent's next start"
            ),
        }
    }
}

/// Runs the agent process, hosting `services` and serving their `consoles` on the control
/// socket, until it is stopped (SIGINT/SIGTERM) or leaves the cluster.
pub async fn run(
    options: AgentOptions,
    services: impl Fn() -> Registry + Send + Sync + 'static,
    consoles: Consoles,
) -> Result<()> {
    let launched = Agent::launch(TokioNet, &options, services).await?;
    // Served while the node enters the cluster, which can take a minute (a seed slow to
    // answer, a restart that waits for the cluster to end its last life): an operator asking
    // meanwhile is told what the agent is doing, not that it is not running.
    let entering = Entering::new(match &options.start {
        Start::Bootstrap => "bootstrapping a new cluster".to_string(),
        Start::Join(seed) => format!("joining the cluster through {seed}"),
        Start::Resume => "resuming its place in the cluster".to_string(),
    });
    let path = launched.dir().socket_path();
    // Removed as `run` returns, whichever way.
    let _socket =
        control::serve(&path, Arc::clone(launched.supervisor()), consoles, entering.clone())
            .await?;
    // Before entering: a join can take a minute, and a stop asked for meanwhile killed the
    // process at once, saying nothing, with its control socket left behind.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| SupervisorError::io("installing the SIGTERM handler", e))?;
    let entered = tokio::select! {
        entered = launched.enter(&options) => entered,
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("interrupted while {}; stopping. {STOPPED_ENTERING}", entering.now().unwrap_or_default());
            return Ok(());
        }
        _ = terminate.recv() => {
            tracing::warn!("terminated (SIGTERM) while {}; stopping. {STOPPED_ENTERING}", entering.now().unwrap_or_default());
            return Ok(());
        }
    };
    let agent = entered?;
    if agent.supervisor.life_admitted() {
        entering.done();
    } else {
        // A restart: the cluster must end the last life before it admits this one, which
        // needs a majority of the voters. Until then this node serves nothing, and an operator
        // asking is told so, not that the cluster is stable or that the node never joined.
        entering.now_doing(
            "restarted: waiting for the cluster to end this node's last life and admit it as a \
             new one (a majority of the voters must be up)"
                .to_string(),
        );
        tokio::spawn(entered_once_admitted(Arc::clone(&agent.supervisor), entering.clone()));
    }
    if options.start == Start::Bootstrap {
        let secret =
            agent.dir.secret()?.ok_or_else(|| SupervisorError::Config("secret vanished".into()))?;
        let (node, addr) =
            (agent.supervisor.id(), options.advertise.as_ref().unwrap_or(&options.listen));
        println!(
            "gobelins: cluster {} bootstrapped; node {node} listens on {addr}.\n\
             To add a node, copy {} to it and run:\n  \
             gobelins agent --data-dir <dir> --listen <addr:port> --join {addr} --secret-file cluster.secret",
            secret.cluster,
            agent.dir.secret_path().display()
        );
    }
    let mut lifecycle = agent.supervisor.lifecycle();
    let mut fatal = None;
    let mut refused = None;
    // A node that had left before this start has nothing to wait for on its way out.
    let left_before = *lifecycle.borrow() == Lifecycle::Left;
    tokio::select! {
        // At the default level: otherwise the log just ended, and an operator could not tell a
        // stop asked for from a crash.
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("interrupted; stopping. {}", stopped(&agent.supervisor));
            announce_stopping(&agent.supervisor).await;
        }
        _ = terminate.recv() => {
            tracing::warn!("terminated (SIGTERM); stopping. {}", stopped(&agent.supervisor));
            announce_stopping(&agent.supervisor).await;
        }
        ended = lifecycle.wait_for(|l| *l != Lifecycle::Member) => {
            match ended.map(|l| l.clone()) {
                Ok(Lifecycle::Fatal(why)) => fatal = Some(why),
                Ok(Lifecycle::Refused(why)) => refused = Some(why),
                _ => {
                    tracing::warn!("this node is not a member of the cluster any more (it left, was evicted, or had left before this start); stopping. To take part again, start it with --join ADDR (the address of a member), as a new life of this node");
                    // Still a voter, it waits for the change of voters that leaves it out, which
                    // needs its vote: of two voters, the other would have no quorum for good.
                    // The change began with the leave, and is usually done by now.
                    let until = tokio::time::Instant::now() + VOTER_WAIT;
                    let out = || left_before || agent.supervisor.out_of_voters();
                    while !out() && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if !out() {
                        tracing::warn!("stopping before raft committed a membership without this node's vote: if the cluster had two voters, check that the other one still has a quorum");
                    }
                    // Let the CLI that asked for the leave read its final answer.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
    agent.stop().await;
    if let Some(why) = refused {
        return Err(SupervisorError::Refused(why));
    }
    match fatal {
        Some(why) => Err(SupervisorError::Storage(format!(
            "{why}; this node stopped and the cluster will declare it failed. Check the disk \
             under {} (full? failing?), then start the agent again: it rejoins as a new life",
            options.data_dir.display()
        ))),
        None => Ok(()),
    }
}

/// Runs `write`, which syncs files of the data directory, where waiting for the disk holds no
/// runtime worker (see `crate::disk`).
async fn on_data_dir(write: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    match crate::disk::on_disk(write).await {
        Ok(written) => written,
        Err(e) => Err(SupervisorError::Storage(format!(
            "a write to the data directory did not finish: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_must_be_advertised_as_one_peers_can_dial() {
        let mut options = AgentOptions {
            data_dir: "/tmp/x".into(),
            listen: "0.0.0.0:7400".into(),
            advertise: None,
            start: Start::Resume,
            secret_file: None,
            labels: Labels::new(),
            node_id: None,
            config: SupervisorConfig::default(),
            durable: true,
            host: HostConfig::default(),
        };
        let refused = advertised(&options).unwrap_err().to_string();
        assert!(refused.contains("--advertise"), "{refused}");
        options.listen = "[::]:7400".into();
        assert!(advertised(&options).is_err());
        options.advertise = Some("10.0.0.5:7400".into());
        assert_eq!(advertised(&options).unwrap(), "10.0.0.5:7400");
        options.advertise = None;
        options.listen = "127.0.0.1:7400".into();
        assert_eq!(advertised(&options).unwrap(), "127.0.0.1:7400");
        options.listen = "node-3.example:7400".into();
        assert_eq!(advertised(&options).unwrap(), "node-3.example:7400");
        options.listen = "[::1]:7400".into();
        assert_eq!(advertised(&options).unwrap(), "[::1]:7400");
        let wrong = ["localhost", "127.0.0.1", ":7400", "localhost:port", "[::1]", "::1"];
        for wrong in wrong.into_iter().chain(["2001:db8::5", "127.0.0.1:0"]) {
            options.listen = wrong.into();
            let refused = advertised(&options).unwrap_err().to_string();
            assert!(refused.contains("not HOST:PORT"), "{wrong}: {refused}");
        }
        options.listen = "127.0.0.1:7400".into();
        options.advertise = Some("node-3.example".into());
        assert!(advertised(&options).is_err(), "an advertised address needs its port too");
        options.advertise = None;
        options.start = Start::Join("garbage".into());
        let refused = advertised(&options).unwrap_err().to_string();
        assert!(refused.contains("--join garbage is not HOST:PORT"), "{refused}");
    }

    #[test]
    fn a_data_directory_too_deep_for_its_socket_is_refused_up_front() {
        assert!(fits_a_socket(std::path::Path::new("/var/lib/gobelins/control.sock")).is_ok());
        let deep = format!("/{}/control.sock", "d".repeat(100));
        let refused = fits_a_socket(std::path::Path::new(&deep)).unwrap_err().to_string();
        assert!(refused.contains("shorter path"), "{refused}");
    }
}
