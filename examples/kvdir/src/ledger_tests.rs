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

/// The last two changes that moved something of a node's, as a recovery says them.
fn took(latest: u64, before: u64) -> [Option<u64>; 2] {
    [Some(latest), Some(before)]
}

/// Node 3 backs node 2 up in a cell of four. Its copy is current if node 2 copied it
/// everything at the end of the last change that moved something of node 2's, not before.
#[test]
fn the_backup_of_record_vouches_for_every_slot_if_it_was_copied_all_at_the_last_change() {
    let at_5 = table_of(&[1, 2, 3, 4], 5);
    let of_2 = slots_of(&at_5, n(2));
    assert!(!of_2.is_empty());
    assert_eq!(backup(&at_5, n(2)), Some(n(3)));
    let mut ledger = Ledger::default();
    ledger.begin(5, Some(table_of(&[1, 2, 3], 4)));
    ledger.end(5);
    ledger.copied(n(2), 2);
    let stale = ledger.vouch(n(3), n(2), &at_5, &of_2, took(5, 3));
    assert_eq!(stale, None, "copied before the last two changes that moved its slots");
    ledger.copied(n(2), 5);
    let whole = Some(word(3, 5, &of_2, &[]));
    assert_eq!(ledger.vouch(n(3), n(2), &at_5, &of_2, took(5, 3)), whole);
    assert_eq!(ledger.vouch(n(4), n(2), &at_5, &of_2, took(5, 3)), None, "not its backup");
}

/// Node 3, in another zone, took no part in the last change that moved something of node 2's
/// (a join in node 2's zone): the copy node 2 made it at the end of that change is current
/// all the same, and so is one made at a later change. When it judged by the changes it took
/// part in itself, it vouched for nothing.
#[test]
fn a_backup_that_took_no_part_in_its_manager_s_last_change_vouches_for_it() {
    let at_7 = table_of(&[1, 2, 3, 4], 7);
    let of_2 = slots_of(&at_7, n(2));
    let mut ledger = Ledger::default();
    ledger.begin(5, Some(table_of(&[1, 2, 3], 4)));
    ledger.end(5);
    ledger.copied(n(2), 5);
    ledger.copied(n(2), 7);
    let whole = Some(word(3, 7, &of_2, &[]));
    assert_eq!(ledger.vouch(n(3), n(2), &at_7, &of_2, took(7, 5)), whole);
    ledger.copied(n(2), 9);
    assert_eq!(ledger.vouch(n(3), n(2), &at_7, &of_2, took(7, 5)), whole, "copied later");
    // Node 2 died during the change to 7, before it copied: this node, which took no part
    // in it, cannot tell what node 2 had as it began, and vouches for nothing.
    let mut ledger = Ledger::default();
    ledger.copied(n(2), 5);
    assert_eq!(ledger.vouch(n(3), n(2), &at_7, &of_2, took(7, 5)), None);
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
    assert_eq!(
        ledger.vouch(n(3), n(2), &at_6, &orphans, took(6, 5)),
        Some(word(3, 6, &has, &sent))
    );
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
    let mut vouch = ledger.vouch(n(4), n(2), &at_6, &orphans, took(6, 5)).expect("a vouch");
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
    assert!(ledger.vouch(n(4), n(2), &at_6, &orphans, took(6, 5)).is_some(), "its word before");
    ledger.forgot(n(2));
    assert_eq!(ledger.vouch(n(4), n(2), &at_6, &orphans, took(6, 5)), None);
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
    assert_eq!(
        sender(true).vouch(n(1), n(3), &at_6, &orphans, [Some(6), None]),
        Some(word(1, 6, &[], &sent))
    );
    assert_eq!(sender(false).vouch(n(1), n(3), &at_6, &orphans, [Some(6), None]), None);
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
    assert_eq!(ledger.vouch(n(3), n(4), &at_7, &given, took(7, 6)), Some(word(3, 7, &[], &given)));
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

    // Its word heard twice, the second time after its batches: they count still.
    let mut manager = Ledger::default();
    manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
    let vouch = Vouch { entries: 3, ..word(3, 6, &mine, &[]) };
    manager.heard(n(2), vouch.clone());
    manager.received(n(3), [(a, Key(10)), (a, Key(11)), (b, Key(12))]);
    manager.heard(n(2), vouch);
    assert_eq!(manager.vouched[&n(2)].len(), 1, "kept once");
    let lost = manager.unvouched(n(1), n(2), 7, |node| node == n(2) || node == n(3));
    assert_eq!(lost, Vec::<u32>::new(), "the word heard again kept what came after the first");

    // Another word from the same voucher at the same epoch is not the same word: what came
    // before it is not counted for it.
    let mut manager = Ledger::default();
    manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
    manager.heard(n(2), Vouch { entries: 2, ..word(3, 6, &[a], &[]) });
    manager.received(n(3), [(a, Key(10)), (a, Key(11))]);
    manager.heard(n(2), Vouch { entries: 3, ..word(3, 6, &mine, &[]) });
    assert_eq!(manager.vouched[&n(2)].len(), 2);
    assert_eq!(manager.unvouched(n(1), n(2), 7, |node| node == n(2) || node == n(3)), mine);

    // What came from node 3 before its word, under an older vouch of its still pending
    // here, is of another change: it does not count for this one.
    let mut manager = Ledger::default();
    manager.rebuild(n(2), Arc::clone(&at_6), mine.clone());
    manager.heard(n(4), word(3, 5, &mine, &[]));
    manager.received(n(3), [(a, Key(10)), (a, Key(11)), (b, Key(12))]);
    manager.heard(n(2), Vouch { entries: 3, ..word(3, 6, &mine, &[]) });
    assert_eq!(manager.unvouched(n(1), n(2), 7, |node| node == n(2) || node == n(3)), mine);
}
