//! Scenario tests of the locator: bad input, labels, scopes, splitting, plans and snapshots.

mod common;

use common::assert_invariants;
use gobelins_locator::{
    parse_label, CellTree, Change, Epoch, Key, Labels, LocatorError, MigrationPlan, NodeId,
    ServiceId, ServiceSpec, SnapshotCell, TreeConfig, ROOT,
};
use std::collections::BTreeSet;

const KV: ServiceId = ServiceId(1);

fn cluster(capacity: u32, nodes: u64) -> CellTree {
    let mut tree = CellTree::new(TreeConfig::default().with_cell_capacity(capacity)).unwrap();
    tree.register_service(ServiceSpec::new(KV, "kv")).unwrap();
    for n in 1..=nodes {
        tree.add_node(NodeId(n), Labels::new()).unwrap();
    }
    tree
}

fn zone(z: &str) -> Labels {
    Labels::from([("zone".to_string(), z.to_string())])
}

#[test]
fn bad_input_gets_a_typed_error_and_changes_nothing() {
    assert_eq!(
        CellTree::new(TreeConfig::default().with_cell_capacity(0)),
        Err(LocatorError::ZeroCapacity)
    );
    let mut tree = cluster(4, 3);
    let before = tree.clone();
    let cases: Vec<(Change, LocatorError)> = vec![
        (
            Change::Add { node: NodeId(2), labels: Labels::new() },
            LocatorError::DuplicateNode(NodeId(2)),
        ),
        (Change::Evict(NodeId(99)), LocatorError::UnknownNode(NodeId(99))),
        (Change::Fail(NodeId(99)), LocatorError::UnknownNode(NodeId(99))),
        (
            Change::Add { node: NodeId(7), labels: zone("a") },
            LocatorError::UnknownLabel { key: "zone".into(), levels: String::new() },
        ),
        (Change::Register(ServiceSpec::new(KV, "again")), LocatorError::DuplicateService(KV)),
        (
            Change::Register(ServiceSpec::new(ServiceId(2), "odd").with_slots(1000)),
            LocatorError::InvalidSlots { service: ServiceId(2), slots: 1000 },
        ),
        (
            Change::Register(ServiceSpec::new(ServiceId(2), "odd").with_runs(3)),
            LocatorError::InvalidRun { service: ServiceId(2), run: 3 },
        ),
    ];
    for (change, expected) in cases {
        assert_eq!(tree.apply(&change), Err(expected), "{change}");
        assert_eq!(tree, before, "{change} changed the tree");
    }
}

#[test]
fn the_last_node_cannot_leave_and_an_empty_cluster_has_no_snapshot() {
    let mut tree = cluster(8, 1);
    assert_eq!(tree.evict_node(NodeId(1)), Err(LocatorError::LastNode(NodeId(1))));
    let empty = CellTree::new(TreeConfig::default()).unwrap();
    assert_eq!(empty.snapshot(Epoch(1)), Err(LocatorError::EmptyCluster));
}

#[test]
fn a_node_with_no_room_is_refused() {
    // Four slots cannot be shared by five nodes of a service meant for the whole cluster.
    let mut tree = CellTree::new(TreeConfig::default()).unwrap();
    tree.register_service(ServiceSpec::new(KV, "tiny").with_slots(4)).unwrap();
    for n in 1..=4 {
        tree.add_node(NodeId(n), Labels::new()).unwrap();
    }
    let err = tree.add_node(NodeId(5), Labels::new()).unwrap_err();
    assert!(matches!(err, LocatorError::NoRoom { node: NodeId(5), service: KV, .. }), "{err}");
    assert!(err.to_string().contains("give the service more slots"), "{err}");
}

