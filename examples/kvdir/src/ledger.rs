//! Where copies of other nodes' entries are, as one node knows it: enough, once a node has
//! failed, for each new manager of its slots to say which came back whole and which may have
//! lost entries.
//!
//! An acknowledged write has two copies, on the key's manager and on its backup. After the
//! manager fails, a slot is whole again on its new manager if a survivor that held every entry
//! of it *vouches* for it and delivered what it held (it lives, or all it announced came):
//! - **the backup of record**: the failed node's backup, to which it copied every entry it
//!   managed (`Request::Copied`) at the end of the last change that moved something of its
//!   own (its slots, or its backup), or of a later one: its writes since came here too;
//! - **the backup before**, when the failed node died during such a change, before it could
//!   copy its entries to a new backup: that node holds them all as of the change's start, if
//!   the failed node copied it them at the end of the one before, or later (a backup before
//!   that was leaving stays for the recovery, as a sender does);
//! - **a sender**, for the slots it sent the failed node in the change it died during: it
//!   keeps their copies while their receiver is gone. A survivor that vouched for slots in a
//!   recovery counts as their sender, should their new manager die before it copies them on.
//!
//! The cluster records, for each node, the last two changes that moved something of its own,
//! and a recovery says the failed node's (`ChangeInfo::failed_moved_in`): a backup need not
//! take part in every change of the nodes it backs up, as it had to when it judged by its own.
//! It takes part in those that move something of theirs (the locator takes the holder of
//! every participant part): the backup before learns the table the change began from that way.
//!
//! The backup before and a sender hold nothing written since the change began: the failed
//! node's backup at the recovery's start holds that, and must live too. A voucher that dies
//! during the recovery still counts if its new manager received every entry it said it would
//! send (a vouch says how many): it died after handing them over. A slot no survivor vouches
//! for is reported lost. It may have been empty, or a sender may have kept some of its
//! entries: nobody can tell, so the report says "may have lost", and rebuilds what it found.

use crate::{backup, KVDIR};
use gobelins_locator::{Key, NodeId, SlotMove, Snapshot};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// How many epochs a vouch is kept for a recovery yet to be judged.
const VOUCH_GRACE: u64 = 16;

/// How many of the tables its last changes began from a node keeps. A node that died during a
/// change is recovered in the next change, unless other failures come first: each of them is a
/// change every survivor takes part in. Past this many, the node's slots are reported lost.
const BEGINS_KEPT: usize = 16;

/// One node's record of the copies it holds for others, and of what it was told by them.
#[derive(Default)]
pub(crate) struct Ledger {
    /// For each manager this node backs up, the latest change at whose end it copied this node
    /// every entry it managed.
    copied: HashMap<NodeId, u64>,
    /// The last change this node took part in.
    took_part: Option<u64>,
    /// The tables the last [`BEGINS_KEPT`] changes this node took part in began from, with
    /// their epochs, latest last.
    began: VecDeque<(u64, Arc<Snapshot>)>,
    /// The change `sent_to` belongs to.
    sending: Option<u64>,
    /// The slots this node sent out in that change, by receiver, while this node keeps their
    /// copies (until the change is stable with the receiver alive).
    sent_to: HashMap<NodeId, Vec<u32>>,
    /// The slots this node vouched for in the recovery beginning, by new manager: they count as
    /// sent in it once it has begun.
    vouched_to: HashMap<NodeId, Vec<u32>>,
    /// What survivors vouched for of each failed node's slots.
    vouched: HashMap<NodeId, Vec<Vouch>>,
    /// The entries, with their slots, received from each node with a vouch still to judge.
    delivered: HashMap<NodeId, HashSet<(u32, Key)>>,
    /// For each failed node, the epoch of the last recovery of it this node judged: a vouch
    /// made before it came too late for that one, and must not count for a later life's.
    judged: HashMap<NodeId, u64>,
    /// The recovery under way, as this node's `scan` saw it.
    rebuilding: Option<Rebuilding>,
}

/// A survivor's word that it holds every entry of some slots of a failed node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Vouch {
    /// The survivor.
    pub(crate) by: NodeId,
    /// The epoch its table was at as it vouched.
    pub(crate) at: u64,
    /// Slots whose every entry it holds, up to the latest write.
    pub(crate) current: Vec<u32>,
    /// Slots whose every entry it holds as of the last change's start: the failed node's
    /// backup at the recovery's start holds the writes since.
    pub(crate) older: Vec<u32>,
    /// How many entries of these slots it sends: received, they count even if it dies.
    pub(crate) entries: u64,
}

/// What a recovery gives this node to rebuild.
struct Rebuilding {
    failed: NodeId,
    /// The table the recovery began from.
    table: Arc<Snapshot>,
    /// The failed node's slots this node now manages.
    mine: Vec<u32>,
}

