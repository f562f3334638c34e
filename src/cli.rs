//! The node commands: `agent`, and the commands that talk to it over its control socket.

use anyhow::{bail, Context};
use clap::Args;
use gobelins_adaptation::HostConfig;
use gobelins_locator::{parse_label, Labels, TreeConfig};
use gobelins_supervisor::agent::{self, AgentOptions, Start};
use gobelins_supervisor::control::{self, ControlRequest};
use gobelins_supervisor::SupervisorConfig;
use serde_json::Value;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Where the agent keeps its state; shared by every node command.
#[derive(Args, Debug)]
pub(crate) struct DirArgs {
    /// The agent's data directory.
    #[arg(long, env = "GOBELINS_DATA_DIR", default_value = "gobelins-data")]
    data_dir: PathBuf,
}

/// Options of `gobelins agent`.
#[derive(Args, Debug)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Address to listen on for peers, such as 127.0.0.1:7400.
    #[arg(long)]
    listen: String,
    /// Address peers should dial, when it differs from --listen (say --listen 0.0.0.0:7400).
    #[arg(long)]
    advertise: Option<String>,
    /// Create a new cluster with this node as its first member.
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster of the agent at this address.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// The cluster secret, copied from the bootstrap node's data directory (for --join).
    #[arg(long, conflicts_with = "bootstrap")]
    secret_file: Option<PathBuf>,
    /// A label placing this node in the cell tree, such as zone=a (repeatable); its key must be
    /// one of the levels the cluster was bootstrapped with.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// With --bootstrap (or to finish one that stopped): the label keys that group nodes into
    /// cells, top first, such as zone,rack. Set once for the cluster's life; nodes give values
    /// with --label zone=a.
    #[arg(long, value_delimiter = ',', conflicts_with = "join", value_name = "KEY,...")]
    levels: Vec<String>,
    /// This node's id (chosen at random on first start if absent).
    #[arg(long)]
    node_id: Option<u64>,
    /// Timers tuned for agents on one machine (failures declared in about half a second).
    #[arg(long)]
    loopback_timers: bool,
    /// How often the leader pings every node, in milliseconds (overrides the preset).
    #[arg(long, value_name = "MS")]
    ping_interval_ms: Option<u64>,
    /// Silence after which a node is suspected and probed by others, in milliseconds.
    #[arg(long, value_name = "MS")]
    failure_timeout_ms: Option<u64>,
    /// How long this node, leading, holds out a node before it may rejoin once two of that
    /// node's lives in a row failed within 2 minutes of their start, in milliseconds; doubled
    /// at each further such failure, up to 5 minutes, until one of its lives lasts 2 minutes or
    /// 10 minutes pass without a failure. A node starved of CPU or on a flaky link would
    /// otherwise be declared failed and rejoin again and again, its entries moving out and back
    /// each time. 0 holds nobody.
    #[arg(long, value_name = "MS")]
    rejoin_hold_ms: Option<u64>,
}

/// Options of `gobelins status`.
#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Show this node's own view instead of the leader's.
    #[arg(long)]
    local: bool,
}

/// Options of `gobelins stats`.
#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of `gobelins join`.
#[derive(Args, Debug)]
pub(crate) struct JoinArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Address of any member of the cluster.
    seed: String,
}

/// Options of `gobelins evict`.
#[derive(Args, Debug)]
pub(crate) struct EvictArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The node to remove.
    node: u64,
}

/// Options of `gobelins unhold`.
#[derive(Args, Debug)]
pub(crate) struct UnholdArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The node held out.
    node: u64,
}

/// Options of `gobelins dsm`.
#[derive(Args, Debug)]
pub(crate) struct DsmArgs {
    #[command(subcommand)]
    op: DsmOp,
}

