//! What a service is told of a change: the change itself, and the slots that leave it.

use crate::run::Packed;
use gobelins_locator::{Change, Key, NodeId, ServiceSpec, SlotMove};
use std::collections::BTreeMap;
use std::collections::BTreeSet;

/// The configuration change a migration belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeInfo {
    /// The epoch the change leads to.
    pub epoch: u64,
    /// The change itself.
    pub change: Change,
    /// Every node taking part.
    pub participants: BTreeSet<NodeId>,
    /// The participants whose part has arrived here in full (their ack came, after all they
    /// sent this node), as of the callback. In `after_migration` of a node that receives, every
    /// participant that did not die during the change: one missing from it may have held what
    /// nobody else did (a recovery's only other copy of an entry, say).
    pub acked: BTreeSet<NodeId>,
    /// For `Change::Fail(n)` or `Change::Recover(n)`: the epochs of the last two changes that
    /// moved something of `n`'s own (slots to or from it, or its replica holder:
    /// `MigrationPlan::touched`), latest first, as the cluster recorded them when each began
    /// (`n` may have died during the latest). A service that keeps `n`'s replicas on its
    /// holder tells from them whether the copy there is current: `n` copied it at the end of
    /// the latest, or later, and nothing `n` managed has moved since. The holder need not take
    /// part in every change `n` does to know it. `[None, None]` for other changes.
    pub failed_moved_in: [Option<u64>; 2],
    /// For `Change::Fail(n)` or `Change::Recover(n)`: since when what `n` said of the entries
    /// it managed still holds ([`gobelins_locator::KeptSince`]): a claim it made at a stable
    /// epoch at or after this one, that each entry had a copy elsewhere say, was still true
    /// when it died, if every survivor reports what it holds. The last change before this one
    /// that removed another node, or moved slots to `n`. `None` when the cluster did not
    /// record it for `n`'s life (rules older than protocol 29's), and for other changes.
    pub failed_kept_since: Option<u64>,
}

/// The slots of one service that leave this node in a change, and where each goes.
#[derive(Clone, Debug)]
pub struct Moving {
    spec: ServiceSpec,
    moves: Vec<SlotMove>,
}

impl Moving {
    /// The moves out of this node for the service `spec` describes. Their slot ranges must not
    /// overlap: each slot has one new manager.
    pub fn new(spec: ServiceSpec, mut moves: Vec<SlotMove>) -> Self {
        moves.sort_unstable_by_key(|m| m.slots.start);
        debug_assert!(
            moves.windows(2).all(|w| w[0].slots.end <= w[1].slots.start),
            "overlapping slot moves: {moves:?}"
        );
        Moving { spec, moves }
    }

    /// The new manager of `key` if it leaves this node, `None` if it stays.
    pub fn destination(&self, key: Key) -> Option<NodeId> {
        // Called for every entry a node holds: a change can move thousands of scattered slot
        // ranges, so a linear search would make `send_out` quadratic.
        let slot = self.spec.slot_of(key);
        let at = self.moves.partition_point(|m| m.slots.end <= slot);
        self.moves.get(at).filter(|m| m.slots.contains(&slot)).map(|m| m.to)
    }

    /// Every slot that leaves, in ascending order. A service that keeps its entries grouped
    /// by slot can take these out whole, without looking at the entries that stay.
    pub fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.moves.iter().flat_map(|m| m.slots.clone())
    }

    /// The moves themselves, in ascending order of slots: which slots go to which node.
    pub fn moves(&self) -> &[SlotMove] {
        &self.moves
    }

    /// The slots that go to `node`.
    pub fn slots_to(&self, node: NodeId) -> impl Iterator<Item = u32> + '_ {
        self.moves.iter().filter(move |m| m.to == node).flat_map(|m| m.slots.clone())
    }

    /// Whether nothing leaves.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// What a scan packed, kept to the keys that leave, each in a run for its new manager; and
    /// how many entries were left out. A scan returns copies of the failed node's keys only,
    /// but a plug-in may pack others (a replica it holds of a live node's key), or hand a run
    /// to the wrong node: shipped as they were, such copies would replace what the keys' live
    /// managers hold, perhaps with older values, as if rebuilt. Runs that need no change are
    /// kept as they are; the others are split per destination, none larger than it was.
    pub(crate) fn keep_leaving(&self, runs: Vec<(NodeId, Packed)>) -> (Vec<(NodeId, Packed)>, u64) {
        let mut kept = Vec::with_capacity(runs.len());
        let mut left_out = 0;
        for (to, run) in runs {
            if run.entries().all(|(key, _)| self.destination(key) == Some(to)) {
                kept.push((to, run));
                continue;
            }
            let mut split: BTreeMap<NodeId, Packed> = BTreeMap::new();
            for (key, entry) in run.entries() {
                let Some(dest) = self.destination(key) else {
                    left_out += 1;
                    continue;
                };
                let packed = split.entry(dest).or_insert_with(|| Packed::with_capacity(run.size()));
                // Taken from a run that held it already: neither too large nor cut short.
                let _ = packed.push(key, entry);
            }
            // Each was sized for the whole run, and waits for the sending phase.
            kept.extend(split.into_iter().map(|(to, mut run)| {
                run.shrink();
                (to, run)
            }));
        }
        (kept, left_out)
    }
}
