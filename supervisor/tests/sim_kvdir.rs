//! Seeded simulation of agents hosting a service under load while the cluster changes: four
//! agents over turmoil's network host kvdir (the example service, a replica of every entry on a
//! second node); 16 writers on nodes 1 and 2 write 10,000 keys and keep writing them; a fifth
//! node joins and, during that migration, a participant crashes (and restarts) or is cut off (and
//! healed); then a node leaves and, during that migration, another fault strikes. Two seeds in
//! five run the cluster in two zones (`zoned`), where replicas are kept in the other zone.
//! Afterwards:
//!
//! - no request failed (held, redirected, retried, but completed);
//! - every key reads back its last acknowledged write (or the value of a write that was still
//!   unanswered when it was given up on, which may or may not have landed);
//! - at the stable epoch after the join (writers still running) and at the last one, every
//!   active node's adaptation layer holds the same table, and every key's entry lives on exactly
//!   one node: its manager;
//! - each fault struck while its change was still in progress, as a node saw it;
//! - no node reported slots lost: one fault at a time, a survivor vouched for every slot rebuilt.
//!
//! `GOBELINS_SIM_SEED=3 cargo test -p gobelins-supervisor --test sim_kvdir -- --exact one_seed
//! --include-ignored --nocapture` replays seed 3; `GOBELINS_SIM_SEEDS` sets the sweep's size.

mod common;

use common::{host_name, options, start_of, Latest};
use futures::StreamExt;
use gobelins_adaptation::{codec, plugin, Host, HostConfig, Registry};
use gobelins_kvdir::{KvDir, Request, Response, KVDIR};
use gobelins_locator::{Change, Key, Labels, NodeId, Snapshot};
use gobelins_supervisor::agent::Agent;
use gobelins_supervisor::state::{ClusterState, Command, NodeStatus};
use gobelins_supervisor::supervisor::Supervisor;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEYS: u64 = 10_000;
/// Writers per writing node; each owns the keys `k % (2 * WRITERS) == its index`.
const WRITERS: u64 = 8;
/// A fault strikes up to this long after node 1 saw its change begin.
const MAX_DELAY_MS: u64 = 10;
/// Nodes 1 and 2 carry the writers and are never struck; the faults fall on 3, 4 and 5.
const STRUCK: [u64; 3] = [3, 4, 5];

/// A fault the seed chose, struck while a migration runs.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `kill -9`, and the process restarted from its data directory `after` later.
    Crash { node: u64, after: Duration },
    /// Every link of `node` cut, healed `after` later.
    Cut { node: u64, after: Duration },
}

impl Fault {
    fn draw(rng: &mut SmallRng, candidates: &[u64]) -> Fault {
        let node = candidates[rng.random_range(0..candidates.len())];
        if rng.random_bool(0.5) {
            Fault::Crash { node, after: Duration::from_millis(rng.random_range(500..4_000)) }
        } else {
            Fault::Cut { node, after: Duration::from_millis(rng.random_range(200..3_000)) }
        }
    }
}

/// `(node, status, incarnation)` for every node a view knows.
/// What the nodes tell the test, and what the test tells them.
#[derive(Default)]
struct Record {
    /// The cluster has label levels: odd nodes in zone a, even ones in zone b (`zoned`).
    zoned: bool,
    /// Latest (stable, statuses) each running node holds, and its epoch.
    latest: Latest,
    /// Changes node 1 saw begin, by epoch.
    begun: BTreeMap<u64, Change>,
    /// Writers that have written every key of theirs once.
    filled: u64,
    /// Node 5 may start.
    join_now: bool,
    /// The node that should propose its own leave, once.
    leave_now: Option<u64>,
    /// Writers stop.
    stop: bool,
    /// Writers that have stopped.
    stopped: u64,
    /// Per key: the last acknowledged value.
    acked: BTreeMap<u64, u64>,
    /// Per key: a value whose write failed, and so may or may not have landed.
    uncertain: BTreeMap<u64, u64>,
    ok: u64,
    failed: Vec<String>,
    /// Per key: its last writes, where they went, and how they ended, to explain a loss.
    stories: BTreeMap<u64, Vec<String>>,
    /// Node 1 checks the directory.
    verify_now: bool,
    /// What the check found.
    verdict: Option<Result<String, String>>,
    /// Node 1 checks where the entries are, with the writers running.
    check_now: bool,
    /// What that check found.
    checked: Option<Result<String, String>>,
    /// Each running node's adaptation layer, for the table it routes by.
    hosts: BTreeMap<u64, Host>,
    /// For each fault struck, whether the change it was meant for was still in progress then.
    mid_change: Vec<bool>,
}

