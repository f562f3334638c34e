//! Where copies of other nodes' entries are, as one node knows it: enough, once a node has
//! failed, for each new manager of its slots to say which came back whole and which may have
//! lost entries.
//!
//! An acknowledged write has two copies, on the key's manager and on its backup. After the
//! manager fails, a slot is whole again on its new manager if a survivor that held every entry
//! of it *vouches* for it and delivered what it held (it lives, or all it announced came):
//! - **the backup of record**: the failed node's backup, to which it copied every entry it
//!   managed at the end of the last change both took part in (`Request::Copied`);
//! - **the backup before**, when the failed node died during a change, before it could copy
//!   its entries to a new backup: that node holds them all as of the change's start;
//! - **a sender**, for the slots it sent the failed node in the change it died during: it
//!   keeps their copies while their receiver is gone. A survivor that vouched for slots in a
//!   recovery counts as their sender, should their new manager die before it copies them on.
//!
//! The last two hold nothing written since the change began: the failed node's backup at the
//! recovery's start holds that, and must live too. A voucher that dies during the recovery
//! still counts if its new manager received every entry it said it would send (a vouch says
//! how many): it died after handing them over. A slot no survivor vouches for is reported
//! lost. It may have been empty, or a sender may have kept some of its entries: nobody can
//! tell, so the report says "may have lost", and rebuilds what it found.

use crate::{backup, KVDIR};
use gobelins_locator::{Key, NodeId, SlotMove, Snapshot};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// How many epochs a vouch is kept for a recovery yet to be judged.
const VOUCH_GRACE: u64 = 16;

