//! How many entries move, and who takes part, when one node is added, evicted or fails: the
//! locator against the report's static modulo, jump consistent hash and rendezvous hashing over
//! the same nodes and the same keys. Then 1,000 random changes, to see whether load stays even.
//!
//! `cargo run --release -p gobelins-locator --example movement`

use gobelins_locator::baseline::{jump, modulo, rendezvous};
use gobelins_locator::{
    mix, CellTree, Change, Epoch, Key, Labels, MigrationPlan, NodeId, ServiceId, ServiceSpec,
    TreeConfig, DEFAULT_CELL_CAPACITY,
};
use std::collections::{BTreeMap, BTreeSet};

const KV: ServiceId = ServiceId(1);
/// Keys sampled per measurement; every scheme sees the same ones.
const KEYS: u64 = 1 << 18;
/// Threshold at which the simulated supervisor queues a rebalance after a change.
const REBALANCE_PERMILLE: u32 = 1200;
const CHURN: usize = 1000;

/// Who manages each sampled key under one scheme, over one set of nodes.
trait Scheme {
    fn name(&self) -> &'static str;
    fn owners(&self, nodes: &[NodeId]) -> Vec<NodeId>;
}

struct Modulo;
struct Jump;
struct Rendezvous;

impl Scheme for Modulo {
    fn name(&self) -> &'static str {
        "modulo"
    }
    fn owners(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        (0..KEYS).map(|k| nodes[modulo(mix(k), nodes.len() as u32) as usize]).collect()
    }
}

impl Scheme for Jump {
    fn name(&self) -> &'static str {
        "jump"
    }
    fn owners(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        (0..KEYS).map(|k| nodes[jump(mix(k), nodes.len() as u32) as usize]).collect()
    }
}

impl Scheme for Rendezvous {
    fn name(&self) -> &'static str {
        "rendezvous"
    }
    fn owners(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        let hashes: Vec<u64> = nodes.iter().map(|n| mix(n.0 ^ 0x5eed)).collect();
        (0..KEYS).map(|k| nodes[rendezvous(mix(k), &hashes) as usize]).collect()
    }
}

/// One line of the table.
struct Row {
    scheme: &'static str,
    nodes: usize,
    change: &'static str,
    moved: u64,
    optimum: u64,
    participants: usize,
    max_over_avg: f64,
    /// For the locator: exact slot figures, and the largest spread of slot counts in a cell.
    slots: Option<(u64, f64, u32)>,
}

fn compare(
    before: &[NodeId],
    after: &[NodeId],
    requester: NodeId,
    added: bool,
) -> (u64, u64, usize, f64) {
    let mut moved = 0;
    let mut optimum = 0;
    let mut participants = BTreeSet::new();
    let mut load: BTreeMap<NodeId, u64> = BTreeMap::new();
    for (b, a) in before.iter().zip(after) {
        *load.entry(*a).or_insert(0) += 1;
        if b != a {
            moved += 1;
            participants.insert(*b);
            participants.insert(*a);
        }
        if (added && *a == requester) || (!added && *b == requester) {
            optimum += 1;
        }
    }
    let live = load.len().max(1) as f64;
    let max = *load.values().max().unwrap_or(&0) as f64;
    (moved, optimum, participants.len(), max / (KEYS as f64 / live))
}

fn locator_owners(tree: &CellTree) -> Vec<NodeId> {
    let snapshot = tree.snapshot(Epoch(0)).expect("cluster is not empty");
    let table = snapshot.table(KV).expect("registered");
    (0..KEYS).map(|k| table.locate(Key(k))).collect()
}

fn slot_max_over_avg(tree: &CellTree) -> f64 {
    let counts = tree.slot_counts(KV);
    let max = *counts.values().max().unwrap_or(&0) as f64;
    max * tree.len() as f64 / 65_536.0
}

fn worst_cell_spread(tree: &CellTree) -> u32 {
    let counts = tree.slot_counts(KV);
    tree.leaves()
        .map(|(_, cell)| {
            let c: Vec<u32> =
                cell.members().iter().map(|m| counts.get(m).copied().unwrap_or(0)).collect();
            c.iter().max().unwrap_or(&0) - c.iter().min().unwrap_or(&0)
        })
        .max()
        .unwrap_or(0)
}

fn cluster(n: usize) -> CellTree {
    let mut tree = CellTree::new(TreeConfig::default()).expect("default config");
    tree.register_service(ServiceSpec::new(KV, "kv")).expect("register");
    for i in 1..=n as u64 {
        tree.add_node(NodeId(i), Labels::new()).expect("add");
    }
    tree
}

/// A fixed-seed generator, so that every run measures the same changes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0 ^ 0xc0ffee) % n
    }
}

