use super::*;

/// The writer a test gives a page up to.
const WRITER: NodeId = NodeId(9);

/// `f` owns `version` of the page, every byte `byte`, then gives it up to [`WRITER`].
async fn own_then_give_up(f: &Frame, version: u64, byte: u8) {
    let page = Some(Arc::new(vec![byte; PAGE_SIZE]));
    assert_eq!(f.install_grant(version, page, None), Installed::Yes);
    let fetched =
        f.fetch(version, (Some(WRITER), None), Duration::from_millis(10), &|| false).await;
    assert!(matches!(fetched, Fetched::Page(_)));
}

#[test]
fn a_read_copy_invalidated_on_its_way_is_not_kept() {
    let f = Frame::default();
    f.invalidate(3);
    f.install_read(3, zeros());
    assert!(f.readable().is_none());
    f.install_read(4, zeros());
    assert_eq!(f.readable().map(|(v, _)| v), Some(4));
}

#[test]
fn a_page_handed_over_is_kept_even_after_its_version_was_invalidated() {
    let f = Frame::default();
    f.invalidate(5);
    f.install_owned(5, zeros(), None);
    let s = f.lock();
    assert!(s.data.is_some() && s.owned && s.version == 5);
}

#[tokio::test(start_paused = true)]
async fn fetch_waits_for_a_grant_on_its_way() {
    let f = Arc::new(Frame::default());
    let g = Arc::clone(&f);
    let fetch =
        tokio::spawn(
            async move { g.fetch(2, (None, None), Duration::from_secs(1), &|| false).await },
        );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(f.install_grant(2, Some(Arc::new(vec![7; PAGE_SIZE])), None), Installed::Yes);
    match fetch.await.expect("fetch") {
        Fetched::Page(p) => assert_eq!(p[0], 7),
        other => panic!("expected the page, got {other:?}"),
    }
    let s = f.lock();
    assert!(s.owned && !s.write, "a reader's fetch leaves the owner a read copy");
}

#[tokio::test(start_paused = true)]
async fn a_copy_given_up_to_a_writer_is_kept_aside_and_can_be_promoted() {
    let f = Frame::default();
    own_then_give_up(&f, 4, 9).await;
    assert!(f.readable().is_none());
    let kept = f.lock().retired.clone().map(|r| (r.version, r.data[0], r.writer));
    assert_eq!(kept, Some((4, 9, Some(WRITER))), "kept aside, with the writer it went to");
    assert!(f.promote(4, Some(4)));
    assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((4, 9)));
}

#[tokio::test(start_paused = true)]
async fn an_owner_promoted_again_starts_without_the_backup_of_its_earlier_ownership() {
    let f = Frame::default();
    let page = Some(Arc::new(vec![1u8; PAGE_SIZE]));
    assert_eq!(f.install_grant(4, page, Some(NodeId(5))), Installed::Yes);
    assert_eq!(f.lock().backup_node, Some(NodeId(5)));
    let fetched = f.fetch(4, (Some(WRITER), None), Duration::from_millis(10), &|| false).await;
    assert!(matches!(fetched, Fetched::Page(_)), "given up to a writer");
    // Later this node keeps the writer's backup, and is promoted from it.
    f.store_backup(6, 2, zeros());
    assert!(f.promote(6, None));
    assert_eq!(f.lock().backup_node, None, "node 5 holds nothing of version 6");
}

#[tokio::test(start_paused = true)]
async fn a_retire_drops_only_a_copy_no_newer_than_the_one_the_writer_took() {
    let f = Frame::default();
    own_then_give_up(&f, 6, 3).await;
    f.drop_retired(5);
    assert!(f.has_retired(), "a late retire for an older version keeps the newer copy");
    f.drop_retired(6);
    assert!(!f.has_retired());
    // An invalidation past it (a later grant, a discard) drops it too.
    own_then_give_up(&f, 8, 4).await;
    f.invalidate(7);
    assert!(f.has_retired(), "an older invalidation keeps it");
    f.invalidate(8);
    assert!(!f.has_retired());
}