type Shared = Rc<RefCell<Record>>;

/// Every kvdir the seed built, restarted nodes' included: each seed runs in a process of its own.
static KVDIRS: Mutex<Vec<Arc<KvDir>>> = Mutex::new(Vec::new());

fn kvdir() -> Registry {
    let kv = Arc::new(KvDir::new());
    KVDIRS.lock().expect("kvdirs").push(Arc::clone(&kv));
    let mut registry = Registry::new();
    registry.register(plugin(kv)).expect("kvdir registers");
    registry
}

fn host_config() -> HostConfig {
    // Long enough to outlast a cut, its detection and the recovery: requests wait, never fail.
    HostConfig { request_deadline: Duration::from_secs(30), ..HostConfig::default() }
}

async fn run_node(root: PathBuf, id: u64, record: Shared) -> turmoil::Result {
    if id == 5 {
        while !record.borrow().join_now {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let start = start_of(&root, id).await;
    let zoned = record.borrow().zoned;
    let agent = loop {
        let mut options = options(&root, id, start.clone(), host_config());
        if zoned {
            options.config.label_levels = vec!["zone".to_string()];
            let zone = if id % 2 == 1 { "a" } else { "b" };
            options.labels = Labels::from([("zone".to_string(), zone.to_string())]);
        }
        match Agent::start(common::TurmoilNet, &options, kvdir).await {
            Ok(agent) => break agent,
            Err(error) => {
                tracing::debug!(id, %error, "start failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let supervisor = Arc::clone(&agent.supervisor);
    record.borrow_mut().hosts.insert(id, supervisor.host().clone());
    if id <= 2 {
        for w in 0..WRITERS {
            let index = (id - 1) * WRITERS + w;
            let host = supervisor.host().clone();
            tokio::task::spawn_local(writer(
                Arc::clone(&supervisor),
                host,
                index,
                Rc::clone(&record),
            ));
        }
    }
    if id == 1 {
        tokio::task::spawn_local(verifier(Arc::clone(&supervisor), Rc::clone(&record)));
    }
    let mut state = supervisor.watch_state();
    loop {
        let current = state.borrow_and_update().clone();
        {
            let mut r = record.borrow_mut();
            let statuses =
                current.nodes.iter().map(|(&n, rec)| (n, rec.status, rec.incarnation)).collect();
            r.latest.insert(id, (current.epoch, current.is_stable(), statuses));
            if id == 1 {
                if std::env::var("SIM_TRACE").is_ok() {
                    eprintln!(
                        "TRACE {:?} epoch {} {:?} queue {:?}",
                        turmoil::elapsed(),
                        current.epoch,
                        current.in_progress.as_ref().map(|p| (&p.change, &p.participants, &p.done)),
                        current.queue
                    );
                }
                if let Some(progress) = &current.in_progress {
                    r.begun.entry(progress.epoch).or_insert_with(|| progress.change.clone());
                }
            }
        }
        if record.borrow().leave_now == Some(id) {
            record.borrow_mut().leave_now = None;
            let supervisor = Arc::clone(&supervisor);
            tokio::task::spawn_local(async move {
                while !matches!(supervisor.propose(Command::Leave { node: id }).await, Ok(Ok(_))) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return Ok(()) },
            // The test's requests (leave) arrive between state changes too.
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Whether the cluster is ready for load: four active nodes, kvdir registered, stable.
fn ready(state: &ClusterState) -> bool {
    state.is_stable()
        && state.with_status(NodeStatus::Active).count() >= 4
        && state.tree.services().any(|s| s.id == KVDIR)
}

async fn writer(supervisor: Arc<Supervisor>, host: Host, index: u64, record: Shared) {
    let mut state = supervisor.watch_state();
    while !ready(&state.borrow_and_update()) {
        if state.changed().await.is_err() {
            return;
        }
    }
    let mut round = 0u64;
    loop {
        for key in (index..KEYS).step_by((2 * WRITERS) as usize) {
            if record.borrow().stop {
                record.borrow_mut().stopped += 1;
                return;
            }
            let value = round * KEYS + key;
            let put = codec::encode(&Request::Put(value.to_le_bytes().to_vec()))
                .expect("request encodes");
            let result = host.request(KVDIR, Key(key), put).await;
            let manager = host.context().snapshot().and_then(|s| s.locate(KVDIR, Key(key)));
            let mut r = record.borrow_mut();
            let story = r.stories.entry(key).or_default();
            story.push(format!(
                "{:?} put {value} at epoch {} to {:?}: {}",
                turmoil::elapsed(),
                host.epoch(),
                manager.map(|m| m.0),
                if result.is_ok() { "ok" } else { "failed" }
            ));
            if story.len() > 3 {
                story.remove(0);
            }
            match result {
                Ok(_) => {
                    r.acked.insert(key, value);
                    r.ok += 1;
                }
                Err(error) => {
                    r.uncertain.insert(key, value);
                    r.failed
                        .push(format!("put {key} given up at {:?}: {error}", turmoil::elapsed()));
                }
            }
        }
        if round == 0 {
            record.borrow_mut().filled += 1;
        }
        round += 1;
    }
}

/// Once told, reads every key back through the router and asks every active node's local
/// server which entries it holds.
async fn verifier(supervisor: Arc<Supervisor>, record: Shared) {
    loop {
        let (check, verify) = {
            let r = record.borrow();
            (r.check_now, r.verify_now)
        };
        if check {
            let found = settled_check(&supervisor, &record, false).await;
            let mut r = record.borrow_mut();
            r.check_now = false;
            r.checked = Some(found);
        } else if verify {
            let verdict = settled_check(&supervisor, &record, true).await;
            record.borrow_mut().verdict = Some(verdict);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`verify`], again until the configuration held still from its start to its end: a node that
/// was cut off may rejoin while the check runs, and keys move to it.
async fn settled_check(
    supervisor: &Supervisor,
    record: &Shared,
    values: bool,
) -> Result<String, String> {
    loop {
        let before = supervisor.state();
        let verdict = verify(supervisor, record, values).await;
        // A commit the others applied reaches node 1 within a round or two: without this
        // pause, a check that failed before its first await (another node on the next
        // table already, node 1 a commit behind) read the same state again and counted.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = supervisor.state();
        // Stable at both ends, not only at the last: a change keeps its epoch from its begin
        // to its end, so a check made mid-change (seed 20: a rejoin begun, its node in the
        // table and not active yet) read as settled once the change ended in the pause.
        if before.is_stable() && after.is_stable() && after.epoch == before.epoch {
            return verdict;
        }
        // A check that fails at once (no table yet, say) awaits nothing: looping straight back
        // would never yield, and the simulated clock, which this task holds, would stop with
        // the cluster in mid-change (seed 190 hung so at 8.55 s).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that every active node routes by node 1's table, and that each key's entry is held
/// by its manager alone; with `values`, also reads every key back against its last
/// acknowledged write (only once the writers have stopped).
async fn verify(supervisor: &Supervisor, record: &Shared, values: bool) -> Result<String, String> {
    let host = supervisor.host();
    let snapshot = host.context().snapshot().ok_or("no table at the stable epoch")?.clone();
    let active: Vec<u64> = supervisor.state().with_status(NodeStatus::Active).collect();
    let table: BTreeSet<u64> = snapshot.nodes().iter().map(|n| n.0).collect();
    if table != active.iter().copied().collect() {
        return Err(format!("the table names {table:?}, the active nodes are {active:?}"));
    }
    for &node in &active {
        let theirs = record.borrow().hosts.get(&node).map(|h| h.context().snapshot().cloned());
        match theirs {
            Some(Some(theirs)) if theirs == snapshot => {}
            Some(Some(theirs)) => {
                return Err(format!(
                    "node {node} routes by epoch {}'s table, node 1 by epoch {}'s, or the same epoch differs",
                    theirs.epoch().0,
                    snapshot.epoch().0
                ))
            }
            _ => return Err(format!("node {node} is active but has no table")),
        }
    }
    let (acked, uncertain, stories) = {
        let r = record.borrow();
        (r.acked.clone(), r.uncertain.clone(), r.stories.clone())
    };
    let reads = values.then_some((&acked, &uncertain, &stories));
    // Keys are checked many at a time: one by one, the sweep would take minutes of wall time.
    let checks = futures::stream::iter(0..KEYS)
        .map(|key| check_key(host, &snapshot, &active, key, reads))
        .buffer_unordered(64);
    let found: Vec<Result<Option<Problem>, String>> = checks.collect().await;
    let mut lost = Vec::new();
    let mut misplaced = Vec::new();
    for problem in found {
        match problem? {
            Some(Problem::Lost(p)) => lost.push(p),
            Some(Problem::Misplaced(p)) => misplaced.push(p),
            None => {}
        }
    }
    if !lost.is_empty() || !misplaced.is_empty() {
        return Err(format!(
            "{} keys lost ({}), {} keys not held by exactly their manager ({})",
            lost.len(),
            lost.iter().take(3).cloned().collect::<Vec<_>>().join("; "),
            misplaced.len(),
            misplaced.iter().take(3).cloned().collect::<Vec<_>>().join("; "),
        ));
    }
    let read = if values { "read back, " } else { "" };
    Ok(format!(
        "{KEYS} keys {read}each held by its manager alone, on nodes {active:?} at epoch {}",
        snapshot.epoch().0
    ))
}

/// What the check of one key can find wrong.
enum Problem {
    Lost(String),
    Misplaced(String),
}

/// The writes acknowledged, those given up on, and each key's last writes.
type Written<'a> = (&'a BTreeMap<u64, u64>, &'a BTreeMap<u64, u64>, &'a BTreeMap<u64, Vec<String>>);

/// Asks each active node's local server whether it holds `key`'s entry; with `written`, first
/// reads it through the router against its last acknowledged write.
async fn check_key(
    host: &Host,
    snapshot: &Snapshot,
    active: &[u64],
    key: u64,
    written: Option<Written<'_>>,
) -> Result<Option<Problem>, String> {
    let value = match written {
        Some(written) => match read_back(host, key, written).await? {
            Ok(value) => value,
            Err(lost) => return Ok(Some(Problem::Lost(lost))),
        },
        None => None,
    };
    let manager = snapshot.locate(KVDIR, Key(key)).map(|n| n.0);
    let ctx = host.context();
    let mut holders = Vec::new();
    let mut answers = Vec::new();
    for &node in active {
        let asked: Result<Response, _> =
            ctx.tell(NodeId(node), KVDIR, Key(key), &Request::Get).await;
        answers.push(format!("{asked:?}"));
        match asked {
            Ok(Response::Value(Some(_))) => holders.push(node),
            Ok(_) => {}
            Err(error) => return Err(format!("node {node} did not answer: {error}")),
        }
    }
    if holders != manager.into_iter().collect::<Vec<_>>() {
        let misplaced = format!("key {key}: manager {manager:?}, held by {holders:?}, read {value:?}, answers of {active:?}: {answers:?}");
        return Ok(Some(Problem::Misplaced(misplaced)));
    }
    Ok(None)
}

/// Reads `key` through the router: its value, or what is wrong with it (`Err` inside) if that
/// is neither its last acknowledged write nor a write given up on.
async fn read_back(
    host: &Host,
    key: u64,
    (acked, uncertain, stories): Written<'_>,
) -> Result<Result<Option<u64>, String>, String> {
    let get = codec::encode(&Request::Get).expect("request encodes");
    let read = match host.request(KVDIR, Key(key), get).await {
        Ok(bytes) => codec::decode::<Response>(&bytes).map_err(|e| e.to_string())?,
        Err(error) => return Err(format!("read of key {key} failed: {error}")),
    };
    let value = match read {
        Response::Value(Some(v)) => Some(u64::from_le_bytes(
            v.value[..].try_into().map_err(|_| format!("key {key}: bad value"))?,
        )),
        Response::Value(None) => None,
        other => return Err(format!("key {key}: unexpected answer {other:?}")),
    };
    let expected = acked.get(&key).copied();
    if value != expected && (value.is_none() || value != uncertain.get(&key).copied()) {
        return Ok(Err(format!(
            "key {key}: read {value:?}, last acknowledged {expected:?}; its last writes: {:?}",
            stories.get(&key)
        )));
    }
    Ok(Ok(value))
}

/// Where the script stands.
enum Step {
    Filling,
    Joining,
    Converging {
        then: Box<Step>,
    },
    /// Node 1 checks where the entries are, before the leave.
    Checking,
    Leaving,
    Stopping,
    Verifying,
}

/// Whether seed `seed` runs in two zones (`--levels zone`), where each node keeps its replicas
/// in the other zone and a holder takes no part in most changes of the nodes it holds for: two
/// seeds in five, not the sweep's past finds (20, 59), which keep replaying as they were found.
fn zoned(seed: u64) -> bool {
    matches!(seed % 5, 1 | 3)
}

fn run_seed(seed: u64) -> Result<String, String> {
    gobelins_supervisor::runtime::seed(seed);
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let record: Shared = Rc::default();
    let zoned = zoned(seed);
    record.borrow_mut().zoned = zoned;
    let mut rng = SmallRng::seed_from_u64(seed);
    let first = Fault::draw(&mut rng, &STRUCK);
    // Within the change: a migration here lasts about 15 to 25 ms of simulated time, and a
    // delay of up to 40 ms had half of the faults strike after it (a sweep of 12 seeds: 13
    // of 24).
    let first_delay = Duration::from_millis(rng.random_range(0..MAX_DELAY_MS));
    let leaver = [3, 4][rng.random_range(0..2)];
    let second = Fault::draw(&mut rng, &STRUCK);
    let second_delay = Duration::from_millis(rng.random_range(0..MAX_DELAY_MS));
    let script = format!(
        "{}join of n5 struck by {first:?} after {first_delay:?}; leave of n{leaver} struck by \
         {second:?} after {second_delay:?}",
        if zoned { "zones a (n1, n3, n5) and b (n2, n4): " } else { "" }
    );

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(300))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_micros(100))
        .max_message_latency(Duration::from_millis(2))
        .build();
    for id in 1..=5 {
        let root = root.path().to_path_buf();
        let record = Rc::clone(&record);
        sim.host(host_name(id), move || run_node(root.clone(), id, Rc::clone(&record)));
    }
    let hold = Rc::clone(&record);
    sim.client("observer", async move {
        let _ = hold;
        tokio::time::sleep(Duration::from_secs(290)).await;
        Ok(())
    });

    // Faults waiting for their time: (when, what, is the undoing, the epoch of the change
    // it is meant for).
    let mut pending: Vec<(Duration, Fault, bool, u64)> = Vec::new();
    let mut step = Step::Filling;
    let mut settled_at = Duration::ZERO;
    let mut after_join = String::new();
    loop {
        sim.step().map_err(|e| format!("{script}: simulation failed: {e}"))?;
        let now = sim.elapsed();
        pending.retain(|&(at, fault, undo, epoch)| {
            if now < at {
                return true;
            }
            if !undo {
                // Its own change, not one queued after it: node 1 still at that epoch, unstable.
                let mut r = record.borrow_mut();
                let in_progress =
                    r.latest.get(&1).is_some_and(|&(at, stable, _)| at == epoch && !stable);
                r.mid_change.push(in_progress);
            }
            match (fault, undo) {
                (Fault::Crash { node, after }, false) => {
                    sim.crash(host_name(node));
                    // Restarted later: the same host, started afresh from its data directory.
                    let _ = after;
                }
                (Fault::Crash { node, .. }, true) => sim.bounce(host_name(node)),
                (Fault::Cut { node, .. }, false) => {
                    for other in (1..=5).filter(|&o| o != node) {
                        sim.partition(host_name(node), host_name(other));
                    }
                }
                (Fault::Cut { node, .. }, true) => {
                    for other in (1..=5).filter(|&o| o != node) {
                        sim.repair(host_name(node), host_name(other));
                    }
                }
            }
            false
        });
        let strike = |pending: &mut Vec<(Duration, Fault, bool, u64)>,
                      fault: Fault,
                      delay: Duration,
                      epoch: u64| {
            let (Fault::Crash { after, .. } | Fault::Cut { after, .. }) = fault;
            pending.push((now + delay, fault, false, epoch));
            pending.push((now + delay + after, fault, true, epoch));
        };
        // The epoch of the last change node 1 saw begin that is `wanted`.
        let began = |r: &Record, wanted: &dyn Fn(&Change) -> bool| {
            r.begun.iter().filter(|(_, change)| wanted(change)).map(|(&epoch, _)| epoch).max()
        };
        step = match step {
            Step::Filling if record.borrow().filled == 2 * WRITERS => {
                record.borrow_mut().join_now = true;
                Step::Joining
            }
            Step::Joining => {
                let join = |c: &Change| matches!(c, Change::Add { node, .. } if node.0 == 5);
                match began(&record.borrow(), &join) {
                    Some(epoch) => {
                        strike(&mut pending, first, first_delay, epoch);
                        Step::Converging { then: Box::new(Step::Leaving) }
                    }
                    None => Step::Joining,
                }
            }
            Step::Converging { then } => {
                if pending.is_empty() && common::converged(&record.borrow().latest) {
                    if settled_at == Duration::ZERO {
                        settled_at = now;
                    }
                    // Load keeps running a while on the settled cluster before the next act.
                    if now >= settled_at + Duration::from_secs(1) {
                        settled_at = Duration::ZERO;
                        match *then {
                            Step::Leaving => {
                                record.borrow_mut().check_now = true;
                                Step::Checking
                            }
                            _ => {
                                record.borrow_mut().stop = true;
                                Step::Stopping
                            }
                        }
                    } else {
                        Step::Converging { then }
                    }
                } else {
                    settled_at = Duration::ZERO;
                    Step::Converging { then }
                }
            }
            Step::Checking => {
                let checked = record.borrow_mut().checked.take();
                match checked {
                    Some(Ok(found)) => {
                        after_join = found;
                        record.borrow_mut().leave_now = Some(leaver);
                        Step::Leaving
                    }
                    Some(Err(problem)) => {
                        return Err(format!(
                            "{script}: at the stable epoch after the join: {problem}"
                        ))
                    }
                    None => Step::Checking,
                }
            }
            Step::Leaving => {
                let leave = |c: &Change| matches!(c, Change::Evict(n) if n.0 == leaver);
                match began(&record.borrow(), &leave) {
                    Some(epoch) => {
                        strike(&mut pending, second, second_delay, epoch);
                        Step::Converging { then: Box::new(Step::Stopping) }
                    }
                    None => Step::Leaving,
                }
            }
            Step::Stopping if record.borrow().stopped == 2 * WRITERS => {
                record.borrow_mut().verify_now = true;
                Step::Verifying
            }
            Step::Verifying => {
                let verdict = record.borrow_mut().verdict.take();
                if let Some(verdict) = verdict {
                    let r = record.borrow();
                    if let Some(late) = r.mid_change.iter().position(|&mid| !mid) {
                        return Err(format!(
                            "{script}: fault {} struck after its change was stable: the seed \
                             tests nothing of a migration (MAX_DELAY_MS is too long for it)",
                            late + 1
                        ));
                    }
                    if !r.failed.is_empty() {
                        return Err(format!(
                            "{script}: {} requests failed, first: {}",
                            r.failed.len(),
                            r.failed[0]
                        ));
                    }
                    let reported: u64 =
                        KVDIRS.lock().expect("kvdirs").iter().map(|kv| kv.slots_lost()).sum();
                    if reported > 0 {
                        return Err(format!(
                            "{script}: {reported} slots reported lost, though every fault \
                             struck alone and their backups lived"
                        ));
                    }
                    let epoch = r.latest.get(&1).map_or(0, |l| l.0);
                    let struck: Vec<&str> = r
                        .mid_change
                        .iter()
                        .map(|&mid| if mid { "mid-change" } else { "after its change" })
                        .collect();
                    return verdict
                        .map(|v| {
                            format!(
                                "{script}; faults struck {struck:?}; after the join, {after_join}; \
                                 {} writes ok, 0 failed; at {:?}, epoch {epoch}: {v}",
                                r.ok,
                                sim.elapsed()
                            )
                        })
                        .map_err(|e| format!("{script}: {e}"));
                }
                Step::Verifying
            }
            other => other,
        };
        if now >= Duration::from_secs(280) {
            let r = record.borrow();
            return Err(format!(
                "{script}: did not finish in time ({} writes ok, {} failed (first: {:?}), filled {}, \
                 stopped {}); latest views: {:?}",
                r.ok,
                r.failed.len(),
                r.failed.first(),
                r.filled,
                r.stopped,
                r.latest
            ));
        }
    }
}

#[test]
#[ignore = "one seed of the sweep; run by `seeds_each_in_their_own_process` or by hand with GOBELINS_SIM_SEED"]
fn one_seed() {
    let seed = common::seed_from_env();
    match run_seed(seed) {
        Ok(summary) => eprintln!("seed {seed}: {summary}"),
        Err(problem) => panic!("seed {seed}: {problem}"),
    }
}

/// Seeds past the sweep that once failed: 20, a check taken mid-change read as settled (the
/// harness's fault); 59, a backup that missed its manager's word to a closed connection, and
/// the manager's death in the next change had 819 slots reported lost.
const FOUND: [u64; 2] = [20, 59];

#[test]
fn seeds_each_in_their_own_process() {
    common::sweep(12, &FOUND);
}