/// The slots `node` manages in `table`, as a mask over every slot.
fn managed_by(table: &Snapshot, node: NodeId) -> Vec<bool> {
    table.table(KVDIR).map_or_else(Vec::new, |t| t.owners().map(|owner| owner == node).collect())
}

/// `slots` as a mask over the first `len` slots; any past them is left out.
fn mask(slots: &[u32], len: usize) -> Vec<bool> {
    let mut mask = vec![false; len];
    for &s in slots {
        if let Some(m) = mask.get_mut(s as usize) {
            *m = true;
        }
    }
    mask
}

impl Ledger {
    /// `manager` copied this node every entry it manages, at the end of the change to `epoch`.
    pub(crate) fn copied(&mut self, manager: NodeId, epoch: u64) {
        let at = self.copied.entry(manager).or_default();
        *at = epoch.max(*at);
    }

    /// This node dropped its copies of what `manager` manages, whose backup holds them now:
    /// it vouches for none of them as a backup before.
    pub(crate) fn forgot(&mut self, manager: NodeId) {
        self.copied.remove(&manager);
    }

    /// Whether `manager` copied this node every entry at the end of the change to `epoch`, or
    /// of a later one.
    fn copied_since(&self, manager: NodeId, epoch: Option<u64>) -> bool {
        epoch.is_some_and(|epoch| self.copied.get(&manager).is_some_and(|&at| at >= epoch))
    }

    /// A change this node takes part in, to `epoch`, begins from `table`.
    pub(crate) fn begin(&mut self, epoch: u64, table: Option<Arc<Snapshot>>) {
        if let Some(table) = table {
            if self.began.len() == BEGINS_KEPT {
                self.began.pop_front();
            }
            self.began.push_back((epoch, table));
        }
        self.sending = Some(epoch);
        self.sent_to = std::mem::take(&mut self.vouched_to);
    }

    /// This node vouched for `slots` to `to`, their new manager, in the recovery beginning.
    pub(crate) fn vouched_to(&mut self, to: NodeId, slots: impl IntoIterator<Item = u32>) {
        self.vouched_to.entry(to).or_default().extend(slots);
    }

    /// This node sends out `moves` in the change that began.
    pub(crate) fn send_out(&mut self, moves: &[SlotMove]) {
        for m in moves {
            self.sent_to.entry(m.to).or_default().extend(m.slots.clone());
        }
    }

    /// This node finished its part in the change to `epoch`.
    pub(crate) fn end(&mut self, epoch: u64) {
        self.took_part = Some(epoch);
        // Vouches for a recovery this node was not given any slots of, or that came after it
        // ended; a few epochs' grace for a voucher whose table lagged.
        self.vouched.retain(|_, vouches| {
            vouches.retain(|v| v.at + VOUCH_GRACE >= epoch);
            !vouches.is_empty()
        });
        self.forget_deliveries();
    }

    /// Whether a vouch by `from` waits to be judged here: what it sends is then counted.
    pub(crate) fn expects(&self, from: NodeId) -> bool {
        self.vouched.values().flatten().any(|v| v.by == from)
    }

    /// `entries`, each with its slot, came from `from`, which vouched to this node: those of
    /// the slots it vouched for are kept, to be counted.
    pub(crate) fn received(&mut self, from: NodeId, entries: impl IntoIterator<Item = (u32, Key)>) {
        let vouched: HashSet<u32> = (self.vouched.values().flatten())
            .filter(|v| v.by == from)
            .flat_map(|v| v.current.iter().chain(&v.older).copied())
            .collect();
        let kept = entries.into_iter().filter(|(slot, _)| vouched.contains(slot));
        self.delivered.entry(from).or_default().extend(kept);
    }

    /// Whether every entry `vouch` announced has come: distinct keys of its slots, so that a
    /// batch received twice counts once.
    fn handed_over(&self, vouch: &Vouch, len: usize) -> bool {
        let slots = mask(&[&vouch.current[..], &vouch.older[..]].concat(), len);
        let came = self.delivered.get(&vouch.by).map_or(0, |keys| {
            keys.iter().filter(|(slot, _)| slots.get(*slot as usize) == Some(&true)).count()
        });
        came as u64 == vouch.entries
    }

    /// What came from nodes with no vouch left to judge.
    fn forget_deliveries(&mut self) {
        let vouchers: HashSet<NodeId> = self.vouched.values().flatten().map(|v| v.by).collect();
        self.delivered.retain(|by, _| vouchers.contains(by));
    }

    /// The change to `epoch` is stable: the copies of what went to live receivers are dropped.
    pub(crate) fn stable(&mut self, epoch: u64, gone: impl Fn(NodeId) -> bool) {
        if self.sending == Some(epoch) {
            self.sent_to.retain(|&to, _| gone(to));
        }
    }

