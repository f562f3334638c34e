//! How long membership changes take on loopback, with real agent processes.
//!
//! `cargo build --release && cargo run --release --example membership [-- --runs 5 --hog-secs 30]`
//!
//! For default and loopback-tuned timers: time from starting a joining agent to a stable
//! cluster with it active, from `gobelins leave` to a stable cluster without it, from `kill -9`
//! to a stable cluster that declared it failed (median and worst of several runs). Then the raft
//! commit latency of a configuration change (three in-process agents over loopback TCP, every
//! write synced), against a raw TCP round trip in the same run. Then two CPU hogs for a while on a
//! three-node cluster with default timers: any node declared failed is a false failure.

use gobelins_adaptation::HostConfig;
use gobelins_locator::{Labels, ServiceId, ServiceSpec};
use gobelins_supervisor::agent::{Agent, AgentOptions, Start};
use gobelins_supervisor::net::TokioNet;
use gobelins_supervisor::state::Command as StateCommand;
use gobelins_supervisor::SupervisorConfig;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("gobelins")).expect("target dir");
    assert!(bin.exists(), "{} is missing: run `cargo build --release` first", bin.display());
    bin
}

fn free_addr(ip: &str) -> String {
    TcpListener::bind((ip, 0)).expect("free port").local_addr().expect("addr").to_string()
}

struct Node {
    id: u64,
    dir: PathBuf,
    addr: String,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(bin: &Path, root: &Path, id: u64, extra: &[String], loopback: bool) -> Node {
    let dir = root.join(format!("n{id}"));
    let addr = free_addr(&format!("127.0.0.{id}"));
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--listen", &addr, "--node-id", &id.to_string()])
        .arg("--data-dir")
        .arg(&dir);
    if loopback {
        cmd.arg("--loopback-timers");
    }
    let child =
        cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn agent");
    Node { id, dir, addr, child: Some(child) }
}

fn status(bin: &Path, dir: &Path) -> Option<Value> {
    let out = Command::new(bin).args(["status", "--json", "--data-dir"]).arg(dir).output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn node_is(s: &Value, id: u64, what: &str) -> bool {
    s["nodes"].as_array().is_some_and(|ns| ns.iter().any(|n| n["id"] == id && n["status"] == what))
}

fn wait(bin: &Path, dir: &Path, check: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if status(bin, dir).is_some_and(|s| s["stable"] == true && check(&s)) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "cluster did not settle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One run: returns (join, leave, kill) durations.
fn run_once(bin: &Path, loopback: bool) -> (Duration, Duration, Duration) {
    let root = tempfile::tempdir().expect("temp dir");
    let first = spawn(bin, root.path(), 1, &["--bootstrap".into()], loopback);
    wait(bin, &first.dir, |s| node_is(s, 1, "active"));
    let secret = first.dir.join("cluster.secret").display().to_string();
    let join =
        || ["--join".to_string(), first.addr.clone(), "--secret-file".into(), secret.clone()];
    let mut nodes = vec![];
    for id in 2..=3 {
        nodes.push(spawn(bin, root.path(), id, &join(), loopback));
        wait(bin, &first.dir, |s| node_is(s, id, "active"));
    }
    // Let raft promote the new voters before timing.
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let fourth = spawn(bin, root.path(), 4, &join(), loopback);
    wait(bin, &first.dir, |s| node_is(s, 4, "active"));
    let t_join = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let out =
        Command::new(bin).args(["leave", "--data-dir"]).arg(&fourth.dir).output().expect("leave");
    assert!(out.status.success(), "leave failed: {}", String::from_utf8_lossy(&out.stderr));
    let t_leave = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));

    let mut victim = nodes.pop().expect("node 3");
    let started = Instant::now();
    victim.child.as_mut().expect("child").kill().expect("kill -9");
    let id = victim.id;
    wait(bin, &first.dir, |s| node_is(s, id, "failed"));
    let t_kill = started.elapsed();
    drop((victim, nodes, fourth, first));
    (t_join, t_leave, t_kill)
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().expect("at least one run"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Raft commit latency of `Register` through three in-process agents over loopback TCP, and a
/// raw TCP echo of the same process for comparison.
fn commit_latency(samples: usize, durable: bool) -> (Duration, Duration, Duration) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let root = tempfile::tempdir().expect("temp dir");
        let options = |id: u64, start: Start| AgentOptions {
            data_dir: root.path().join(format!("n{id}")),
            listen: free_addr(&format!("127.0.0.{id}")),
            advertise: None,
            start,
            secret_file: Some(root.path().join("n1/cluster.secret")),
            labels: Labels::new(),
            node_id: Some(id),
            config: SupervisorConfig::loopback(),
            durable,
            host: HostConfig::default(),
        };
        let first_options = options(1, Start::Bootstrap);
        let first =
            Agent::start(TokioNet, &first_options, gobelins::services).await.expect("bootstrap");
        let mut others = Vec::new();
        for id in 2..=3 {
            others.push(
                Agent::start(
                    TokioNet,
                    &options(id, Start::Join(first_options.listen.clone())),
                    gobelins::services,
                )
                .await
                .expect("join"),
            );
        }
        while first.supervisor.voters().len() < 3 || !first.supervisor.state().is_stable() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut times = Vec::new();
        for i in 0..samples {
            let spec = ServiceSpec::new(ServiceId(100 + i as u16), "probe").with_slots(16);
            let started = Instant::now();
            first
                .supervisor
                .propose(StateCommand::Register(spec))
                .await
                .expect("committed")
                .expect("accepted");
            times.push(started.elapsed());
        }
        for agent in others.iter().chain(std::iter::once(&first)) {
            agent.stop().await;
        }
        let (median, _) = median(times.clone());
        times.sort();
        let p99 = times[times.len() * 99 / 100];
        (median, p99, tcp_echo(samples))
    })
}

