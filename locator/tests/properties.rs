//! Property tests of the locator over random sequences of additions, evictions, failures and
//! rebalances, on clusters of up to 1,024 nodes.

mod common;

use common::{assert_invariants, moved_by_plan, slots_of};
use gobelins_locator::{
    CellId, CellTree, Change, Epoch, Labels, LocatorError, MigrationPlan, NodeId, ServiceId,
    ServiceSpec, TreeConfig, ROOT,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use std::collections::{BTreeMap, BTreeSet};

/// One step of a random history. Node choices are indices into the live nodes, so every
/// generated history is meaningful whatever came before it.
#[derive(Clone, Debug)]
enum Step {
    Add {
        zone: Option<u8>,
    },
    Evict(usize),
    Fail(usize),
    /// Adds a node that is already a member: must be refused and change nothing.
    AddExisting(usize),
    Rebalance,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => proptest::option::of(0u8..3).prop_map(|zone| Step::Add { zone }),
        2 => any::<usize>().prop_map(Step::Evict),
        2 => any::<usize>().prop_map(Step::Fail),
        1 => any::<usize>().prop_map(Step::AddExisting),
        1 => Just(Step::Rebalance),
    ]
}

fn labels(zone: Option<u8>) -> Labels {
    zone.map(|z| Labels::from([("zone".to_string(), format!("z{z}"))])).unwrap_or_default()
}

/// Turns a step into a concrete change against the current tree.
fn concretise(tree: &CellTree, step: &Step, next_id: &mut u64, zoned: bool) -> Change {
    let live: Vec<NodeId> = tree.nodes().collect();
    let pick = |i: &usize| live[i % live.len()];
    match step {
        Step::Add { zone } => {
            *next_id += 1;
            Change::Add { node: NodeId(*next_id), labels: labels(zone.filter(|_| zoned)) }
        }
        Step::Evict(i) => Change::Evict(pick(i)),
        Step::Fail(i) => Change::Fail(pick(i)),
        Step::AddExisting(i) => Change::Add { node: pick(i), labels: Labels::new() },
        Step::Rebalance => Change::Rebalance { max_over_avg_permille: 1100 },
    }
}

/// Builds a cluster of `initial` nodes, registers a confined service, then runs `steps`,
/// checking every property after each change. Returns the changes applied, for replay.
fn run_history(
    capacity: u32,
    slots: u32,
    initial: usize,
    steps: &[Step],
    zoned: bool,
) -> (CellTree, Vec<Change>) {
    let config = TreeConfig::default().with_cell_capacity(capacity).with_label_levels(["zone"]);
    let mut tree = CellTree::new(config).expect("valid config");
    let mut applied = vec![
        Change::Register(ServiceSpec::new(ServiceId(1), "hashed").with_slots(slots)),
        Change::Register(ServiceSpec::new(ServiceId(2), "runs").with_slots(slots).with_runs(64)),
    ];
    for change in &applied {
        tree.apply(change).expect("register");
    }
    for i in 0..initial {
        let change = Change::Add {
            node: NodeId(i as u64 + 1),
            labels: labels(zoned.then_some((i % 3) as u8)),
        };
        tree.apply(&change).expect("initial add");
        applied.push(change);
    }
    let confined =
        Change::Register(ServiceSpec::new(ServiceId(3), "small").with_slots(256).with_size(3));
    tree.apply(&confined).expect("register confined");
    applied.push(confined);
    assert_invariants(&tree);

    let mut next_id = initial as u64;
    let mut epoch = Epoch(1);
    for step in steps {
        let change = concretise(&tree, step, &mut next_id, zoned);
        let before = tree.clone();
        let old = tree.snapshot(epoch).expect("cluster is never empty here");
        match tree.apply(&change) {
            Err(LocatorError::LastNode(_)) | Err(LocatorError::DuplicateNode(_)) => {
                assert_eq!(tree, before, "a refused change must leave the tree untouched");
                continue;
            }
            Err(e) => panic!("{change}: unexpected {e}"),
            Ok(report) => {
                assert!(!matches!(step, Step::AddExisting(_)), "duplicate add accepted");
                epoch = epoch.next();
                let new = tree.snapshot(epoch).expect("non-empty");
                assert_invariants(&tree);
                check_movement(&change, &old, &new, &report, &tree);
            }
        }
        applied.push(change);
    }
    (tree, applied)
}

