//! Seeded simulation of five agents over turmoil's network: crashes and restarts from the data
//! directory, a partition, a graceful leave. After healing, every node must hold the same
//! configuration; epochs never go backwards; no acknowledged change is lost.
//!
//! Each seed runs in its own process, because openraft's election timeouts come from one
//! process-wide seeded generator: `GOBELINS_SIM_SEED=7 cargo test -p gobelins-supervisor --test
//! sim -- --exact one_seed --include-ignored` replays seed 7 alone. `GOBELINS_SIM_SEEDS` sets how many seeds the
//! sweep runs (default 50).

mod common;

use common::{host_name, options, start_of, Latest};
use gobelins_adaptation::{HostConfig, Registry};
use gobelins_supervisor::agent::{Agent, Start};
use gobelins_supervisor::state::{Command, NodeStatus};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

const NODES: u64 = 5;

/// `(node, status, incarnation)` for every node a view knows.
/// What the hosts tell the test.
#[derive(Default)]
struct Record {
    /// Highest epoch each node has applied, over all its lives.
    max_epoch: BTreeMap<u64, u64>,
    /// Latest (epoch, stable, statuses) each running node holds.
    latest: Latest,
    /// Joins the cluster acknowledged: (node, incarnation).
    joined: BTreeSet<(u64, u64)>,
    /// Nodes whose leave the cluster acknowledged.
    left: BTreeSet<u64>,
    /// States the nodes saw, all lives together: a fingerprint of the run, for the replay check.
    views: u64,
    violations: Vec<String>,
}

