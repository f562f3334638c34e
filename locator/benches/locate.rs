//! `locate` on a snapshot against the report's static modulo, jump consistent hash and
//! rendezvous hashing over the same nodes, with the same key hash; then lookups from one and
//! from two threads at once.
//!
//! Then what every node computes at each change of the configuration: the new epoch's
//! snapshot, and the change applied to the tree, on a tree shaped like an agent's (three
//! services of 65,536 slots, two of 4,096, six nodes), against a copy of that tree.
//!
//! `cargo bench -p gobelins-locator`

use criterion::{black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use gobelins_locator::baseline::{jump, modulo, rendezvous};
use gobelins_locator::{
    mix, CellTree, Epoch, Key, Labels, NodeId, ServiceId, ServiceSpec, SnapshotCell, TreeConfig,
};
use std::time::{Duration, Instant};

const KV: ServiceId = ServiceId(1);

fn cluster(n: u64) -> CellTree {
    let mut tree = CellTree::new(TreeConfig::default()).expect("default config");
    tree.register_service(ServiceSpec::new(KV, "kv")).expect("register");
    for i in 1..=n {
        tree.add_node(NodeId(i), Labels::new()).expect("add");
    }
    tree
}

fn schemes(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for n in [64u64, 1024] {
        let tree = cluster(n);
        let snapshot = tree.snapshot(Epoch(1)).expect("non-empty");
        let cell = SnapshotCell::new(snapshot.clone());
        let nodes: Vec<NodeId> = tree.nodes().collect();
        let hashes: Vec<u64> = nodes.iter().map(|x| mix(x.0 ^ 0x5eed)).collect();
        let count = nodes.len() as u32;

        group.bench_with_input(BenchmarkId::new("locate", n), &snapshot, |b, snap| {
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                snap.locate(KV, Key(black_box(k)))
            })
        });
        group.bench_with_input(BenchmarkId::new("locate_via_cell", n), &cell, |b, cell| {
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                cell.load().locate(KV, Key(black_box(k)))
            })
        });
        group.bench_with_input(BenchmarkId::new("locate_via_reader", n), &cell, |b, cell| {
            let mut reader = cell.reader();
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                reader.load().locate(KV, Key(black_box(k)))
            })
        });
        group.bench_with_input(BenchmarkId::new("modulo", n), &nodes, |b, nodes| {
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                nodes[modulo(mix(black_box(k)), black_box(count)) as usize]
            })
        });
        group.bench_with_input(BenchmarkId::new("jump", n), &nodes, |b, nodes| {
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                nodes[jump(mix(black_box(k)), black_box(count)) as usize]
            })
        });
        group.bench_with_input(BenchmarkId::new("rendezvous", n), &nodes, |b, nodes| {
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                nodes[rendezvous(mix(black_box(k)), &hashes) as usize]
            })
        });
    }
    group.finish();
}

/// Runs `iters` lookups on each of `threads` threads at once through the shared cell (each
/// thread with its own cached reader, or loading the cell every time); returns the wall time.
/// Equal times for one and two threads mean twice the lookups per second.
fn lookups_on(cell: &SnapshotCell, threads: u64, iters: u64, cached: bool) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut reader = cell.reader();
                let mut k = t << 40;
                let mut sum = 0u64;
                for _ in 0..iters {
                    k = k.wrapping_add(1);
                    let owner = if cached {
                        reader.load().locate(KV, Key(black_box(k)))
                    } else {
                        cell.load().locate(KV, Key(black_box(k)))
                    };
                    sum = sum.wrapping_add(owner.map_or(0, |x| x.0));
                }
                black_box(sum)
            });
        }
    });
    start.elapsed()
}