#[tokio::test(start_paused = true)]
async fn a_grant_of_a_version_this_node_said_it_lacks_is_refused_when_it_comes_late() {
    let f = Frame::default();
    assert_eq!(f.install_grant(2, Some(zeros()), None), Installed::Yes);
    assert!(matches!(
        f.fetch(3, (None, None), Duration::from_millis(10), &|| false).await,
        Fetched::Missing
    ));
    assert_eq!(
        f.install_grant(3, Some(Arc::new(vec![1; PAGE_SIZE])), None),
        Installed::Stale,
        "the manager may have taken version 3 back"
    );
    assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((2, 0)), "nothing changed");
    assert_eq!(f.install_grant(4, None, None), Installed::Yes, "a later grant lands");

    let g = Frame::default();
    assert_eq!(g.install_grant(5, Some(zeros()), None), Installed::Yes);
    assert_eq!(
        g.install_grant(4, Some(Arc::new(vec![1; PAGE_SIZE])), None),
        Installed::Stale,
        "older than the copy held"
    );
    assert_eq!(g.readable().map(|(v, d)| (v, d[0])), Some((5, 0)));
}

#[tokio::test(start_paused = true)]
async fn a_refused_grant_is_kept_aside_and_can_become_the_page() {
    let f = Frame::default();
    assert!(matches!(
        f.fetch(1, (None, None), Duration::from_millis(10), &|| false).await,
        Fetched::Missing
    ));
    let page = Arc::new(vec![6; PAGE_SIZE]);
    assert_eq!(f.install_grant(1, Some(Arc::clone(&page)), None), Installed::Stale);
    f.keep_refused(1, Arc::clone(&page));
    assert!(f.readable().is_none(), "not the page unless the manager says so");
    let offered = |s: &FrameState| s.backup.is_some() || s.retired.is_some();
    assert!(!offered(&f.lock()), "nor offered to a scan");
    assert!(f.promote(1, Some(1)));
    assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((1, 6)));

    let g = Frame::default();
    g.keep_refused(3, Arc::clone(&page));
    g.invalidate(3);
    assert!(!g.promote(3, Some(3)), "a later write's invalidation drops it");
}

/// A grant asked for before a recovery scanned this node, and arriving after, is refused:
/// the scan reported the frame without it. Should its manager have lived after all (the
/// recovery was another node's), the manager's next take-back finds the refused copy, and
/// the grant after it lands.
#[test]
fn a_grant_asked_for_before_a_scan_of_this_node_is_refused_and_can_be_taken_back() {
    let f = Frame::default();
    f.install_read(1, zeros());
    let page = Arc::new(vec![4; PAGE_SIZE]);
    let asked = f.lock().scans;
    f.lock().scans += 1;
    let granted = f.install_grant_unless(2, Some(Arc::clone(&page)), None, asked);
    assert_eq!(granted, Installed::Stale);
    assert_eq!(f.lock().refused, 2, "the next fault asks for a grant past it");
    assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((1, 0)), "nothing changed");
    assert!(!f.lock().owned);
    f.keep_refused(2, page);
    assert!(f.promote(2, Some(2)), "taken back to the refused copy");
    assert_eq!(f.install_grant(3, None, None), Installed::Yes);
    assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((3, 4)));
    assert!(f.lock().write);
}

#[tokio::test(start_paused = true)]
async fn an_owner_whose_upgrade_never_arrived_is_promoted_from_its_own_copy() {
    let f = Frame::default();
    assert_eq!(f.install_grant(5, Some(Arc::new(vec![8; PAGE_SIZE])), None), Installed::Yes);
    assert!(f.promote(6, Some(5)));
    assert_eq!(f.readable().map(|(v, d)| (v, d[0])), Some((6, 8)));
    assert!(f.promote(6, Some(5)), "asked again when the answer was lost: still yes");
    assert!(!f.promote(5, None), "never to a version older than the copy");
    assert!(!f.promote(7, Some(5)), "nor from a copy of another label than asked");
}