    /// What this node vouches for among `orphans`, the slots `failed` leaves, in a recovery
    /// that begins from `table`; `moved_in`, the last two changes that moved something of
    /// `failed`'s, latest first.
    pub(crate) fn vouch(
        &self,
        me: NodeId,
        failed: NodeId,
        table: &Snapshot,
        orphans: &[u32],
        moved_in: [Option<u64>; 2],
    ) -> Option<Vouch> {
        let at = table.epoch().0;
        let among = |mask: &[bool]| -> Vec<u32> {
            orphans.iter().copied().filter(|&s| mask.get(s as usize) == Some(&true)).collect()
        };
        let mut vouch = Vouch { by: me, at, current: Vec::new(), older: Vec::new(), entries: 0 };
        // The copy is current if it was made at the end of the last change that moved
        // something of `failed`'s, or later: neither what it manages nor its holder has
        // changed since.
        if backup(table, failed) == Some(me) && self.copied_since(failed, moved_in[0]) {
            vouch.current = among(&managed_by(table, failed));
        }
        // It may have died during that change, before copying its new backup what it had, or
        // once it had, but before the cluster heard its part was done: the slots it was
        // sending are orphans too. This node took part, if it held for `failed` as the change
        // began, and kept the table it began from.
        let began = self.began.iter().find(|(epoch, _)| moved_in[0] == Some(*epoch));
        if let Some((_, began)) = began {
            if backup(began, failed) == Some(me) && self.copied_since(failed, moved_in[1]) {
                vouch.older.extend(among(&managed_by(began, failed)));
            }
        }
        if self.sending.is_some() && self.sending == self.took_part {
            if let Some(sent) = self.sent_to.get(&failed) {
                let len = orphans.iter().max().map_or(0, |&m| m as usize + 1);
                vouch.older.extend(among(&mask(sent, len)));
            }
        }
        vouch.older.sort_unstable();
        vouch.older.dedup();
        vouch.older.retain(|s| vouch.current.binary_search(s).is_err());
        (!vouch.current.is_empty() || !vouch.older.is_empty()).then_some(vouch)
    }

    /// `vouch` came for slots of `failed`. Its sender's batches follow it: whatever came from
    /// that node before is of other changes, and is not counted. The same word heard again (its
    /// sender asks again when an answer fails, and the first may have come all the same)
    /// changes nothing: what came since the first counts still.
    pub(crate) fn heard(&mut self, failed: NodeId, vouch: Vouch) {
        if self.judged.get(&failed).is_some_and(|&judged| vouch.at < judged) {
            return;
        }
        let words = self.vouched.entry(failed).or_default();
        if words.contains(&vouch) {
            return;
        }
        self.delivered.remove(&vouch.by);
        words.push(vouch);
    }

    /// This node's `scan` saw the recovery of `failed` begin from `table`, which gives this
    /// node the slots `mine`.
    pub(crate) fn rebuild(&mut self, failed: NodeId, table: Arc<Snapshot>, mine: Vec<u32>) {
        self.rebuilding = Some(Rebuilding { failed, table, mine });
    }

    /// The recovery of `failed`, to `epoch`, ends on this node: the slots it rebuilt that no
    /// survivor still alive vouched for.
    pub(crate) fn unvouched(
        &mut self,
        me: NodeId,
        failed: NodeId,
        epoch: u64,
        gone: impl Fn(NodeId) -> bool,
    ) -> Vec<u32> {
        let since = self.judged.insert(failed, epoch).unwrap_or(0);
        let mut vouches = self.vouched.remove(&failed).unwrap_or_default();
        vouches.retain(|v| v.at >= since);
        let rebuilding = self.rebuilding.take_if(|r| r.failed == failed);
        let judged = rebuilding.map_or_else(Vec::new, |rebuilding| {
            let len = rebuilding.table.table(KVDIR).map_or(0, |t| t.owners().len());
            let alive = |n: NodeId| n == me || !gone(n);
            let writes_since = backup(&rebuilding.table, failed).is_none_or(alive);
            let mut slots = Vec::new();
            for vouch in vouches.iter().filter(|v| alive(v.by) || self.handed_over(v, len)) {
                let older = if writes_since { &vouch.older[..] } else { &[] };
                slots.extend(vouch.current.iter().chain(older));
            }
            // The slots came from peers: only those of the service count, whatever else is
            // sent.
            let covered = mask(&slots, len);
            rebuilding
                .mine
                .into_iter()
                .filter(|&s| covered.get(s as usize) != Some(&true))
                .collect()
        });
        self.forget_deliveries();
        judged
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
