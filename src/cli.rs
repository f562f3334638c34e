//! The node commands: `agent`, and the commands that talk to it over its control socket.
//!
//! Its parts: `report` (`status`, `stats`), `kvdir` (`kv`), `pages` (`dsm`), `plan` (`plan`).

mod kvdir;
mod pages;
mod plan;
mod report;

pub(crate) use kvdir::{kv, KvArgs, NoValue};
pub(crate) use pages::{dsm, DsmArgs};
pub(crate) use plan::{one_line, plan, PlanArgs};
pub(crate) use report::{stats, status, StatsArgs, StatusArgs};

use anyhow::{bail, Context};
use clap::Args;
use gobelins_adaptation::HostConfig;
use gobelins_locator::{parse_label, Labels, TreeConfig};
use gobelins_supervisor::agent::{self, AgentOptions, Start};
use gobelins_supervisor::control::{self, ControlRequest};
use gobelins_supervisor::SupervisorConfig;
use serde_json::Value;
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
    #[command(flatten)]
    now: NowArg,
}

/// Options of `gobelins leave`.
#[derive(Args, Debug)]
pub(crate) struct LeaveArgs {
    #[command(flatten)]
    dir: DirArgs,
    #[command(flatten)]
    now: NowArg,
}

/// Whether a removal waits for the other members first.
#[derive(Args, Debug)]
pub(crate) struct NowArg {
    /// Ask for the removal at once, without first waiting (up to 6 failure timeouts) for a
    /// member that does not answer to answer or be declared failed. Should that member be
    /// dead, the pages it managed in the DSM that no node holds then read as lost, never-written
    /// ones too, until `gobelins dsm forgive`: its recovery comes after the removal
    #[arg(long)]
    now: bool,
}

/// Options of `gobelins unhold`.
#[derive(Args, Debug)]
pub(crate) struct UnholdArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The node held out.
    node: u64,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The labels of `--label` options, each level once.
fn labels(texts: &[String]) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for text in texts {
        let (key, value) = parse_label(text)?;
        if value.contains(',') {
            bail!("--label {text}: one level a --label, as --label zone=a --label rack=r1");
        }
        if let Some(first) = labels.insert(key.clone(), value) {
            bail!("--label {key} given twice ({key}={first} first): give each level once");
        }
    }
    Ok(labels)
}

pub(crate) fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let labels = labels(&args.labels)?;
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
        let checked = shape
            .validate()
            .and_then(|()| shape.check_label_texts(&labels))
            .and_then(|()| shape.check_labels(&labels));
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

pub(crate) fn join(args: JoinArgs) -> anyhow::Result<()> {
    agent::host_and_port("the seed", &args.seed)?;
    let status = ask(&args.dir, ControlRequest::Join { seed: args.seed })?;
    eprintln!("joined; this node is active (the cluster is at epoch {})", status["epoch"]);
    Ok(())
}

pub(crate) fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let status = ask(&args.dir, ControlRequest::Leave { now: args.now.now })?;
    eprintln!("left (the cluster is at epoch {}); this agent stops", status["epoch"]);
    Ok(())
}

