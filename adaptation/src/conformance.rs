//! The conformance suite: a service run through additions, evictions and failures under load,
//! every key read back after each change, so that a key lost in one change is found before the
//! writers' later rounds write it again. (A write held through the change, released to the key's
//! new manager before the check, can still write a key anew there: a loss of what that write
//! replaced anyway.)

use crate::codec;
use crate::host::{Host, HostConfig};
use crate::registry::Registry;
use crate::service::{plugin, Service};
use crate::testing::MemCluster;
use gobelins_locator::{Change, Key, NodeId, ServiceId};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::RwLock;

/// Concurrent writers during the changes.
const WRITERS: u64 = 16;
/// Keys the cut-off node's own clients write, apart from the writers' keys.
const CUT_OFF_KEYS: usize = 32;
/// Wrong keys a stage names: enough to see a pattern.
const NAMED: usize = 10;
/// Errors of failed requests a verdict keeps.
const ERRORS: usize = 10;
/// How long the writers run before each change.
const SETTLE: Duration = Duration::from_millis(200);
/// Counters added to, when the probe has [`Probe::add`]: two adders, each on counters of its
/// own, a counter's adds one after another.
const COUNTERS: u64 = 8;
/// How far past the writers' keys the counters' keys begin: past those the cut-off step
/// picks among too.
const COUNTERS_FROM: u64 = 2_000_000;

/// How the conformance suite drives a service: how to write a value and read it back.
pub trait Probe: Send + Sync + 'static {
    /// The service under test.
    type S: Service;
    /// A fresh instance, for one node.
    fn make(&self) -> Self::S;
    /// A request that stores `value` under `key`.
    fn write(&self, value: u64) -> <Self::S as Service>::Request;
    /// A request that reads `key`.
    fn read(&self) -> <Self::S as Service>::Request;
    /// The value a read returned, if any.
    fn value(&self, response: <Self::S as Service>::Response) -> Option<u64>;
    /// A request that adds one to its key's value, if the service has such a request, carrying
    /// `id`: unique to this add, and in its retries, which send the same request again. The
    /// suite then adds to a few counters through every step, and checks that each add counted
    /// once: across a manager's failure the layer's own memory of answers dies with it, and
    /// only the ids the service kept in its entries tell a retry from a new add (see
    /// [`Service::handle`]). Read with [`Probe::read`], a counter never added to may read no
    /// value. The default: none, and nothing counted.
    fn add(&self, _id: u64) -> Option<<Self::S as Service>::Request> {
        None
    }
    /// Whether the service keeps a second copy of each entry, so that a single failure loses
    /// nothing.
    fn survives_one_failure(&self) -> bool;
}

/// A key that did not read back its last acknowledged value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrong {
    /// The key.
    pub key: u64,
    /// The last value a write acknowledged for it.
    pub expected: u64,
    /// What the read found: `Ok(None)` for no value, `Err` for the read's own error.
    pub got: Result<Option<u64>, String>,
}

/// One step of the run, and what the check right after it found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// What the step did.
    pub name: String,
    /// Writes acknowledged from the end of the last check to the end of this step.
    pub writes: u64,
    /// Keys that did not read back their last acknowledged value after it, counters that
    /// read fewer adds than were acknowledged among them.
    pub lost: u64,
    /// Counters ([`Probe::add`]) that read more adds than were asked, those whose answer never
    /// came included: an add that counted twice.
    pub counted_twice: u64,
    /// The first of both.
    pub wrong: Vec<Wrong>,
}

/// What [`conformance`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Requests that completed.
    pub ok: u64,
    /// Of those, requests that were held, redirected or retried on the way.
    pub delayed: u64,
    /// Requests that failed, writes through a node cut off from the cluster aside.
    pub failed: u64,
    /// Writes through the node cut off from the cluster that failed, as they should: its
    /// manager could not keep a second copy. One it acknowledged must not be lost.
    pub cut_off_failed: u64,
    /// Keys that did not read back their last acknowledged value, summed over the checks.
    pub lost: u64,
    /// Counters that read more adds than were asked, summed over the checks.
    pub counted_twice: u64,
    /// Entries the services reported lost (`Service::reported_lost`), summed over every node,
    /// as each last said it at a check: failures came one at a time, so a service that
    /// survives one reports nothing.
    pub reported_lost: u64,
    /// Changes carried out, from the cluster's first node on.
    pub changes: u64,
    /// The first errors of failed requests.
    pub errors: Vec<String>,
    /// Each step, in order.
    pub stages: Vec<Stage>,
}