#[test]
fn labels_parse_and_malformed_ones_are_refused() {
    assert_eq!(parse_label("zone=a"), Ok(("zone".into(), "a".into())));
    for bad in ["zone", "=a", "zone=", ""] {
        assert_eq!(parse_label(bad), Err(LocatorError::BadLabel(bad.into())));
    }
    assert_eq!(parse_label("zone=eu-west-1a"), Ok(("zone".into(), "eu-west-1a".into())));
    // `status` prints labels as they are: a newline forged a row of its table, an escape
    // coloured the terminal, and 120,000 bytes made every later `status` 241 KB.
    for bad in ["zone=a\n  1  127.0.0.1:1  active", "zone=\u{1b}[31mred", "zo ne=a", "zone=a b"] {
        let refused = parse_label(bad).expect_err(bad);
        assert!(matches!(refused, LocatorError::LabelText(_)), "{bad:?}: {refused}");
        assert!(!refused.to_string().contains('\n') && !refused.to_string().contains('\u{1b}'));
    }
    let long = format!("zone={}", "x".repeat(64));
    assert!(matches!(parse_label(&long), Err(LocatorError::LabelText(_))));
    assert!(parse_label(&format!("zone={}", "x".repeat(63))).is_ok());
    // Labels from the network are checked where a join is admitted.
    let config = TreeConfig::default().with_label_levels(["zone"]);
    let forged: Labels = [("zone".to_string(), "a\nb".to_string())].into();
    assert!(matches!(config.check_label_texts(&forged), Err(LocatorError::LabelText(_))));
    assert!(matches!(
        TreeConfig::default().with_label_levels(["zo\tne"]).check_label_texts(&Labels::new()),
        Err(LocatorError::LabelText(_))
    ));
}

#[test]
fn a_full_cell_splits_in_two_without_moving_anything_but_the_newcomers_share() {
    let mut tree = cluster(4, 4);
    assert_eq!(tree.leaves().count(), 1);
    let old = tree.snapshot(Epoch(1)).unwrap();
    let report = tree.add_node(NodeId(5), Labels::new()).unwrap();
    let new = tree.snapshot(Epoch(2)).unwrap();
    assert_eq!(tree.leaves().count(), 2, "{}", tree.render());
    assert_invariants(&tree);
    // The newcomer joined a half of two nodes, which alone gave it slots. The other half's
    // nodes take part too: their replica holders moved with the split.
    assert_eq!(report.participants, (1..=5).map(NodeId).collect(), "{}", tree.render());
    let plan = MigrationPlan::between(&old, &new);
    assert_eq!(plan.receivers(), BTreeSet::from([NodeId(5)]));
    assert_eq!(plan.senders().len(), 2);
    assert_eq!(plan.moved_slots(), u64::from(tree.slot_counts(KV)[&NodeId(5)]));
}

#[test]
fn nodes_land_in_the_subtree_of_their_label() {
    let config = TreeConfig::default().with_cell_capacity(2).with_label_levels(["zone", "rack"]);
    let mut tree = CellTree::new(config).unwrap();
    tree.register_service(ServiceSpec::new(KV, "kv")).unwrap();
    let mut labelled = Vec::new();
    for n in 1..=12u64 {
        let z = if n % 2 == 0 { "a" } else { "b" };
        let mut labels = zone(z);
        if n % 3 == 0 {
            labels.insert("rack".into(), "r1".into());
        }
        tree.add_node(NodeId(n), labels.clone()).unwrap();
        labelled.push((NodeId(n), labels));
    }
    assert_invariants(&tree);
    for (node, labels) in labelled {
        // Walk up from the node's leaf: every label it carries names one of its ancestors.
        let mut seen = Labels::new();
        let mut cell = tree.leaf_of(node);
        while let Some(id) = cell {
            let c = tree.cell(id).unwrap();
            if let Some((k, v)) = &c.label {
                seen.insert(k.clone(), v.clone());
            }
            cell = c.parent;
        }
        // A node without a rack label may sit under any rack of its zone.
        assert!(
            labels.iter().all(|(k, v)| seen.get(k) == Some(v)),
            "{node} placed outside its labels:\n{}",
            tree.render()
        );
    }
}