/// One node's record of the copies it holds for others, and of what it was told by them.
#[derive(Default)]
pub(crate) struct Ledger {
    /// For each manager this node backs up, the last two changes at whose end it copied this
    /// node every entry it managed, latest first.
    copied: HashMap<NodeId, [Option<u64>; 2]>,
    /// The last two changes this node took part in, latest first.
    took_part: [Option<u64>; 2],
    /// The table as the latest change this node took part in began.
    began: Option<Arc<Snapshot>>,
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
        if at[0].is_none_or(|latest| latest < epoch) {
            *at = [Some(epoch), at[0]];
        }
    }

    /// This node dropped its copies of what `manager` manages, whose backup holds them now:
    /// it vouches for none of them as a backup before.
    pub(crate) fn forgot(&mut self, manager: NodeId) {
        self.copied.remove(&manager);
    }

    /// Whether `manager` copied this node every entry at the end of the change to `epoch`.
    fn copied_at(&self, manager: NodeId, epoch: Option<u64>) -> bool {
        epoch.is_some() && self.copied.get(&manager).is_some_and(|at| at.contains(&epoch))
    }

    /// A change this node takes part in, to `epoch`, begins from `table`.
    pub(crate) fn begin(&mut self, epoch: u64, table: Option<Arc<Snapshot>>) {
        self.began = table;
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
        self.took_part = [Some(epoch), self.took_part[0]];
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
    /// that begins from `table`.
    pub(crate) fn vouch(
        &self,
        me: NodeId,
        failed: NodeId,
        table: &Snapshot,
        orphans: &[u32],
    ) -> Option<Vouch> {
        let at = table.epoch().0;
        let among = |mask: &[bool]| -> Vec<u32> {
            orphans.iter().copied().filter(|&s| mask.get(s as usize) == Some(&true)).collect()
        };
        let mut vouch = Vouch { by: me, at, current: Vec::new(), older: Vec::new(), entries: 0 };
        // Cell mates take part in the same changes: the copy is current if it was made at the
        // end of the last one. (A node alone in its cell keeps its copies in another cell,
        // whose changes it takes no part in: its backup vouches only if that node's last
        // copy came at the end of a change both took part in, a recovery say.)
        if backup(table, failed) == Some(me) && self.copied_at(failed, self.took_part[0]) {
            vouch.current = among(&managed_by(table, failed));
        }
        // It may have died during the last change, before copying its new backup what it had,
        // or once it had, but before the cluster heard its part was done: the slots it was
        // sending are orphans too.
        if let Some(began) = &self.began {
            if backup(began, failed) == Some(me) && self.copied_at(failed, self.took_part[1]) {
                vouch.older.extend(among(&managed_by(began, failed)));
            }
        }
        if self.sending.is_some() && self.sending == self.took_part[0] {
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
    /// that node before is of other changes, and is not counted.
    pub(crate) fn heard(&mut self, failed: NodeId, vouch: Vouch) {
        if self.judged.get(&failed).is_some_and(|&judged| vouch.at < judged) {
            return;
        }
        self.delivered.remove(&vouch.by);
        self.vouched.entry(failed).or_default().push(vouch);
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
mod tests {
    use super::*;
    use crate::tests::table_of;
    use std::ops::Range;

    fn n(i: u64) -> NodeId {
        NodeId(i)
    }

    /// The slots `node` manages in `table`.
    fn slots_of(table: &Snapshot, node: NodeId) -> Vec<u32> {
        let mask = managed_by(table, node);
        (0..mask.len() as u32).filter(|&s| mask[s as usize]).collect()
    }

    fn moving(slots: Range<u32>, from: u64, to: u64) -> SlotMove {
        SlotMove { slots, from: n(from), to: n(to) }
    }

    /// A node that took part in the changes to epochs 5 and 6, the second begun from `at_5`,
    /// to which node 2 said it copied every entry at the end of the changes to `copied`.
    fn through_5_and_6(at_5: &Arc<Snapshot>, copied: &[u64]) -> Ledger {
        let mut ledger = Ledger::default();
        ledger.begin(5, Some(table_of(&[1, 2], 4)));
        ledger.end(5);
        ledger.begin(6, Some(Arc::clone(at_5)));
        ledger.end(6);
        for &epoch in copied {
            ledger.copied(n(2), epoch);
        }
        ledger
    }

    /// `by`'s word, at `at`, for `current` and `older` slots.
    fn word(by: u64, at: u64, current: &[u32], older: &[u32]) -> Vouch {
        Vouch { by: n(by), at, current: current.to_vec(), older: older.to_vec(), entries: 0 }
    }

    /// Node 3 backs node 2 up in a cell of four. Its copy is current if node 2 copied it
    /// everything at the end of the last change node 3 took part in, not an earlier one.
    #[test]
    fn the_backup_of_record_vouches_for_every_slot_if_it_was_copied_all_at_the_last_change() {
        let at_5 = table_of(&[1, 2, 3, 4], 5);
        let of_2 = slots_of(&at_5, n(2));
        assert!(!of_2.is_empty());
        assert_eq!(backup(&at_5, n(2)), Some(n(3)));
        let mut ledger = Ledger::default();
        ledger.begin(5, Some(table_of(&[1, 2, 3], 4)));
        ledger.end(5);
        ledger.copied(n(2), 4);
        assert_eq!(ledger.vouch(n(3), n(2), &at_5, &of_2), None, "copied before the last change");
        ledger.copied(n(2), 5);
        assert_eq!(ledger.vouch(n(3), n(2), &at_5, &of_2), Some(word(3, 5, &of_2, &[])));
        assert_eq!(ledger.vouch(n(4), n(2), &at_5, &of_2), None, "node 4 is not its backup");
    }

    /// Node 2 sent slots to node 4, a joiner, copied node 3 everything, and died before the
    /// cluster heard its part was done: the slots it sent are orphans too, and node 3, which
    /// held them as node 2's backup when the join began, vouches for them as well.
    #[test]
    fn the_backup_of_record_vouches_for_what_its_manager_had_as_the_last_change_began() {
        let at_5 = table_of(&[1, 2, 3], 5);
        let at_6 = table_of(&[1, 2, 3, 4], 6);
        let (had, has) = (slots_of(&at_5, n(2)), slots_of(&at_6, n(2)));
        let sent: Vec<u32> = had.iter().copied().filter(|s| !has.contains(s)).collect();
        assert!(!sent.is_empty());
        let ledger = through_5_and_6(&at_5, &[5, 6]);
        let orphans: Vec<u32> = (0..4096).filter(|s| had.contains(s) || has.contains(s)).collect();
        assert_eq!(ledger.vouch(n(3), n(2), &at_6, &orphans), Some(word(3, 6, &has, &sent)));
    }

    /// Node 3 joins between nodes 2 and 4, and node 2 dies before it copies node 3 its
    /// entries: node 4, its backup when the join began, vouches for what node 2 had then, and
    /// a new manager takes its word only while node 3, which holds the writes since, lives.
    #[test]
    fn a_former_backup_vouches_for_a_node_that_died_during_the_change_while_the_new_one_lives() {
        let at_5 = table_of(&[1, 2, 4], 5);
        let at_6 = table_of(&[1, 2, 4, 3], 6);
        assert_eq!((backup(&at_5, n(2)), backup(&at_6, n(2))), (Some(n(4)), Some(n(3))));
        let ledger = through_5_and_6(&at_5, &[5]);
        let orphans = slots_of(&at_6, n(2));
        let had = slots_of(&at_5, n(2));
        let mut vouch = ledger.vouch(n(4), n(2), &at_6, &orphans).expect("a vouch");
        assert!(vouch.current.is_empty());
        // As kvdir's `vouch` counts them: what it found of those slots, and sends.
        vouch.entries = 3;
        let older = vouch.older.clone();
        assert!(!older.is_empty() && older.iter().all(|s| had.contains(s)), "{older:?}");

        let judge = |gone: &[u64]| {
            let mut manager = Ledger::default();
            manager.rebuild(n(2), Arc::clone(&at_6), older.clone());
            manager.heard(n(2), vouch.clone());
            manager.unvouched(n(1), n(2), 7, |node| gone.contains(&node.0))
        };
        assert_eq!(judge(&[2]), Vec::<u32>::new());
        assert_eq!(judge(&[2, 3]), older, "the writes since died with node 3");
        assert_eq!(judge(&[2, 4]), older, "the voucher died before it delivered");
    }

    /// Node 4 dropped its copies of node 2's entries once node 3 held them all: it vouches
    /// for none of them as node 2's backup before.
    #[test]
    fn a_former_backup_that_dropped_its_copies_vouches_for_nothing() {
        let at_5 = table_of(&[1, 2, 4], 5);
        let at_6 = table_of(&[1, 2, 4, 3], 6);
        let mut ledger = through_5_and_6(&at_5, &[5]);
        let orphans = slots_of(&at_6, n(2));
        assert!(ledger.vouch(n(4), n(2), &at_6, &orphans).is_some(), "its word before");
        ledger.forgot(n(2));
        assert_eq!(ledger.vouch(n(4), n(2), &at_6, &orphans), None);
    }

    /// Node 1 sent slots to node 3 in the change it last took part in: it vouches for them
    /// while node 3 is gone, and not once that change was stable with node 3 alive (it then
    /// dropped its copies).
    #[test]
    fn a_sender_vouches_for_what_it_sent_while_its_receiver_is_gone() {
        let at_6 = table_of(&[1, 2, 3], 6);
        let sent: Vec<u32> = slots_of(&at_6, n(3)).into_iter().take(5).collect();
        let moves: Vec<SlotMove> = sent.iter().map(|&s| moving(s..s + 1, 1, 3)).collect();
        let orphans = slots_of(&at_6, n(3));
        let sender = |gone_at_stable: bool| {
            let mut ledger = Ledger::default();
            ledger.begin(6, Some(table_of(&[1, 2], 5)));
            ledger.send_out(&moves);
            ledger.end(6);
            ledger.stable(6, |node| gone_at_stable && node == n(3));
            ledger
        };
        assert_eq!(sender(true).vouch(n(1), n(3), &at_6, &orphans), Some(word(1, 6, &[], &sent)));
        assert_eq!(sender(false).vouch(n(1), n(3), &at_6, &orphans), None);
    }

    /// Node 3 vouched to node 4 for slots of node 2 in node 2's recovery, and node 4 died
    /// before copying them on: in node 4's recovery node 3 vouches for them again.
    #[test]
    fn what_a_node_vouched_for_counts_as_sent_should_its_new_manager_die() {
        let at_6 = table_of(&[1, 2, 3, 4], 6);
        let given: Vec<u32> = slots_of(&at_6, n(2)).into_iter().take(3).collect();
        let mut ledger = Ledger::default();
        ledger.vouched_to(n(4), given.iter().copied());
        ledger.begin(7, Some(Arc::clone(&at_6)));
        ledger.end(7);
        ledger.stable(7, |node| node == n(4));
        let at_7 = table_of(&[1, 3, 4], 7);
        assert_eq!(ledger.vouch(n(3), n(4), &at_7, &given), Some(word(3, 7, &[], &given)));
    }

    /// A vouch that comes after its recovery was judged counts for no later recovery of a
    /// node of the same name (a new life of it).
    #[test]
    fn a_late_vouch_counts_for_no_later_recovery() {
        let at_6 = table_of(&[1, 2, 3], 6);
        let mine = slots_of(&at_6, n(2));
        let mut manager = Ledger::default();
        manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
        assert_eq!(manager.unvouched(n(1), n(2), 7, |node| node == n(2)), mine, "none came");
        manager.heard(n(2), word(3, 6, &mine, &[]));
        manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
        assert_eq!(manager.unvouched(n(1), n(2), 9, |node| node == n(2)), mine, "too late");
        manager.heard(n(2), word(3, 9, &mine, &[]));
        manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
        assert_eq!(manager.unvouched(n(1), n(2), 10, |node| node == n(2)), Vec::<u32>::new());
    }

    /// Node 3 vouched to node 1 for two of node 2's slots, three entries, and died during
    /// the recovery: its word counts once all three came (a batch received twice counts
    /// once), not before, and the count is of its slots alone, and of what came after its word.
    #[test]
    fn a_voucher_that_died_after_handing_everything_over_still_counts() {
        let at_6 = table_of(&[1, 2, 3], 6);
        let mine: Vec<u32> = slots_of(&at_6, n(2)).into_iter().take(2).collect();
        let other = slots_of(&at_6, n(1))[0];
        let (a, b) = (mine[0], mine[1]);
        let judge = |came: &[(u32, u64)]| {
            let mut manager = Ledger::default();
            manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
            manager.heard(n(2), Vouch { entries: 3, ..word(3, 6, &mine, &[]) });
            assert!(manager.expects(n(3)) && !manager.expects(n(4)));
            manager.received(n(3), came.iter().map(|&(slot, key)| (slot, Key(key))));
            assert!(manager.delivered[&n(3)].iter().all(|(slot, _)| mine.contains(slot)));
            let lost = manager.unvouched(n(1), n(2), 7, |node| node == n(2) || node == n(3));
            assert!(manager.delivered.is_empty(), "forgotten once judged");
            lost
        };
        assert_eq!(judge(&[(a, 10), (a, 11), (b, 12)]), Vec::<u32>::new());
        assert_eq!(judge(&[(a, 10), (a, 10), (b, 12), (b, 12)]), mine, "two of three came");
        assert_eq!(judge(&[(a, 10), (b, 12), (other, 13)]), mine, "one came for another slot");
        assert_eq!(judge(&[]), mine, "it died before it sent anything");

        // What came from node 3 before its word, under an older vouch of its still pending
        // here, is of another change: it does not count for this one.
        let mut manager = Ledger::default();
        manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
        manager.heard(n(4), word(3, 5, &mine, &[]));
        manager.received(n(3), [(a, Key(10)), (a, Key(11)), (b, Key(12))]);
        manager.heard(n(2), Vouch { entries: 3, ..word(3, 6, &mine, &[]) });
        assert_eq!(manager.unvouched(n(1), n(2), 7, |node| node == n(2) || node == n(3)), mine);
    }
}