#[tokio::test(start_paused = true)]
async fn a_write_kept_going_past_the_wait_makes_a_fetch_busy_not_wait_for_it() {
    let f = Frame::default();
    assert_eq!(f.install_grant(3, Some(Arc::new(vec![5; PAGE_SIZE])), None), Installed::Yes);
    let writing = f.writer.lock().await;
    let started = tokio::time::Instant::now();
    assert!(matches!(
        f.fetch(3, (Some(WRITER), None), Duration::from_millis(50), &|| false).await,
        Fetched::Busy
    ));
    assert_eq!(started.elapsed(), Duration::from_millis(50), "waited the wait, no more");
    drop(writing);
    assert!(matches!(
        f.fetch(3, (Some(WRITER), None), Duration::from_millis(50), &|| false).await,
        Fetched::Page(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn fetch_of_a_version_never_granted_gives_up() {
    let f = Frame::default();
    assert!(matches!(
        f.fetch(5, (Some(WRITER), None), Duration::from_millis(50), &|| false).await,
        Fetched::Missing
    ));
}

#[tokio::test(start_paused = true)]
async fn an_owner_gives_up_a_page_only_after_its_direct_readers_are_revoked() {
    let f = Frame::default();
    let wait = Duration::from_millis(10);
    assert!(f.serve(NodeId(2)).await.is_none(), "nothing owned, nothing served");
    assert_eq!(f.install_grant(3, Some(Arc::new(vec![5; PAGE_SIZE])), None), Installed::Yes);
    let (version, data) = f.serve(NodeId(2)).await.expect("the owner serves");
    assert_eq!((version, data[0]), (3, 5));
    assert!(!f.lock().write, "a served reader ends write mode");
    match f.fetch(3, (Some(WRITER), None), wait, &|| false).await {
        Fetched::Revoke(readers) => assert_eq!(readers, vec![NodeId(2)]),
        other => panic!("expected a revocation first, got {other:?}"),
    }
    assert!(f.serve(NodeId(4)).await.is_none(), "closed while revoking");
    f.revoked(&[NodeId(2)]);
    assert!(matches!(f.fetch(3, (Some(WRITER), None), wait, &|| false).await, Fetched::Page(_)));
    assert!(f.serve(NodeId(4)).await.is_none(), "given up");
}

#[tokio::test(start_paused = true)]
async fn a_manager_read_leaves_direct_readers_alone_and_a_grant_forgets_them() {
    let f = Frame::default();
    assert_eq!(f.install_grant(1, None, None), Installed::NoCopy, "no copy to make current");
    assert!(f.readable().is_none(), "and none made up");
    assert_eq!(f.install_grant(1, Some(zeros()), None), Installed::Yes);
    f.serve(NodeId(2)).await.expect("served");
    assert!(matches!(f.fetch(1, (None, None), Duration::ZERO, &|| false).await, Fetched::Page(_)));
    assert_eq!(f.close(1), vec![NodeId(2)]);
    assert!(f.close(2).is_empty(), "not owned at that version");
    f.reopen();
    assert!(f.serve(NodeId(3)).await.is_some());
    f.revoked(&[NodeId(2), NodeId(3)]);
    assert_eq!(f.install_grant(2, None, None), Installed::Yes);
    assert!(f.lock().write, "no reader left: writable");
}

/// Two writers on one node both fault; the second grant arrives after this node, owning
/// the first grant's version, served a reader directly. The manager never heard of that
/// reader, so the frame must not become writable until it is revoked.
#[tokio::test(start_paused = true)]
async fn a_grant_keeps_the_readers_served_since_the_fault_was_sent() {
    let f = Frame::default();
    assert_eq!(f.install_grant(68, Some(zeros()), None), Installed::Yes);
    let (version, _) = f.serve(NodeId(5)).await.expect("the owner serves");
    assert_eq!(version, 68);
    assert_eq!(f.install_grant(69, None, None), Installed::Yes);
    let s = f.lock();
    assert!(!s.write, "a direct reader still holds version 68");
    assert_eq!(s.readers, [NodeId(5)].into());
    drop(s);
    assert_eq!(f.close(69), vec![NodeId(5)], "the writer revokes it before writing");
}

#[test]
fn a_fostered_backup_is_dropped_once_handed_on_unless_an_entry_may_name_it() {
    let whose = || Fostered { leaver: NodeId(4), readers: BTreeSet::new(), backup: None };
    let f = Frame::default();
    f.foster(5, zeros(), whose());
    assert_eq!(f.fostered_copy().map(|(v, _, w)| (v, w)), Some((5, whose())));
    assert!(f.drop_fostered(NodeId(4)));
    let f = Frame::default();
    f.foster(5, zeros(), whose());
    assert!(f.fostered(5).is_some());
    assert!(f.fostered(4).is_none(), "only the version fostered");
    assert!(f.drop_fostered(NodeId(4)));
    assert!(f.lock().backup.is_none());
    // A manager's backup stored over it: the entry names this node now.
    f.foster(5, zeros(), whose());
    f.store_backup(5, FINAL, zeros());
    assert!(f.fostered(5).is_none());
    assert!(!f.drop_fostered(NodeId(4)));
    assert!(f.lock().backup.is_some(), "kept as the manager's backup");
    // A newer backup already here is not replaced, nor marked.
    f.foster(4, zeros(), whose());
    assert!(!f.drop_fostered(NodeId(4)));
    assert_eq!(f.lock().backup.as_ref().map(|(v, _)| *v), Some(5));
    // Nor one of the same version, which an entry may name: it takes the leaver's last
    // content, unmarked.
    let page = |b: u8| Arc::new(vec![b; PAGE_SIZE]);
    let f = Frame::default();
    f.store_backup(6, 2, page(1));
    f.foster(6, page(2), whose());
    assert!(f.fostered(6).is_none());
    assert_eq!(f.lock().backup.as_ref().map(|(_, d)| d[0]), Some(2));
    assert_eq!(f.lock().backup_commit, FINAL);
}

/// A `BackupTo` that comes late (the page went to a writer meanwhile) must not make this
/// node a second, stale owner: only a valid read copy at exactly the entry's version is
/// taken as the page, never a copy given up, refused, backed up or invalidated.
#[tokio::test(start_paused = true)]
async fn only_a_valid_read_copy_at_the_entry_s_version_is_adopted_as_the_page() {
    let f = Frame::default();
    f.install_read(4, zeros());
    assert!(!f.adopt_read_copy(5, &|| false), "another version");
    assert!(f.adopt_read_copy(4, &|| false));
    assert!(f.lock().owned && f.lock().commits == FINAL);
    assert!(!f.adopt_read_copy(4, &|| false), "owned already");

    let given_up = Frame::default();
    own_then_give_up(&given_up, 3, 1).await;
    assert!(!given_up.adopt_read_copy(3, &|| false), "a copy given up to a writer");
    assert!(!given_up.lock().owned && given_up.readable().is_none());

    let backup = Frame::default();
    backup.store_backup(4, FINAL, zeros());
    assert!(!backup.adopt_read_copy(4, &|| false), "a backup");

    let invalidated = Frame::default();
    invalidated.install_read(4, zeros());
    invalidated.invalidate(4);
    assert!(!invalidated.adopt_read_copy(4, &|| false), "an invalidated copy");

    let refused = Frame::default();
    refused.keep_refused(5, zeros());
    assert!(!refused.adopt_read_copy(5, &|| false), "a refused grant's copy");
    assert!(!refused.lock().owned);
}

/// A manager declared failed between a `Promote` or `BackupTo`'s arrival and the frame's
/// lock changes nothing: the survivors' scan may have counted the frame as it was.
#[test]
fn a_departed_manager_neither_promotes_a_backup_nor_makes_a_read_copy_the_page() {
    let departed = || true;
    let backup = Frame::default();
    backup.store_backup(4, FINAL, zeros());
    assert!(!backup.promote_unless(4, None, &departed));
    assert!(!backup.lock().owned && backup.lock().backup.is_some(), "still the backup");
    assert!(backup.promote_unless(4, None, &|| false), "promoted when its manager lives");

    let reader = Frame::default();
    reader.install_read(4, zeros());
    assert!(!reader.adopt_read_copy(4, &departed));
    assert!(!reader.lock().owned, "still a read copy");
    assert!(reader.adopt_read_copy(4, &|| false));
}

#[test]
fn promote_accepts_a_backup_no_newer_than_the_entry() {
    let f = Frame::default();
    f.store_backup(8, 3, zeros());
    assert!(!f.promote(7, None));
    assert!(f.promote(9, None));
    assert_eq!(f.readable().map(|(v, _)| v), Some(9));
    let f = Frame::default();
    f.store_backup(6, 0, zeros());
    assert!(f.promote(7, None));
    assert_eq!(f.readable().map(|(v, _)| v), Some(7));
}

#[test]
fn a_backup_keeps_the_latest_commit_of_the_latest_version_and_says_which() {
    let f = Frame::default();
    let page = |b: u8| Arc::new(vec![b; PAGE_SIZE]);
    let backup = |f: &Frame| {
        let s = f.lock();
        s.backup.as_ref().map(|(v, d)| (*v, s.backup_commit, d[0]))
    };
    assert_eq!(f.store_backup(5, 2, page(2)), Stored::Kept);
    assert_eq!(f.store_backup(5, 1, page(1)), Stored::Newer);
    assert_eq!(backup(&f), Some((5, 2, 2)), "older commit");
    f.store_backup(5, 3, page(3));
    assert_eq!(f.store_backup(4, 9, page(9)), Stored::Newer);
    assert_eq!(backup(&f), Some((5, 3, 3)), "older version");
    // The last content of a version, as a grant gives it up, outranks every commit of it.
    assert_eq!(f.store_backup(5, FINAL, page(4)), Stored::Kept);
    assert_eq!(backup(&f), Some((5, FINAL, 4)));
    // A leaving node that took its copy keeps none sent after, and says so.
    assert!(f.backup_copy().is_some());
    assert_eq!(f.store_backup(6, 1, page(6)), Stored::Sealed);
    assert_eq!(backup(&f), Some((5, FINAL, 4)));
    // A writer's commits count from its grant.
    let w = Frame::default();
    assert_eq!(w.install_grant(6, Some(page(0)), None), Installed::Yes);
    assert_eq!(w.lock().commits, 0);
    w.install_owned(6, page(0), None);
    assert_eq!(w.lock().commits, FINAL, "handed over: no more commits at 6");
}

/// A manager declared failed while its fetch waited for a write here takes nothing: the
/// survivors' `scan` may have counted the page as owned here already, and a seed of the
/// random-failure test lost a page given up after it. Nor does its invalidation drop a
/// copy.
#[tokio::test(start_paused = true)]
async fn a_manager_that_departed_while_its_fetch_waited_takes_nothing() {
    let f = Arc::new(Frame::default());
    assert_eq!(f.install_grant(3, Some(zeros()), None), Installed::Yes);
    let departed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = Arc::clone(&f.writer).lock_owned().await;
    let (g, d) = (Arc::clone(&f), Arc::clone(&departed));
    let fetch = tokio::spawn(async move {
        let departed = || d.load(std::sync::atomic::Ordering::SeqCst);
        g.fetch(3, (Some(WRITER), None), Duration::from_secs(1), &departed).await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    departed.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(writing);
    assert!(matches!(fetch.await.expect("fetch"), Fetched::Departed));
    let s = f.lock();
    assert!(s.owned && s.data.is_some() && s.retired.is_none(), "the page stays owned here");
    drop(s);
    assert!(!f.invalidate_unless(3, &|| true));
    assert!(f.lock().data.is_some(), "nor dropped");
    assert!(f.invalidate_unless(3, &|| false));
    assert!(f.lock().data.is_none());
}

/// A commit asking the manager for a new backup holds the writer lock until the manager
/// answers: a fetch waiting for that lock answers `Busy` as soon as the commit asks, not
/// after its whole wait, and a direct read is sent to the manager. Before, each fault the
/// manager held the page's entry for waited out its fetch wait here, and the commit's
/// request queued behind them all.
#[tokio::test(start_paused = true)]
async fn a_fetch_waiting_for_a_commit_that_asks_the_manager_answers_busy_at_once() {
    let f = Arc::new(Frame::default());
    assert_eq!(f.install_grant(3, Some(zeros()), None), Installed::Yes);
    let writing = Arc::clone(&f.writer).lock_owned().await;
    let g = Arc::clone(&f);
    let started = tokio::time::Instant::now();
    let fetch =
        tokio::spawn(
            async move { g.fetch(3, (None, None), Duration::from_secs(1), &|| false).await },
        );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let rebacking = f.rebacking();
    assert!(matches!(fetch.await.expect("fetch"), Fetched::Busy));
    assert_eq!(started.elapsed(), Duration::from_millis(10), "answered when the commit asked");
    assert_eq!(f.serve(NodeId(7)).await, None, "a direct read goes to the manager");
    drop(rebacking);
    drop(writing);
    assert!(f.serve(NodeId(7)).await.is_some(), "served once the commit is done");
}

/// A reader asked to take the page when its owner lacks it gives only a valid read copy: a
/// backup it keeps under the same label may hold an older commit of that version (it missed
/// one), and `promote`, which takes a backup, would roll those commits back (the review of
/// `c29d11e`).
#[test]
fn only_a_valid_read_copy_is_adopted_never_a_backup_of_the_same_label() {
    let page = |b: u8| Arc::new(vec![b; PAGE_SIZE]);
    let f = Frame::default();
    assert_eq!(f.store_backup(6, 2, page(1)), Stored::Kept);
    f.invalidate(6);
    f.install_read(6, page(2));
    assert!(!f.adopt_read_copy(6, &|| false), "no valid read copy: the backup is not taken");
    assert!(f.promote(6, Some(6)), "as `Promote` would take it");
    let held = Frame::default();
    held.install_read(6, page(2));
    assert!(held.adopt_read_copy(6, &|| false), "a valid read copy is the page");
    assert_eq!(held.readable().map(|(v, d)| (v, d[0])), Some((6, 2)));
}