#[test]
fn a_new_label_opens_a_subtree_that_takes_its_share_from_one_cell() {
    let config = TreeConfig::default().with_label_levels(["zone"]);
    let mut tree = CellTree::new(config).unwrap();
    tree.register_service(ServiceSpec::new(KV, "kv")).unwrap();
    for n in 1..=6 {
        tree.add_node(NodeId(n), zone("a")).unwrap();
    }
    let old = tree.snapshot(Epoch(1)).unwrap();
    let report = tree.add_node(NodeId(7), zone("b")).unwrap();
    let new = tree.snapshot(Epoch(2)).unwrap();
    assert_invariants(&tree);
    assert_eq!(report.cells.len(), 2);
    assert_eq!(report.participants.len(), 7);
    let counts = tree.slot_counts(KV);
    assert_eq!(counts[&NodeId(7)], 65_536 / 7);
    assert_eq!(MigrationPlan::between(&old, &new).moved_slots(), u64::from(counts[&NodeId(7)]));
}

#[test]
fn a_small_service_stays_in_its_subtree_and_widens_when_the_subtree_empties() {
    let mut tree = cluster(4, 12);
    tree.register_service(ServiceSpec::new(ServiceId(2), "small").with_slots(64).with_size(2))
        .unwrap();
    let scope = tree.scope_of(ServiceId(2)).unwrap();
    assert_ne!(scope, ROOT);
    let small: BTreeSet<NodeId> = tree.slot_counts(ServiceId(2)).keys().copied().collect();
    assert!(small.len() < 12 && small.len() >= 2, "{small:?}");
    assert_invariants(&tree);
    // Remove every node of the scope: the service must survive, managed elsewhere.
    for node in small {
        tree.fail_node(node).unwrap();
        assert_invariants(&tree);
    }
    let snapshot = tree.snapshot(Epoch(3)).unwrap();
    let owner = snapshot.locate(ServiceId(2), Key(42)).unwrap();
    assert!(tree.contains(owner));
}

#[test]
fn runs_of_neighbouring_keys_share_a_manager() {
    let mut tree = cluster(8, 5);
    tree.register_service(ServiceSpec::new(ServiceId(2), "pages").with_runs(16)).unwrap();
    let snapshot = tree.snapshot(Epoch(1)).unwrap();
    for run in 0..100u64 {
        let first = snapshot.locate(ServiceId(2), Key(run * 16)).unwrap();
        for k in run * 16..run * 16 + 16 {
            assert_eq!(snapshot.locate(ServiceId(2), Key(k)), Some(first));
        }
    }
    assert_eq!(snapshot.locate(ServiceId(9), Key(1)), None, "unregistered service");
}

#[test]
fn rebalance_evens_out_a_cluster_that_shrank_unevenly() {
    let mut tree = cluster(4, 16);
    // Empty one cell almost completely: its last node now carries four nodes' worth.
    let leaf = tree.leaf_of(NodeId(1)).unwrap();
    let members = tree.cell(leaf).unwrap().members().to_vec();
    for &m in &members[1..] {
        tree.evict_node(m).unwrap();
    }
    let load = |t: &CellTree| {
        let c = t.slot_counts(KV);
        let max = *c.values().max().unwrap() as f64;
        max * t.len() as f64 / 65_536.0
    };
    assert!(load(&tree) > 2.0, "setup: {}", load(&tree));
    let mut rounds = 0;
    while !tree.apply(&Change::Rebalance { max_over_avg_permille: 1200 }).unwrap().cells.is_empty()
    {
        rounds += 1;
        assert!(rounds < 20, "rebalance does not converge");
    }
    assert!(load(&tree) <= 1.2, "after {rounds} rounds: {}", load(&tree));
    assert_invariants(&tree);
    // A balanced cluster is left alone.
    assert!(tree
        .apply(&Change::Rebalance { max_over_avg_permille: 1200 })
        .unwrap()
        .cells
        .is_empty());
}