#[derive(clap::Subcommand, Debug)]
enum DsmOp {
    /// Print bytes of a segment to standard output, as they are, through this node's DSM.
    Read {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// Where to start, in bytes.
        offset: u64,
        /// How many bytes (at most 512 KiB).
        len: u64,
    },
    /// Write bytes into a segment through this node's DSM: the text given, or standard input
    /// with `-`.
    Write {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// Where to start, in bytes.
        offset: u64,
        /// The bytes, as text; `-` reads them from standard input (at most 512 KiB).
        data: String,
    },
    /// Give a segment back: every node drops its copies and directory entries of it, and it
    /// reads as zeros afterwards. For a segment no program uses any more.
    Free {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// Its length in bytes, as the program made it. The whole segment is freed, whatever
        /// the length: every page of it reads as zeros afterwards, even where a node that
        /// managed it failed.
        len: u64,
    },
    /// Start a page reported lost afresh, zero-filled, once what it held is dealt with (the
    /// page of byte `offset` is `offset / 4096`).
    Discard {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// The page within the segment.
        page: u32,
    },
    /// List the pages reported lost, with their managers, asking every node, and the slots
    /// where pages nobody reported after a failure read as lost (tainted). Exits non-zero when
    /// the list may be incomplete: a node did not answer, requests held entries, or the
    /// cluster changed meanwhile, for the few seconds it asks again.
    Lost {
        #[command(flatten)]
        dir: DirArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `gobelins kv`.
#[derive(Args, Debug)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    op: KvOp,
}

#[derive(clap::Subcommand, Debug)]
enum KvOp {
    /// Print a key's value to standard output, as it is, from the key's manager.
    Get {
        #[command(flatten)]
        dir: DirArgs,
        /// The key: a whole number below 2^63 (kvdir keeps the keys from 2^63 up for itself).
        key: u64,
    },
    /// Store a value under a key: the text given, or standard input with `-`.
    Put {
        #[command(flatten)]
        dir: DirArgs,
        /// The key: a whole number below 2^63 (kvdir keeps the keys from 2^63 up for itself).
        key: u64,
        /// The value, as text; `-` reads it from standard input (at most 4 MiB).
        value: String,
    },
    /// Accept that the entries of the key's slot that kvdir reported lost are gone: the keys
    /// the slot lacks read as absent again, not as lost. Use it once what mattered is restored
    /// (the agents' log names the slots; `gobelins stats` counts them).
    Forgive {
        #[command(flatten)]
        dir: DirArgs,
        /// Any key of the slot.
        #[arg(required_unless_present = "all")]
        key: Option<u64>,
        /// Every slot, a few at a time: after every node of the cluster stopped at once (a
        /// power cut), when every key reads as lost. Slots that lost nothing are left as they
        /// are.
        #[arg(long, conflicts_with = "key")]
        all: bool,
    },
}

/// Forgives every slot of kvdir through the agent of `dir`, with a key of each, found by
/// walking the keys from 0: a slot's keys are spread by a hash.
fn forgive_all(dir: &DirArgs) -> anyhow::Result<()> {
    use gobelins::kvdir::{KvDir, Request, Response, KVDIR};
    use gobelins::locator::Key;
    let spec = KvDir::declaration();
    let mut of_slot: Vec<Option<u64>> = vec![None; spec.slots as usize];
    let mut missing = of_slot.len();
    for key in 0u64.. {
        let slot = &mut of_slot[spec.slot_of(Key(key)) as usize];
        if slot.is_none() {
            *slot = Some(key);
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    let body = gobelins::adaptation::codec::encode(&Request::Forgive)?;
    let socket = dir.data_dir.join("control.sock");
    let forgive = |key: u64| {
        let (socket, body) = (socket.clone(), body.clone());
        async move {
            let call = ControlRequest::Call { service: KVDIR.0, key, body };
            let answer = control::request(&socket, &call, |_| {}).await?;
            let bytes = control::answer_body(&answer)?;
            match gobelins::adaptation::codec::decode::<Response>(&bytes)? {
                Response::Forgiven => Ok(()),
                other => bail!("key {key}: unexpected answer {other:?}"),
            }
        }
    };
    let mut keys = of_slot.into_iter().flatten();
    let first = keys.next().context("kvdir has slots")?;
    let failed = runtime()?.block_on(async {
        // One alone first: an agent not running, or a cluster not there yet, says so once.
        forgive(first).await?;
        let mut asked = tokio::task::JoinSet::new();
        let mut failed: Vec<anyhow::Error> = Vec::new();
        let mut note = |done: Result<anyhow::Result<()>, tokio::task::JoinError>| match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(e.into()),
        };
        for key in keys {
            if asked.len() >= 16 {
                if let Some(done) = asked.join_next().await {
                    note(done);
                }
            }
            asked.spawn(forgive(key));
        }
        while let Some(done) = asked.join_next().await {
            note(done);
        }
        anyhow::Ok(failed)
    })?;
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} slots were not forgiven (the first: {first:#}); run it again once the \
             cluster is stable",
            failed.len(),
            spec.slots
        );
    }
    eprintln!("every one of kvdir's {} slots reads the keys it lacks as absent", spec.slots);
    Ok(())
}

pub(crate) fn kv(args: KvArgs) -> anyhow::Result<()> {
    use gobelins::kvdir::{Request, Response, KVDIR, MAX_VALUE, RESERVED};
    use std::io::Read as _;
    if let KvOp::Forgive { dir, key: None, .. } = &args.op {
        return forgive_all(dir);
    }
    let (dir, key, request) = match args.op {
        KvOp::Get { dir, key } => (dir, key, Request::Get),
        KvOp::Put { dir, key, value } => {
            let value = if value == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .take(MAX_VALUE as u64 + 1)
                    .read_to_end(&mut bytes)
                    .context("reading standard input")?;
                bytes
            } else {
                value.into_bytes()
            };
            if value.len() > MAX_VALUE {
                bail!(
                    "the value is larger than kvdir's limit of {MAX_VALUE} bytes; nothing stored"
                );
            }
            (dir, key, Request::Put(value))
        }
        KvOp::Forgive { dir, key, .. } => {
            (dir, key.context("a key to forgive the slot of, or --all")?, Request::Forgive)
        }
    };
    let body = gobelins::adaptation::codec::encode(&request)?;
    let answer = ask(&dir, ControlRequest::Call { service: KVDIR.0, key, body })?;
    let bytes = control::answer_body(&answer)?;
    match gobelins::adaptation::codec::decode::<Response>(&bytes)? {
        Response::Value(Some(entry)) => std::io::stdout().lock().write_all(&entry.value)?,
        Response::Value(None) => bail!("key {key} has no value"),
        Response::Lost => bail!(
            "key {key} has no value, and its slot lost entries in a failure: it may have had one. \
             Write it again, or `gobelins kv forgive {key}` once what mattered is restored"
        ),
        Response::Stored { version } => eprintln!("key {key} stored at version {version}"),
        Response::Forgiven => {
            eprintln!("key {key}'s slot reads the keys it lacks as absent (none is lost)")
        }
        Response::TooLarge { max } => bail!("the value is larger than {max} bytes; nothing stored"),
        Response::Reserved => bail!("keys from {RESERVED} up are kvdir's own"),
        other => bail!("unexpected answer from key {key}'s manager: {other:?}"),
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut labels = Labels::new();
    for text in &args.labels {
        let (key, value) = parse_label(text)?;
        if value.contains(',') {
            bail!("--label {text}: one level a --label, as --label zone=a --label rack=r1");
        }
        if let Some(first) = labels.insert(key.clone(), value) {
            bail!("--label {key} given twice ({key}={first} first): give each level once");
        }
    }
    let start = match (args.bootstrap, args.join) {
        (true, _) => Start::Bootstrap,
        (false, Some(seed)) => Start::Join(seed),
        (false, None) => Start::Resume,
    };
    let mut config = if args.loopback_timers {
        SupervisorConfig::loopback()
    } else {
        SupervisorConfig::default()
    };
    if args.ping_interval_ms == Some(0) || args.failure_timeout_ms == Some(0) {
        bail!("--ping-interval-ms and --failure-timeout-ms take a number of milliseconds above 0");
    }
    if let Some(ms) = args.ping_interval_ms {
        config.ping_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = args.failure_timeout_ms {
        config.failure_timeout = Duration::from_millis(ms);
    }
    if let Some(ms) = args.rejoin_hold_ms {
        config.rejoin_hold = Duration::from_millis(ms);
    }
    if args.node_id == Some(0) {
        // Accepted, node 0 joined and could not be evicted: `evict` refuses it.
        bail!("--node-id 0 is not a node id: ids start at 1");
    }
    let bad = |l: &String| l.is_empty() || l.contains('=') || l.contains(char::is_whitespace);
    if let Some(bad) = args.levels.iter().find(|l| bad(l)) {
        bail!(
            "--levels takes label keys separated by commas, such as zone,rack; `{bad}` is not one"
        );
    }
    // Checked before anything is written: found by the bootstrap's own join, they left a
    // half-bootstrapped directory behind.
    if args.bootstrap {
        let shape = TreeConfig { label_levels: args.levels.clone(), ..TreeConfig::default() };
        let checked = shape.validate().and_then(|()| shape.check_labels(&labels));
        checked.map_err(|e| {
            anyhow::anyhow!(
                "{e}. Nothing was written: mend --levels or --label (a node's labels give a \
                 value to the cluster's levels from the top, such as --levels zone,rack \
                 --label zone=a --label rack=r1)"
            )
        })?;
    }
    if let Start::Join(seed) = &start {
        if *seed == args.listen || Some(seed) == args.advertise.as_ref() {
            bail!(
                "--join {seed} is this agent's own address: give the address of a member of \
                 the cluster to join (to start a new cluster, use --bootstrap)"
            );
        }
    }
    config.label_levels = args.levels;
    if config.failure_timeout < config.ping_interval * 2 {
        bail!(
            "--failure-timeout-ms ({} ms) must be at least twice the ping interval ({} ms), or every \
             node would be suspected between two pings",
            config.failure_timeout.as_millis(),
            config.ping_interval.as_millis()
        );
    }
    let options = AgentOptions {
        data_dir: args.dir.data_dir,
        listen: args.listen,
        advertise: args.advertise,
        start,
        secret_file: args.secret_file,
        labels,
        node_id: args.node_id,
        config,
        durable: true,
        host: HostConfig::default(),
    };
    let builtins = gobelins::builtin::Builtins::new();
    let consoles = builtins.consoles();
    runtime()?.block_on(agent::run(options, move || builtins.registry(), consoles))?;
    Ok(())
}

fn ask(dir: &DirArgs, request: ControlRequest) -> anyhow::Result<Value> {
    let socket = dir.data_dir.join("control.sock");
    let answer = runtime()?.block_on(control::request(&socket, &request, |progress| {
        eprintln!("  {progress}");
    }))?;
    Ok(answer)
}

pub(crate) fn status(args: StatusArgs) -> anyhow::Result<()> {
    let status = ask(&args.dir, ControlRequest::Status { local: args.local })?;
    if args.json {
        writeln!(std::io::stdout().lock(), "{status}")?;
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    if args.local {
        // Said first: the text is laid out as the cluster's, and a view taken for it misleads.
        writeln!(
            out,
            "node {}'s own view (--local), not asked of the leader: it may be stale",
            status["node"]
        )?;
    }
    write_status(&mut out, &status)
}

fn write_status(out: &mut impl std::io::Write, status: &Value) -> anyhow::Result<()> {
    let show = |v: &Value| if v.is_null() { "none".to_string() } else { v.to_string() };
    let change = match status.get("in_progress") {
        Some(p) if !p.is_null() => {
            let ids = |v: &Value| -> Vec<u64> {
                v.as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default()
            };
            let (done, participants) = (ids(&p["done"]), ids(&p["participants"]));
            // The laggards by name: at 3 a.m. the one node that holds a change up is the news.
            let waiting: Vec<String> = participants
                .iter()
                .filter(|n| !done.contains(n))
                .map(|n| format!("node {n}"))
                .collect();
            let waiting = if waiting.is_empty() {
                String::new()
            } else {
                format!("; waiting for {}", waiting.join(", "))
            };
            format!(
                "changing: {} ({} of {} participants done{waiting})",
                p["change"].as_str().unwrap_or("?"),
                done.len(),
                participants.len()
            )
        }
        // The agent's own view while it enters, or with no leader answering, or a leader's
        // that hears from no majority: the cluster may be changing without it.
        _ if status["entering"].is_string()
            || status["own_view"] == true
            || status["quorum_lost_ms"].is_u64() =>
        {
            "not known to be stable".to_string()
        }
        _ if status["nodes"].as_array().into_iter().flatten().any(|n| n["suspected"] == true) => {
            "not stable: a node is suspected".to_string()
        }
        _ if status["stable"] == false => "not stable: changes are queued".to_string(),
        _ => "stable".to_string(),
    };
    if let Some(what) = status["entering"].as_str() {
        writeln!(out, "this agent is entering the cluster: {what}")?;
        writeln!(out, "below, its own view until then (it may be stale):")?;
    } else if status["own_view"] == true {
        let leader = match status["leader"].as_u64() {
            Some(leader) => format!("its leader, node {leader}, did not answer"),
            None => "it knows of no leader".to_string(),
        };
        writeln!(out, "WARNING: node {} cannot reach the cluster's leader: {leader}. Below is its own view, as it last knew the cluster: it may be stale (a node cut off from the others sees them as they were, itself included). An election may be under way; if this lasts, check this node's network and log, or ask another node (`--data-dir` of its agent).", status["node"])?;
        if let Some(ms) = status["leaderless_ms"].as_u64() {
            writeln!(
                out,
                "WARNING: this node votes, and has known no leader for {:.1} s: its elections win \
                 no majority. A majority of the voters (listed below) is down or cut off from it, \
                 and nothing commits through it until enough of them are back; its log names the \
                 silent ones.",
                ms as f64 / 1e3
            )?;
        }
    }
    writeln!(out, "epoch {}, {change}, leader {}", status["epoch"], show(&status["leader"]))?;
    if let Some(ms) = status["quorum_lost_ms"].as_u64() {
        writeln!(
            out,
            "WARNING: this leader has heard from no majority of the voters for {:.1} s: it can \
             commit nothing (no join, leave or eviction, no failure recovered), and the states \
             below are the last it committed. Its log names the silent voters; if they are up \
             and reach each other, they may have another leader: ask one of them.",
            ms as f64 / 1e3
        )?;
    }
    for node in status["nodes"].as_array().into_iter().flatten() {
        let Some(failures) = node["failures"].as_u64() else { continue };
        let Some(ms) = node["held_ms"].as_u64() else {
            let lives = match failures {
                1 => "last life failed soon after it began".to_string(),
                n => format!("last {n} lives each failed soon after they began"),
            };
            writeln!(
                out,
                "note: node {}'s {lives}: from the second such life in a row, a node is held \
                 out before it may rejoin, longer each time (while two members at least are in)",
                node["id"]
            )?;
            continue;
        };
        writeln!(
            out,
            "WARNING: node {} keeps failing ({failures} short lives in a row): it is held out \
             for {:.1} s more before it may rejoin, and rejoins by itself then. Look for what \
             starves it (CPU, memory, disk, network: its log), or for restarts in a loop; once \
             that is mended, `gobelins unhold {}` lifts the hold",
            node["id"],
            ms as f64 / 1e3,
            node["id"]
        )?;
    }
    for node in status["nodes"].as_array().into_iter().flatten() {
        let Some(ms) = node["silent_ms"].as_u64() else { continue };
        let id = &node["id"];
        let s = ms as f64 / 1e3;
        if node["suspected"] == true {
            writeln!(out, "WARNING: node {id} has not answered the leader for {s:.1} s: other nodes are trying it, and it is declared failed if they cannot reach it either")?;
        } else {
            writeln!(out, "note: node {id} has not answered the leader for {s:.1} s")?;
        }
    }
    writeln!(
        out,
        "{:>8}  {:<22} {:<8} {:>5} {:<6} labels",
        "node", "address", "status", "inc", "voter"
    )?;
    for node in status["nodes"].as_array().into_iter().flatten() {
        let labels: Vec<String> = node["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        writeln!(
            out,
            "{:>8}  {:<22} {:<8} {:>5} {:<6} {}",
            node["id"].to_string(),
            node["addr"].as_str().unwrap_or(""),
            node["status"].as_str().unwrap_or(""),
            node["incarnation"].to_string(),
            if node["voter"].as_bool() == Some(true) { "yes" } else { "" },
            labels.join(" ")
        )?;
    }
    let levels: Vec<&str> =
        status["levels"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let levels = if levels.is_empty() { "none".to_string() } else { levels.join(", ") };
    writeln!(
        out,
        "\ncell tree (label levels: {levels}):\n{}",
        status["tree"].as_str().unwrap_or("")
    )?;
    Ok(())
}

pub(crate) fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let answer = ask(&args.dir, ControlRequest::Stats)?;
    if args.json {
        writeln!(std::io::stdout().lock(), "{answer}")?;
        return Ok(());
    }
    write_stats(&mut std::io::stdout().lock(), &answer)
}

/// This node's requests, what it served and moved, and the changes it took part in.
fn write_stats(out: &mut impl std::io::Write, answer: &Value) -> anyhow::Result<()> {
    let s = &answer["stats"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    writeln!(
        out,
        "requests from here: {} ok ({} delayed), {} failed",
        n(&s["requests_ok"]),
        n(&s["requests_delayed"]),
        n(&s["requests_failed"])
    )?;
    writeln!(
        out,
        "as manager: {} served, {} held while their keys moved, {} answers kept for retries, \
         {} passed on to the key's new manager",
        n(&s["served"]),
        n(&s["held"]),
        n(&s["answers_kept"]),
        n(&s["forwarded"])
    )?;
    writeln!(
        out,
        "entries: {} sent ({:.1} MB), {} received, {} rebuilt after failures",
        n(&s["entries_sent"]),
        n(&s["bytes_sent"]) as f64 / 1e6,
        n(&s["entries_received"]),
        n(&s["entries_rebuilt"])
    )?;
    // Said only when something was: a line of zeros would be read past at the moment it matters.
    let lost = s["reported_lost"].as_object().cloned().unwrap_or_default();
    for (service, count) in lost.iter().filter(|(_, c)| n(c) > 0) {
        writeln!(
            out,
            "REPORTED LOST by {service}: {} ({})",
            n(count),
            if service == "dsm" {
                "`gobelins dsm lost` lists the pages still lost, cluster-wide"
            } else {
                "its log says which and what to do"
            }
        )?;
    }
    let changes = answer["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nchanges this node took part in (ms; newest last):")?;
    writeln!(
        out,
        "{:>6}  {:<24} {:>7} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8}",
        "epoch",
        "change",
        "before",
        "sending",
        "receiving",
        "after",
        "held",
        "stable",
        "sent",
        "received",
        "rebuilt"
    )?;
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |m| format!("{m:.1}"));
    for c in changes.iter().rev().take(20).rev() {
        writeln!(
            out,
            "{:>6}  {:<24} {:>7} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8}",
            n(&c["epoch"]),
            c["change"].as_str().unwrap_or("?"),
            ms(&c["before_ms"]),
            ms(&c["sending_ms"]),
            ms(&c["receiving_ms"]),
            ms(&c["after_ms"]),
            ms(&c["held_ms"]),
            ms(&c["stable_ms"]),
            n(&c["entries_sent"]),
            n(&c["entries_received"]),
            n(&c["entries_rebuilt"])
        )?;
    }
    Ok(())
}

pub(crate) fn join(args: JoinArgs) -> anyhow::Result<()> {
    agent::host_and_port("the seed", &args.seed)?;
    let status = ask(&args.dir, ControlRequest::Join { seed: args.seed })?;
    eprintln!("joined; this node is active (the cluster is at epoch {})", status["epoch"]);
    Ok(())
}

pub(crate) fn leave(args: DirArgs) -> anyhow::Result<()> {
    let status = ask(&args, ControlRequest::Leave)?;
    eprintln!("left (the cluster is at epoch {}); this agent stops", status["epoch"]);
    Ok(())
}

pub(crate) fn evict(args: EvictArgs) -> anyhow::Result<()> {
    if args.node == 0 {
        bail!("node ids start at 1");
    }
    let status = ask(&args.dir, ControlRequest::Evict { node: args.node })?;
    eprintln!("node {} is out of the cluster (now at epoch {})", args.node, status["epoch"]);
    Ok(())
}

pub(crate) fn unhold(args: UnholdArgs) -> anyhow::Result<()> {
    if args.node == 0 {
        bail!("node ids start at 1");
    }
    let answer = ask(&args.dir, ControlRequest::Unhold { node: args.node })?;
    eprintln!("{}", unheld_text(args.node, &answer)?);
    Ok(())
}

/// What `gobelins unhold` says of the agent's answer; an error when a member did not answer.
fn unheld_text(node: u64, answer: &Value) -> anyhow::Result<String> {
    let ids = |key: &str| -> Vec<String> {
        answer[key].as_array().into_iter().flatten().map(ToString::to_string).collect()
    };
    let (answered, silent) = (ids("answered"), ids("silent"));
    if !silent.is_empty() {
        bail!(
            "node {node}'s hold is lifted here and at node(s) [{}], but node(s) [{}] did not \
             answer: should one of them lead next, it may still hold node {node} out. Ask again \
             once they answer",
            answered.join(", "),
            silent.join(", ")
        );
    }
    if answer["held"] != true && answer["counted"] == true {
        return Ok(format!(
            "node {node} was not held out; its short lives counted so far are forgotten, so its \
             next failure is a first one"
        ));
    }
    if answer["held"] != true {
        return Ok(format!("no member held node {node} or counted failures of it: nothing to do"));
    }
    Ok(format!(
        "node {node}'s hold is lifted at every member: it rejoins at its next try, within \
         seconds (`gobelins status` shows it back)"
    ))
}

pub(crate) fn dsm(args: DsmArgs) -> anyhow::Result<()> {
    use gobelins::builtin::{DsmCommand, DSM_CONSOLE_MAX};
    use std::io::Read as _;
    let (dir, command) = match args.op {
        DsmOp::Read { dir, segment, offset, len } => {
            (dir, DsmCommand::Read { segment, offset, len })
        }
        DsmOp::Write { dir, segment, offset, data } => {
            let data = if data == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .take(DSM_CONSOLE_MAX + 1)
                    .read_to_end(&mut bytes)
                    .context("reading standard input")?;
                bytes
            } else {
                data.into_bytes()
            };
            if data.len() as u64 > DSM_CONSOLE_MAX {
                bail!("more than {DSM_CONSOLE_MAX} bytes to write; split the write");
            }
            (dir, DsmCommand::Write { segment, offset, data })
        }
        DsmOp::Free { dir, segment, len } => (dir, DsmCommand::Free { segment, len }),
        DsmOp::Discard { dir, segment, page } => (dir, DsmCommand::Discard { segment, page }),
        DsmOp::Lost { dir, json } => return dsm_lost(&dir, json),
    };
    let freed = match command {
        DsmCommand::Free { segment, .. } => Some(segment),
        _ => None,
    };
    let reading = matches!(command, DsmCommand::Read { .. });
    let body = gobelins::adaptation::codec::encode(&command)?;
    let answer = ask(&dir, ControlRequest::Local { service: gobelins::dsm::DSM.0, body })?;
    if reading {
        let bytes = control::answer_body(&answer)?;
        std::io::stdout().lock().write_all(&bytes)?;
    }
    if let Some(segment) = freed {
        eprintln!("segment {segment} freed on every node");
    }
    if let DsmCommand::Discard { segment, page } = command {
        if control::answer_body(&answer)? == [1] {
            eprintln!("page {page} of segment {segment} starts afresh from zeros");
        } else {
            eprintln!(
                "page {page} of segment {segment} is not lost (or was started afresh already): \
                 nothing discarded"
            );
        }
    }
    Ok(())
}

/// `gobelins dsm lost`: asks every node through the local agent, and says what it found.
fn dsm_lost(dir: &DirArgs, json: bool) -> anyhow::Result<()> {
    use gobelins::adaptation::codec;
    use gobelins::builtin::DsmCommand;
    let body = codec::encode(&DsmCommand::Losses)?;
    let answer = ask(dir, ControlRequest::Local { service: gobelins::dsm::DSM.0, body })?;
    let losses: gobelins::dsm::Losses = codec::decode(&control::answer_body(&answer)?)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", losses_json(&losses))?;
    } else {
        write_losses(&mut out, &losses)?;
    }
    if !losses.settled {
        bail!("not every node answered, or the cluster changed meanwhile: the list may be incomplete; ask again");
    }
    Ok(())
}

/// Lines of pages `gobelins dsm lost` prints before it says how many more `--json` lists.
const LOST_LINES: usize = 200;

fn write_losses(
    out: &mut impl std::io::Write,
    losses: &gobelins::dsm::Losses,
) -> anyhow::Result<()> {
    let pages = losses.pages();
    let lost = losses.lost();
    if lost == 0 {
        writeln!(out, "no page is reported lost")?;
    } else {
        writeln!(
            out,
            "{lost} pages reported lost (each answers `lost` until discarded or freed):"
        )?;
        for (page, manager) in pages.iter().take(LOST_LINES) {
            writeln!(
                out,
                "  segment {} page {} (manager: node {})",
                page.segment, page.page, manager.0
            )?;
        }
        let unlisted = lost - pages.len().min(LOST_LINES) as u64;
        if unlisted > 0 {
            writeln!(out, "  ... and {unlisted} more (`--json` lists up to 65,536 a node)")?;
        }
    }
    let tainted = losses.tainted();
    if tainted > 0 {
        let by_node: Vec<String> = losses
            .nodes
            .iter()
            .filter(|(_, held)| !held.tainted.is_empty())
            .map(|(node, held)| format!("node {}: {}", node.0, held.tainted.len()))
            .collect();
        writeln!(
            out,
            "{tainted} of {} slots tainted ({}): their manager failed, and a page of theirs that \
             no node reported then reads as lost when first asked for, unless its segment was \
             freed since (which pages, nobody can tell until they are asked for)",
            gobelins::dsm::DSM_SLOTS,
            by_node.join(", ")
        )?;
    }
    if lost > 0 || tainted > 0 {
        writeln!(
            out,
            "what to do: restore what mattered, then `gobelins dsm discard SEGMENT PAGE` for each \
             page, or `gobelins dsm free SEGMENT LEN` for a segment no program uses"
        )?;
    }
    let unlooked = losses.unlooked();
    if unlooked > 0 {
        writeln!(out, "{unlooked} entries were held by requests and not looked at: ask again")?;
    }
    for (node, why) in &losses.unanswered {
        writeln!(out, "node {} did not answer: {why}", node.0)?;
    }
    writeln!(out, "epoch {}: {} nodes answered", losses.epoch, losses.nodes.len())?;
    Ok(())
}

fn losses_json(losses: &gobelins::dsm::Losses) -> Value {
    let pages: Vec<Value> = losses
        .pages()
        .into_iter()
        .map(|(p, m)| serde_json::json!({ "segment": p.segment, "page": p.page, "manager": m.0 }))
        .collect();
    let nodes: Vec<Value> = losses
        .nodes
        .iter()
        .map(|(node, held)| {
            serde_json::json!({ "node": node.0, "lost_pages": held.pages.len() as u64 + held.unlisted,
                "tainted_slots": held.tainted.len(), "unlooked": held.unlooked })
        })
        .collect();
    let unanswered: Vec<Value> = losses
        .unanswered
        .iter()
        .map(|(node, why)| serde_json::json!({ "node": node.0, "why": why }))
        .collect();
    serde_json::json!({ "epoch": losses.epoch, "settled": losses.settled, "lost": losses.lost(),
        "pages": pages, "tainted": losses.tainted(), "unlooked": losses.unlooked(),
        "nodes": nodes, "unanswered": unanswered })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats_text(reported_lost: Value) -> String {
        let answer = json!({ "stats": { "requests_ok": 5, "reported_lost": reported_lost } });
        let mut out = Vec::new();
        write_stats(&mut out, &answer).expect("written");
        String::from_utf8(out).expect("text")
    }

    fn status_text(nodes: Value, stable: bool) -> String {
        let status = json!({ "node": 1, "epoch": 4, "stable": stable, "leader": 1,
            "nodes": nodes, "in_progress": null, "tree": "", "levels": [] });
        let mut out = Vec::new();
        write_status(&mut out, &status).expect("written");
        String::from_utf8(out).expect("text")
    }

    #[test]
    fn status_names_the_participants_a_change_waits_for() {
        let status = json!({ "node": 1, "epoch": 7, "stable": false, "leader": 1, "nodes": [],
            "in_progress": { "change": "fail n3", "done": [1, 2], "participants": [1, 2, 4] },
            "tree": "", "levels": [] });
        let mut out = Vec::new();
        write_status(&mut out, &status).expect("written");
        let shown = String::from_utf8(out).expect("text");
        assert!(
            shown.contains("changing: fail n3 (2 of 3 participants done; waiting for node 4)"),
            "{shown}"
        );
    }

    #[test]
    fn status_says_which_nodes_the_leader_has_not_heard_from() {
        let node = |id: u64, silent: Value, suspected: bool| {
            json!({ "id": id, "addr": "127.0.0.1:7400", "status": "active", "incarnation": 1,
                "labels": {}, "voter": true, "silent_ms": silent, "suspected": suspected })
        };
        let quiet = status_text(json!([node(1, json!(null), false)]), true);
        assert!(quiet.contains("epoch 4, stable"), "{quiet}");
        assert!(!quiet.contains("has not answered"), "{quiet}");
        let nodes = json!([
            node(1, json!(null), false),
            node(2, json!(600), false),
            node(3, json!(1250), true)
        ]);
        let shown = status_text(nodes, false);
        assert!(shown.contains("not stable: a node is suspected"), "{shown}");
        assert!(shown.contains("note: node 2 has not answered the leader for 0.6 s"), "{shown}");
        assert!(shown.contains("WARNING: node 3 has not answered the leader for 1.2 s"), "{shown}");
        let queued = status_text(json!([node(1, json!(null), false)]), false);
        assert!(queued.contains("not stable: changes are queued"), "{queued}");
    }

    #[test]
    fn unhold_says_whether_a_hold_was_lifted_and_fails_when_a_member_did_not_answer() {
        let lifted = unheld_text(5, &json!({ "held": true, "answered": [1, 2], "silent": [] }));
        assert!(lifted.expect("lifted").contains("node 5's hold is lifted at every member"));
        let none = unheld_text(5, &json!({ "held": false, "answered": [1, 2], "silent": [] }));
        assert!(none.expect("nothing").contains("no member held node 5"));
        let counted = json!({ "held": false, "counted": true, "answered": [1], "silent": [] });
        let counted = unheld_text(5, &counted).expect("forgotten");
        assert!(counted.contains("node 5 was not held out; its short lives"), "{counted}");
        let part = unheld_text(5, &json!({ "held": true, "answered": [1], "silent": [3] }));
        let said = part.expect_err("a member did not answer").to_string();
        assert!(said.contains("at node(s) [1], but node(s) [3] did not answer"), "{said}");
    }

    #[test]
    fn status_warns_of_a_node_held_out_for_failing_again_and_again() {
        let held = json!({ "id": 5, "addr": "127.0.0.1:7500", "status": "failed",
            "incarnation": 4, "labels": {}, "voter": false, "silent_ms": null,
            "suspected": false, "failures": 4, "held_ms": 17300 });
        let shown = status_text(json!([held]), true);
        assert!(shown.contains("epoch 4, stable"), "{shown}");
        assert!(
            shown.contains(
                "WARNING: node 5 keeps failing (4 short lives in a row): it is held out for \
                 17.3 s more before it may rejoin"
            ),
            "{shown}"
        );
        let mut between = held.clone();
        between["held_ms"] = json!(null);
        between["status"] = json!("active");
        let shown = status_text(json!([between.clone()]), true);
        assert!(!shown.contains("WARNING"), "{shown}");
        assert!(shown.contains("note: node 5's last 4 lives each failed soon after"), "{shown}");
        between["failures"] = json!(1);
        let once = status_text(json!([between.clone()]), true);
        assert!(once.contains("note: node 5's last life failed soon after it began"), "{once}");
        between["failures"] = json!(null);
        assert!(!status_text(json!([between]), true).contains("failed soon after"));
    }

    #[test]
    fn stats_say_what_a_service_reported_lost_and_nothing_when_none_was() {
        let lost = stats_text(json!({ "dsm": 0, "kvdir": 3 }));
        assert!(lost.contains("REPORTED LOST by kvdir: 3"), "{lost}");
        assert!(!lost.contains("by dsm"), "{lost}");
        let none = stats_text(json!({ "dsm": 0, "kvdir": 0 }));
        assert!(!none.contains("REPORTED LOST"), "{none}");
        assert!(none.contains("requests from here: 5 ok"), "{none}");
        let dsm = stats_text(json!({ "dsm": 2 }));
        assert!(dsm.contains("REPORTED LOST by dsm: 2 (`gobelins dsm lost` lists"), "{dsm}");
    }

    fn losses_text(losses: &gobelins::dsm::Losses) -> String {
        let mut out = Vec::new();
        write_losses(&mut out, losses).expect("written");
        String::from_utf8(out).expect("text")
    }

    #[test]
    fn dsm_lost_names_each_page_and_its_manager_the_tainted_slots_and_who_did_not_answer() {
        use gobelins::dsm::{Losses, NodeLosses, PageId};
        use gobelins::locator::NodeId;
        let clean = Losses {
            epoch: 7,
            settled: true,
            nodes: vec![(NodeId(1), NodeLosses::default()), (NodeId(2), NodeLosses::default())],
            unanswered: vec![],
        };
        let shown = losses_text(&clean);
        assert_eq!(shown, "no page is reported lost\nepoch 7: 2 nodes answered\n");

        let held = |pages: Vec<PageId>, tainted: Vec<u32>| NodeLosses {
            pages,
            tainted,
            unlisted: 0,
            unlooked: 0,
        };
        let lost = Losses {
            epoch: 9,
            settled: false,
            nodes: vec![
                (NodeId(1), held(vec![PageId { segment: 7, page: 3 }], vec![])),
                (NodeId(2), held(vec![PageId { segment: 7, page: 0 }], vec![5, 6])),
            ],
            unanswered: vec![(NodeId(4), "node 4 unreachable: timed out".into())],
        };
        let shown = losses_text(&lost);
        let page0 = shown.find("segment 7 page 0 (manager: node 2)").expect("page 0 listed");
        let page3 = shown.find("segment 7 page 3 (manager: node 1)").expect("page 3 listed");
        assert!(page0 < page3, "in page order: {shown}");
        assert!(shown.starts_with("2 pages reported lost"), "{shown}");
        assert!(shown.contains("2 of 4096 slots tainted (node 2: 2)"), "{shown}");
        assert!(shown.contains("gobelins dsm discard SEGMENT PAGE"), "{shown}");
        assert!(shown.contains("node 4 did not answer: node 4 unreachable"), "{shown}");
        let json = losses_json(&lost);
        assert_eq!(json["pages"][0], json!({ "segment": 7, "page": 0, "manager": 2 }));
        assert_eq!(json["tainted"], 2);
        assert_eq!(json["lost"], 2);
        assert_eq!(
            json["nodes"][1],
            json!({ "node": 2, "lost_pages": 1, "tainted_slots": 2, "unlooked": 0 })
        );
        assert_eq!(json["settled"], false);
        assert_eq!(json["unanswered"][0]["node"], 4);
    }
}