async fn run_node(
    root: PathBuf,
    id: u64,
    leave_at: Option<Duration>,
    record: Rc<RefCell<Record>>,
) -> turmoil::Result {
    let start = start_of(&root, id).await;
    let agent = loop {
        match Agent::start(
            common::TurmoilNet,
            &options(&root, id, start.clone(), HostConfig::default()),
            Registry::new,
        )
        .await
        {
            Ok(agent) => break agent,
            // The seed may be down; try again, as an operator's restart script would.
            Err(error) => {
                tracing::debug!(id, %error, "start failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let supervisor = Arc::clone(&agent.supervisor);
    if matches!(start, Start::Join(_) | Start::Bootstrap) {
        record.borrow_mut().joined.insert((id, supervisor.incarnation()));
    }
    if let Some(at) = leave_at {
        let supervisor = Arc::clone(&supervisor);
        let record = Rc::clone(&record);
        tokio::task::spawn_local(async move {
            // Measured from this life's start: a node restarted before then leaves later.
            tokio::time::sleep(at).await;
            loop {
                match supervisor.propose(Command::Leave { node: id }).await {
                    Ok(Ok(_)) => {
                        record.borrow_mut().left.insert(id);
                        return;
                    }
                    Ok(Err(refusal)) => {
                        tracing::debug!(id, %refusal, "leave refused; retrying");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let mut state = supervisor.watch_state();
    let mut last = 0;
    loop {
        let current = state.borrow_and_update().clone();
        {
            let mut r = record.borrow_mut();
            if current.epoch < last {
                r.violations
                    .push(format!("node {id}: epoch went from {last} back to {}", current.epoch));
            }
            last = current.epoch;
            r.views += 1;
            let max = r.max_epoch.entry(id).or_insert(0);
            *max = (*max).max(current.epoch);
            let statuses =
                current.nodes.iter().map(|(&n, rec)| (n, rec.status, rec.incarnation)).collect();
            r.latest.insert(id, (current.epoch, current.is_stable(), statuses));
        }
        if state.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// Runs one seed; returns what went wrong, if anything.
fn run_seed(seed: u64) -> Result<(), String> {
    gobelins_supervisor::runtime::seed(seed);
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let record = Rc::new(RefCell::new(Record::default()));
    let mut rng = SmallRng::seed_from_u64(seed);
    let leaver = rng.random_range(2..=NODES);
    let leave_at = Duration::from_millis(rng.random_range(8_000..14_000));

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(2))
        .min_message_latency(Duration::from_micros(100))
        .max_message_latency(Duration::from_millis(5))
        .build();
    for id in 1..=NODES {
        let root = root.path().to_path_buf();
        let record = Rc::clone(&record);
        let leave = (id == leaver).then_some(leave_at);
        sim.host(host_name(id), move || run_node(root.clone(), id, leave, Rc::clone(&record)));
    }
    let hold = Rc::clone(&record);
    sim.client("observer", async move {
        // Keeps the simulation running until the test body decides it is over.
        let _ = hold;
        tokio::time::sleep(Duration::from_secs(110)).await;
        Ok(())
    });

    // The script: a crash and restart, and a partition, at seeded times, on seeded nodes.
    let crashed = rng.random_range(1..=NODES);
    let crash_at = Duration::from_millis(rng.random_range(4_000..10_000));
    let restart_at = crash_at + Duration::from_millis(rng.random_range(1_000..5_000));
    let cut = rng.random_range(1..=NODES);
    let cut_at = Duration::from_millis(rng.random_range(5_000..15_000));
    let heal_at = cut_at + Duration::from_millis(rng.random_range(500..4_000));
    let settle_from = Duration::from_secs(25);
    let script = format!(
        "crashed n{crashed} at {crash_at:?}, restarted at {restart_at:?}; cut n{cut} off \
         {cut_at:?}..{heal_at:?}; n{leaver} leaves at {leave_at:?}"
    );
    let mut done = (false, false, false, false);

    loop {
        sim.step().map_err(|e| format!("simulation failed: {e}"))?;
        let now = sim.elapsed();
        if !done.0 && now >= crash_at {
            sim.crash(host_name(crashed));
            done.0 = true;
        }
        if !done.1 && now >= restart_at {
            sim.bounce(host_name(crashed));
            done.1 = true;
        }
        if !done.2 && now >= cut_at {
            for other in (1..=NODES).filter(|&o| o != cut) {
                sim.partition(host_name(cut), host_name(other));
            }
            done.2 = true;
        }
        if !done.3 && now >= heal_at {
            for other in (1..=NODES).filter(|&o| o != cut) {
                sim.repair(host_name(cut), host_name(other));
            }
            done.3 = true;
        }
        if now >= settle_from && common::converged(&record.borrow().latest) {
            break;
        }
        if now >= Duration::from_secs(100) {
            let r = record.borrow();
            let views: Vec<String> = r
                .latest
                .iter()
                .map(|(n, (epoch, stable, s))| format!("n{n}: epoch {epoch} stable {stable} {s:?}"))
                .collect();
            return Err(format!(
                "{script}: no agreement after healing; latest views:\n{}",
                views.join("\n")
            ));
        }
    }

    let r = record.borrow();
    if !r.violations.is_empty() {
        return Err(r.violations.join("; "));
    }
    let (epoch, _, statuses) =
        common::newest_stable(&r.latest).cloned().ok_or("no node reported")?;
    if let Some((node, max)) = r.max_epoch.iter().find(|(_, &max)| max > epoch) {
        return Err(format!("node {node} once saw epoch {max}, later than the agreed {epoch}"));
    }
    let final_status: BTreeMap<u64, (NodeStatus, u64)> =
        statuses.iter().map(|&(n, s, i)| (n, (s, i))).collect();
    for &(node, incarnation) in &r.joined {
        match final_status.get(&node) {
            Some(&(_, i)) if i >= incarnation => {}
            other => {
                return Err(format!(
                    "acknowledged join of node {node}/{incarnation} lost: {other:?}"
                ))
            }
        }
    }
    for node in &r.left {
        if final_status.get(node).map(|s| s.0) != Some(NodeStatus::Left) {
            return Err(format!(
                "acknowledged leave of node {node} lost: {:?}",
                final_status.get(node)
            ));
        }
    }
    eprintln!(
        "seed {seed}: {script}; agreed at {:?} on epoch {epoch}, after {} views: {final_status:?}",
        sim.elapsed(),
        r.views
    );
    Ok(())
}

/// The newest stable view: the reference, since a node cut off may still hold an old one.
#[test]
#[ignore = "one seed of the sweep; run by `seeds_each_in_their_own_process` or by hand with GOBELINS_SIM_SEED"]
fn one_seed() {
    let seed = common::seed_from_env();
    if let Err(problem) = run_seed(seed) {
        panic!("seed {seed}: {problem}");
    }
}

#[test]
fn seeds_each_in_their_own_process() {
    common::sweep(50, &[]);
}