#[test]
fn a_plan_reads_well_for_an_operator() {
    let mut tree = cluster(8, 3);
    let old = tree.snapshot(Epoch(4)).unwrap();
    tree.evict_node(NodeId(2)).unwrap();
    let new = tree.snapshot(Epoch(5)).unwrap();
    let text = MigrationPlan::between(&old, &new).to_string();
    assert!(text.starts_with("plan e4 -> e5: 21845 slots move, 3 nodes take part"), "{text}");
    // n1 held one slot more than n3, so n3 takes one more: both end with 32,768.
    assert!(text.contains("n2 -> n1: 10922 slots in 32768..43690\n"), "{text}");
    assert!(text.contains("n2 -> n3: 10923 slots in 43690..54613\n"), "{text}");
    assert_eq!(tree.slot_counts(KV).values().copied().collect::<Vec<_>>(), vec![32_768, 32_768]);
}

#[test]
fn the_snapshot_cell_refuses_to_go_back_in_time() {
    let tree = cluster(8, 3);
    let cell = SnapshotCell::new(tree.snapshot(Epoch(2)).unwrap());
    assert_eq!(
        cell.install(tree.snapshot(Epoch(2)).unwrap()).unwrap_err(),
        LocatorError::StaleEpoch { installed: Epoch(2), offered: Epoch(2) }
    );
    let previous = cell.install(tree.snapshot(Epoch(3)).unwrap()).unwrap();
    assert_eq!(previous.epoch(), Epoch(2));
    assert_eq!(cell.load().epoch(), Epoch(3));
}

#[test]
fn readers_see_whole_snapshots_while_epochs_are_installed() {
    let mut tree = cluster(8, 4);
    let cell = SnapshotCell::new(tree.snapshot(Epoch(1)).unwrap());
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut last = Epoch(0);
                    for k in 0..200_000u64 {
                        let snap = cell.load();
                        assert!(snap.epoch() >= last, "epoch went back");
                        last = snap.epoch();
                        let owner = snap.locate(KV, Key(k)).unwrap();
                        assert!(snap.nodes().contains(&owner), "{owner} not in {}", snap.epoch());
                    }
                })
            })
            .collect();
        for e in 2..40u64 {
            tree.add_node(NodeId(100 + e), Labels::new()).unwrap();
            cell.install(tree.snapshot(Epoch(e)).unwrap()).unwrap();
        }
        for r in readers {
            r.join().unwrap();
        }
    });
}

#[test]
fn the_tree_draws_itself() {
    let tree = cluster(2, 3);
    let drawing = tree.render();
    assert!(drawing.starts_with("c0 root (3 nodes)\n"), "{drawing}");
    assert!(
        drawing.contains("└─ c1\n   ├─ c2 [n1:16384 n3:16384]\n   └─ c3 [n2:32768]"),
        "{drawing}"
    );
    assert!(drawing.contains("└─ "), "{drawing}");
}

/// Worst max/avg slot load over `steps` seeded changes on a cluster of `n`, rebalancing after
/// each change above `permille` as the supervisor does.
fn churn_worst(n: u64, steps: u64, permille: u32) -> f64 {
    let mut tree = CellTree::new(TreeConfig::default()).unwrap();
    tree.register_service(ServiceSpec::new(KV, "kv").with_slots(4096)).unwrap();
    for i in 1..=n {
        tree.add_node(NodeId(i), Labels::new()).unwrap();
    }
    let mut next = n;
    let mut worst: f64 = 0.0;
    for step in 0..steps {
        let roll = gobelins_locator::mix(step) % 10;
        let nodes: Vec<NodeId> = tree.nodes().collect();
        let size = nodes.len() as u64;
        let change = if size <= n / 2 || (size < 2 * n && roll < 5) {
            next += 1;
            Change::Add { node: NodeId(next), labels: Labels::new() }
        } else {
            let victim = nodes[(gobelins_locator::mix(step ^ 0xfeed) % size) as usize];
            if roll < 8 {
                Change::Evict(victim)
            } else {
                Change::Fail(victim)
            }
        };
        tree.apply(&change).unwrap();
        let rebalance = Change::Rebalance { max_over_avg_permille: permille };
        while !tree.apply(&rebalance).unwrap().cells.is_empty() {}
        assert_invariants(&tree);
        let max = f64::from(*tree.slot_counts(KV).values().max().unwrap());
        worst = worst.max(max * tree.len() as f64 / 4096.0);
    }
    worst
}

