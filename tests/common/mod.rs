//! The harness of the black-box tests: real `gobelins agent` processes, the CLI, and a
//! kvdir call through an agent's control socket.

// Each test binary uses its own part of the harness.
#![allow(dead_code)]

use gobelins::adaptation::codec;
use gobelins::kvdir;
use gobelins::supervisor::control::{self, ControlRequest};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_gobelins");

pub(crate) struct Agent {
    pub(crate) id: u64,
    pub(crate) addr: String,
    pub(crate) dir: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
    /// The network namespace the agent runs in, if not the test's own.
    pub(crate) netns: Option<String>,
}

impl Agent {
    /// Kills the agent (`kill -9`) and waits for it.
    pub(crate) fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// The path of the cluster secret in its data directory, which `--secret-file` takes:
    /// that of the bootstrap node, for a node that joins.
    pub(crate) fn secret(&self) -> String {
        self.dir.join("cluster.secret").to_str().expect("a UTF-8 path").to_string()
    }

    /// Another agent of the same id, directory and log, not started.
    pub(crate) fn clone_paths(&self) -> Agent {
        Agent {
            id: self.id,
            addr: self.addr.clone(),
            dir: self.dir.clone(),
            log: self.log.clone(),
            child: None,
            netns: self.netns.clone(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free port on `ip`, found by binding it once.
pub(crate) fn free_addr(ip: &str) -> String {
    let listener = TcpListener::bind((ip, 0)).expect("bind a free port");
    listener.local_addr().expect("address").to_string()
}

pub(crate) fn start(root: &Path, id: u64, addr: &str, extra: &[&str]) -> Agent {
    start_in(root, id, addr, None, extra)
}

/// [`start`], in network namespace `netns` if one is given.
pub(crate) fn start_in(
    root: &Path,
    id: u64,
    addr: &str,
    netns: Option<String>,
    extra: &[&str],
) -> Agent {
    let mut agent = unstarted(root, id, addr.to_string());
    agent.netns = netns;
    agent.child = Some(spawn(&agent, extra));
    agent
}

/// Node `id`, its directory and log under `root`, not started.
pub(crate) fn unstarted(root: &Path, id: u64, addr: String) -> Agent {
    let dir = root.join(format!("n{id}"));
    let log = root.join(format!("n{id}.log"));
    Agent { id, addr, dir, log, child: None, netns: None }
}

pub(crate) fn spawn(agent: &Agent, extra: &[&str]) -> Child {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(&agent.log).expect("log file");
    // `ip netns exec` execs the agent in place: the child is the agent, for its signals.
    let mut command = match &agent.netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns, BIN]);
            command
        }
        None => Command::new(BIN),
    };
    command
        .args(["agent", "--listen", &agent.addr, "--node-id", &agent.id.to_string()])
        .arg("--data-dir")
        .arg(&agent.dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log);
    // The agent's own default log unless asked: the one an operator reads.
    match std::env::var("GOBELINS_TEST_AGENT_LOG") {
        Ok(filter) => command.env("RUST_LOG", filter),
        Err(_) => command.env_remove("RUST_LOG"),
    };
    command.spawn().expect("spawn gobelins agent")
}

/// Runs the CLI, killed after 5 minutes: a `leave` or `evict` follows its change for as long as
/// the cluster works on it, and one stuck by a regression must fail the test, not hang it.
pub(crate) fn cli(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new("timeout");
    command.args(["--kill-after=10", "300", BIN]).args(args).arg("--data-dir").arg(dir);
    command.output().expect("run gobelins under timeout")
}

