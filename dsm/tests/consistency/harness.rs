//! What the scenarios share: clusters of DSM nodes, workers under load, and page helpers.

use crate::checker::{check, Op, Value};
use gobelins_adaptation::testing::MemCluster;
use gobelins_adaptation::{plugin, HostConfig, Registry};
use gobelins_dsm::{Dsm, DsmConfig, DsmError, DsmNode, FaultStats, PageId};
use gobelins_locator::{NodeId, TreeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) const PAGES: u32 = 16;
pub(crate) const SEGMENT: u32 = 3;

/// The test's page `i`: spread over the slots, so that every node manages some.
pub(crate) fn pid(i: u32) -> PageId {
    PageId { segment: SEGMENT, page: i * 523 }
}

/// Logs as `RUST_LOG` asks, with the paused clock's time, to replay a failure.
pub(crate) fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .with_timer(Paused(tokio::time::Instant::now()))
        .try_init();
}

/// Log times on the test's paused clock.
struct Paused(tokio::time::Instant);

impl tracing_subscriber::fmt::time::FormatTime for Paused {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:>9.3}ms", self.0.elapsed().as_secs_f64() * 1e3)
    }
}

/// An in-memory cluster whose hosts each run a DSM node, and the nodes by id.
pub(crate) struct Cluster {
    pub(crate) mem: MemCluster,
    pub(crate) made: Arc<Mutex<Vec<DsmNode>>>,
}

impl Cluster {
    pub(crate) async fn start(nodes: u64, config: DsmConfig) -> Cluster {
        Cluster::start_shaped(nodes, TreeConfig::default(), config).await
    }

    /// [`Cluster::start`] with a tree of this shape: cells of a few nodes, say.
    pub(crate) async fn start_shaped(nodes: u64, shape: TreeConfig, config: DsmConfig) -> Cluster {
        let made = Arc::new(Mutex::new(Vec::new()));
        let m = Arc::clone(&made);
        let mem = MemCluster::start_shaped(nodes, shape, HostConfig::default(), move || {
            let node = DsmNode::new(config.clone());
            m.lock().expect("made").push(node.clone());
            let mut registry = Registry::new();
            registry.register(plugin(node.service())).expect("dsm registers");
            registry
        })
        .await;
        Cluster { mem, made }
    }

    /// `nodes` nodes keeping a backup of every dirty page.
    pub(crate) async fn with_backups(nodes: u64) -> Cluster {
        Cluster::start(nodes, DsmConfig { backups: true, ..DsmConfig::default() }).await
    }

    /// The DSM of `node`: the first registry built is only read for its declarations, then
    /// node `n` is the `n`th built.
    pub(crate) fn dsm(&self, node: NodeId) -> Dsm {
        let made = self.made.lock().expect("made");
        Dsm::new(made[node.0 as usize].clone(), self.mem.host(node))
    }

    /// Brings `node`, failed, back as a new life ([`MemCluster::rejoin`]); its DSM, built
    /// last, takes the place of the old life's.
    pub(crate) async fn rejoin(&mut self, node: NodeId) {
        self.mem.rejoin(node).await;
        let mut made = self.made.lock().expect("made");
        let new = made.pop().expect("the new life's DSM");
        made[node.0 as usize] = new;
    }

    /// How `node`'s read faults used their probable-owner hints.
    pub(crate) fn stats(&self, node: NodeId) -> FaultStats {
        self.made.lock().expect("made")[node.0 as usize].fault_stats()
    }

    /// Pages the cluster's nodes reported lost, summed: what `gobelins stats` shows each.
    pub(crate) fn reported_lost(&self) -> u64 {
        let nodes = self.mem.nodes().into_iter();
        let lost = nodes.map(|n| self.mem.host(n).stats().reported_lost.get("dsm").copied());
        lost.map(|l| l.unwrap_or(0)).sum()
    }

    /// Pages whose copy `node` gave up to a writer and still keeps aside.
    pub(crate) fn kept_aside(&self, node: NodeId) -> usize {
        self.made.lock().expect("made")[node.0 as usize].kept_aside()
    }
}

/// Writes `count` into `page` from `dsm`.
pub(crate) async fn put(dsm: &Dsm, page: PageId, count: u64) {
    let mut g = dsm.write(page).await.expect("write");
    Value { count, worker: 0, seq: count }.encode(&mut g);
    g.commit().await.expect("commit");
}

/// The count `dsm` reads from `page`.
pub(crate) async fn get(dsm: &Dsm, page: PageId) -> u64 {
    Value::decode(&dsm.read(page).await.expect("read")).count
}

/// What a worker did, and the errors it met.
type Outcome = (Vec<Op>, Vec<DsmError>);

