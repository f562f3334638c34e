//! `gobelins status` and `gobelins stats`: what the agent says, written for an operator.

use super::{ask, DirArgs};
use clap::Args;
use gobelins_supervisor::control::ControlRequest;
use serde_json::Value;
use std::io::Write as _;

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
    /// List the nodes that left or were evicted in the table however many there are (past
    /// five, they are counted on one line).
    #[arg(long)]
    all: bool,
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
    write_status(&mut out, &status, args.all)
}

/// How many nodes that left (or were evicted once failed) `status` lists before it only
/// counts them: the cluster keeps
/// every node it has known, and agents started afresh take new ids, so a cluster that lives
/// through machines replaced for years would list them by the hundred.
pub(super) const LEFT_SHOWN: usize = 5;

pub(super) fn write_status(
    out: &mut impl std::io::Write,
    status: &Value,
    all: bool,
) -> anyhow::Result<()> {
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
        let voters: Vec<u64> =
            status["voters"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
        let votes = status["node"].as_u64().is_some_and(|me| voters.contains(&me));
        if !voters.is_empty() && !votes {
            // A node that does not vote waits on the voters alone: with one, on that node.
            let which = match voters.as_slice() {
                [only] => format!("the cluster's only voter is node {only}: until it is back"),
                many => format!(
                    "the cluster's voters are nodes {}: until a majority of them answers",
                    many.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                ),
            };
            writeln!(
                out,
                "WARNING: this node does not vote, and {which}, it sees nothing committed (no \
                 join, leave or eviction, no failure recovered) and its requests for the \
                 entries of failed nodes wait. If the voters are up and reach each other, they \
                 may have a leader this node cannot reach: ask one of them."
            )?;
        }
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
        // A node that left since, and is not held, comes back only when asked to: its short
        // lives before are no news.
        if node["status"] == "left" && node["held_ms"].is_null() {
            continue;
        }
        // Nor does one kept out, held or not: its note below says so.
        if node["kept_out"] == true {
            continue;
        }
        let Some(failures) = node["failures"].as_u64() else { continue };
        let Some(ms) = node["held_ms"].as_u64() else {
            let short = gobelins_supervisor::SHORT_LIFE.as_secs() / 60;
            // One such life is no flap: said as what happens should it go on, not as a fault.
            let lives = match failures {
                1 => format!(
                    "last life was declared failed within {short} minutes of its start; should \
                     its next one end as soon, it is held out for a while before it may rejoin \
                     (a node that keeps failing is, while two members at least are in)"
                ),
                n => format!(
                    "last {n} lives each failed within {short} minutes of their start: from the \
                     second such life in a row, a node is held out before it may rejoin, longer \
                     each time (while two members at least are in)"
                ),
            };
            writeln!(
                out,
                "note: node {}'s {lives}. Such lives are forgotten once the node has stayed up, \
                 or away, for {} minutes",
                node["id"],
                gobelins_supervisor::FLAP_MEMORY.as_secs() / 60
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
        let waits: Vec<String> = (node["stays_for"].as_array().into_iter().flatten())
            .map(|n| format!("node {n}"))
            .collect();
        if !waits.is_empty() {
            writeln!(
                out,
                "note: node {} stays, leaving, until the recovery of {} ends: it holds the \
                 only other copies of what they may not have passed on before they died, and \
                 that recovery rebuilds from them. It leaves by itself then",
                node["id"],
                waits.join(", ")
            )?;
        }
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
    let kept: Vec<String> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|node| node["kept_out"] == true)
        .map(|node| node["id"].to_string())
        .collect();
    if !kept.is_empty() {
        let (nodes, agents) = match kept.len() {
            1 => (
                format!("node {} is", kept[0]),
                "Its agent, started again, stops by itself; --join ADDR brings it back",
            ),
            _ => (
                format!("nodes {} are", kept.join(", ")),
                "Their agents, started again, stop by themselves; --join ADDR brings one back",
            ),
        };
        writeln!(out, "note: {nodes} kept out: failed with a leave or eviction under way, or evicted once failed. {agents}")?;
    }
    writeln!(
        out,
        "{:>8}  {:<22} {:<8} {:>5} {:<6} labels",
        "node", "address", "status", "inc", "voter"
    )?;
    let nodes: Vec<&Value> = status["nodes"].as_array().into_iter().flatten().collect();
    // Those that left, or were evicted once failed (kept out: they come back only when asked
    // with --join), held out of nothing: the news is elsewhere (`leave`, `evict`, the note on
    // kept-out nodes above). A node that failed on its own stays listed: it rejoins if it is
    // started again, and may be what an operator looks for.
    let gone = |node: &Value| {
        let kept_out = node["status"] == "failed" && node["kept_out"] == true;
        // Still a voter (raft has yet to take it out): its row says so.
        let quiet = node["held_ms"].is_null() && node["voter"] != true;
        (node["status"] == "left" || kept_out) && quiet
    };
    let left = nodes.iter().filter(|n| gone(n)).count();
    let unlisted: Vec<String> = if all || left <= LEFT_SHOWN {
        Vec::new()
    } else {
        nodes.iter().filter(|n| gone(n)).map(|n| n["id"].to_string()).collect()
    };
    for node in nodes.into_iter().filter(|n| unlisted.is_empty() || !gone(n)) {
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
            shown_status(node),
            node["incarnation"].to_string(),
            if node["voter"].as_bool() == Some(true) { "yes" } else { "" },
            labels.join(" ")
        )?;
    }
    if !unlisted.is_empty() {
        const NAMED: usize = 12;
        let more = unlisted.len().saturating_sub(NAMED);
        let mut ids = unlisted.into_iter().take(NAMED).collect::<Vec<_>>().join(", ");
        if more > 0 {
            ids = format!("{ids} and {more} more");
        }
        writeln!(
            out,
            "{:>8}  {left} nodes that left or were evicted, not listed: {ids} (`status --all` \
             lists them)",
            ""
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
pub(super) fn write_stats(out: &mut impl std::io::Write, answer: &Value) -> anyhow::Result<()> {
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

/// A node's status as the table shows it: one taken out by another node's `evict` is
/// "evicted", one that asked to leave "left" (the record says which from protocol 30 on).
fn shown_status(node: &Value) -> &str {
    match (node["status"].as_str().unwrap_or(""), node["removed_by"].as_str()) {
        ("left", Some("evict")) => "evicted",
        (status, _) => status,
    }
}
