use super::*;
use crate::node::DsmConfig;
use gobelins_locator::SlotMove;
use std::collections::{BTreeMap, BTreeSet};

/// Only a word its holder confirmed spares a slot it leaves out the taking back: one whose
/// `Cover` never landed may have left there an earlier word of the same epoch (words are
/// given again while stale) that vouches for the slot, and a page of it written with no
/// copy elsewhere would read as zeros after this node's death (the review of `76d86d7`).
#[test]
fn only_a_confirmed_word_spares_a_slot_it_leaves_out_the_taking_back() {
    let mut word = crate::node::Word {
        seq: 1,
        holder: Some(NodeId(2)),
        epoch: 5,
        unclean: [7].into(),
        tainted: Default::default(),
        confirmed: false,
    };
    assert!(!word.leaves_out(7), "not answered: the holder may vouch for slot 7");
    word.confirmed = true;
    assert!(word.leaves_out(7));
    assert!(!word.leaves_out(8));
}

/// A word left out a slot only for its taint, which no later look clears, is not given
/// again: it was, every 30 s until the next change, each time reading every entry the
/// node manages and holding the word's lock across the round trip.
#[test]
fn a_word_that_leaves_out_only_tainted_slots_is_not_given_again() {
    let mut word = crate::node::Word {
        seq: 1,
        holder: Some(NodeId(2)),
        epoch: 5,
        unclean: [7, 9].into(),
        tainted: [7].into(),
        confirmed: true,
    };
    assert!(word.stale(5), "slot 9 may be clean at the next look");
    word.unclean = [7].into();
    assert!(!word.stale(5), "slot 7 is left out for its taint, whatever the next look finds");
    assert!(word.stale(6), "a later epoch has a word of its own");
    word.confirmed = false;
    assert!(word.stale(5), "a word not answered is given again");
}

/// A leaver's page, handed on by the node it was left on after its entry was marked lost
/// (its owner gone): taken back at the entry's version, and only at that version.
#[tokio::test]
async fn an_entry_marked_lost_takes_its_leavers_page_of_that_version_back() {
    let node = DsmNode::new(DsmConfig::default());
    let service = node.service();
    let ctx = Context::detached(NodeId(1), 1, None);
    let page = PageId { segment: 1, page: 0 };
    let lost = PageEntry { version: 4, lost: true, ..PageEntry::default() };
    service.state().live.insert(page.key(), Arc::new(AsyncMutex::new(Live::Page(lost))));
    let surrender = |version| Request::Surrender {
        node: NodeId(3),
        version,
        data: PageBytes::shared(&Arc::new(vec![7; crate::PAGE_SIZE])),
        readers: BTreeSet::new(),
    };
    let older = service.handle(&ctx, page.key(), surrender(3)).await;
    assert!(matches!(older, Response::Missing), "{older:?}");
    let taken = service.handle(&ctx, page.key(), surrender(4)).await;
    assert!(matches!(taken, Response::Ok), "{taken:?}");
    let slot = service.slot(page.key());
    let Live::Page(entry) = &*slot.lock().await else { panic!("a page entry") };
    assert_eq!((entry.owner, entry.lost), (Some(NodeId(1)), false));
    let held = service.state().frames.get(page).and_then(|f| f.readable());
    assert_eq!(held.map(|(v, d)| (v, d[0])), Some((4, 7)));
}

/// A node whose leave has begun takes no more backups: its hand-over may have looked at its
/// frames already, and the copy would have left with it unsaid while a lagging manager
/// counted it as the page's copy elsewhere (a helper's review). A committing owner asks the
/// manager for another, as for a frame sealed.
#[tokio::test]
async fn a_node_whose_leave_began_takes_no_more_backups_nor_other_leavers_copies() {
    let node = DsmNode::new(DsmConfig { backups: true, ..DsmConfig::default() });
    let service = node.service();
    let ctx = Context::detached(NodeId(2), 1, None).told_by(NodeId(1));
    let backup = |page: PageId| Request::Backup {
        page,
        version: 3,
        commit: 1,
        data: PageBytes::shared(&Arc::new(vec![7; crate::PAGE_SIZE])),
    };
    let (kept, refused) = (PageId { segment: 1, page: 0 }, PageId { segment: 1, page: 1 });
    let answer = service.handle(&ctx, kept.key(), backup(kept)).await;
    assert!(matches!(answer, Response::Ok), "{answer:?}");
    service.state().leaving.store(true, Ordering::SeqCst);
    let answer = service.handle(&ctx, refused.key(), backup(refused)).await;
    assert!(matches!(answer, Response::Departed), "{answer:?}");
    let stored = |page| service.state().frames.get(page).and_then(|f| f.backup_copy());
    assert_eq!(stored(kept).map(|(v, c, _)| (v, c)), Some((3, 1)));
    assert!(stored(refused).is_none(), "not kept");
    // Nor another leaver's page, which would go with this node's frames: the leaver tries the
    // next node.
    let foster = Request::Foster {
        page: refused,
        leaver: NodeId(1),
        version: 3,
        data: PageBytes::shared(&Arc::new(vec![7; crate::PAGE_SIZE])),
        readers: BTreeSet::new(),
        backup: None,
    };
    let answer = service.handle(&ctx, refused.key(), foster).await;
    assert!(matches!(answer, Response::Departed), "{answer:?}");
    assert!(service.state().frames.get(refused).is_none_or(|f| f.fostered_copy().is_none()));
    // Nor a copy another leaver kept aside for a write grant.
    let kept_aside = Request::KeepRetired {
        page: refused,
        leaver: NodeId(1),
        version: 3,
        data: PageBytes::shared(&Arc::new(vec![7; crate::PAGE_SIZE])),
        writer: Some(NodeId(3)),
        backup: None,
    };
    let answer = service.handle(&ctx, refused.key(), kept_aside).await;
    assert!(matches!(answer, Response::Departed), "{answer:?}");
}

