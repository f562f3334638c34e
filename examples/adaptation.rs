//! What the adaptation layer costs, each figure against its baseline in the same run:
//!
//! - request round trip through the router (host → manager over the agents' TCP transport)
//!   against two raw TCP echoes of the same size, one request in flight, on tokio: one whose
//!   caller reads its answer from the socket itself, and one with the transport's I/O model
//!   (many calls share a connection, a reading task hands each answer to its caller);
//! - a request redirected once (sent to a node that no longer manages the key, which passes it
//!   on to the manager and relays its reply) against the same echoes; and, for
//!   comparison, the same request told `Moved` and sent again (two round trips);
//! - pipelined requests per second to one manager;
//! - migration throughput (entries/s, MB/s) as nodes join one by one (`--joins`, the median
//!   join shown), each against raw loopback TCP moving the same bytes in the same write sizes,
//!   one connection per sender carrying its bytes, all at once (the median of three transfers),
//!   the bytes kept where they land in memory fresh from the kernel, as a joiner keeps its
//!   entries (the target), and in memory touched before (TCP at its best, for comparison);
//! - the same round trip and the transport's ping with cold caches (each after megabytes were
//!   written on both sides), for what the layer costs a program whose own work evicts it; and,
//!   just as cold, a typed get routed against the same get told to its manager's local server:
//!   what the DSM's DYN pays over its STAT per remote request.
//!
//! The latencies are taken in rounds, one sample of each path per round and each path first as
//! often as the others, so that a figure and its baselines see the same state of the machine.
//! The same paths are then timed in runs of their own, taking turns, and printed apart: on a VM
//! whose idle vCPUs wake slowly, a path's p50 depends on what ran just before it, and the two
//! layouts can disagree, most for the multiplexed echo.
//!
//! `cargo run --release --example adaptation [-- --samples 20000 --entries 180000 --value-bytes 1024 --cold 2000 --joins 5]`
//!
//! `-- --only routed|typed|tell|ping|echo|mux [--count 10000] [--evict]` runs one path alone
//! (each request after the caches were filled, with `--evict`) and exits,
//! for a profiler: under `valgrind --tool=callgrind`, the difference of two counts (13,000 and
//! 3,000 iterations, say) divided by 10,000 is what one operation of the path costs. `typed` is
//! the get a service's code sends through the router, `tell` the same get sent straight to the
//! manager's local server (as the DSM's STAT sends): their difference is what routing costs.
//!
//! 180,000 entries of 1 KiB: the joins move 27 to 63 MB each, 20 to 95 ms of sending. A change
//! has a start that does not grow with what it moves: its participants begin one to five
//! milliseconds apart, the joiner last, and the bytes wait for it. With 60,000 entries (9 to
//! 21 MB a join) that start was a quarter of a window, and the median join ranged from 51% to
//! 70% of raw TCP over nine runs; with 180,000, from 61% to 97% (BENCHMARKS.md, adaptation
//! layer, stop 46). With 20,000, the phase lasted a few milliseconds, and a page fault or a
//! vCPU waking late moved the figure by a third from one run to the next.
//!
//! The agents share this process, and every joiner after the first receives into memory the
//! allocator recycled from the others' frees, which a joiner in a process of its own does not
//! have: its median join flatters the migration. `examples/migration.rs` runs every agent as a
//! process of its own, against the same baseline (42% to 52% in stop 46).

use gobelins_adaptation::wire::{Message, Reply, RequestId, Routed};
use gobelins_adaptation::{codec, HostConfig, Link};
use gobelins_kvdir::{Request, Response, KVDIR};
use gobelins_locator::Labels;
use gobelins_locator::{Key, NodeId};
use gobelins_supervisor::agent::{Agent, AgentOptions, Start};
use gobelins_supervisor::link::TransportLink;
use gobelins_supervisor::net::TokioNet;
use gobelins_supervisor::state::NodeStatus;
use gobelins_supervisor::transport::Transport;
use gobelins_supervisor::SupervisorConfig;
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "bench/mod.rs"]
mod bench;
use bench::arg;
use bench::raw::{raw_median, Landing};

fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn free_addr() -> String {
    StdListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").to_string()
}