#[test]
fn load_stays_within_a_quarter_of_even_through_churn_with_rebalancing() {
    let worst = churn_worst(16, 400, 1200);
    assert!(worst <= 1.25, "max/avg reached {worst:.3}");
}

#[test]
fn churn_without_rebalancing_drifts_out_of_balance() {
    // Why rebalancing exists: removals burden only their own cell.
    let worst = churn_worst(16, 400, u32::MAX);
    assert!(worst > 1.5, "max/avg only reached {worst:.3}");
}

#[test]
fn a_rebalance_that_cannot_lower_the_hottest_cell_changes_nothing() {
    // A small service confined to one cell makes that cell the hottest for good; no slot can
    // move to help, so a rebalance must be a no-op rather than a new epoch every round.
    let mut tree = cluster(2, 4);
    tree.register_service(ServiceSpec::new(ServiceId(2), "small").with_slots(64).with_size(2))
        .unwrap();
    let before = tree.clone();
    let report = tree.apply(&Change::Rebalance { max_over_avg_permille: 1200 }).unwrap();
    assert!(report.cells.is_empty(), "a useless rebalance was reported: {report:?}");
    assert_eq!(tree, before);
}

#[test]
fn adding_and_evicting_at_capacity_keeps_the_tree_shallow() {
    // Each add at capacity splits a cell; each evict may empty a half. Without collapsing
    // split cells left with one child, every round would add a level.
    let mut tree = cluster(2, 3);
    let mut next = 3;
    for _ in 0..50 {
        next += 1;
        tree.add_node(NodeId(next), Labels::new()).unwrap();
        let victim = tree.nodes().find(|&n| n != NodeId(1)).expect("another node");
        let report = tree.evict_node(victim).unwrap();
        assert!(report.cells.iter().all(|c| tree.cell(*c).is_some()), "report names a gone cell");
        assert_invariants(&tree);
    }
    assert!(
        tree.cells().count() <= 2 * tree.len() + 1,
        "{} cells for {} nodes",
        tree.cells().count(),
        tree.len()
    );
}

/// `nodes` as `(id, labels)`, in a tree with these label levels.
fn labelled(levels: &[&str], nodes: &[(u64, Labels)]) -> CellTree {
    let config = TreeConfig::default().with_label_levels(levels.iter().copied());
    let mut tree = CellTree::new(config).unwrap();
    tree.register_service(ServiceSpec::new(KV, "kv")).unwrap();
    for (n, labels) in nodes {
        tree.add_node(NodeId(*n), labels.clone()).unwrap();
    }
    tree
}

/// The zone's label value of a member.
fn zone_of(tree: &CellTree, node: NodeId) -> String {
    let mut cell = tree.leaf_of(node).expect("a member");
    loop {
        let c = tree.cell(cell).unwrap();
        if let Some((_, value)) = &c.label {
            if c.parent == Some(ROOT) {
                return value.clone();
            }
        }
        cell = c.parent.expect("a labelled cell under the root");
    }
}

