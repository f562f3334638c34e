//! Checks shared by the locator's integration tests.
#![allow(dead_code)]

use gobelins_locator::{CellTree, Epoch, MigrationPlan, NodeId, ServiceId, Snapshot, ROOT};
use std::collections::{BTreeMap, BTreeSet};

/// Asserts every invariant a stable configuration must hold.
pub(crate) fn assert_invariants(tree: &CellTree) {
    let live: BTreeSet<NodeId> = tree.nodes().collect();
    let capacity = tree.config().cell_capacity as usize;
    let mut seen = BTreeSet::new();
    for (id, cell) in tree.leaves() {
        let members = cell.members();
        assert!(!members.is_empty(), "leaf {id} is empty");
        assert!(members.len() <= capacity, "leaf {id} holds {} > {capacity}", members.len());
        for m in members {
            assert!(seen.insert(*m), "{m} sits in two leaves");
            assert_eq!(tree.leaf_of(*m), Some(id));
        }
    }
    assert_eq!(seen, live, "leaves and membership disagree");
    for (id, cell) in tree.cells() {
        if id == ROOT || cell.is_leaf() {
            continue;
        }
        assert!(!cell.children().is_empty(), "inner cell {id} is empty");
        assert!(
            cell.label.is_some() || cell.children().len() > 1,
            "split cell {id} has a lone child:\n{}",
            tree.render()
        );
    }

    if tree.is_empty() {
        return;
    }
    let snapshot = tree.snapshot(Epoch(0)).expect("non-empty cluster");
    for spec in tree.services() {
        let table = snapshot.table(spec.id).expect("every service has a table");
        assert_eq!(table.owners().len(), spec.slots as usize);
        let scope = tree.scope_of(spec.id).expect("registered");
        for owner in table.owners() {
            assert!(live.contains(&owner), "{}: slot managed by dead {owner}", spec.id);
            let leaf = tree.leaf_of(owner).expect("live");
            assert!(within(tree, leaf, scope), "{}: {owner} manages outside scope", spec.id);
        }
        let counts = tree.slot_counts(spec.id);
        for (id, cell) in tree.leaves() {
            let c: Vec<u32> =
                cell.members().iter().map(|m| counts.get(m).copied().unwrap_or(0)).collect();
            let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(hi - lo <= 1, "{}: leaf {id} unbalanced: {c:?}", spec.id);
        }
    }
}

/// Whether `cell` is `ancestor` or below it, walking parents.
pub(crate) fn within(
    tree: &CellTree,
    mut cell: gobelins_locator::CellId,
    ancestor: gobelins_locator::CellId,
) -> bool {
    loop {
        if cell == ancestor {
            return true;
        }
        match tree.cell(cell).and_then(|c| c.parent) {
            Some(p) => cell = p,
            None => return cell == ROOT && ancestor == ROOT,
        }
    }
}

/// Slots per service that `node` manages in `snapshot`.
pub(crate) fn slots_of(snapshot: &Snapshot, node: NodeId) -> BTreeMap<ServiceId, BTreeSet<u32>> {
    snapshot
        .tables()
        .map(|t| {
            let mine =
                t.owners().enumerate().filter(|(_, o)| *o == node).map(|(s, _)| s as u32).collect();
            (t.spec().id, mine)
        })
        .collect()
}

/// Slots per service whose manager differs, according to the plan.
pub(crate) fn moved_by_plan(plan: &MigrationPlan) -> BTreeMap<ServiceId, BTreeSet<u32>> {
    plan.services
        .iter()
        .map(|s| (s.service, s.moves.iter().flat_map(|m| m.slots.clone()).collect()))
        .collect()
}
