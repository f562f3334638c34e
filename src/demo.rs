//! `gobelins demo`: a real cluster on this machine, under load, through an addition, an
//! eviction and a `kill -9`.
//!
//! It starts `gobelins agent` processes on 127.0.0.1, fills the kvdir example service with
//! entries, keeps clients writing through the agents' control sockets, and walks the cluster
//! through the three kinds of change. For each it prints what the clients saw and what the
//! agents moved, phase by phase; at the end it reads every key back and compares it with the
//! last write the cluster acknowledged.

use anyhow::{bail, Context as _};
use clap::Args;
use gobelins_adaptation::{codec, ChangeRecord};
use gobelins_kvdir::{Request, Response, KVDIR};
use gobelins_supervisor::control::{self, ControlRequest, PlanAsk};
use gobelins_supervisor::preview::Previewed;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Options of `gobelins demo`.
#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Agents the cluster starts with (one more is added during the demo).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Keys written to the kvdir service and checked at the end.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Clients writing concurrently during the changes.
    #[arg(long, default_value_t = 8)]
    clients: u64,
    /// Where the agents keep their data and logs, kept at the end (default: a fresh
    /// directory under $TMPDIR, else /tmp, removed at the end of a successful run unless
    /// --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data directories and logs of a successful run (a --dir is always kept).
    #[arg(long)]
    keep: bool,
}

/// A request that took longer than this waited on a change.
const DELAYED: Duration = Duration::from_millis(20);