fn options(root: &Path, id: u64, start: Start) -> AgentOptions {
    AgentOptions {
        data_dir: root.join(format!("n{id}")),
        listen: free_addr(),
        advertise: None,
        start,
        secret_file: Some(root.join("n1/cluster.secret")),
        labels: Labels::new(),
        node_id: Some(id),
        config: SupervisorConfig::loopback(),
        durable: true,
        host: HostConfig::default(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Bytes written between two cold samples: more than a core's private caches hold.
const EVICT_BYTES: usize = 4 << 20;

/// Writes a byte into every cache line of `scratch`, on this thread and, at the same time, on
/// a runtime worker (the one likely to serve the next request): what a program's own work does
/// to the layer's code and data between two of its requests, as MGS's does on the DSM.
async fn evict(scratch: &mut [u8], other: &Arc<std::sync::Mutex<Vec<u8>>>, round: usize) {
    let other = Arc::clone(other);
    let worker = tokio::spawn(async move {
        let mut other = other.lock().expect("scratch");
        for line in other.chunks_mut(64) {
            line[0] = line[0].wrapping_add(round as u8);
        }
    });
    for line in scratch.chunks_mut(64) {
        line[0] = line[0].wrapping_add(round as u8);
    }
    worker.await.expect("eviction");
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Starts a server that sends every length-prefixed frame back as it reads it, on one
/// connection; returns its address.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let Ok(len) = socket.read_u32().await else { return };
            let body = &mut buf[..len as usize];
            if socket.read_exact(body).await.is_err() {
                return;
            }
            let mut frame = Vec::with_capacity(4 + body.len());
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(body);
            if socket.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    addr
}

/// A raw length-prefixed echo over loopback TCP, one request in flight.
struct Echo {
    socket: TcpStream,
    frame: Vec<u8>,
    back: Vec<u8>,
}

impl Echo {
    async fn start(size: usize) -> Echo {
        let addr = echo_server().await;
        let socket = TcpStream::connect(addr).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&(size as u32).to_be_bytes());
        frame.extend_from_slice(&vec![7u8; size]);
        Echo { socket, frame, back: vec![0u8; size] }
    }

    async fn round_trip(&mut self) -> Duration {
        let t = Instant::now();
        self.socket.write_all(&self.frame).await.expect("write");
        let len = self.socket.read_u32().await.expect("read len");
        self.socket.read_exact(&mut self.back[..len as usize]).await.expect("read body");
        t.elapsed()
    }
}

type Waiters =
    Arc<std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Vec<u8>>>>>;

/// A raw echo with the transport's I/O model: one connection carries many calls, a caller
/// writes its numbered request itself, and a reading task hands each answer to its caller by
/// number; the server answers on the socket as it reads. No framing codec, handshake, routing
/// or encoding: what is left between this and the transport is ours.
struct MuxEcho {
    writer: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    waiters: Waiters,
    frame: Vec<u8>,
    next: u64,
}

impl MuxEcho {
    async fn start(size: usize) -> MuxEcho {
        let addr = echo_server().await;
        let socket = TcpStream::connect(addr).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        let (mut read, write) = socket.into_split();
        let waiters: Waiters = Arc::default();
        let dispatch = Arc::clone(&waiters);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let Ok(len) = read.read_u32().await else { return };
                let body = &mut buf[..len as usize];
                if read.read_exact(body).await.is_err() {
                    return;
                }
                let id = u64::from_be_bytes(body[..8].try_into().expect("an id"));
                if let Some(waiter) = dispatch.lock().expect("waiters").remove(&id) {
                    let _ = waiter.send(body.to_vec());
                }
            }
        });
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&(size.max(8) as u32).to_be_bytes());
        frame.extend_from_slice(&vec![7u8; size.max(8)]);
        MuxEcho { writer: Arc::new(tokio::sync::Mutex::new(write)), waiters, frame, next: 0 }
    }

    async fn round_trip(&mut self) -> Duration {
        let t = Instant::now();
        self.next += 1;
        self.frame[4..12].copy_from_slice(&self.next.to_be_bytes());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.lock().expect("waiters").insert(self.next, tx);
        self.writer.lock().await.write_all(&self.frame).await.expect("write");
        rx.await.expect("answer");
        t.elapsed()
    }
}

/// One node's join: what its senders shipped, how long their sending phase took, and raw
/// loopback TCP moving the same bytes in the same write sizes just after, one connection per
/// sender carrying that sender's bytes, all at once (each the median of three).
struct Migration {
    node: u64,
    bytes: u64,
    moved: u64,
    sending_ms: f64,
    /// The slowest participant's after-migration phase: copying what it received, or every
    /// entry if its backup is new, to its backup.
    after_ms: f64,
    /// The longest a participant held the requests for the keys that moved: from its start of
    /// the change to their release, after its merge.
    held_ms: f64,
    /// The longest a participant took from its start of the change to its report of done.
    done_ms: f64,
    /// How long the first sender waited for the joiner to begin the change, and the time from
    /// then (or from the first sender's start, if later) to the last sender's end: the
    /// migration while its receiver could stage what came. A receiver stages nothing before it
    /// has begun, and a joiner learns of its own join last (BENCHMARKS.md, adaptation layer,
    /// stop 40).
    waited_ms: f64,
    moving_ms: f64,
    raw: Duration,
    /// Every byte its own, kept in memory touched before the clock (median of three).
    raw_touched: Duration,
    /// Every byte its own, kept in fresh memory, as the joiner keeps what it receives (median of
    /// three): the baseline the target is judged against.
    raw_fresh: Duration,
}

