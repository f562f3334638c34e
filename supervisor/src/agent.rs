//! `gobelins agent`: a supervisor process on one node.
//!
//! Its parts: `running` (the process, from its start to a signal), `entry` (a bootstrap or a
//! join), `lives` (a new life after the cluster ended the last, and the services registered).

mod entry;
mod lives;
mod running;

pub use running::run;

use entry::enter;
use lives::register;

use crate::datadir::DataDir;
use crate::error::{Result, SupervisorError};
use crate::link::TransportLink;
use crate::net::Net;
use crate::secret::ClusterSecret;
use crate::store;
use crate::supervisor::{Dispatch, Me, Parts, Supervisor, SupervisorConfig};
use crate::tcp::{Identity, TcpConfig, TcpTransport};
use crate::transport::{StateAdmission, Transport};
use gobelins_adaptation::{Host, HostConfig, Registry};
use gobelins_locator::{Labels, NodeId};
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
            // A member that died between its admission and keeping the secret: a bootstrap
            // wrote a new cluster's secret over its membership, which raft then refused to
            // initialize, and the directory belonged to neither cluster.
            // (With no secret, `restarted` says the directory holds an incarnation.)
            (Start::Bootstrap, None, _) if restarted && !dir.unadmitted()? => {
                return Err(SupervisorError::Config(format!(
                    "{} belongs to a node that was admitted to a cluster but did not keep its \
                     secret (it stopped in between): it cannot bootstrap another. Start it with \
                     --join ADDR (a member's address) and that cluster's --secret-file, or give \
                     --bootstrap an empty --data-dir",
                    options.data_dir.display()
                )));
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
            // A member's directory whose secret went (deleted, or a restore that missed it).
            (Start::Resume, None, _) if restarted && !dir.unadmitted()? => {
                return Err(SupervisorError::Config(format!(
                    "{} holds a member's node id and raft store, but no cluster.secret: it \
                     was deleted, or not restored. Copy the cluster's secret back into it \
                     (cluster.secret from another member's data directory), or start with \
                     --join ADDR and --secret-file FILE; --bootstrap would make another cluster",
                    options.data_dir.display()
                )));
            }
            (Start::Resume, None, _) => {
                return Err(SupervisorError::Config(format!(
                "{} holds no cluster: start with --bootstrap for a new cluster or --join ADDR to join one",
                options.data_dir.display()
            )));
            }
        };
        // A generated id is kept once the store agrees the directory may have it (`claim`).
        let mut generated = None;
        // A member's directory whose node.id went (deleted, a restore that missed it, a crash
        // before a first join kept it): its raft store says whose it is, in this cluster.
        // Read only then: every other start would open the store twice.
        let saved = dir.node_id()?;
        let recorded = if saved.is_none() && options.node_id.is_none() && !dir.unadmitted()? {
            store::owner_of(&dir.store_path())
                .filter(|(cluster, _)| *cluster == secret.cluster.to_string())
                .map(|(_, node)| node)
        } else {
            None
        };
        let node = match (saved, options.node_id) {
            (Some(saved), Some(asked)) if saved != asked => {
                return Err(SupervisorError::Config(format!(
                    "{} belongs to node {saved}, not {asked}: start it with --node-id {saved} \
                     (or none), or give node {asked} a data directory of its own",
                    options.data_dir.display()
                )));
            }
            (Some(saved), _) => saved,
            (None, None) if recorded.is_some() => {
                let id = recorded.expect("checked");
                tracing::warn!(node = id, "{} had no node.id: its raft store is node {id}'s, in this cluster; it runs as node {id} and writes node.id again", options.data_dir.display());
                generated = Some(id);
                id
            }
            (None, asked) => {
                let id = asked.unwrap_or_else(|| rand::rng().random_range(1..1_000_000));
                // A first join keeps its id only once admitted, as it does the secret: refused
                // (the id is in use, say), the node may be started again with another.
                if !matches!(options.start, Start::Join(_)) {
                    generated = Some(id);
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
        // Emptied (truncated, a restore that wrote nothing) is as gone: redb takes an empty
        // file for a new store, and the node voted again with an empty log. A file that cannot
        // be read is left to the store's opening, which says why.
        let gone = match std::fs::metadata(dir.store_path()) {
            Ok(file) => file.len() == 0,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if restarted && !dir.unadmitted()? && gone {
            return Err(SupervisorError::Config(format!(
                "the raft store {} is missing from this data directory, or empty, whose node was \
                 a member of cluster {}: this node no longer knows its peers, nor what it \
                 voted. Put the file back if you have it. Otherwise move this data directory \
                 aside and start the agent on an empty --data-dir with --join ADDR (a member's address) and the \
                 cluster's --secret-file: it joins as a new node (without --node-id), and the \
                 cluster declares this one failed and rebuilds its entries from replicas",
                dir.store_path().display(),
                secret.cluster
            )));
        }
        // Not `!restarted`: a start refused (its join, say) leaves an incarnation behind, and
        // a wiped voter started twice must not vote on its second start either.
        let fresh = dir.unadmitted()?;
        let older_copy = dir.older_copy()?;
        if older_copy {
            tracing::warn!(
                node,
                "this data directory was found to be an older copy of this node's (restored \
                 from a backup?), and the cluster has not admitted the node since: until it is, \
                 it grants no raft vote and stands for no election, for its log and vote are \
                 behind what the node voted in a later life"
            );
        }
        let me = Me { id: node, addr: addr.clone(), labels: options.labels.clone() };

        let (log, machine) = store::open_with(&dir.store_path(), options.durable)?;
        store::claim(&log, &secret.cluster.to_string(), node, fresh, &dir.store_path())?;
        if let Some(id) = generated {
            dir.save_node_id(id)?;
        }
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
            older_copy,
            admitted_first: {
                let dir = dir.clone();
                Box::new(move || dir.clear_until_admitted())
            },
            record_older_copy: {
                let dir = dir.clone();
                Box::new(move || dir.mark_older_copy())
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