fn threads(c: &mut Criterion) {
    let tree = cluster(1024);
    let cell = SnapshotCell::new(tree.snapshot(Epoch(1)).expect("non-empty"));
    let mut group = c.benchmark_group("threads");
    for threads in [1u64, 2] {
        group.bench_with_input(
            BenchmarkId::new("locate_via_reader", threads),
            &threads,
            |b, &t| b.iter_custom(|iters| lookups_on(&cell, t, iters, true)),
        );
        group.bench_with_input(BenchmarkId::new("locate_via_cell", threads), &threads, |b, &t| {
            b.iter_custom(|iters| lookups_on(&cell, t, iters, false))
        });
    }
    group.finish();
}

/// Six nodes holding the agent's services: the process, file and scheduler services at the
/// default 65,536 slots each, and two of 4,096 (the DSM, the example directory).
fn agent_shaped() -> CellTree {
    let mut tree = CellTree::new(TreeConfig::default()).expect("default config");
    for id in 1..=3 {
        tree.register_service(ServiceSpec::new(ServiceId(id), "big")).expect("register");
    }
    for id in 4..=5 {
        let spec = ServiceSpec::new(ServiceId(id), "small").with_slots(4096);
        tree.register_service(spec).expect("register");
    }
    for i in 1..=6 {
        tree.add_node(NodeId(i), Labels::new()).expect("add");
    }
    tree
}

fn epoch(c: &mut Criterion) {
    let tree = agent_shaped();
    let mut group = c.benchmark_group("epoch");
    // The clone and the snapshot are dropped in the clock, each in turn, as an epoch's tables
    // replace the last; the tree a node is added to is made and dropped outside it.
    group.bench_function("clone_tree (baseline)", |b| b.iter(|| black_box(tree.clone())));
    group.bench_function("snapshot", |b| b.iter(|| tree.snapshot(black_box(Epoch(2)))));
    group.bench_function("add_node", |b| {
        b.iter_batched_ref(
            || tree.clone(),
            |t| t.add_node(NodeId(7), Labels::new()).expect("add"),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// `n` nodes holding one service of 4,096 slots, in three zones when `zoned`.
fn sized(n: u64, zoned: bool) -> CellTree {
    let config = TreeConfig::default().with_label_levels(["zone"]);
    let mut tree = CellTree::new(config).expect("valid config");
    let spec = ServiceSpec::new(ServiceId(1), "kv").with_slots(4096);
    tree.register_service(spec).expect("register");
    for i in 1..=n {
        tree.add_node(NodeId(i), zone_of(i, zoned)).expect("add");
    }
    tree
}

fn zone_of(i: u64, zoned: bool) -> Labels {
    let zone = || Labels::from([("zone".to_string(), format!("z{}", i % 3))]);
    if zoned {
        zone()
    } else {
        Labels::new()
    }
}

/// What keeping replicas in other zones costs a change: under labels, each one ranks every
/// node's candidates in the other zones, twice, and the snapshot once more. The same cluster
/// unlabelled, in the same run, is the baseline.
fn zoned(c: &mut Criterion) {
    let mut group = c.benchmark_group("zoned");
    for n in [64u64, 1024] {
        for zoned in [false, true] {
            let tree = sized(n, zoned);
            let joined = tree.clone().add_node(NodeId(n + 1), zone_of(n + 1, zoned));
            let taking_part = joined.expect("add").participants.len();
            let shape = if zoned { "3 zones" } else { "unlabelled" };
            println!("zoned/{n} nodes, {shape}: a join takes {taking_part} nodes part");
            let name = if zoned { "add_node, 3 zones" } else { "add_node, unlabelled (baseline)" };
            group.bench_with_input(BenchmarkId::new(name, n), &tree, |b, tree| {
                b.iter_batched_ref(
                    || tree.clone(),
                    |t| t.add_node(NodeId(n + 1), zone_of(n + 1, zoned)).expect("add"),
                    BatchSize::LargeInput,
                )
            });
            let name = if zoned { "snapshot, 3 zones" } else { "snapshot, unlabelled (baseline)" };
            group.bench_with_input(BenchmarkId::new(name, n), &tree, |b, tree| {
                b.iter(|| tree.snapshot(black_box(Epoch(2))))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = schemes, threads, epoch, zoned
}
criterion_main!(benches);