#[tokio::test]
async fn a_version_or_generation_no_cluster_gave_out_is_refused_and_changes_nothing() {
    let node = DsmNode::new(DsmConfig::default());
    let service = node.service();
    let ctx = Context::detached(NodeId(1), 1, None);
    let page = PageId { segment: 1, page: 0 };
    let wrap = Request::WriteFault { node: NodeId(2), have: None, refused: u64::MAX - 1 };
    let arrive = |generation| Request::Arrive { participant: 2, generation, parties: 2 };
    for (key, request) in [(page.key(), wrap), (crate::page::barrier_key(3), arrive(u64::MAX))] {
        let answer = service.handle(&ctx, key, request).await;
        assert!(matches!(answer, Response::Invalid(_)), "{answer:?}");
    }
    assert!(service.state().live.is_empty(), "no entry made for either");
}

/// An owner that revoked its direct readers for a write fault, then did not give the page
/// up (a write here went on past the wait), serves direct reads again: left closed, it
/// sent every hinted reader to the manager until its next grant.
#[tokio::test(start_paused = true)]
async fn an_owner_that_revoked_its_readers_but_kept_the_page_serves_direct_reads_again() {
    let node = DsmNode::new(DsmConfig::default());
    let ctx = Context::detached(NodeId(1), 1, None);
    let page = PageId { segment: 1, page: 0 };
    let frame = node.inner.frames.frame(page);
    let granted = frame.install_grant(3, Some(crate::frames::zeros()), None);
    assert_eq!(granted, crate::frames::Installed::Yes);
    assert!(frame.serve(NodeId(2)).await.is_some());
    // The reader failed: its invalidation is done with at once.
    node.inner.failed.lock().expect("failed").insert(NodeId(2), 1);
    // Held until the fetch waits for it, then handed to the fetch, then back here (the
    // lock is fair): the fetch's second look, after the revocation, finds a write going on.
    let writing = frame.writer.lock().await;
    let (service, c) = (node.service(), ctx.clone());
    let give = tokio::spawn(async move {
        service.give(&c, page, 3, (Some(NodeId(3)), None), None).await.map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(writing);
    let writing = frame.writer.lock().await;
    let given = give.await.expect("give");
    assert!(matches!(given, Err(Absent::Unreachable)), "{given:?}");
    drop(writing);
    assert!(frame.lock().owned, "the page stays here");
    assert!(frame.serve(NodeId(4)).await.is_some(), "direct reads are served again");
}

#[test]
fn a_node_reports_the_passage_it_passed_as_well_as_the_one_it_waits_at() {
    let node = DsmNode::new(DsmConfig::default());
    let service = node.service();
    // Barrier 5: passed its third passage. Barrier 6: waits at its second.
    node.inner.generations.lock().expect("generations").extend([(5, 3), (6, 2)]);
    node.inner.waiting.lock().expect("waiting").insert(6, 2);
    let spec = service.spec();
    let everything = SlotMove { slots: 0..spec.slots, from: NodeId(9), to: NodeId(1) };
    let reports = service.reports(NodeId(1), &Moving::new(spec, vec![everything]));
    let barrier = |id| {
        reports.iter().find_map(|(k, e)| match e {
            Entry::Barrier(b) if *k == crate::page::barrier_key(id) => Some(b.clone()),
            _ => None,
        })
    };
    let passed = barrier(5).expect("reported though it waits at none of its passages");
    assert_eq!((passed.passed, passed.arrived.len()), (3, 0));
    let waits = barrier(6).expect("reported");
    assert_eq!(waits.passed, 1);
    assert_eq!(waits.arrived, BTreeMap::from([(2, BTreeSet::from([1]))]));
}

/// Under levels `zone,rack`, a backup goes to another zone before another rack of the writer's
/// zone, whichever comes first after the writer; to another rack when no other zone is left;
/// and, unlabelled, to the next node, as ever.
#[test]
fn a_backup_goes_to_another_zone_before_another_rack() {
    use gobelins_locator::{CellTree, Epoch, Labels, ServiceId, TreeConfig};
    let config = TreeConfig::default().with_label_levels(["zone", "rack"]);
    let mut tree = CellTree::new(config).expect("valid");
    tree.register_service(ServiceSpec::new(ServiceId(1), "dsm").with_slots(64)).expect("room");
    let at = |z: &str, r: &str| {
        Labels::from([("zone".to_string(), z.to_string()), ("rack".to_string(), r.to_string())])
    };
    for (n, z, r) in [(1, "a", "r1"), (2, "a", "r2"), (3, "a", "r1"), (4, "b", "r1")] {
        tree.add_node(NodeId(n), at(z, r)).expect("added");
    }
    let s = tree.snapshot(Epoch(1)).expect("members");
    let nodes = s.nodes().to_vec();
    assert_eq!(next_node(Some(&s), &nodes, NodeId(1), None), Some(NodeId(4)), "another zone");
    let no_b = Some(NodeId(4));
    assert_eq!(next_node(Some(&s), &nodes, NodeId(1), no_b), Some(NodeId(2)), "another rack");
    assert_eq!(next_node(Some(&s), &nodes, NodeId(4), None), Some(NodeId(1)), "wrapping");
    assert_eq!(next_node(None, &nodes, NodeId(1), None), Some(NodeId(2)), "the next node");
}

/// A manager that has begun an eviction gives no write its backup on the leaver, which takes
/// none (it answers `Departed`): chosen each time as the next node after the writer, a write
/// fault was retried on it until the change ended (a helper's review).
#[test]
fn a_backup_is_never_chosen_on_the_node_leaving() {
    use gobelins_locator::{CellTree, Epoch, Labels, ServiceId, TreeConfig};
    let mut tree = CellTree::new(TreeConfig::default()).expect("valid");
    tree.register_service(ServiceSpec::new(ServiceId(1), "dsm").with_slots(64)).expect("room");
    for n in 1..=4 {
        tree.add_node(NodeId(n), Labels::new()).expect("added");
    }
    let snapshot = Arc::new(tree.snapshot(Epoch(1)).expect("members"));
    let node = DsmNode::new(DsmConfig { backups: true, ..DsmConfig::default() });
    let service = node.service();
    let ctx = Context::detached(NodeId(1), 1, Some(snapshot));
    let entry = PageEntry::default();
    let chosen = |service: &DsmService| service.choose_backup(&ctx, &entry, NodeId(2), false);
    assert_eq!(chosen(&service), Some((NodeId(3), false)), "the next node after the writer");
    *service.state().change.lock().expect("change") = Some(gobelins_adaptation::ChangeInfo {
        epoch: 2,
        change: gobelins_locator::Change::Evict(NodeId(3)),
        participants: Default::default(),
        acked: Default::default(),
        failed_moved_in: [None, None],
        failed_kept_since: None,
    });
    assert_eq!(chosen(&service), Some((NodeId(4), false)), "not the leaver");
}

/// A tainted slot, forgiven: a page never written there reads as zeros again, and so does one
/// first asked for while the slot was tainted (reported lost then); a page lost otherwise
/// stays lost, for a discard; forgiven again, the slot says it was not tainted.
#[tokio::test]
async fn a_forgiven_slot_reads_its_unreported_pages_as_zeros_and_keeps_the_others_lost() {
    let node = DsmNode::new(DsmConfig::default());
    let service = node.service();
    let ctx = Context::detached(NodeId(1), 1, None);
    let spec = service.state().spec.clone();
    let asked = PageId { segment: 1, page: 0 };
    let slot = spec.slot_of(asked.key());
    let in_slot = |n: u32| PageId { segment: 2 + n, page: 0 };
    let more: Vec<PageId> =
        (0..).map(in_slot).filter(|p| spec.slot_of(p.key()) == slot).take(2).collect();
    let (never, lost) = (more[0], more[1]);
    let marker = crate::page::taint_key(slot);
    service.state().live.insert(marker, Arc::new(AsyncMutex::new(Live::Taint)));
    let written_and_lost = PageEntry { version: 3, lost: true, ..PageEntry::default() };
    service
        .state()
        .live
        .insert(lost.key(), Arc::new(AsyncMutex::new(Live::Page(written_and_lost))));
    let read =
        |page: PageId| service.handle(&ctx, page.key(), Request::ReadFault { node: NodeId(2) });
    assert!(matches!(read(asked).await, Response::Lost), "tainted: lost");

    service.state().word.lock().await.tainted.insert(slot);
    let forgiven = service.handle(&ctx, marker, Request::Forgive).await;
    assert!(matches!(forgiven, Response::Forgiven { reset: 1 }), "{forgiven:?}");
    let word = service.state().word.lock().await;
    assert!(!word.tainted.contains(&slot), "the word is given again, vouching for the slot");
    drop(word);
    for page in [asked, never] {
        let answer = read(page).await;
        assert!(matches!(answer, Response::Copy { owner: None, .. }), "{page:?}: {answer:?}");
    }
    assert!(matches!(read(lost).await, Response::Lost), "lost otherwise: for a discard");
    let again = service.handle(&ctx, marker, Request::Forgive).await;
    assert!(matches!(again, Response::Kept), "{again:?}");
}