/// One worker: random reads and writes of the segment's pages until told to stop.
async fn work(dsm: Dsm, worker: u64, seed: u64, stop: Arc<AtomicBool>) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = Vec::new();
    let mut errors = Vec::new();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let page = rng.random_range(0..PAGES);
        let id = pid(page);
        if rng.random_bool(0.3) {
            match dsm.write(id).await {
                Ok(mut guard) => {
                    let value = Value { count: Value::decode(&guard).count + 1, worker, seq };
                    seq += 1;
                    value.encode(&mut guard);
                    let version = guard.version();
                    match guard.commit().await {
                        Ok(()) => {
                            tracing::debug!(
                                worker,
                                page,
                                count = value.count,
                                version,
                                "test: wrote"
                            );
                            history.push(Op::Write { page, value })
                        }
                        Err(e) => {
                            history.push(Op::Maybe { page, value });
                            errors.push(e)
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        } else {
            match dsm.read(id).await {
                Ok(guard) => history.push(Op::Read { page, value: Value::decode(&guard) }),
                Err(e) => errors.push(e),
            }
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(50..500))).await;
    }
    (history, errors)
}

/// A write to every page by `dsm`, as worker `worker`.
pub(crate) async fn write_all(dsm: &Dsm, worker: u64) -> Outcome {
    let mut history = Vec::new();
    for page in 0..PAGES {
        let mut guard = dsm.write(pid(page)).await.expect("write");
        let value = Value { count: Value::decode(&guard).count + 1, worker, seq: u64::from(page) };
        value.encode(&mut guard);
        let version = guard.version();
        guard.commit().await.expect("commit");
        tracing::debug!(worker, page, count = value.count, version, "test: wrote");
        history.push(Op::Write { page, value });
    }
    (history, Vec::new())
}

pub(crate) struct Load {
    pub(crate) stops: BTreeMap<u64, Arc<AtomicBool>>,
    pub(crate) tasks: BTreeMap<u64, tokio::task::JoinHandle<Outcome>>,
    next: u64,
}

impl Load {
    pub(crate) fn new() -> Load {
        Load { stops: BTreeMap::new(), tasks: BTreeMap::new(), next: 0 }
    }

    /// Starts two workers on `node`; returns their ids.
    pub(crate) fn start(&mut self, cluster: &Cluster, node: NodeId) -> Vec<u64> {
        (0..2)
            .map(|_| {
                let worker = self.next;
                self.next += 1;
                let stop = Arc::new(AtomicBool::new(false));
                self.stops.insert(worker, Arc::clone(&stop));
                let task = tokio::spawn(work(cluster.dsm(node), worker, 1000 + worker, stop));
                self.tasks.insert(worker, task);
                worker
            })
            .collect()
    }

    pub(crate) async fn stop(&mut self, workers: &[u64]) -> Vec<Outcome> {
        let mut out = Vec::new();
        for w in workers {
            self.stops[w].store(true, Ordering::Relaxed);
        }
        for w in workers {
            out.push(self.tasks.remove(w).expect("a running worker").await.expect("worker"));
        }
        out
    }

    pub(crate) async fn stop_all(&mut self) -> Vec<Outcome> {
        let all: Vec<u64> = self.tasks.keys().copied().collect();
        self.stop(&all).await
    }
}

/// The count every page ends with, read from `dsm`.
pub(crate) async fn final_counts(dsm: &Dsm) -> Result<Vec<u64>, DsmError> {
    let mut out = Vec::new();
    for page in 0..PAGES {
        out.push(Value::decode(&dsm.read(pid(page)).await?).count);
    }
    Ok(out)
}

pub(crate) fn highest_writes(histories: &[Vec<Op>]) -> Vec<u64> {
    let mut top = vec![0; PAGES as usize];
    for op in histories.iter().flatten() {
        if let Op::Write { page, value } = op {
            top[*page as usize] = top[*page as usize].max(value.count);
        }
    }
    top
}

/// Pages whose final count is neither their highest acknowledged write nor a later write that
/// may have happened.
pub(crate) fn unexplained(histories: &[Vec<Op>], counts: &[u64]) -> Vec<(u32, u64, u64)> {
    let top = highest_writes(histories);
    let maybe: std::collections::HashSet<(u32, u64)> = histories
        .iter()
        .flatten()
        .filter_map(|op| match op {
            Op::Maybe { page, value } => Some((*page, value.count)),
            _ => None,
        })
        .collect();
    (0..PAGES)
        .filter(|&p| {
            let (got, want) = (counts[p as usize], top[p as usize]);
            got != want && !(got > want && maybe.contains(&(p, got)))
        })
        .map(|p| (p, counts[p as usize], top[p as usize]))
        .collect()
}

/// The workers' accesses all succeeded, their histories are sequentially consistent, and
/// every page ends with its last acknowledged write, read through node 1.
pub(crate) async fn every_write_survived(cluster: &Cluster, done: Vec<Outcome>) {
    let histories = consistent(done);
    every_write_read_back(cluster, &histories).await;
}

/// The workers' histories, once none of their accesses failed and they are sequentially
/// consistent.
pub(crate) fn consistent(done: Vec<Outcome>) -> Vec<Vec<Op>> {
    let errors: BTreeSet<String> =
        done.iter().flat_map(|(_, e)| e).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "accesses failed: {errors:?}");
    let histories: Vec<Vec<Op>> = done.into_iter().map(|(h, _)| h).collect();
    check(&histories).expect("sequentially consistent");
    histories
}