#[test]
fn replicas_are_kept_in_another_zone_spread_and_a_change_moves_few_holders() {
    let zones = ["a", "b", "c"];
    let nodes: Vec<(u64, Labels)> = (1..=9).map(|n| (n, zone(zones[(n % 3) as usize]))).collect();
    let mut tree = labelled(&["zone"], &nodes);
    let before = tree.replica_holders();
    for &(n, holder) in &before {
        let holder = holder.expect("a holder");
        assert_ne!(zone_of(&tree, n), zone_of(&tree, holder), "{n} on {holder}");
        assert_eq!(tree.replica_holder(n), Some(holder));
        assert_eq!(tree.snapshot(Epoch(1)).unwrap().replica_holder(n), Some(holder));
    }
    // Pinned: every node of every labelled cluster derives these, and a change to the ranking
    // moves replicas in every one of them. No node holds for more than two.
    let pinned: Vec<u64> = before.iter().map(|(_, h)| h.unwrap().0).collect();
    assert_eq!(pinned, [2, 1, 1, 9, 4, 4, 6, 7, 8]);

    // Each node whose holder moves takes part, with its new holder; and few move.
    let mut check = |change: Change| {
        let before = tree.replica_holders();
        let report = tree.apply(&change).unwrap();
        let after = tree.replica_holders();
        let mut moved = 0;
        for &(n, now) in &after {
            let was = before.iter().find(|(m, _)| *m == n).map(|&(_, h)| h);
            if was != Some(now) {
                let now = now.expect("a holder");
                assert_ne!(zone_of(&tree, n), zone_of(&tree, now), "{change}: {n} on {now}");
                let part = |x| report.participants.contains(&x);
                assert!(part(n) && part(now), "{change}: {n} on {now} take part");
                moved += u32::from(was.is_some());
            }
            let holds = after.iter().filter(|&&(_, h)| h == Some(n)).count();
            assert!(holds as u32 <= gobelins_locator::HOLDER_CAP, "{change}: {n} holds {holds}");
        }
        moved
    };
    // The join moves no one's holder (the joiner's own is new); the removals move just the
    // holders of the nodes the removed one held for, two and one.
    assert_eq!(check(Change::Add { node: NodeId(10), labels: zone("b") }), 0);
    assert_eq!(check(Change::Evict(NodeId(4))), 2);
    assert_eq!(check(Change::Fail(NodeId(9))), 1);
}

#[test]
fn in_one_zone_replicas_go_to_another_rack_and_in_one_rack_to_a_cell_mate() {
    let rack = |r: &str| {
        let mut labels = zone("a");
        labels.insert("rack".into(), r.into());
        labels
    };
    let nodes: Vec<(u64, Labels)> =
        vec![(1, rack("r1")), (2, rack("r1")), (3, rack("r2")), (4, rack("r2"))];
    let tree = labelled(&["zone", "rack"], &nodes);
    for (n, holder) in tree.replica_holders() {
        let (n, holder) = (n.0, holder.expect("a holder").0);
        assert_ne!((n - 1) / 2, (holder - 1) / 2, "{n} on {holder}: another rack");
    }
    let nodes: Vec<(u64, Labels)> = (1..=3).map(|n| (n, rack("r1"))).collect();
    let tree = labelled(&["zone", "rack"], &nodes);
    let holders: Vec<_> = tree.replica_holders().into_iter().map(|(_, h)| h.unwrap().0).collect();
    assert_eq!(holders, [2, 3, 1], "the next node of the one cell");
    // A node labelled with its zone alone sits right under it, its rack unknown: not apart
    // from a node of rack r1, so no candidate for one.
    let nodes = vec![(1, zone("a")), (2, rack("r1")), (3, rack("r1"))];
    let tree = labelled(&["zone", "rack"], &nodes);
    assert_eq!(tree.replica_holder(NodeId(2)), Some(NodeId(3)), "{}", tree.render());
    assert_eq!(tree.snapshot(Epoch(1)).unwrap().apart_at(NodeId(1), NodeId(2)), None);
}