impl Verdict {
    /// What broke the contract, one line each; empty for a service that kept it.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.failed > 0 {
            problems.push(format!(
                "{} requests failed; the first errors: {:?}",
                self.failed, self.errors
            ));
        }
        for stage in &self.stages {
            if stage.lost > 0 {
                problems.push(format!(
                    "after \"{}\": {} keys did not read back their last acknowledged value, \
                     among them {:?}",
                    stage.name, stage.lost, stage.wrong
                ));
            }
            if stage.counted_twice > 0 {
                problems.push(format!(
                    "after \"{}\": {} counters read more adds than were asked (an add that \
                     ran twice: a retry the service did not tell from a new add by its id), \
                     among them {:?}",
                    stage.name, stage.counted_twice, stage.wrong
                ));
            }
            if stage.writes == 0 {
                problems.push(format!(
                    "no write was acknowledged up to the end of \"{}\": the load did not run",
                    stage.name
                ));
            }
        }
        if self.reported_lost > 0 {
            problems.push(format!(
                "the services reported {} entries lost, though failures came one at a time",
                self.reported_lost
            ));
        }
        problems
    }

    /// Panics, saying what broke the contract and after which step, unless nothing did.
    #[track_caller]
    pub fn assert_conforms(&self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "the service broke its contract:\n- {}\n{self}",
            problems.join("\n- ")
        );
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ok ({} delayed), {} failed, {} failed through the cut-off node, {} lost, \
             {} counted twice, {} reported lost, {} changes",
            self.ok,
            self.delayed,
            self.failed,
            self.cut_off_failed,
            self.lost,
            self.counted_twice,
            self.reported_lost,
            self.changes
        )?;
        for stage in &self.stages {
            writeln!(
                f,
                "  {:<72} {:>7} writes {:>6} lost {:>4} counted twice",
                stage.name, stage.writes, stage.lost, stage.counted_twice
            )?;
        }
        Ok(())
    }
}