pub(crate) fn status(dir: &Path, local: bool) -> Option<Value> {
    let mut args = vec!["status", "--json"];
    if local {
        args.push("--local");
    }
    let out = cli(dir, &args);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

pub(crate) fn node_status(status: &Value, id: u64) -> Option<(String, u64)> {
    status["nodes"].as_array()?.iter().find(|n| n["id"] == id).map(|n| {
        (n["status"].as_str().unwrap_or("").to_string(), n["incarnation"].as_u64().unwrap_or(0))
    })
}

/// Polls until `check` holds, failing with `what` after `limit`.
pub(crate) fn wait_until(what: &str, limit: Duration, check: impl FnMut() -> bool) {
    wait_showing(&[], what, limit, check);
}

/// [`wait_until`], failing with every agent's own status and log tail.
pub(crate) fn wait_showing(
    agents: &[Agent],
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}{}", evidence(agents));
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn stable_with(dir: &Path, expected: &[(u64, &str, u64)]) -> bool {
    let Some(s) = status(dir, false) else { return false };
    s["stable"] == true
        && expected.iter().all(|(id, st, inc)| node_status(&s, *id) == Some((st.to_string(), *inc)))
}

pub(crate) fn log_of(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.log).unwrap_or_default()
}

/// What each agent says of itself and logged, for a failure message.
pub(crate) fn evidence(agents: &[Agent]) -> String {
    let mut out = String::new();
    for agent in agents {
        let log = log_of(agent);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        out.push_str(&format!(
            "\n--- node {} (running: {}) local status: {}\nlog tail:\n{}\n",
            agent.id,
            agent.child.is_some(),
            status(&agent.dir, true).map_or("none".into(), |s| s.to_string()),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    out
}

pub(crate) fn call(socket: &Path, key: u64, request: &kvdir::Request) -> Option<kvdir::Response> {
    let body = codec::encode(request).expect("encode");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    let answer = runtime
        .block_on(control::request(
            socket,
            &ControlRequest::Call { service: kvdir::KVDIR.0, key, body },
            |_| {},
        ))
        .ok()?;
    let bytes = control::answer_body(&answer).ok()?;
    codec::decode(&bytes).ok()
}

/// Agents at `places` (an address and the network namespace it is in, if any), nodes 1
/// (bootstrap) to `places.len()`, each started with `extra`, active, stable and voting.
pub(crate) fn agents_at(
    root: &Path,
    places: Vec<(String, Option<String>)>,
    limit: Duration,
    extra: &[&str],
) -> Vec<Agent> {
    agents_each(root, places, limit, extra, |_| Vec::new())
}

/// As [`agents_at`], node `i` started with `each(i)` too (its labels, say, and the bootstrap's
/// levels).
pub(crate) fn agents_each(
    root: &Path,
    places: Vec<(String, Option<String>)>,
    limit: Duration,
    extra: &[&str],
    each: impl Fn(u64) -> Vec<&'static str>,
) -> Vec<Agent> {
    let count = places.len() as u64;
    let seed = places[0].0.clone();
    let mut places = places.into_iter();
    let (addr, netns) = places.next().expect("a first node");
    let first = start_in(root, 1, &addr, netns, &[&["--bootstrap"], extra, &each(1)].concat());
    wait_until("the bootstrap node", limit, || stable_with(&first.dir, &[(1, "active", 1)]));
    let secret = first.secret();
    let mut agents = vec![first];
    for (i, (addr, netns)) in (2..).zip(places) {
        let join = ["--join", seed.as_str(), "--secret-file", secret.as_str()];
        agents.push(start_in(root, i, &addr, netns, &[&join, extra, &each(i)].concat()));
    }
    let all: Vec<(u64, &str, u64)> = (1..=count).map(|i| (i, "active", 1)).collect();
    wait_showing(&agents, "every node active", limit, || stable_with(&agents[0].dir, &all));
    // Raft's voters follow the membership a little later. Until the last node votes, the
    // cluster may be two voters, which cannot lose one: a kill before then would stop it.
    wait_showing(&agents, "every node voting", limit, || {
        status(&agents[0].dir, false)
            .is_some_and(|s| s["voters"].as_array().map_or(0, Vec::len) as u64 == count)
    });
    agents
}

/// `gobelins stats --json` of the agent in `dir`.
pub(crate) fn stats_of(dir: &Path) -> Value {
    let stats = cli(dir, &["stats", "--json"]);
    assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
    serde_json::from_slice(&stats.stdout).expect("one JSON object")
}