pub(crate) fn evict(args: EvictArgs) -> anyhow::Result<()> {
    if args.node == 0 {
        bail!("node ids start at 1");
    }
    let status = ask(&args.dir, ControlRequest::Evict { node: args.node, now: args.now.now })?;
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
    // Its operator asked it out: a hold lifted or not, it comes back only when asked back.
    if answer["kept_out"] == true {
        return Ok(format!(
            "node {node} is kept out of the cluster (evicted, or it failed in its leave or \
             eviction): it rejoins only when started with --join ADDR. Its failures counted so \
             far are forgotten"
        ));
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

#[cfg(test)]
mod tests {
    use super::pages::{losses_json, write_losses};
    use super::report::{write_stats, write_status, LEFT_SHOWN};
    use super::*;
    use serde_json::json;

    /// `dsm free SEGMENT 0` wiped the whole segment (the length is not used): a 0 is taken
    /// for the slip it most likely is, before any agent is asked.
    #[test]
    fn a_free_of_length_zero_is_refused_before_anything_is_asked() {
        #[derive(clap::Parser)]
        struct Line {
            #[command(flatten)]
            args: DsmArgs,
        }
        let line = ["dsm", "free", "--data-dir", "/nonexistent/gobelins", "5", "0"];
        let line = <Line as clap::Parser>::try_parse_from(line).expect("parsed");
        let said = dsm(line.args).expect_err("refused").to_string();
        assert!(said.contains("a length of 0") && said.contains("nothing freed"), "{said}");
    }

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
        write_status(&mut out, &status, false).expect("written");
        String::from_utf8(out).expect("text")
    }

    #[test]
    fn a_node_that_does_not_vote_and_cannot_reach_a_leader_names_the_voters() {
        let shown = |voters: Value| {
            let status = json!({ "node": 3, "epoch": 4, "stable": false, "leader": 1,
                "own_view": true, "voters": voters, "nodes": [], "in_progress": null,
                "tree": "", "levels": [] });
            let mut out = Vec::new();
            write_status(&mut out, &status, false).expect("written");
            String::from_utf8(out).expect("text")
        };
        let one = shown(json!([1]));
        assert!(one.contains("the cluster's only voter is node 1: until it is back"), "{one}");
        let three = shown(json!([1, 2, 4]));
        assert!(three.contains("voters are nodes 1, 2, 4: until a majority"), "{three}");
        // A voter says its own warning (its elections win no majority), not this one.
        let voting = shown(json!([1, 3]));
        assert!(!voting.contains("does not vote"), "{voting}");
    }

    #[test]
    fn status_names_the_participants_a_change_waits_for() {
        let status = json!({ "node": 1, "epoch": 7, "stable": false, "leader": 1, "nodes": [],
            "in_progress": { "change": "fail n3", "done": [1, 2], "participants": [1, 2, 4] },
            "tree": "", "levels": [] });
        let mut out = Vec::new();
        write_status(&mut out, &status, false).expect("written");
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
        // Kept out, it rejoins at no try of its own: the operator asked it out.
        let kept = json!({ "held": true, "kept_out": true, "answered": [1, 2], "silent": [] });
        let kept = unheld_text(5, &kept).expect("lifted");
        assert!(kept.contains("node 5 is kept out") && kept.contains("--join"), "{kept}");
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
        // Kept out, it is not coming back by itself: no warning that it will, one note.
        let mut kept = held.clone();
        kept["kept_out"] = json!(true);
        let shown = status_text(json!([kept]), true);
        assert!(!shown.contains("WARNING") && !shown.contains("rejoins by itself"), "{shown}");
        assert!(shown.contains("note: node 5 is kept out"), "{shown}");
        let mut between = held.clone();
        between["held_ms"] = json!(null);
        between["status"] = json!("active");
        let shown = status_text(json!([between.clone()]), true);
        assert!(!shown.contains("WARNING"), "{shown}");
        assert!(
            shown.contains("note: node 5's last 4 lives each failed within 2 minutes"),
            "{shown}"
        );
        between["failures"] = json!(1);
        let once = status_text(json!([between.clone()]), true);
        assert!(
            once.contains("note: node 5's last life was declared failed within 2 minutes"),
            "{once}"
        );
        assert!(once.contains("should its next one end as soon"), "{once}");
        // A note that stays while the node is active says for how long.
        assert!(once.contains("forgotten once the node has stayed up, or away, for 10 minutes"));
        // Left since, and not held: its short lives before are no news.
        let mut left = between.clone();
        left["status"] = json!("left");
        assert!(!status_text(json!([left]), true).contains("within 2 minutes"));
        between["failures"] = json!(null);
        assert!(!status_text(json!([between]), true).contains("within 2 minutes"));
    }

    #[test]
    fn status_says_why_a_leaver_stays() {
        let node = |id: u64, status: &str, stays_for: Value| {
            json!({ "id": id, "addr": "127.0.0.1:7400", "status": status, "incarnation": 1,
                "labels": {}, "voter": false, "silent_ms": null, "suspected": false,
                "failures": null, "held_ms": null, "stays_for": stays_for })
        };
        let nodes = json!([node(2, "active", json!(null)), node(4, "leaving", json!([1, 3]))]);
        let shown = status_text(nodes, false);
        assert!(
            shown.contains(
                "note: node 4 stays, leaving, until the recovery of node 1, node 3 ends: it \
                 holds the only other copies"
            ),
            "{shown}"
        );
        assert!(!shown.contains("node 2 stays"), "{shown}");
    }

    /// Agents started afresh take new ids, and the cluster keeps every node it has known: a
    /// soak of 25 joins and leaves left `status` listing 25 rows of nodes long gone. Past a
    /// few, those that left or were evicted once failed are counted on one line; `--all`
    /// lists them, and those that failed on their own, or are held out, are listed whatever
    /// their number.
    #[test]
    fn status_counts_the_nodes_that_left_once_there_are_many() {
        let node = |id: u64, status: &str| {
            json!({ "id": id, "addr": format!("127.0.0.1:{}", 7000 + id), "status": status,
                "incarnation": 1, "labels": {}, "voter": false, "silent_ms": null,
                "suspected": false, "failures": null, "held_ms": null, "stays_for": null })
        };
        let text = |nodes: &[Value], all: bool| {
            let status = json!({ "node": 1, "epoch": 4, "stable": true, "leader": 1,
                "nodes": nodes, "in_progress": null, "tree": "", "levels": [] });
            let mut out = Vec::new();
            write_status(&mut out, &status, all).expect("written");
            String::from_utf8(out).expect("text")
        };
        let rows = |shown: &str| shown.lines().filter(|l| l.contains("127.0.0.1:")).count();
        let mut nodes = vec![node(1, "active"), node(2, "active"), node(3, "failed")];
        nodes.extend((100..119).map(|id| node(id, "left")));
        let mut evicted = node(119, "failed");
        evicted["kept_out"] = json!(true);
        nodes.push(evicted);
        let mut voting = node(120, "left");
        voting["voter"] = json!(true);
        voting["removed_by"] = json!("evict");
        nodes.push(voting);
        let shown = text(&nodes, false);
        assert_eq!(rows(&shown), 4, "{shown}");
        assert!(shown.contains("127.0.0.1:7120 "), "a voter that left is listed: {shown}");
        // One taken out by another node's evict says so; one that left by itself, "left".
        let row = |id| shown.lines().find(|l| l.contains(id)).unwrap_or_default().to_string();
        assert!(row("127.0.0.1:7120 ").contains(" evicted "), "{shown}");
        let all = text(&nodes, true);
        let row = |id| all.lines().find(|l| l.contains(id)).unwrap_or_default().to_string();
        assert!(row("127.0.0.1:7100 ").contains(" left "), "{all}");
        assert!(
            shown.contains("20 nodes that left or were evicted, not listed: 100, 101, 102,")
                && shown.contains("111 and 8 more (`status --all` lists them)"),
            "{shown}"
        );
        assert_eq!(rows(&text(&nodes, true)), 24);
        nodes.truncate(3 + LEFT_SHOWN);
        let few = text(&nodes, false);
        assert_eq!(rows(&few), 3 + LEFT_SHOWN, "{few}");
        assert!(!few.contains("not listed"), "{few}");
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
        assert!(shown.contains("tainted slots, `gobelins dsm forgive --all`"), "{shown}");
        assert!(shown.contains("node 4 did not answer: node 4 unreachable"), "{shown}");
        // Pages lost, no slot tainted: a forgive would lift nothing, and is not offered.
        let untainted = Losses {
            nodes: vec![(NodeId(1), held(vec![PageId { segment: 7, page: 3 }], vec![]))],
            ..lost.clone()
        };
        let shown = losses_text(&untainted);
        assert!(shown.contains("gobelins dsm discard SEGMENT PAGE"), "{shown}");
        assert!(!shown.contains("forgive --all"), "{shown}");
        // No page lost yet, slots tainted: not said as if all were well (a helper's run).
        let only_tainted =
            Losses { nodes: vec![(NodeId(2), held(vec![], vec![5]))], ..lost.clone() };
        let shown = losses_text(&only_tainted);
        assert!(
            shown.starts_with("no page is reported lost yet, but slots are tainted"),
            "{shown}"
        );
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