/// Runs `probe`'s service on a 3-node in-memory cluster over `keys` keys, with 16 writers
/// going on through nodes 1 and 2, and reads every key back through node 2 after each step,
/// the writers paused:
///
/// 1. a node added, then node 3 evicted, every batch of that eviction delivered twice (as a
///    sender whose call timed out just as its batch landed sends it again);
/// 2. if the service says it survives a failure: the added node fails; a node added dies in
///    its own eviction, before it sends anything out; a node dies as it joins, before it
///    passes on what it received (only copies its senders kept, or older replicas, can rebuild
///    that); a node added is cut off from the cluster while its own clients write to keys it
///    manages, and is declared failed (a write it acknowledged must have a copy elsewhere).
///
/// If the probe has [`Probe::add`], two more tasks add to 8 counters meanwhile, and each check
/// reads them back too: no fewer adds than were acknowledged, and no more than were asked.
///
/// A conforming service fails no request, loses no key, counts no add twice and reports
/// nothing lost:
/// [`Verdict::assert_conforms`] says so, or what broke and where. Run it under a paused tokio
/// clock ([`crate::testing::replay`]) to keep it deterministic and fast.
pub async fn conformance<P: Probe>(probe: P, keys: u64) -> Verdict {
    let probe = Arc::new(probe);
    let maker = Arc::clone(&probe);
    let mut cluster = MemCluster::start(3, HostConfig::default(), move || {
        let mut registry = Registry::new();
        registry.register(plugin(maker.make())).expect("the service registers");
        registry
    })
    .await;
    let service = probe.make().spec().id;
    let book = Arc::new(Mutex::new(Book::default()));
    let entry = cluster.host(NodeId(1));
    for key in 0..keys {
        let written = write(&entry, &*probe, service, key, key).await;
        book.lock().expect("book").record(key, key, written, false);
    }
    book.lock().expect("book").since = 0;

    // Writers keep going through every change, each from a node that stays, each on keys of
    // its own: a key's writes come one after another. A check takes the gate whole.
    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (host, probe) = (cluster.host(NodeId(1 + w % 2)), Arc::clone(&probe));
        let (book, gate, stop) = (Arc::clone(&book), Arc::clone(&gate), Arc::clone(&stop));
        writers.spawn(async move {
            for round in 1u64.. {
                for key in (w..keys).step_by(WRITERS as usize) {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let value = round * keys + key;
                    let _turn = gate.read().await;
                    let written = write(&host, &*probe, service, key, value).await;
                    book.lock().expect("book").record(key, value, written, false);
                    drop(_turn);
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
            }
        });
    }

    if probe.add(0).is_some() {
        let ids = Arc::new(std::sync::atomic::AtomicU64::new(1));
        for adder in 0..2 {
            let (host, probe) = (cluster.host(NodeId(1 + adder)), Arc::clone(&probe));
            let (book, gate, stop) = (Arc::clone(&book), Arc::clone(&gate), Arc::clone(&stop));
            let ids = Arc::clone(&ids);
            writers.spawn(async move {
                let counters: Vec<u64> =
                    (adder..COUNTERS).step_by(2).map(|c| keys + COUNTERS_FROM + c).collect();
                loop {
                    for &key in &counters {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let add = probe.add(id).expect("the probe adds");
                        let request = codec::encode(&add).expect("request encodes");
                        let _turn = gate.read().await;
                        let added = host.request(service, Key(key), request).await;
                        book.lock().expect("book").count(key, added.map(|_| ()));
                        drop(_turn);
                        tokio::time::sleep(Duration::from_micros(100)).await;
                    }
                }
            });
        }
    }

    let mut run = Run {
        probe: &*probe,
        service,
        book: &book,
        gate: &gate,
        stages: Vec::new(),
        reported: BTreeMap::new(),
    };
    tokio::time::sleep(SETTLE).await;
    let added = cluster.add().await;
    run.check(&cluster, format!("node {} joined", added.0)).await;
    tokio::time::sleep(SETTLE).await;
    // Its batches twice, as a sender whose call timed out as one landed sends it again.
    cluster.faults().batches_twice(true);
    cluster.evict(NodeId(3)).await;
    cluster.faults().batches_twice(false);
    run.check(&cluster, "node 3 was evicted, each of its batches delivered twice".into()).await;
    if probe.survives_one_failure() {
        tokio::time::sleep(SETTLE).await;
        cluster.fail(added).await;
        run.check(&cluster, format!("node {} failed", added.0)).await;
        tokio::time::sleep(SETTLE).await;
        let victim = cluster.add().await;
        run.check(&cluster, format!("node {} joined", victim.0)).await;
        tokio::time::sleep(SETTLE).await;
        cluster.change_and_crash(Change::Evict(victim), victim).await;
        let name = format!("node {} died in its own eviction, before it sent anything", victim.0);
        run.check(&cluster, name).await;
        tokio::time::sleep(SETTLE).await;
        let joiner = cluster.add_and_crash().await;
        let name = format!("node {} died as it joined, before it passed anything on", joiner.0);
        run.check(&cluster, name).await;
        tokio::time::sleep(SETTLE).await;
        let cut = cluster.add().await;
        run.check(&cluster, format!("node {} joined", cut.0)).await;
        tokio::time::sleep(SETTLE).await;
        cut_off(&mut cluster, &run, cut, keys).await;
        let name =
            format!("node {} was cut off as its own clients wrote, and declared failed", cut.0);
        run.check(&cluster, name).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.expect("writer task");
    }

    let book = book.lock().expect("book");
    let mut verdict = Verdict {
        ok: book.ok,
        failed: book.failed,
        cut_off_failed: book.cut_off_failed,
        changes: cluster.epoch(),
        errors: book.errors.clone(),
        ..Verdict::default()
    };
    for node in cluster.nodes() {
        verdict.delayed += cluster.host(node).stats().requests_delayed;
    }
    run.note_reports(&cluster);
    verdict.reported_lost = run.reported.values().sum();
    verdict.lost = run.stages.iter().map(|s| s.lost).sum();
    verdict.counted_twice = run.stages.iter().map(|s| s.counted_twice).sum();
    verdict.stages = run.stages;
    verdict
}

