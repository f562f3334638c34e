//! `gobelins demo`: the story of a cluster's configuration changes, told by the locator.
//!
//! A cluster grows from a few nodes, takes more joins, loses nodes to eviction and to a failure,
//! and at each change the demo moves every entry whose manager changed, checks that none was
//! lost or duplicated, and prints what moved against the least that could have moved.
//! The agents, consensus and the adaptation layer that carry this out between real processes are
//! being built (issues 3 and 4); this command then grows into the live-cluster demo.

use anyhow::{ensure, Context};
use clap::Args;
use gobelins_locator::{
    CellTree, Change, Epoch, Key, Labels, MigrationPlan, NodeId, ServiceId, ServiceSpec, Snapshot,
    TreeConfig,
};
use std::collections::BTreeMap;
use std::time::Instant;

const KV: ServiceId = ServiceId(1);

/// Load above which the demo, as the supervisor will, queues a rebalance after a change.
const REBALANCE_PERMILLE: u32 = 1200;

/// Options of `gobelins demo`.
#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Nodes the cluster starts with.
    #[arg(long, default_value_t = 6)]
    nodes: u64,
    /// Entries stored in the cluster's key-value directory.
    #[arg(long, default_value_t = 200_000)]
    entries: u64,
    /// Nodes per leaf cell.
    #[arg(long, default_value_t = 4)]
    cell_capacity: u32,
    /// Print each change's full migration plan.
    #[arg(long)]
    plans: bool,
}

/// The entries each node holds, as the adaptation layer would keep them.
struct Store {
    held: BTreeMap<NodeId, Vec<Key>>,
}

impl Store {
    fn place(snapshot: &Snapshot, entries: u64) -> Store {
        let mut held: BTreeMap<NodeId, Vec<Key>> = BTreeMap::new();
        for k in 0..entries {
            let owner = snapshot.locate(KV, Key(k)).expect("kv is registered");
            held.entry(owner).or_default().push(Key(k));
        }
        Store { held }
    }

    /// Hands every entry whose manager changed to its new manager; returns how many moved.
    fn migrate(&mut self, new: &Snapshot) -> u64 {
        let table = new.table(KV).expect("kv is registered");
        let mut moved = 0;
        let mut arriving: BTreeMap<NodeId, Vec<Key>> = BTreeMap::new();
        for (node, keys) in &mut self.held {
            keys.retain(|&k| {
                let owner = table.locate(k);
                if owner == *node {
                    return true;
                }
                arriving.entry(owner).or_default().push(k);
                moved += 1;
                false
            });
        }
        for (node, keys) in arriving {
            self.held.entry(node).or_default().extend(keys);
        }
        self.held.retain(|_, keys| !keys.is_empty());
        moved
    }

    fn count(&self, node: NodeId) -> u64 {
        self.held.get(&node).map_or(0, |k| k.len() as u64)
    }

    fn total(&self) -> u64 {
        self.held.values().map(|k| k.len() as u64).sum()
    }

    fn max_over_avg(&self, nodes: usize) -> f64 {
        let max = self.held.values().map(Vec::len).max().unwrap_or(0) as f64;
        max * nodes as f64 / self.total().max(1) as f64
    }
}

pub(crate) fn run(args: &DemoArgs) -> anyhow::Result<()> {
    ensure!(args.nodes >= 2, "the demo needs at least 2 nodes to evict and fail one");
    let config = TreeConfig::default().with_cell_capacity(args.cell_capacity);
    let mut tree = CellTree::new(config).context("tree configuration")?;
    tree.register_service(ServiceSpec::new(KV, "kv"))?;
    for n in 1..=args.nodes {
        tree.add_node(NodeId(n), Labels::new())?;
    }
    let mut epoch = Epoch(1);
    let mut snapshot = tree.snapshot(epoch)?;
    let mut store = Store::place(&snapshot, args.entries);
    println!(
        "gobelins demo: {} nodes, cells of {}, {} entries in service kv (locator only: the \
         agents that carry migrations out between processes are being built)\n",
        args.nodes, args.cell_capacity, args.entries
    );
    print!("{}", tree.render());

    let next = args.nodes + 1;
    let story = [
        Change::Add { node: NodeId(next), labels: Labels::new() },
        Change::Add { node: NodeId(next + 1), labels: Labels::new() },
        Change::Add { node: NodeId(next + 2), labels: Labels::new() },
        Change::Evict(NodeId(2)),
        Change::Fail(NodeId(next)),
        Change::Evict(NodeId(1)),
    ];
    println!(
        "\n{:<10} {:>5} {:>9} {:>9} {:>9} {:>13} {:>8} {:>9}",
        "change", "epoch", "moved", "optimum", "moved/opt", "participants", "max/avg", "time"
    );
    let (mut moved_total, mut optimum_total, mut rebalanced) = (0u64, 0u64, 0u64);
    let rebalance = Change::Rebalance { max_over_avg_permille: REBALANCE_PERMILLE };
    let mut steps: Vec<&Change> = story.iter().collect();
    steps.reverse();
    while let Some(change) = steps.pop() {
        if matches!(change, Change::Rebalance { .. }) {
            let started = Instant::now();
            let report = tree.apply(change)?;
            if report.cells.is_empty() {
                continue;
            }
            epoch = epoch.next();
            let next_snapshot = tree.snapshot(epoch)?;
            let moved = store.migrate(&next_snapshot);
            ensure!(store.total() == args.entries, "entries lost or duplicated at {change}");
            println!(
                "{:<10} {:>5} {:>9} {:>9} {:>9} {:>6} of {:>3} {:>8.3} {:>7.1?}",
                "rebalance",
                epoch.to_string(),
                moved,
                "-",
                "-",
                report.participants.len(),
                tree.len(),
                store.max_over_avg(tree.len()),
                started.elapsed(),
            );
            rebalanced += moved;
            snapshot = next_snapshot;
            steps.push(&rebalance);
            continue;
        }
        let requester = change.node().expect("every step names a node");
        let had = store.count(requester);
        let started = Instant::now();
        let report = tree.apply(change).with_context(|| format!("{change}"))?;
        epoch = epoch.next();
        let next_snapshot = tree.snapshot(epoch)?;
        let plan = MigrationPlan::between(&snapshot, &next_snapshot);
        let moved = store.migrate(&next_snapshot);
        let elapsed = started.elapsed();
        let optimum = match change {
            Change::Add { .. } => store.count(requester),
            _ => had,
        };
        ensure!(store.total() == args.entries, "entries lost or duplicated at {change}");
        ensure!(store.count(requester) == 0 || matches!(change, Change::Add { .. }));
        println!(
            "{:<10} {:>5} {:>9} {:>9} {:>9.2} {:>6} of {:>3} {:>8.3} {:>7.1?}",
            change.to_string(),
            epoch.to_string(),
            moved,
            optimum,
            moved as f64 / optimum.max(1) as f64,
            report.participants.len(),
            tree.len() + usize::from(!matches!(change, Change::Add { .. })),
            store.max_over_avg(tree.len()),
            elapsed,
        );
        if args.plans {
            print!("{plan}");
        }
        moved_total += moved;
        optimum_total += optimum;
        snapshot = next_snapshot;
        steps.push(&rebalance);
    }
    println!();
    print!("{}", tree.render());
    println!(
        "\ndemo: entries={} entries_lost=0 moved={} optimum={} rebalanced={} changes={}",
        store.total(),
        moved_total,
        optimum_total,
        rebalanced,
        story.len()
    );
    Ok(())
}