/// Every page ends with its last acknowledged write, read through node 1.
pub(crate) async fn every_write_read_back(cluster: &Cluster, histories: &[Vec<Op>]) {
    let counts = final_counts(&cluster.dsm(NodeId(1))).await.expect("no page lost");
    assert_eq!(unexplained(histories, &counts), vec![], "every committed write survived");
}

/// What `dsm` reads of `page`: its count, or the error.
pub(crate) async fn outcome(dsm: &Dsm, page: PageId) -> Result<u64, String> {
    dsm.read(page).await.map(|g| Value::decode(&g).count).map_err(|e| e.to_string())
}

/// Writes `i + 1` into the `i`th of `pages` through `dsm`.
pub(crate) async fn write_counts(dsm: &Dsm, pages: &[PageId]) {
    for (i, &page) in pages.iter().enumerate() {
        put(dsm, page, i as u64 + 1).await;
    }
}

/// The pages of `pages` that do not read back `i + 1` through `dsm`, with what they read.
pub(crate) async fn misread(dsm: &Dsm, pages: &[PageId]) -> Vec<String> {
    misread_acked(dsm, pages, &vec![0; pages.len()]).await
}

/// Six nodes with backups, in cells of two: a leave in one cell leaves the others out of
/// the change, so that a node out of reach there does not hold it up.
pub(crate) async fn six_in_cells_of_two() -> Cluster {
    let shape = TreeConfig::default().with_cell_capacity(2);
    let config = DsmConfig { backups: true, ..DsmConfig::default() };
    Cluster::start_shaped(6, shape, config).await
}

/// Up to `count` of the test segment's pages `131 p` whose manager is `node` (`managed`), or
/// is not.
pub(crate) fn pages_by_manager(
    cluster: &Cluster,
    node: NodeId,
    managed: bool,
    count: usize,
) -> Vec<PageId> {
    let table = cluster.mem.snapshot();
    (0..400)
        .map(|p| PageId { segment: SEGMENT, page: p * 131 })
        .filter(|p| (table.locate(gobelins_dsm::DSM, p.key()) == Some(node)) == managed)
        .take(count)
        .collect()
}

/// The pages of `pages` that do not read back their acknowledged round (`write_counts`'
/// `i + 1` when none was) through `reader`, with what they read.
pub(crate) async fn misread_acked(reader: &Dsm, pages: &[PageId], acked: &[u64]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (i, &page) in pages.iter().enumerate() {
        let want = if acked[i] == 0 { i as u64 + 1 } else { acked[i] };
        match outcome(reader, page).await {
            Ok(count) if count == want => {}
            other => wrong.push(format!("{page:?}: {other:?}, acknowledged {want}")),
        }
    }
    wrong
}

/// Makes `r` (node `reader`) a reader `o` served straight, unknown to the page's manager: it
/// read version 1 through the manager, then version 2 from the owner its hint named.
pub(crate) async fn read_straight_from_the_owner(
    cluster: &Cluster,
    o: &Dsm,
    r: &Dsm,
    reader: NodeId,
    page: PageId,
) {
    put(o, page, 1).await;
    assert_eq!(get(r, page).await, 1);
    put(o, page, 2).await;
    assert_eq!(get(r, page).await, 2);
    assert_eq!(cluster.stats(reader).hinted, 1, "served by the owner, unknown to the manager");
}

/// The first test page `node` manages.
pub(crate) fn managed_by(cluster: &Cluster, node: NodeId) -> PageId {
    let snapshot = cluster.mem.snapshot();
    (0..)
        .map(pid)
        .find(|p| snapshot.locate(gobelins_dsm::DSM, p.key()) == Some(node))
        .expect("a page the node manages")
}

/// In a cluster of three: `page`'s manager, and the two other nodes, the page's first owner and
/// the writer whose grant is lost, so that either can fail without taking the entry with it.
pub(crate) fn three_roles(cluster: &Cluster, page: PageId) -> (NodeId, NodeId, NodeId) {
    let manager = cluster.mem.snapshot().locate(gobelins_dsm::DSM, page.key()).expect("a manager");
    let others: Vec<NodeId> = [1, 2, 3].map(NodeId).into_iter().filter(|&n| n != manager).collect();
    (manager, others[0], others[1])
}