/// Cuts `node` off, lets its own clients write to keys it manages (apart from the writers'),
/// then has the cluster declare it failed.
async fn cut_off<P: Probe>(cluster: &mut MemCluster, run: &Run<'_, P>, node: NodeId, keys: u64) {
    let table = cluster.snapshot();
    let mine: Vec<u64> = (keys..keys + 1_000_000)
        .filter(|&k| table.locate(run.service, Key(k)) == Some(node))
        .take(CUT_OFF_KEYS)
        .collect();
    let through = cluster.host(NodeId(2));
    for &key in &mine {
        let written = write(&through, run.probe, run.service, key, 0).await;
        run.book.lock().expect("book").record(key, 0, written, false);
    }
    cluster.crash(node);
    let host = cluster.host(node);
    let mut clients = tokio::task::JoinSet::new();
    for key in mine {
        let (host, book) = (host.clone(), Arc::clone(run.book));
        let request = codec::encode(&run.probe.write(1)).expect("request encodes");
        let service = run.service;
        clients.spawn(async move {
            let written = host.request(service, Key(key), request).await.map(|_| ());
            let written = written.map_err(|e| e.to_string());
            book.lock().expect("book").record(key, 1, written, true);
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    cluster.fail_cut_off(node).await;
    // The clients' writes wait for their deadline: the writers need not run meanwhile.
    let _paused = run.gate.write().await;
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
}

/// What the writers' requests did.
#[derive(Default)]
struct Book {
    /// Per key, the last value a write acknowledged, and the values of writes that failed
    /// since: those may have taken effect.
    keys: BTreeMap<u64, (u64, Vec<u64>)>,
    /// Per counter, the adds acknowledged, and those that failed: they may have counted.
    counts: BTreeMap<u64, (u64, u64)>,
    ok: u64,
    failed: u64,
    cut_off_failed: u64,
    errors: Vec<String>,
    /// Writes acknowledged since the last check.
    since: u64,
}

impl Book {
    fn count(&mut self, key: u64, added: Result<(), crate::AdaptationError>) {
        let (acknowledged, unsure) = self.counts.entry(key).or_default();
        match added {
            Ok(()) => {
                *acknowledged += 1;
                self.ok += 1;
                self.since += 1;
            }
            Err(e) => {
                *unsure += 1;
                self.failed += 1;
                if self.errors.len() < ERRORS {
                    self.errors.push(format!("counter {key}: {e}"));
                }
            }
        }
    }

    fn record(&mut self, key: u64, value: u64, written: Result<(), String>, cut_off: bool) {
        match written {
            Ok(()) => {
                self.ok += 1;
                self.since += 1;
                self.keys.insert(key, (value, Vec::new()));
            }
            Err(e) => {
                if cut_off {
                    self.cut_off_failed += 1;
                } else {
                    self.failed += 1;
                    if self.errors.len() < ERRORS {
                        self.errors.push(format!("key {key}: {e}"));
                    }
                }
                if let Some((_, maybe)) = self.keys.get_mut(&key) {
                    maybe.push(value);
                }
            }
        }
    }
}

/// The checks of one run.
struct Run<'a, P: Probe> {
    probe: &'a P,
    service: ServiceId,
    book: &'a Arc<Mutex<Book>>,
    gate: &'a Arc<RwLock<()>>,
    stages: Vec<Stage>,
    /// What each node last reported lost: a node that leaves later takes its count along.
    reported: BTreeMap<NodeId, u64>,
}

impl<P: Probe> Run<'_, P> {
    fn note_reports(&mut self, cluster: &MemCluster) {
        for node in cluster.nodes() {
            let reported = cluster.host(node).stats().reported_lost.values().sum();
            self.reported.insert(node, reported);
        }
    }

    /// Pauses the writers, reads every key written through node 2, and names the step.
    async fn check(&mut self, cluster: &MemCluster, name: String) {
        self.note_reports(cluster);
        let _paused = self.gate.write().await;
        let (keys, counts, writes) = {
            let mut book = self.book.lock().expect("book");
            (book.keys.clone(), book.counts.clone(), std::mem::take(&mut book.since))
        };
        let mut stage = Stage { name, writes, lost: 0, counted_twice: 0, wrong: Vec::new() };
        for (key, (expected, maybe)) in keys {
            let got = self.read(cluster, key).await;
            let fine = matches!(got, Ok(Some(v)) if v == expected || maybe.contains(&v));
            if !fine {
                stage.lost += 1;
                if stage.wrong.len() < NAMED {
                    stage.wrong.push(Wrong { key, expected, got });
                }
            }
        }
        for (key, (acknowledged, unsure)) in counts {
            let got = self.read(cluster, key).await;
            let counted = match &got {
                Ok(value) => value.unwrap_or(0),
                Err(_) => 0,
            };
            let twice = counted > acknowledged + unsure;
            if counted < acknowledged || twice {
                if twice {
                    stage.counted_twice += 1;
                } else {
                    stage.lost += 1;
                }
                if stage.wrong.len() < NAMED {
                    stage.wrong.push(Wrong { key, expected: acknowledged, got });
                }
            }
        }
        self.stages.push(stage);
    }

    /// What a read of `key` through node 2 returns.
    async fn read(&self, cluster: &MemCluster, key: u64) -> Result<Option<u64>, String> {
        let read = codec::encode(&self.probe.read()).expect("request encodes");
        match cluster.host(NodeId(2)).request(self.service, Key(key), read).await {
            Ok(bytes) => codec::decode(&bytes)
                .map(|response| self.probe.value(response))
                .map_err(|e| format!("the answer did not decode: {e}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

async fn write<P: Probe>(
    host: &Host,
    probe: &P,
    service: ServiceId,
    key: u64,
    value: u64,
) -> Result<(), String> {
    let request = codec::encode(&probe.write(value)).expect("request encodes");
    host.request(service, Key(key), request).await.map(|_| ()).map_err(|e| e.to_string())
}