fn check_movement(
    change: &Change,
    old: &gobelins_locator::Snapshot,
    new: &gobelins_locator::Snapshot,
    report: &gobelins_locator::ChangeReport,
    tree: &CellTree,
) {
    let plan = MigrationPlan::between(old, new);
    let moved = moved_by_plan(&plan);
    match change {
        Change::Add { node, .. } => {
            // An addition moves exactly the slots the new node ends up with.
            assert_eq!(moved, slots_of(new, *node), "{change}");
            assert!(plan.services.iter().flat_map(|s| &s.moves).all(|m| m.to == *node));
        }
        Change::Evict(node) | Change::Fail(node) => {
            // A removal moves exactly the slots the removed node had.
            assert_eq!(moved, slots_of(old, *node), "{change}");
            assert!(plan.services.iter().flat_map(|s| &s.moves).all(|m| m.from == *node));
        }
        _ => {}
    }
    assert!(plan.participants.is_subset(&report.participants), "{change}: plan outside report");
    // The cell under the root each member's leaf lies in: its zone, when it is labelled.
    let zones: BTreeMap<NodeId, CellId> = tree
        .nodes()
        .map(|n| {
            let mut cell = tree.leaf_of(n).expect("a member");
            while let Some(up) = tree.cell(cell).and_then(|c| c.parent).filter(|&p| p != ROOT) {
                cell = up;
            }
            (n, cell)
        })
        .collect();
    let labelled = |zone: &CellId| tree.cell(*zone).is_some_and(|c| c.label.is_some());
    let distinct: BTreeSet<CellId> = zones.values().copied().filter(labelled).collect();
    for (n, holder) in tree.replica_holders() {
        assert_eq!(new.replica_holder(n), holder, "{change}: node {n}");
        if labelled(&zones[&n]) && distinct.len() > 1 {
            let holder = holder.expect("a holder");
            assert_ne!(zones[&holder], zones[&n], "{change}: {n} keeps its replicas in its zone");
        }
    }
    if let Some(node) = change.node() {
        // Every node whose replica holder moves (a joiner's is new) takes part, with its new holder,
        // and so does the holder, as the change begins, of every node the change moves something
        // of (the ledger's "backup before" needs the table the change began from); beyond them,
        // only one cell's members and the requesting node.
        let mut holders = BTreeSet::new();
        for &n in new.nodes() {
            let holder = new.replica_holder(n);
            if !old.nodes().contains(&n) || old.replica_holder(n) != holder {
                holders.insert(n);
                holders.extend(holder);
            }
        }
        let missing: Vec<_> = holders.difference(&report.participants).collect();
        assert!(
            missing.is_empty(),
            "{change}: {missing:?} take no part; their replica holder moved"
        );
        let was_held: BTreeSet<NodeId> = (plan.touched(Some(old), new).into_iter())
            .filter(|n| old.nodes().contains(n))
            .filter_map(|n| old.replica_holder(n))
            .collect();
        let missing: Vec<_> = was_held.difference(&report.participants).collect();
        assert!(missing.is_empty(), "{change}: {missing:?} held for moved nodes, take no part");
        // The locator takes the holders of a cell's members part, moved or not.
        let hold_for_participants: BTreeSet<NodeId> = (report.participants.iter())
            .filter(|n| old.nodes().contains(n))
            .filter_map(|&n| old.replica_holder(n))
            .collect();
        let others: BTreeSet<NodeId> = (report.participants.iter())
            .copied()
            .filter(|n| *n != node && !holders.contains(n) && !hold_for_participants.contains(n))
            .collect();
        let cells: BTreeSet<_> = others.iter().map(|n| tree.leaf_of(*n).expect("live")).collect();
        assert!(cells.len() <= 1, "{change}: participants span cells {cells:?}");
    }
}

/// Replays `changes` on a fresh tree: the same inputs must give the same tree and snapshot.
fn assert_replays_identically(tree: &CellTree, changes: &[Change], capacity: u32) {
    let config = TreeConfig::default().with_cell_capacity(capacity).with_label_levels(["zone"]);
    let mut again = CellTree::new(config).expect("valid");
    for change in changes {
        again.apply(change).expect("replayed change applies as it did the first time");
    }
    assert_eq!(&again, tree);
    assert_eq!(again.snapshot(Epoch(9)).unwrap(), tree.snapshot(Epoch(9)).unwrap());
    let json = serde_json::to_string(tree).expect("serialise");
    let back: CellTree = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(&back, tree);
}

fn config(cases: u32, seed: u64) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..Config::default() }
}

proptest! {
    #![proptest_config(config(96, 0x6f62_656c))]
    #[test]
    fn small_clusters_keep_every_invariant(
        capacity in 1u32..=8,
        initial in 1usize..=40,
        steps in proptest::collection::vec(step(), 1..60),
        zoned in any::<bool>(),
    ) {
        let (tree, changes) = run_history(capacity, 1024, initial, &steps, zoned);
        assert_replays_identically(&tree, &changes, capacity);
    }
}

proptest! {
    #![proptest_config(config(6, 0x6c69_6e73))]
    #[test]
    fn large_clusters_keep_every_invariant(
        initial in 500usize..=985,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        // At most 985 + 39 = 1,024 nodes after the additions.
        let (tree, changes) = run_history(8, 4096, initial, &steps, true);
        prop_assert!(tree.len() <= 1024);
        assert_replays_identically(&tree, &changes, 8);
    }
}