fn measure(n: usize, rows: &mut Vec<Row>) {
    let tree = cluster(n);
    let nodes: Vec<NodeId> = tree.nodes().collect();
    let mut rng = Rng(n as u64);
    let added = NodeId(n as u64 + 1);
    let evicted = nodes[rng.below(n as u64) as usize];
    let failed = nodes
        .iter()
        .copied()
        .filter(|x| *x != evicted)
        .nth(rng.below(n as u64 - 1) as usize)
        .unwrap_or(evicted);
    let cases: [(&'static str, Change); 3] = [
        ("add", Change::Add { node: added, labels: Labels::new() }),
        ("evict", Change::Evict(evicted)),
        ("fail", Change::Fail(failed)),
    ];

    let before = locator_owners(&tree);
    let old_snapshot = tree.snapshot(Epoch(1)).expect("non-empty");
    for (label, change) in &cases {
        let requester = change.node().expect("node change");
        let is_add = matches!(change, Change::Add { .. });
        if !is_add && n == 1 {
            continue;
        }
        let mut next = tree.clone();
        next.apply(change).expect("change applies");
        let after = locator_owners(&next);
        let (moved, optimum, participants, max_over_avg) =
            compare(&before, &after, requester, is_add);
        let plan =
            MigrationPlan::between(&old_snapshot, &next.snapshot(Epoch(2)).expect("non-empty"));
        rows.push(Row {
            scheme: "locator",
            nodes: n,
            change: label,
            moved,
            optimum,
            participants,
            max_over_avg,
            slots: Some((plan.moved_slots(), slot_max_over_avg(&next), worst_cell_spread(&next))),
        });
    }

    let schemes: [&dyn Scheme; 3] = [&Modulo, &Jump, &Rendezvous];
    for scheme in schemes {
        let before = scheme.owners(&nodes);
        for (label, change) in &cases {
            let requester = change.node().expect("node change");
            let is_add = matches!(change, Change::Add { .. });
            let mut after_nodes = nodes.clone();
            if is_add {
                after_nodes.push(requester);
            } else if scheme.name() == "jump" {
                // Jump can only drop its last bucket: the last node takes the leaver's bucket.
                let at = after_nodes.iter().position(|x| *x == requester).expect("member");
                after_nodes.swap_remove(at);
            } else {
                after_nodes.retain(|x| *x != requester);
            }
            let after = scheme.owners(&after_nodes);
            let (moved, optimum, participants, max_over_avg) =
                compare(&before, &after, requester, is_add);
            rows.push(Row {
                scheme: scheme.name(),
                nodes: n,
                change: label,
                moved,
                optimum,
                participants,
                max_over_avg,
                slots: None,
            });
        }
    }
}

/// What 1,000 random changes do to the balance of a cluster that starts with `n` nodes.
struct Churn {
    n: usize,
    rebalanced: bool,
    end_nodes: usize,
    rebalances: usize,
    rebalance_moved: u64,
    change_moved: u64,
    change_optimum: u64,
    worst_before_rebalance: f64,
    worst_after_rebalance: f64,
    end: f64,
    worst_cell_spread: u32,
}

fn churn(n: usize, rebalance: bool) -> Churn {
    let mut tree = cluster(n);
    let mut rng = Rng(0xc4u64 << 32 | n as u64);
    let mut next_id = n as u64 + 1;
    let mut out = Churn {
        n,
        rebalanced: rebalance,
        end_nodes: 0,
        rebalances: 0,
        rebalance_moved: 0,
        change_moved: 0,
        change_optimum: 0,
        worst_before_rebalance: 0.0,
        worst_after_rebalance: 0.0,
        end: 0.0,
        worst_cell_spread: 0,
    };
    for _ in 0..CHURN {
        let size = tree.len();
        let roll = rng.below(10);
        let grow = size <= n / 2 || (size < 2 * n && roll < 5);
        let change = if grow {
            next_id += 1;
            Change::Add { node: NodeId(next_id), labels: Labels::new() }
        } else {
            let nodes: Vec<NodeId> = tree.nodes().collect();
            let victim = nodes[rng.below(nodes.len() as u64) as usize];
            if roll < 8 {
                Change::Evict(victim)
            } else {
                Change::Fail(victim)
            }
        };
        let old = tree.snapshot(Epoch(0)).expect("non-empty");
        let before = tree.slot_counts(KV);
        tree.apply(&change).expect("change applies");
        let plan = MigrationPlan::between(&old, &tree.snapshot(Epoch(1)).expect("non-empty"));
        let requester = change.node().expect("node change");
        let optimum = match change {
            Change::Add { .. } => tree.slot_counts(KV)[&requester],
            _ => before[&requester],
        };
        out.change_moved += plan.moved_slots();
        out.change_optimum += u64::from(optimum);
        out.worst_before_rebalance = out.worst_before_rebalance.max(slot_max_over_avg(&tree));
        // Without rebalancing the threshold is out of reach, so the loop stops at once.
        let permille = if rebalance { REBALANCE_PERMILLE } else { u32::MAX };
        loop {
            let old = tree.snapshot(Epoch(0)).expect("non-empty");
            let report = tree
                .apply(&Change::Rebalance { max_over_avg_permille: permille })
                .expect("rebalance applies");
            if report.cells.is_empty() {
                break;
            }
            out.rebalances += 1;
            let new = tree.snapshot(Epoch(1)).expect("non-empty");
            out.rebalance_moved += MigrationPlan::between(&old, &new).moved_slots();
        }
        out.worst_after_rebalance = out.worst_after_rebalance.max(slot_max_over_avg(&tree));
        out.worst_cell_spread = out.worst_cell_spread.max(worst_cell_spread(&tree));
    }
    out.end_nodes = tree.len();
    out.end = slot_max_over_avg(&tree);
    out
}

fn main() {
    let sizes = [4usize, 16, 64, 256, 1024];
    let mut rows = Vec::new();
    for &n in &sizes {
        measure(n, &mut rows);
    }
    println!("One change on a cluster of n nodes; {KEYS} keys, the same for every scheme.");
    println!("moved/opt: keys that changed manager over the keys the added node ends with or the");
    println!("removed node had. parts: nodes that send or receive. max/avg: keys per node after.");
    println!(
        "locator also: slots moved (of 65,536), max/avg in slots, largest slot spread in a cell."
    );
    println!();
    println!(
        "{:<11} {:>5} {:<6} {:>8} {:>8} {:>9} {:>6} {:>8}   {:>7} {:>9} {:>6}",
        "scheme",
        "n",
        "change",
        "moved",
        "optimum",
        "moved/opt",
        "parts",
        "max/avg",
        "slots",
        "slot m/a",
        "spread"
    );
    for r in &rows {
        let extra = match r.slots {
            Some((moved, ratio, spread)) => format!("{moved:>7} {ratio:>9.3} {spread:>6}"),
            None => format!("{:>7} {:>9} {:>6}", "-", "-", "-"),
        };
        println!(
            "{:<11} {:>5} {:<6} {:>8} {:>8} {:>9.2} {:>6} {:>8.3}   {}",
            r.scheme,
            r.nodes,
            r.change,
            r.moved,
            r.optimum,
            r.moved as f64 / r.optimum.max(1) as f64,
            r.participants,
            r.max_over_avg,
            extra
        );
    }

    println!();
    println!(
        "{CHURN} random changes from n nodes (half additions; removals 80% evict, 20% fail; size kept \
         within n/2..2n). After each change a rebalance runs while max/avg > {:.2}.",
        f64::from(REBALANCE_PERMILLE) / 1000.0
    );
    println!(
        "{:>5} {:<9} {:>6} {:>9} {:>10} {:>11} {:>12} {:>11} {:>6} {:>6}",
        "n",
        "rebalance",
        "end n",
        "moved/opt",
        "rebalances",
        "rebal slots",
        "worst change",
        "worst after",
        "end",
        "spread"
    );
    let mut churns = Vec::new();
    for (&n, rebalance) in sizes[1..].iter().flat_map(|n| [(n, false), (n, true)]) {
        let c = churn(n, rebalance);
        println!(
            "{:>5} {:<9} {:>6} {:>9.3} {:>10} {:>11} {:>12.3} {:>11.3} {:>6.3} {:>6}",
            c.n,
            if rebalance { "yes" } else { "no" },
            c.end_nodes,
            c.change_moved as f64 / c.change_optimum.max(1) as f64,
            c.rebalances,
            c.rebalance_moved,
            c.worst_before_rebalance,
            c.worst_after_rebalance,
            c.end,
            c.worst_cell_spread
        );
        churns.push(c);
    }

    let locator: Vec<&Row> = rows.iter().filter(|r| r.scheme == "locator").collect();
    let moved_over_optimum =
        locator.iter().map(|r| r.moved as f64 / r.optimum.max(1) as f64).fold(0.0, f64::max);
    let max_participants = locator.iter().map(|r| r.participants).max().unwrap_or(0);
    // The supervisor rebalances, so the figure that counts is the one with rebalancing.
    let max_over_avg =
        churns.iter().filter(|c| c.rebalanced).map(|c| c.worst_after_rebalance).fold(0.0, f64::max);
    println!();
    println!(
        "summary: moved_over_optimum={moved_over_optimum:.2} max_participants={max_participants} \
         cell_capacity={DEFAULT_CELL_CAPACITY} max_over_avg={max_over_avg:.3}"
    );
}