struct Agent {
    id: u64,
    addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
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

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    delayed: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn read(&self) -> (u64, u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.delayed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

pub(crate) fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3: the demo evicts one node and kills another");
    }
    // A client with no key of its own would spin without ever yielding its thread.
    if args.clients == 0 || args.clients > args.keys {
        bail!(
            "--clients ({}) must be between 1 and --keys ({}): each client writes keys of its own",
            args.clients,
            args.keys
        );
    }
    let root = match &args.dir {
        Some(dir) => {
            let reading = || format!("reading --dir {}", dir.display());
            if dir.exists() && std::fs::read_dir(dir).with_context(reading)?.next().is_some() {
                bail!("{} is not empty; give --dir an empty or new directory", dir.display());
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => fresh_root()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(demo(args, &root));
    // A directory the user named is theirs: only the demo's own goes.
    if !args.keep && args.dir.is_none() && result.is_ok() {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        eprintln!("demo: data directories and agent logs are in {}", root.display());
    }
    result
}

/// A directory for the demo, made new under a name nobody could guess and private to this
/// user: another user of the machine cannot have made it first, nor plant a secret or a link
/// in it, nor read the cluster's secret from it.
fn fresh_root() -> anyhow::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("gobelins-demo-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("creating a directory for the demo under the temporary directory")?;
    Ok(dir.keep())
}

async fn demo(args: &DemoArgs, root: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the gobelins binary")?;
    let started = Instant::now();
    let mut agents: BTreeMap<u64, Agent> = BTreeMap::new();
    let first = spawn(&exe, root, 1, None)?;
    wait_until(&first, "bootstrapped", |s| member(s, 1) == Some("active")).await?;
    let seed = first.addr.clone();
    agents.insert(1, first);
    for id in 2..=args.nodes {
        let agent = spawn(&exe, root, id, Some(&seed))?;
        wait_until(&agent, "joined", |s| member(s, id) == Some("active") && stable(s)).await?;
        agents.insert(id, agent);
    }
    let sockets: Vec<PathBuf> = agents.values().take(2).map(Agent::socket).collect();
    wait_for_service(&sockets[0]).await?;
    println!(
        "demo: {} agents up on 127.0.0.1 in {} ms; kvdir registered",
        args.nodes,
        started.elapsed().as_millis()
    );

    // Every key gets a first value; `book` is the last value the cluster acknowledged.
    let book = Arc::new(Mutex::new(BTreeMap::new()));
    let tally = Arc::new(Tally::default());
    let fill = Instant::now();
    let mut fillers = tokio::task::JoinSet::new();
    for c in 0..args.clients {
        let (socket, book, tally) =
            (sockets[(c % 2) as usize].clone(), Arc::clone(&book), Arc::clone(&tally));
        let keys = args.keys;
        let clients = args.clients;
        fillers.spawn(async move {
            for key in (c..keys).step_by(clients as usize) {
                write(&socket, key, key, &book, &tally).await;
            }
        });
    }
    while fillers.join_next().await.is_some() {}
    let (ok, _, failed) = tally.read();
    println!(
        "demo: {} keys written in {} ms ({ok} ok, {failed} failed); {} clients keep writing",
        args.keys,
        fill.elapsed().as_millis(),
        args.clients
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..args.clients {
        let (socket, book, tally, stop) = (
            sockets[(c % 2) as usize].clone(),
            Arc::clone(&book),
            Arc::clone(&tally),
            Arc::clone(&stop),
        );
        let (keys, n) = (args.keys, args.clients);
        clients.spawn(async move {
            let mut round = 1;
            while !stop.load(Ordering::Relaxed) {
                for key in (c..keys).step_by(n as usize) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    write(&socket, key, round * keys + key, &book, &tally).await;
                }
                round += 1;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Counted from the changes the agents carried out, not from the steps asked for.
    let mut changes = 0;
    let added = args.nodes + 1;
    let evicted = args.nodes;
    let observer = agents[&1].socket();

    // An addition.
    let join = PlanAsk::Join { labels: Default::default(), node: Some(added) };
    let before = ChangeStart::now(&observer, &tally, join).await?;
    let agent = spawn(&exe, root, added, Some(&seed))?;
    // Connected: the process started, reached the seed, and its join is committed (the
    // cluster lists it). The change that moves entries to it begins there.
    wait_until(&agent, "admitted", |s| member(s, added).is_some()).await?;
    let admitted = before.at.elapsed();
    wait_until(&agent, "joined", |s| member(s, added) == Some("active") && stable(s)).await?;
    agents.insert(added, agent);
    changes +=
        report(&format!("add node {added}"), before, &agents, &tally, Some(admitted)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An eviction.
    let before = ChangeStart::now(&observer, &tally, PlanAsk::Evict { node: evicted }).await?;
    control::request(&observer, &ControlRequest::Evict { node: evicted, now: false }, |_| {})
        .await
        .with_context(|| format!("evicting node {evicted}"))?;
    wait_until(&agents[&1], "evicted", |s| member(s, evicted) == Some("left") && stable(s)).await?;
    changes += report(&format!("evict node {evicted}"), before, &agents, &tally, None).await?;
    if let Some(mut gone) = agents.remove(&evicted) {
        if let Some(mut child) = gone.child.take() {
            let _ = child.wait();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A failure.
    let before = ChangeStart::now(&observer, &tally, PlanAsk::Fail { node: added }).await?;
    if let Some(mut victim) = agents.remove(&added) {
        if let Some(mut child) = victim.child.take() {
            child.kill().context("kill -9")?;
            let _ = child.wait();
        }
    }
    wait_until(&agents[&1], "recovered", |s| member(s, added) == Some("failed") && stable(s))
        .await?;
    changes += report(&format!("kill -9 node {added}"), before, &agents, &tally, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}

    // Every key must read back as the last value the cluster acknowledged.
    let book = std::mem::take(&mut *book.lock().expect("book"));
    let mut lost = 0;
    for (&key, &value) in &book {
        match read(&observer, key).await {
            Ok(Some(got)) if got == value => {}
            Ok(got) => {
                lost += 1;
                if lost <= 5 {
                    eprintln!("demo: key {key} reads {got:?}, but {value} was acknowledged");
                }
            }
            Err(e) => {
                lost += 1;
                eprintln!("demo: key {key} cannot be read: {e:#}");
            }
        }
    }
    let missing = args.keys - book.len() as u64;
    // What the survivors themselves said they could not rebuild: one failure at a time, a
    // survivor held a whole copy of everything the dead node had, and nothing may be reported.
    // Each service counts in its own unit: kvdir's slots are named as such, the rest only
    // summed (the DSM runs in every agent, though the demo's clients do not use it).
    let (mut slots, mut reported) = (0, 0);
    for agent in agents.values() {
        let stats: gobelins_adaptation::Stats =
            serde_json::from_value(agent_stats(agent).await?["stats"].clone())?;
        slots += stats.reported_lost.get("kvdir").copied().unwrap_or(0);
        reported += stats.reported_lost.values().sum::<u64>();
    }
    println!(
        "demo: the agents reported {slots} kvdir slots lost (slots no survivor could vouch for)"
    );
    if reported > slots {
        println!(
            "demo: and other services reported {} lost (`gobelins stats` says which)",
            reported - slots
        );
    }
    let (ok, delayed, failed) = tally.read();
    println!(
        "demo: {} keys read back, {lost} differ from the last acknowledged write, \
         {missing} were never acknowledged; requests delayed over {} ms: {delayed}",
        book.len(),
        DELAYED.as_millis()
    );
    println!(
        "demo: requests_ok={ok} requests_failed={failed} entries_lost={} changes={changes}",
        lost + missing
    );
    for agent in agents.values_mut() {
        if let Some(mut child) = agent.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if failed > 0 || lost + missing > 0 || reported > 0 {
        bail!(
            "the cluster failed requests, lost entries or reported some lost; see the agent logs"
        );
    }
    Ok(())
}

fn spawn(exe: &Path, root: &Path, id: u64, seed: Option<&str>) -> anyhow::Result<Agent> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let dir = root.join(format!("n{id}"));
    let log = std::fs::File::create(root.join(format!("n{id}.log")))?;
    let mut command = Command::new(exe);
    command
        .args(["agent", "--loopback-timers", "--listen", &addr, "--node-id", &id.to_string()])
        .arg("--data-dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(log);
    match seed {
        None => {
            command.arg("--bootstrap");
        }
        Some(seed) => {
            command
                .args(["--join", seed, "--secret-file"])
                .arg(root.join("n1").join("cluster.secret"));
        }
    }
    let child = command.spawn().context("starting gobelins agent")?;
    Ok(Agent { id, addr, dir, child: Some(child) })
}

fn member(status: &Value, id: u64) -> Option<&str> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
        .and_then(|n| n["status"].as_str())
}

fn stable(status: &Value) -> bool {
    status["stable"].as_bool() == Some(true)
}

async fn status(socket: &Path) -> anyhow::Result<Value> {
    Ok(control::request(socket, &ControlRequest::Status { local: false }, |_| {}).await?)
}

async fn wait_until(
    agent: &Agent,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = status(&agent.socket()).await {
            if check(&s) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("node {} (at {}) not {what} after 60 s", agent.id, agent.addr);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_service(socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(socket, 0, &Request::Get).await.is_err() {
        if Instant::now() > deadline {
            bail!("the kvdir service was not registered within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn call(socket: &Path, key: u64, request: &Request) -> anyhow::Result<Response> {
    let body = codec::encode(request)?;
    let answer =
        control::request(socket, &ControlRequest::Call { service: KVDIR.0, key, body }, |_| {})
            .await?;
    let bytes = control::answer_body(&answer)?;
    Ok(codec::decode(&bytes)?)
}

async fn write(
    socket: &Path,
    key: u64,
    value: u64,
    book: &Mutex<BTreeMap<u64, u64>>,
    tally: &Tally,
) {
    let t = Instant::now();
    match call(socket, key, &Request::Put(value.to_le_bytes().to_vec())).await {
        Ok(Response::Stored { .. }) => {
            book.lock().expect("book").insert(key, value);
            tally.ok.fetch_add(1, Ordering::Relaxed);
            if t.elapsed() > DELAYED {
                tally.delayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(other) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, ?other, "unexpected answer to a write");
        }
        Err(e) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, error = %format!("{e:#}"), "write failed");
        }
    }
}

async fn read(socket: &Path, key: u64) -> anyhow::Result<Option<u64>> {
    match call(socket, key, &Request::Get).await? {
        Response::Value(Some(v)) => {
            let bytes: [u8; 8] =
                v.value[..].try_into().map_err(|_| anyhow::anyhow!("not a u64"))?;
            Ok(Some(u64::from_le_bytes(bytes)))
        }
        Response::Value(None) => Ok(None),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// What `gobelins stats` shows of `agent`: its counters and the changes it took part in.
async fn agent_stats(agent: &Agent) -> anyhow::Result<Value> {
    Ok(control::request(&agent.socket(), &ControlRequest::Stats, |_| {}).await?)
}

/// The clients' counters and the epoch when a change was asked for, and what `gobelins plan`
/// said of it just before.
struct ChangeStart {
    at: Instant,
    epoch: u64,
    tally: (u64, u64, u64),
    planned: String,
}

impl ChangeStart {
    /// Asks `observer`'s agent for the plan of `change`, as `gobelins plan` does, then notes
    /// the counters and the epoch. A plan that cannot be had is said, and the demo goes on.
    async fn now(observer: &Path, tally: &Tally, change: PlanAsk) -> anyhow::Result<Self> {
        let asked = ControlRequest::Plan { change };
        let answer = control::request(observer, &asked, |_| {}).await;
        let previewed = answer
            .map_err(anyhow::Error::from)
            .and_then(|answer| Ok(serde_json::from_value::<Previewed>(answer["preview"].clone())?));
        let planned = match previewed {
            Ok(Previewed::Begins(preview)) => crate::cli::one_line(&preview),
            Ok(Previewed::Nothing) => "no change would begin".to_string(),
            Ok(Previewed::Unknown { stuck }) => format!("cannot tell: {stuck} ahead of it"),
            Err(e) => format!("no plan: {e:#}"),
        };
        let epoch = status(observer).await?["epoch"].as_u64().unwrap_or(0);
        Ok(ChangeStart { at: Instant::now(), epoch, tally: tally.read(), planned })
    }
}

/// Prints what a change cost the clients and each phase; returns how many changes (epochs) the
/// agents carried out since `before`.
async fn report(
    what: &str,
    before: ChangeStart,
    agents: &BTreeMap<u64, Agent>,
    tally: &Tally,
    admitted: Option<Duration>,
) -> anyhow::Result<usize> {
    let took = before.at.elapsed();
    let (ok, delayed, failed) = tally.read();
    let mut records: Vec<ChangeRecord> = Vec::new();
    for agent in agents.values() {
        let history: Vec<ChangeRecord> =
            serde_json::from_value(agent_stats(agent).await?["changes"].clone())?;
        records.extend(history.into_iter().filter(|r| r.epoch > before.epoch));
    }
    let sent: u64 = records.iter().map(|r| r.entries_sent).sum();
    let rebuilt: u64 = records.iter().map(|r| r.entries_rebuilt).sum();
    let slowest = |f: fn(&ChangeRecord) -> f64| records.iter().map(f).fold(0.0, f64::max);
    let epochs: std::collections::BTreeSet<u64> = records.iter().map(|r| r.epoch).collect();
    println!("change: {what}: stable after {} ms (epochs {epochs:?})", took.as_millis());
    println!("  planned    {} (`gobelins plan`, asked just before)", before.planned);
    if let Some(admitted) = admitted {
        println!(
            "  connect    agent started, reached the seed, its join committed in {} ms",
            admitted.as_millis()
        );
    }
    println!(
        "  requests   ok={} delayed={} failed={}",
        ok - before.tally.0,
        delayed - before.tally.1,
        failed - before.tally.2
    );
    println!("  entries    moved={sent} rebuilt={rebuilt}");
    println!(
        "  phases     before {:.1} ms | sending out {:.1} ms | receiving {:.1} ms | after {:.1} ms | stable {:.1} ms (slowest participant)",
        slowest(|r| r.before_ms),
        slowest(|r| r.sending_ms),
        slowest(|r| r.receiving_ms),
        slowest(|r| r.after_ms),
        slowest(|r| r.stable_ms.unwrap_or(0.0)),
    );
    println!(
        "  held       requests for the moved keys held at most {:.1} ms (released after the merge, before the copy to backups)",
        slowest(|r| r.held_ms),
    );
    Ok(epochs.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn more_clients_than_keys_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let args = |clients, keys| DemoArgs {
            nodes: 3,
            keys,
            clients,
            dir: Some(dir.path().join("demo")),
            keep: false,
        };
        for (clients, keys) in [(9, 8), (0, 8)] {
            let said = run(&args(clients, keys)).unwrap_err().to_string();
            assert!(said.contains("--clients"), "{said}");
        }
        assert!(!dir.path().join("demo").exists(), "nothing was made");
    }

    #[test]
    fn the_default_directory_is_new_each_time_and_private() {
        let (a, b) = (fresh_root().unwrap(), fresh_root().unwrap());
        assert_ne!(a, b);
        for dir in [a, b] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            std::fs::remove_dir(&dir).unwrap();
            assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
        }
    }
}