fn tcp_echo(samples: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut buf = [0u8; 64];
    let mut times = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        c.write_all(&[7; 64]).expect("write");
        c.read_exact(&mut buf).expect("read");
        times.push(started.elapsed());
    }
    median(times).0
}

fn hog(bin: &Path, secs: u64) -> usize {
    let root = tempfile::tempdir().expect("temp dir");
    let first = spawn(bin, root.path(), 1, &["--bootstrap".into()], false);
    wait(bin, &first.dir, |s| node_is(s, 1, "active"));
    let secret = first.dir.join("cluster.secret").display().to_string();
    let mut nodes = vec![];
    for id in 2..=3 {
        let join =
            ["--join".to_string(), first.addr.clone(), "--secret-file".into(), secret.clone()];
        nodes.push(spawn(bin, root.path(), id, &join, false));
        wait(bin, &first.dir, |s| node_is(s, id, "active"));
    }
    let mut hogs: Vec<Child> = (0..2)
        .map(|_| Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("hog"))
        .collect();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut failed = 0;
    while Instant::now() < until {
        if let Some(s) = status(bin, &first.dir) {
            failed = failed.max(
                s["nodes"]
                    .as_array()
                    .map_or(0, |ns| ns.iter().filter(|n| n["status"] == "failed").count()),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for h in &mut hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    drop((nodes, first));
    failed
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut runs, mut hog_secs) = (5usize, 30u64);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--runs", Some(v)) => runs = v as usize,
            ("--hog-secs", Some(v)) => hog_secs = v,
            _ => panic!("usage: membership [--runs N] [--hog-secs S]"),
        }
    }
    let bin = binary();
    println!("{runs} runs each; a 3-node cluster, plus a 4th node that joins then leaves; then node 3 is killed\n");
    println!(
        "{:<10} {:>16} {:>16} {:>16}",
        "timers", "join->stable", "leave->stable", "kill-9->stable"
    );
    for (label, loopback) in [("default", false), ("loopback", true)] {
        let results: Vec<_> = (0..runs).map(|_| run_once(&bin, loopback)).collect();
        let (join, join_max) = median(results.iter().map(|r| r.0).collect());
        let (leave, leave_max) = median(results.iter().map(|r| r.1).collect());
        let (kill, kill_max) = median(results.iter().map(|r| r.2).collect());
        println!(
            "{label:<10} {:>16} {:>16} {:>16}   (worst {} / {} / {})",
            ms(join),
            ms(leave),
            ms(kill),
            ms(join_max),
            ms(leave_max),
            ms(kill_max)
        );
    }
    println!();
    for (label, durable) in [("fsync", true), ("no sync", false)] {
        let (commit, commit_p99, echo) = commit_latency(200, durable);
        println!(
            "configuration change committed (3 voters, loopback TCP, {label}): median {} p99 {}; raw TCP echo {:.1} µs",
            ms(commit),
            ms(commit_p99),
            echo.as_secs_f64() * 1e6
        );
    }
    if hog_secs > 0 {
        let failed = hog(&bin, hog_secs);
        println!("false failures during {hog_secs} s of two CPU hogs (default timers): {failed}");
    }
}