impl Migration {
    fn ours_mbs(&self) -> f64 {
        self.bytes as f64 / 1e6 / (self.sending_ms / 1e3)
    }

    /// Throughput while the receiver could stage the bytes.
    fn moving_mbs(&self) -> f64 {
        self.bytes as f64 / 1e6 / (self.moving_ms / 1e3)
    }

    fn mbs(&self, raw: Duration) -> f64 {
        self.bytes as f64 / 1e6 / raw.as_secs_f64()
    }

    /// The migration's throughput over raw TCP's when every byte is its own and lands in fresh
    /// memory, as a migration's do.
    fn per_byte_ratio(&self) -> f64 {
        self.ours_mbs() / self.mbs(self.raw_fresh)
    }

    /// The same over raw TCP into memory touched before: what page faults on the joiner cost
    /// the migration, next to the wire.
    fn touched_ratio(&self) -> f64 {
        self.ours_mbs() / self.mbs(self.raw_touched)
    }
}

/// Starts node `id`, joining through `seed`, waits until the cluster is stable with it active,
/// and measures the migration `senders` made for it.
async fn join_and_measure(
    root: &tempfile::TempDir,
    seed: &str,
    id: u64,
    senders: &[&Agent<TokioNet>],
) -> (Agent<TokioNet>, Migration) {
    let before: Vec<_> = senders.iter().map(|s| s.supervisor.host().stats()).collect();
    let joined = Agent::start(
        TokioNet,
        &options(root.path(), id, Start::Join(seed.to_string())),
        gobelins::services,
    )
    .await
    .expect("join");
    let first = &senders[0].supervisor;
    while !(first.state().is_stable()
        && first.state().nodes.get(&id).is_some_and(|r| r.status == NodeStatus::Active))
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let epoch = first.state().epoch;
    let (mut bytes, mut moved, mut sending_ms) = (0, 0, 0.0f64);
    let mut shares = Vec::new();
    for (sender, before) in senders.iter().zip(&before) {
        let host = sender.supervisor.host();
        let stats = host.stats();
        let sent = stats.bytes_sent - before.bytes_sent;
        if sent > 0 {
            shares.push(sent as usize);
        }
        bytes += sent;
        moved += stats.entries_sent - before.entries_sent;
        if let Some(r) = host.history().iter().find(|r| r.epoch == epoch) {
            sending_ms = sending_ms.max(r.sending_ms);
        }
    }
    let slowest = |of: fn(&gobelins_adaptation::ChangeRecord) -> f64| {
        senders
            .iter()
            .map(|s| &s.supervisor)
            .chain([&joined.supervisor])
            .filter_map(|s| s.host().history().iter().find(|r| r.epoch == epoch).map(of))
            .fold(0.0f64, f64::max)
    };
    let (after_ms, held_ms) = (slowest(|r| r.after_ms), slowest(|r| r.held_ms));
    // Until stop 49, requests were released as the change was reported done.
    let done_ms = slowest(|r| r.before_ms + r.sending_ms + r.receiving_ms + r.after_ms);
    let record = |s: &Arc<gobelins_supervisor::Supervisor>| {
        s.host().history().iter().find(|r| r.epoch == epoch).cloned()
    };
    let windows: Vec<_> = senders.iter().filter_map(|s| record(&s.supervisor)?.sending).collect();
    let joiner_begun = record(&joined.supervisor).and_then(|r| r.begun_at);
    let (waited_ms, moving_ms) = match (
        windows.iter().map(|w| w.0).min(),
        windows.iter().map(|w| w.1).max(),
        joiner_begun,
    ) {
        (Some(first), Some(last), Some(begun)) => {
            let from = first.max(begun);
            ((from - first).as_secs_f64() * 1e3, (last - from).as_secs_f64() * 1e3)
        }
        _ => (0.0, sending_ms),
    };
    let batch_bytes = HostConfig::default().batch_bytes;
    // Once the change is stable, the joiner's kvdir copies what it received into memory of
    // its own, in the background: the baselines must not share the cores with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let raw = raw_median(&shares, batch_bytes, Landing::Reused).await;
    let raw_touched = raw_median(&shares, batch_bytes, Landing::Touched).await;
    let raw_fresh = raw_median(&shares, batch_bytes, Landing::Fresh).await;
    (
        joined,
        Migration {
            node: id,
            bytes,
            moved,
            sending_ms,
            after_ms,
            held_ms,
            done_ms,
            waited_ms,
            moving_ms,
            raw,
            raw_touched,
            raw_fresh,
        },
    )
}

