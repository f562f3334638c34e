//! What the seeded simulations share: agents over turmoil's network, their options, and the
//! sweep that runs each seed in its own process (openraft's election timeouts come from one
//! process-wide seeded generator, so a seed replays only in a fresh process).

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use async_trait::async_trait;
use gobelins_adaptation::HostConfig;
use gobelins_locator::Labels;
use gobelins_supervisor::agent::{AgentOptions, Start};
use gobelins_supervisor::net::Net;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::SupervisorConfig;
use std::collections::BTreeMap;
use std::path::Path;

/// The port every simulated agent listens on, each on its own simulated host.
pub(crate) const PORT: u16 = 7400;

/// Agents' sockets are turmoil's: messages are delayed, partitioned and dropped by the seed.
pub(crate) struct TurmoilNet;

#[async_trait]
impl Net for TurmoilNet {
    type Stream = turmoil::net::TcpStream;
    type Listener = turmoil::net::TcpListener;
    type ReadHalf = turmoil::net::tcp::OwnedReadHalf;
    type WriteHalf = turmoil::net::tcp::OwnedWriteHalf;

    fn split(stream: Self::Stream) -> (Self::ReadHalf, Self::WriteHalf) {
        stream.into_split()
    }

    async fn bind(&self, addr: &str) -> std::io::Result<Self::Listener> {
        turmoil::net::TcpListener::bind(addr).await
    }

    async fn accept(&self, listener: &Self::Listener) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = listener.accept().await?;
        Ok((stream, peer.to_string()))
    }

    async fn connect(&self, addr: &str) -> std::io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(addr).await
    }
}

/// The simulated host of node `id`.
pub(crate) fn host_name(id: u64) -> String {
    format!("n{id}")
}

/// How node `id` starts in the simulation, its data under `root/n<id>`.
pub(crate) fn options(root: &Path, id: u64, start: Start, host: HostConfig) -> AgentOptions {
    AgentOptions {
        data_dir: root.join(host_name(id)),
        listen: format!("0.0.0.0:{PORT}"),
        advertise: Some(format!("{}:{PORT}", host_name(id))),
        start,
        secret_file: Some(root.join("n1").join("cluster.secret")),
        labels: Labels::new(),
        node_id: Some(id),
        // Snapshots every few entries, and few logs kept behind them: a node that restarts or
        // lags is brought up by a snapshot, and purges race installs, in every seed.
        config: SupervisorConfig {
            snapshot_every: 16,
            logs_kept: 2,
            ..SupervisorConfig::loopback()
        },
        durable: false,
        host,
    }
}

/// How node `id` enters: resumes from its data directory, bootstraps (node 1), or joins
/// through node 1 once the cluster secret exists.
pub(crate) async fn start_of(root: &Path, id: u64) -> Start {
    let dir = root.join(host_name(id));
    if dir.join("cluster.secret").exists() {
        Start::Resume
    } else if id == 1 {
        Start::Bootstrap
    } else {
        while !root.join("n1").join("cluster.secret").exists() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Start::Join(format!("n1:{PORT}"))
    }
}

/// The seed `one_seed` replays, from `GOBELINS_SIM_SEED`, with logs from `RUST_LOG`.
pub(crate) fn seed_from_env() -> u64 {
    let seed =
        std::env::var("GOBELINS_SIM_SEED").expect("set GOBELINS_SIM_SEED to the seed to replay");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_timer(SimTime)
        .try_init();
    seed.parse().expect("GOBELINS_SIM_SEED is a number")
}

/// Stamps a replayed seed's log lines with the simulation's clock, which the script's events
/// and the requests' stories are told in.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:>9.3}s", t.as_secs_f64()),
            None => write!(w, "{:>10}", "-"),
        }
    }
}

/// Runs `one_seed` of this test binary once per seed, each in its own process, and fails with
/// every failing seed's reason. `GOBELINS_SIM_SEEDS` overrides how many (`default` otherwise).
/// `found` are seeds past the sweep that once failed, run too: each stands for a fault fixed.
/// A seed runs on one thread, so as many run at once as the machine has cores: the sweep is
/// most of the suite's time. The first seed runs twice and must print the same summary both
/// times: a failing seed is only worth its number if it replays.
pub(crate) fn sweep(default: u64, found: &[u64]) {
    if std::env::var("GOBELINS_SIM_SEED").is_ok() {
        return;
    }
    let seeds: u64 =
        std::env::var("GOBELINS_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
    let exe = std::env::current_exe().expect("test binary");
    let past: Vec<u64> = found.iter().copied().filter(|&seed| seed >= seeds).collect();
    let runs: Vec<u64> = (0..seeds).chain(past).chain((seeds > 0).then_some(0)).collect();
    let mut summaries: Vec<(u64, String)> = Vec::new();
    let mut failures = Vec::new();
    for batch in runs.chunks(at_once) {
        let running: Vec<(u64, std::process::Child)> = batch
            .iter()
            .map(|&seed| {
                let child = std::process::Command::new(&exe)
                    .args(["--exact", "one_seed", "--include-ignored", "--nocapture"])
                    .arg("--test-threads=1")
                    .env("GOBELINS_SIM_SEED", seed.to_string())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("run one seed");
                (seed, child)
            })
            .collect();
        for (seed, child) in running {
            let out = child.wait_with_output().expect("wait for one seed");
            let text = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                // The seed's one-line summary, so that a passing sweep still shows what it did.
                // A run that exits well without its summary did not run the seed (a filter
                // that matched no test, say): that is no pass.
                match text.lines().find(|l| l.starts_with(&format!("seed {seed}:"))) {
                    Some(line) => {
                        eprintln!("{line}");
                        summaries.push((seed, line.to_string()));
                    }
                    None => {
                        failures.push(format!("seed {seed}: exited well but printed no summary"))
                    }
                }
            } else {
                let reason =
                    text.lines().find(|l| l.contains("seed ")).unwrap_or("no reason printed");
                failures.push(reason.to_string());
            }
        }
    }
    let replays: Vec<&str> =
        summaries.iter().filter(|(seed, _)| *seed == 0).map(|(_, l)| l.as_str()).collect();
    if let [first, second] = replays[..] {
        if first != second {
            failures.push(format!(
                "seed 0 did not replay (a source of randomness or of wall-clock time is not \
                 the seed's; see .cargo/config.toml):\n  first run:  {first}\n  second run: {second}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs failed:\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n")
    );
}

/// Each node's statuses as it last applied them: (node, status, incarnation).
pub(crate) type Statuses = Vec<(u64, NodeStatus, u64)>;

/// Each node's last applied state: (epoch, stable, statuses).
pub(crate) type Latest = BTreeMap<u64, (u64, bool, Statuses)>;

/// The newest stable state any node reported.
pub(crate) fn newest_stable(latest: &Latest) -> Option<&(u64, bool, Statuses)> {
    latest.values().filter(|(_, stable, _)| *stable).max_by_key(|(epoch, _, _)| *epoch)
}

/// Whether the cluster settled: at least three active members, each reporting the newest
/// stable state, and nobody joining or leaving in it.
pub(crate) fn converged(latest: &Latest) -> bool {
    let Some((_, _, statuses)) = newest_stable(latest) else { return false };
    let mut active = statuses.iter().filter(|(_, s, _)| *s == NodeStatus::Active);
    active.clone().count() >= 3
        && active.all(|(m, _, _)| latest.get(m).is_some_and(|(_, st, s)| *st && s == statuses))
        && !statuses.iter().any(|(_, s, _)| matches!(s, NodeStatus::Joining | NodeStatus::Leaving))
}