async fn put(agent: &Agent<TokioNet>, key: u64, value: Vec<u8>) {
    let body = codec::encode(&Request::Put(value)).expect("encode");
    let answer = agent.supervisor.host().request(KVDIR, Key(key), body).await.expect("put");
    let response: Response = codec::decode(&answer).expect("decode");
    assert!(matches!(response, Response::Stored { .. }));
}

/// The p50 of the last 500 samples: one block's.
fn block_p50(all: &[Duration]) -> f64 {
    let mut block = all[all.len() - 500..].to_vec();
    block.sort();
    percentile(&block, 0.5).as_secs_f64()
}

fn main() {
    // Quiet unless asked: `RUST_LOG=gobelins_adaptation=trace` shows each batch shipped.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let samples = arg("--samples", 20_000);
    let entries = arg("--entries", 180_000);
    let value_bytes = arg("--value-bytes", 1024);
    let migration_rounds = arg("--joins", 5).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let root = tempfile::tempdir().expect("temp dir");
        let first_options = options(root.path(), 1, Start::Bootstrap);
        let seed = first_options.listen.clone();
        let a = Agent::start(TokioNet, &first_options, gobelins::services).await.expect("boot");
        let b = Agent::start(TokioNet, &options(root.path(), 2, Start::Join(seed.clone())), gobelins::services)
            .await
            .expect("join");
        // Wait for kvdir to be registered and the cluster stable.
        let get = codec::encode(&Request::Get).expect("encode");
        while a.supervisor.host().request(KVDIR, Key(0), get.clone()).await.is_err()
            || !a.supervisor.state().is_stable()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let snapshot = a.supervisor.state().tree.snapshot(gobelins_locator::Epoch(0)).expect("snap");
        let remote: Vec<Key> =
            (0..).map(Key).filter(|&k| snapshot.locate(KVDIR, k) == Some(NodeId(2))).take(1024).collect();

        // Request round trip: Get of a key node 2 manages, from node 1.
        let host = a.supervisor.host().clone();
        for k in &remote {
            host.request(KVDIR, *k, get.clone()).await.expect("warm up");
        }
        let request_bytes = {
            let m = Message::Request(Routed {
                id: RequestId { origin: NodeId(1), seq: 1 },
                service: KVDIR,
                key: remote[0],
                epoch: 1,
                body: get.clone().into(),
                wait_ms: 10_000,
                settled: Default::default(),
                repeatable: true,
            });
            // As the layer lays it out (its header by hand), not as bincode would.
            gobelins_supervisor::lane::Lane::Adaptation.seal(m.encode().expect("m")).len()
        };
        // Interleaved in blocks, so that each path and its baselines see the same machine.
        let mut echo_client = Echo::start(request_bytes).await;
        let mut mux_client = MuxEcho::start(request_bytes).await;
        // The transport alone: a supervisor ping, answered without the adaptation layer.
        let ping = gobelins_supervisor::lane::request(&gobelins_supervisor::rpc::Request::Ping).expect("e");
        // One path alone, `--count` times, then out: for a profiler, which counts what a
        // path costs as the difference of two counts (see BENCHMARKS.md, stop 22).
        if let Some(path) = text_arg("--only") {
            let count = arg("--count", 10_000);
            // With `--evict`, each request goes after the caches were filled with other data,
            // as in the cold rounds: under callgrind's cache simulation, the misses a cold
            // request takes.
            let evicting = std::env::args().any(|a| a == "--evict");
            let mut scratch = vec![0u8; if evicting { EVICT_BYTES } else { 0 }];
            let other = Arc::new(std::sync::Mutex::new(scratch.clone()));
            let mut took = Vec::with_capacity(count);
            for i in 0..count {
                if evicting {
                    evict(&mut scratch, &other, i).await;
                }
                let t = Instant::now();
                match path.as_str() {
                    "routed" => {
                        host.request(KVDIR, remote[i % remote.len()], get.clone()).await.expect("get");
                    }
                    "ping" => {
                        a.transport.call(2, ping.clone(), Duration::from_secs(5)).await.expect("ping");
                    }
                    // The same get, typed, through the router (as a service's own requests go),
                    // and told straight to node 2's local server (the DSM's STAT): what routing
                    // costs over a request sent where the caller already knows.
                    "typed" => {
                        let k = remote[i % remote.len()];
                        let _: Response = host.context().request(KVDIR, k, &Request::Get).await.expect("typed");
                    }
                    "tell" => {
                        let k = remote[i % remote.len()];
                        let _: Response = host.context().tell(NodeId(2), KVDIR, k, &Request::Get).await.expect("tell");
                    }
                    "echo" => {
                        echo_client.round_trip().await;
                    }
                    "mux" => {
                        mux_client.round_trip().await;
                    }
                    other => panic!("--only takes routed, typed, tell, ping, echo or mux, not {other}"),
                }
                took.push(t.elapsed());
            }
            took.sort();
            println!("{path}: {count} in a row, p50 {}", us(percentile(&took, 0.5)));
            // Out by the agents' stop and the data directory's drop: an exit here left both
            // nodes' directories, cluster secret included, in the temporary directory each run.
            b.stop().await;
            a.stop().await;
            return;
        }
        let (mut routed, mut echo, mut mux, mut pings) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Per block: the routed p50 over the two echoes' p50s.
        let mut blocks: Vec<[f64; 2]> = Vec::new();
        for block in 0..samples / 500 {
            // Each round takes one sample of every path in turn, so that all of them see the
            // same machine: its speed changes within a block too (idle vCPUs waking slowly, or
            // not), and a path measured apart from its baseline caught a different speed.
            for i in 0..500 {
                let k = remote[(block * 500 + i) % remote.len()];
                // Each path takes each place in the round in turn: what one path leaves running
                // (a task finishing, a vCPU still awake) speeds up the one after it.
                for turn in 0..4 {
                    match (turn + i) % 4 {
                        0 => {
                            let t = Instant::now();
                            host.request(KVDIR, k, get.clone()).await.expect("get");
                            routed.push(t.elapsed());
                        }
                        1 => echo.push(echo_client.round_trip().await),
                        2 => mux.push(mux_client.round_trip().await),
                        _ => {
                            let t = Instant::now();
                            a.transport.call(2, ping.clone(), Duration::from_secs(5)).await.expect("ping");
                            pings.push(t.elapsed());
                        }
                    }
                }
            }
            let (r, e, m) = (block_p50(&routed), block_p50(&echo), block_p50(&mux));
            blocks.push([r / e, r / m]);
        }
        for v in [&mut routed, &mut echo, &mut mux, &mut pings] {
            v.sort();
        }

        // The same paths in runs of their own, taking turns: how much each p50 owes to what ran
        // just before it. On a VM whose idle vCPUs wake slowly, the interleaved rounds and
        // these runs can disagree by a third for one path and not at all for another.
        let run_length = (samples / 8).max(100);
        let mut runs: [Vec<Duration>; 4] = Default::default();
        for turn in 0..8 {
            let path = turn % 4;
            for i in 0..run_length {
                let sample = match path {
                    0 => {
                        let t = Instant::now();
                        host.request(KVDIR, remote[i % remote.len()], get.clone()).await.expect("get");
                        t.elapsed()
                    }
                    1 => {
                        let t = Instant::now();
                        a.transport.call(2, ping.clone(), Duration::from_secs(5)).await.expect("ping");
                        t.elapsed()
                    }
                    2 => echo_client.round_trip().await,
                    _ => mux_client.round_trip().await,
                };
                runs[path].push(sample);
            }
        }
        for v in &mut runs {
            v.sort();
        }

        // Cold: the routed request, the ping, and the typed get routed and told, taking turns,
        // each after the caches were filled with other data on both sides. The routed request
        // over the ping is what the layer costs a program whose own work evicts it between
        // requests; the typed get routed over the same get told to its manager's local server
        // is what the DSM's DYN pays over its STAT per remote request (MGS, issue 5).
        let cold_samples = arg("--cold", 2_000);
        let mut scratch = vec![0u8; EVICT_BYTES];
        let other = Arc::new(std::sync::Mutex::new(vec![0u8; EVICT_BYTES]));
        let mut cold: [Vec<Duration>; 4] = Default::default();
        // Per round, the typed get routed less the same get told, in nanoseconds: paired, so
        // that the machine's drift from round to round cancels.
        let mut routing_cold = Vec::with_capacity(cold_samples);
        let ctx = host.context();
        for i in 0..cold_samples {
            let k = remote[i % remote.len()];
            let mut took = [Duration::ZERO; 4];
            for turn in 0..4 {
                let path = (turn + i) % 4;
                evict(&mut scratch, &other, i).await;
                let t = Instant::now();
                match path {
                    0 => {
                        host.request(KVDIR, k, get.clone()).await.expect("get");
                    }
                    1 => {
                        a.transport.call(2, ping.clone(), Duration::from_secs(5)).await.expect("ping");
                    }
                    2 => {
                        let _: Response = ctx.request(KVDIR, k, &Request::Get).await.expect("typed");
                    }
                    _ => {
                        let _: Response = ctx.tell(NodeId(2), KVDIR, k, &Request::Get).await.expect("told");
                    }
                }
                took[path] = t.elapsed();
                cold[path].push(took[path]);
            }
            routing_cold.push(took[2].as_nanos() as i64 - took[3].as_nanos() as i64);
        }
        for v in cold.iter_mut() {
            v.sort();
        }
        routing_cold.sort();
        let [cold_routed, cold_pings, cold_typed, cold_told] = cold;

        // Pipelined: 256 requests in flight from node 1 to node 2's keys for 2 s.
        let stop = Instant::now() + Duration::from_secs(2);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..256usize {
            let (host, get, keys) = (host.clone(), get.clone(), remote.clone());
            tasks.spawn(async move {
                let mut n = 0u64;
                let mut i = w;
                while Instant::now() < stop {
                    host.request(KVDIR, keys[i % keys.len()], get.clone()).await.expect("get");
                    n += 1;
                    i += 7;
                }
                n
            });
        }
        let started = Instant::now();
        let mut done = 0;
        while let Some(n) = tasks.join_next().await {
            done += n.expect("task");
        }
        let per_second = done as f64 / started.elapsed().as_secs_f64();

        // Migration: fill, then add node 3 and time what the senders ship.
        let value = vec![5u8; value_bytes];
        let mut fill = tokio::task::JoinSet::new();
        let a = Arc::new(a);
        for w in 0..32u64 {
            let (a, value) = (Arc::clone(&a), value.clone());
            let entries = entries as u64;
            fill.spawn(async move {
                for key in (w..entries).step_by(32) {
                    put(&a, key, value.clone()).await;
                }
            });
        }
        while fill.join_next().await.is_some() {}
        let (c, first) = join_and_measure(&root, &seed, 3, &[&*a, &b]).await;
        let mut migrations = vec![first];

        // Redirected once, now that there are three nodes: node 1 sends to node 3 (as a sender
        // routing by an old epoch would), which passes the request on to node 2, its manager,
        // and relays node 2's reply to node 1. Without forwarding: node 2 asks node 1, which
        // does not manage the key and says so (a request whose origin is not its sender is not
        // passed on), then asks the manager. Measured apart from the direct round trips, against
        // echoes of its own, taken with node 3 joined.
        let snapshot = a.supervisor.state().tree.snapshot(gobelins_locator::Epoch(0)).expect("snap");
        let managed_by_2: Vec<Key> =
            (0..).map(Key).filter(|&k| snapshot.locate(KVDIR, k) == Some(NodeId(2))).take(1024).collect();
        let link = TransportLink::new(Arc::new(a.transport.clone()) as Arc<dyn Transport>);
        let wrong = TransportLink::new(Arc::new(b.transport.clone()) as Arc<dyn Transport>);
        let epoch = host.epoch();
        let (mut redirected, mut asked_again, mut echo_r, mut mux_r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut blocks_r: Vec<[f64; 4]> = Vec::new();
        for block in 0..samples / 500 {
            for i in 0..500 {
                let n = block * 500 + i;
                let k = managed_by_2[n % managed_by_2.len()];
                for turn in 0..4 {
                    match (turn + i) % 4 {
                        0 => {
                            let t = Instant::now();
                            host.request_via(NodeId(3), KVDIR, k, get.clone()).await.expect("redirected");
                            redirected.push(t.elapsed());
                        }
                        1 => echo_r.push(echo_client.round_trip().await),
                        2 => mux_r.push(mux_client.round_trip().await),
                        _ => {
                            let message = Message::Request(Routed {
                                id: RequestId { origin: NodeId(99), seq: (1u64 << 40) + n as u64 },
                                service: KVDIR,
                                key: k,
                                epoch,
                                body: get.clone().into(),
                                wait_ms: 10_000,
                                settled: Default::default(),
                                repeatable: true,
                            });
                            let bytes = link.seal(message.encode().expect("encode"));
                            let t = Instant::now();
                            let first =
                                wrong.call(NodeId(1), bytes.clone(), Duration::from_secs(5)).await.expect("call");
                            assert!(matches!(Reply::decode(&first).expect("d"), Reply::Moved { .. }));
                            let second = link.call(NodeId(2), bytes, Duration::from_secs(5)).await.expect("call");
                            assert!(matches!(Reply::decode(&second).expect("d"), Reply::Done(_)));
                            asked_again.push(t.elapsed());
                        }
                    }
                }
            }
            let (e, m) = (block_p50(&echo_r), block_p50(&mux_r));
            let (d, g) = (block_p50(&redirected), block_p50(&asked_again));
            blocks_r.push([d / e, d / m, g / e, g / m]);
        }
        for v in [&mut redirected, &mut asked_again, &mut echo_r, &mut mux_r] {
            v.sort();
        }

        // More joins, each measured against raw TCP right after it: one migration is tens of
        // milliseconds, and a page fault or a late vCPU moved the one figure by a third from
        // run to run. The row shows the join whose ratio to per-byte raw TCP is the median.
        let mut joined = vec![c];
        for id in 4..3 + migration_rounds as u64 {
            let mut senders: Vec<&Agent<TokioNet>> = vec![&*a, &b];
            senders.extend(joined.iter());
            let (next, migration) = join_and_measure(&root, &seed, id, &senders).await;
            migrations.push(migration);
            joined.push(next);
        }

        println!("| figure | ours | raw echo, caller reads | ratio | raw echo, multiplexed (the transport's I/O model) | ratio | target |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let (r50, r99) = (percentile(&routed, 0.5), percentile(&routed, 0.99));
        let (e50, e99) = (percentile(&echo, 0.5), percentile(&echo, 0.99));
        let (m50, m99) = (percentile(&mux, 0.5), percentile(&mux, 0.99));
        let row = |figure: &str, ours: Duration, echo: Duration, mux: Duration, target: &str| {
            let ratio = |base: Duration| ours.as_secs_f64() / base.as_secs_f64();
            println!(
                "| {figure} | {} | {} | {:.2}x | {} | {:.2}x | {target} |",
                us(ours), us(echo), ratio(echo), us(mux), ratio(mux)
            );
        };
        row(&format!("request round trip p50 ({request_bytes} B)"), r50, e50, m50, "≤ 1.15x");
        row("request round trip p99", r99, e99, m99, "≤ 1.3x");
        row("transport call alone (supervisor ping, no adaptation layer), p50", percentile(&pings, 0.5), e50, m50, "");
        let (er50, mr50) = (percentile(&echo_r, 0.5), percentile(&mux_r, 0.5));
        row("redirected once (passed on by the node asked), p50, against its own section's echoes", percentile(&redirected, 0.5), er50, mr50, "≤ 2.2x");
        row("told Moved and sent again (no forwarding), p50, same section", percentile(&asked_again, 0.5), er50, mr50, "");
        println!("| pipelined requests to one manager (256 in flight) | {per_second:.0}/s | | | | | ≥ 100,000/s |");
        // The join whose `ratio` is the median: each row shows its own.
        let median_join = |ratio: fn(&Migration) -> f64| {
            let mut by_ratio: Vec<&Migration> = migrations.iter().collect();
            by_ratio.sort_by(|x, y| ratio(x).total_cmp(&ratio(y)));
            by_ratio[by_ratio.len() / 2]
        };
        let m = median_join(Migration::per_byte_ratio);
        println!(
            "| migration on join (median of {} joins; this one {} entries of {value_bytes} B, {:.1} MB) | {:.0} entries/s, {:.0} MB/s | raw TCP, one chunk sent again and again: {:.0} MB/s | {:.0}% | raw TCP, every byte its own (read where it lies, kept where it lands, in memory fresh from the kernel as a joiner's): {:.0} MB/s | {:.0}% | ≥ 60% |",
            migrations.len(),
            m.moved,
            m.bytes as f64 / 1e6,
            m.moved as f64 / (m.sending_ms / 1e3),
            m.ours_mbs(),
            m.mbs(m.raw),
            100.0 * m.ours_mbs() / m.mbs(m.raw),
            m.mbs(m.raw_fresh),
            100.0 * m.per_byte_ratio()
        );
        let t = median_join(Migration::touched_ratio);
        println!(
            "| migration on join against raw TCP with every byte its own kept in memory touched before the clock, no page faults: TCP at its best (the median join by this ratio: node {}, {:.1} MB) | {:.0} entries/s, {:.0} MB/s | raw TCP into touched memory: {:.0} MB/s | {:.0}% | | | |",
            t.node,
            t.bytes as f64 / 1e6,
            t.moved as f64 / (t.sending_ms / 1e3),
            t.ours_mbs(),
            t.mbs(t.raw_touched),
            100.0 * t.touched_ratio()
        );
        let w = median_join(|m| m.moving_mbs() / m.mbs(m.raw_fresh));
        println!(
            "| migration on join, timed from when the joiner could stage what came (its change begun; the senders waited {:.1} ms for it here) to the last sender's end (the median join by this ratio: node {}, {:.1} MB; no target: for where the time goes) | {:.0} entries/s, {:.0} MB/s | raw TCP into fresh memory: {:.0} MB/s | {:.0}% | raw TCP into touched memory: {:.0} MB/s | {:.0}% | |",
            w.waited_ms,
            w.node,
            w.bytes as f64 / 1e6,
            w.moved as f64 / (w.moving_ms / 1e3),
            w.moving_mbs(),
            w.mbs(w.raw_fresh),
            100.0 * w.moving_mbs() / w.mbs(w.raw_fresh),
            w.mbs(w.raw_touched),
            100.0 * w.moving_mbs() / w.mbs(w.raw_touched)
        );
        let middle = |ratios: &mut dyn Iterator<Item = f64>| {
            let mut ratios: Vec<f64> = ratios.collect();
            ratios.sort_by(f64::total_cmp);
            ratios[ratios.len() / 2]
        };
        println!(
            "\nBy block ({} blocks of 500 interleaved rounds), median of the blocks' p50 ratios: round trip {:.2}x caller reads, {:.2}x multiplexed; redirected once {:.2}x caller reads, {:.2}x multiplexed; sent again {:.2}x caller reads, {:.2}x multiplexed.",
            blocks.len(),
            middle(&mut blocks.iter().map(|b| b[0])),
            middle(&mut blocks.iter().map(|b| b[1])),
            middle(&mut blocks_r.iter().map(|b| b[0])),
            middle(&mut blocks_r.iter().map(|b| b[1])),
            middle(&mut blocks_r.iter().map(|b| b[2])),
            middle(&mut blocks_r.iter().map(|b| b[3]))
        );
        let run_p50: Vec<Duration> = runs.iter().map(|v| percentile(v, 0.5)).collect();
        println!(
            "Each path in runs of its own ({run_length} in a row, the paths taking turns, twice): p50 round trip {}, transport ping {}, echo caller reads {}, echo multiplexed {}; round trip {:.2}x caller reads, {:.2}x multiplexed. The targets are judged on the interleaved rounds above.",
            us(run_p50[0]),
            us(run_p50[1]),
            us(run_p50[2]),
            us(run_p50[3]),
            run_p50[0].as_secs_f64() / run_p50[2].as_secs_f64(),
            run_p50[0].as_secs_f64() / run_p50[3].as_secs_f64()
        );
        let layer = |routed: &[Duration], pings: &[Duration]| {
            (percentile(routed, 0.5).as_secs_f64() - percentile(pings, 0.5).as_secs_f64()) * 1e6
        };
        println!(
            "Cold ({} pairs, each sample after {} MiB written on this thread and on a worker): p50 round trip {}, transport ping {}; the layer adds {:.2} µs cold against {:.2} µs in the interleaved rounds above.",
            cold_routed.len(),
            EVICT_BYTES >> 20,
            us(percentile(&cold_routed, 0.5)),
            us(percentile(&cold_pings, 0.5)),
            layer(&cold_routed, &cold_pings),
            layer(&routed, &pings)
        );
        let routing = routing_cold[routing_cold.len() / 2] as f64 / 1e3;
        println!(
            "Cold, the typed get routed against the same get told to its manager's local server (DYN against STAT, per remote request): p50 {} against {}; routing adds {:.2} µs (median of the {} rounds' differences).",
            us(percentile(&cold_typed, 0.5)),
            us(percentile(&cold_told, 0.5)),
            routing,
            routing_cold.len()
        );
        let each: Vec<String> = migrations
            .iter()
            .map(|m| {
                let (node, mb, ms) = (m.node, m.bytes as f64 / 1e6, m.sending_ms);
                let (fresh, touched) = (100.0 * m.per_byte_ratio(), 100.0 * m.touched_ratio());
                format!(
                    "node {node} {mb:.1} MB in {ms:.1} ms, {fresh:.0}% ({touched:.0}% into touched memory; {:.1} ms of it before the joiner began; after migration {:.1} ms; moved keys held {:.1} ms of the {:.1} ms to done)",
                    m.waited_ms,
                    m.after_ms,
                    m.held_ms,
                    m.done_ms
                )
            })
            .collect();
        println!(
            "Each join, migration against per-byte raw TCP into fresh memory (and into memory touched before), the slowest participant's after-migration phase, and the longest any held the requests for the keys that moved: {}. Transparent huge pages: {}.",
            each.join(", "),
            std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        );
        for agent in joined.iter().rev() {
            agent.stop().await;
        }
        b.stop().await;
        a.stop().await;
    });
}
