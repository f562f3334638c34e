//! A manager's word to its replica holder: once it died, a page never written reads as zeros.

use crate::harness::{outcome, pid, put, Cluster, PAGES, SEGMENT};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, PageId, PAGE_SIZE};
use gobelins_locator::{Change, NodeId, TreeConfig};
use std::time::Duration;

/// The pages of `segment` that `manager` manages, by number, among the first `count`.
fn pages_managed_by(cluster: &Cluster, manager: NodeId, segment: u32, count: u32) -> Vec<u32> {
    let table = cluster.mem.snapshot();
    (0..count)
        .filter(|&p| {
            let key = PageId { segment, page: p }.key();
            table.locate(gobelins_dsm::DSM, key) == Some(manager)
        })
        .collect()
}

/// Waits until `node` has given its replica holder its word for the cluster's epoch, which
/// it does in the background once a change is stable, and again a while after it took it
/// back (up to 30 s later).
async fn word_given(cluster: &Cluster, node: NodeId) {
    let epoch = cluster.mem.host(node).context().epoch();
    let made = || cluster.made.lock().expect("made")[node.0 as usize].clone();
    for _ in 0..60_000 {
        if made().word().is_some_and(|(_, e)| e == epoch) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("node {node} gave no word at epoch {epoch}");
}

/// In a cluster of several cells, a manager that took no part in the last change (another
/// cell's) vouches at its stable epoch too: once it dies, a page never written that it managed
/// reads as zeros, not lost. Before, only participants gave their word, and a failure after
/// another cell's change tainted the dead manager's slots.
#[test]
fn with_backups_a_manager_outside_the_last_change_still_vouches_for_its_slots() {
    replay(async {
        let shape = TreeConfig::default().with_cell_capacity(2);
        let config = DsmConfig { backups: true, ..DsmConfig::default() };
        let mut cluster = Cluster::start_shaped(6, shape, config).await;
        let added = cluster.mem.add().await;
        let epoch = cluster.mem.host(NodeId(1)).context().epoch();
        let outside = |n: NodeId| {
            let history = cluster.mem.host(n).history();
            history.last().is_none_or(|record| record.epoch < epoch)
        };
        let mut candidates =
            cluster.mem.nodes().into_iter().filter(|&n| n != NodeId(1) && n != added);
        let victim = candidates.rfind(|&n| outside(n)).expect("a node outside the change");
        word_given(&cluster, victim).await;
        // A segment nobody wrote.
        let unwritten = pages_managed_by(&cluster, victim, 9, 4096);
        assert!(unwritten.len() >= 16, "pages the victim manages");
        cluster.mem.fail(victim).await;
        read_as_zeros(&cluster, NodeId(1), victim, &unwritten).await;
    })
}

/// Reads the first 16 `pages` of segment 9, never written and managed by `victim`, through
/// `reader`: each reads as zeros, and nothing is reported lost.
async fn read_as_zeros(cluster: &Cluster, reader: NodeId, victim: NodeId, pages: &[u32]) {
    let reader = cluster.dsm(reader);
    for &page in &pages[..16] {
        let read = outcome(&reader, PageId { segment: 9, page }).await;
        assert_eq!(read, Ok(0), "page {page}, managed by node {victim}");
    }
    assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
}

/// With backups on, one failure loses no page: a page nobody reports after it was never
/// written. It reads as zeros, not lost, and a segment first used after the failure is
/// written as any other. The dead manager vouched for its slots to its replica holder once
/// the cluster was stable, and every survivor reported.
#[test]
fn with_backups_a_page_never_written_reads_as_zeros_after_its_manager_died() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let victim = NodeId(3);
        word_given(&cluster, victim).await;
        // Even pages written, each from another node, the victim included.
        for page in (0..PAGES).step_by(2) {
            let writer = NodeId(1 + u64::from(page / 2) % 4);
            put(&cluster.dsm(writer), pid(page), u64::from(page) + 1).await;
        }
        let unwritten: Vec<u32> = (1..PAGES).step_by(2).collect();
        let table = cluster.mem.snapshot();
        let victims = |p: &&u32| table.locate(gobelins_dsm::DSM, pid(**p).key()) == Some(victim);
        assert!(unwritten.iter().any(|p| victims(&p)), "the victim manages a page never written");
        let fresh = SEGMENT + 7;
        assert!(!pages_managed_by(&cluster, victim, fresh, 64).is_empty());

        cluster.mem.fail(victim).await;

        let reader = cluster.dsm(NodeId(1));
        let mut wrong = Vec::new();
        for page in 0..PAGES {
            let want = if page % 2 == 0 { u64::from(page) + 1 } else { 0 };
            let read = outcome(&reader, pid(page)).await;
            if read != Ok(want) {
                wrong.push(format!("page {page}: {read:?}, not {want}"));
            }
        }
        for page in 0..64 {
            let id = PageId { segment: fresh, page };
            match reader.write(id).await {
                Ok(mut g) => {
                    g[0] = 9;
                    g.commit().await.expect("commit");
                }
                Err(e) => wrong.push(format!("the new segment's page {page}: {e}")),
            }
        }
        assert!(wrong.is_empty(), "after one failure with backups on: {wrong:?}");
        assert_eq!(cluster.reported_lost(), 0, "no page reported lost");
    })
}

/// An operator evicts a node that has just died, before the cluster noticed: the eviction
/// begins, the node sends nothing, and its recovery follows. Its word, given at the epoch
/// before the eviction, still vouches: pages never written that it managed read as zeros, not
/// lost. Before, only a word of the epoch right before the recovery counted, and evicting a
/// node killed a moment before tainted a fifth of a five-node cluster's slots (a helper's
/// black-box run).
#[test]
fn with_backups_evicting_a_node_that_just_died_leaves_pages_never_written_as_zeros() {
    replay(evicted_dying(false))
}

/// As above, but the evicted node dies once it has handed everything over, before it says it
/// is done: its entries and the frames of the pages it owned are at their new managers, which
/// the recovery after its eviction finds, and its word lets the rest read as zeros.
#[test]
fn with_backups_a_node_evicted_that_dies_once_it_sent_everything_loses_and_taints_nothing() {
    replay(evicted_dying(true))
}

/// Node 3 of four, with pages written that it manages (one owned there, whose frame travels
/// with its entry), is evicted and dies at once, or once it `sent` everything: every page
/// written reads back, and those never written read as zeros.
async fn evicted_dying(sent: bool) {
    let (mut cluster, victim) = (Cluster::with_backups(4).await, NodeId(3));
    let (written, unwritten) = two_written(&cluster, victim).await;
    assert!(unwritten.len() >= 16, "pages the victim manages");

    if sent {
        cluster.mem.change_and_crash_once_sent(Change::Evict(victim), victim).await;
    } else {
        cluster.mem.change_and_crash(Change::Evict(victim), victim).await;
    }

    read_back(&cluster, written).await;
    read_as_zeros(&cluster, NodeId(2), victim, &unwritten).await;
}

/// Two pages that `victim` manages, written: one from itself (owned there, its frame travels
/// with its entry should it leave), one from node 1; then `victim`'s word given. Returns
/// them, and the pages of segment 9, never written, that `victim` manages.
async fn two_written(cluster: &Cluster, victim: NodeId) -> ([PageId; 2], Vec<u32>) {
    let pages = pages_managed_by(cluster, victim, SEGMENT, 2048);
    let own = PageId { segment: SEGMENT, page: pages[0] };
    put(&cluster.dsm(victim), own, 7).await;
    let other = PageId { segment: SEGMENT, page: pages[1] };
    put(&cluster.dsm(NodeId(1)), other, 8).await;
    word_given(cluster, victim).await;
    ([own, other], pages_managed_by(cluster, victim, 9, 4096))
}

/// The pages [`two_written`] wrote read back through node 2.
async fn read_back(cluster: &Cluster, [own, other]: [PageId; 2]) {
    let reader = cluster.dsm(NodeId(2));
    assert_eq!(outcome(&reader, own).await, Ok(7));
    assert_eq!(outcome(&reader, other).await, Ok(8));
}

/// A node killed a moment before another joins: the join begins, the dead node sends the
/// joiner nothing, and its failure is recovered once the join ends. Its word, given at the
/// epoch before the join, still vouches (a join removes no copy): written pages read back,
/// and pages never written read as zeros, at the survivors and at the joiner, which the
/// recovery hands the slots the dead node did not send. Before, only a word of the epoch
/// right before the recovery counted, and every slot of the dead node was tainted (a helper's
/// black-box run, 3 runs of 3).
#[test]
fn with_backups_a_node_dying_as_another_joins_leaves_pages_never_written_as_zeros() {
    replay(async {
        let (mut cluster, victim) = (Cluster::with_backups(4).await, NodeId(3));
        let (written, unwritten) = two_written(&cluster, victim).await;

        let joiner = cluster.mem.add_while_dying(victim).await;

        read_back(&cluster, written).await;
        let table = cluster.mem.snapshot();
        let at = |p: &u32| table.locate(gobelins_dsm::DSM, PageId { segment: 9, page: *p }.key());
        let (joined, stayed): (Vec<u32>, Vec<u32>) =
            unwritten.iter().partition(|p| at(p) == Some(joiner));
        assert!(joined.len() >= 16 && stayed.len() >= 16, "{} and {}", joined.len(), stayed.len());
        read_as_zeros(&cluster, NodeId(2), victim, &joined).await;
        read_as_zeros(&cluster, joiner, victim, &stayed).await;
    })
}

/// Four nodes, of which 3 and 4 fail at once, beyond what backups guard against: their slots
/// are tainted at nodes 1 and 2. 45 s later, the words' pauses have grown: the next comes 61 s
/// after the stable epoch.
async fn two_failed() -> Cluster {
    let mut cluster = Cluster::with_backups(4).await;
    cluster.mem.fail_both(NodeId(3), NodeId(4)).await;
    tokio::time::sleep(Duration::from_secs(45)).await;
    cluster
}

/// The pages of segment 9 that `node` manages.
fn of_segment_9(cluster: &Cluster, node: NodeId) -> Vec<PageId> {
    let pages = pages_managed_by(cluster, node, 9, 4096).into_iter();
    pages.map(|page| PageId { segment: 9, page }).collect()
}

/// A forgive lifts taints that the managers' words left out: each gives its word again at
/// once, and its failure a moment later does not taint the forgiven slots anew. Before, the
/// word came again only after its pause, up to 30 s (a helper's run: a failure within a second
/// of `dsm forgive --all` tainted 206 slots again).
#[test]
fn with_backups_a_forgive_has_the_managers_vouch_again_at_once() {
    replay(async {
        let mut cluster = two_failed().await;
        let (reader, survivor) = (cluster.dsm(NodeId(1)), NodeId(2));
        let pages = of_segment_9(&cluster, survivor);
        let lost = futures::future::join_all(pages.iter().map(|&p| outcome(&reader, p))).await;
        assert!(lost.iter().any(Result::is_err), "some of node 2's slots were tainted");
        let (slots, _) = reader.forgive_all().await.expect("forgiven");
        assert!(slots > 0);
        tokio::time::sleep(Duration::from_millis(500)).await;

        cluster.mem.fail(survivor).await;

        let mut wrong = Vec::new();
        for &page in &pages {
            let read = outcome(&reader, page).await;
            if read != Ok(0) {
                wrong.push(format!("{page:?}: {read:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {}: {:?}",
            wrong.len(),
            pages.len(),
            &wrong[..wrong.len().min(3)]
        );
    })
}

/// As above, with a change since the taints and a forgive of one slot: the keeper of the word
/// for the epoch before that change, still waiting out its pause, must not swallow the
/// forgive's wake-up (the review of `8685359`: the oldest waiter takes it, and gave no word
/// for an epoch gone by).
#[test]
fn with_backups_a_forgive_of_one_slot_after_another_change_has_its_manager_vouch_again() {
    replay(async {
        let mut cluster = two_failed().await;
        let (reader, survivor) = (cluster.dsm(NodeId(1)), NodeId(2));
        cluster.mem.add().await;
        // The new keeper's pauses: 1, 2, then 4 s; the next wake is 7 s after the change.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let spec = gobelins_dsm::DsmNode::declaration();
        let pages = of_segment_9(&cluster, survivor);
        let mut tainted = None;
        for &page in &pages {
            if outcome(&reader, page).await.is_err() {
                tainted = Some(page);
                break;
            }
        }
        let tainted = tainted.expect("a page of a tainted slot node 2 manages");
        let slot = spec.slot_of(tainted.key());
        assert!(reader.forgive(tainted).await.expect("forgiven").is_some());
        tokio::time::sleep(Duration::from_millis(600)).await;

        cluster.mem.fail(survivor).await;

        let of_slot: Vec<PageId> =
            pages.into_iter().filter(|p| spec.slot_of(p.key()) == slot).collect();
        for &page in &of_slot {
            assert_eq!(outcome(&reader, page).await, Ok(0), "{page:?}, of the forgiven slot");
        }
    })
}

/// The word that counts after a node's own eviction is the one it gave: a slot it left out (a
/// page there had no copy on another node) stays tainted. Evicted just after it died, the
/// manager's pages never written in other slots read as zeros, and one in the slot left out
/// reads as lost, never as zeros.
#[test]
fn with_backups_evicting_a_node_that_just_died_leaves_the_slots_its_word_left_out_tainted() {
    replay(async {
        let mut cluster = Cluster::with_backups(2).await;
        let (victim, survivor) = (NodeId(1), NodeId(2));
        word_given(&cluster, victim).await;
        let spec = gobelins_dsm::DsmNode::declaration();
        let slot = |p: PageId| spec.slot_of(p.key());
        let written =
            PageId { segment: SEGMENT, page: pages_managed_by(&cluster, victim, SEGMENT, 2048)[0] };
        let unwritten: Vec<PageId> = (9..40)
            .flat_map(|segment| {
                let pages = pages_managed_by(&cluster, victim, segment, 256);
                pages.into_iter().map(move |page| PageId { segment, page })
            })
            .collect();
        let same_slot =
            *unwritten.iter().find(|&&p| slot(p) == slot(written)).expect("a page of its slot");
        let other_slot =
            *unwritten.iter().find(|&&p| slot(p) != slot(written)).expect("another slot");
        word_taken_back(&cluster, victim, survivor, written).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let word = cluster.made.lock().expect("made")[victim.0 as usize].word();
        assert!(word.is_some(), "the word is given again, leaving the written page's slot out");

        cluster.mem.change_and_crash(Change::Evict(victim), victim).await;

        let reader = cluster.dsm(survivor);
        assert_eq!(outcome(&reader, other_slot).await, Ok(0), "{other_slot:?}");
        let read = outcome(&reader, same_slot).await;
        assert!(read.as_ref().is_err_and(|e| e.contains("lost")), "{same_slot:?}: {read:?}");
    })
}

/// The dead manager's word counts only if every node reported: a node dying with it may
/// have held a page's only other copy. Then a page nobody reports reads as lost, never as
/// zeros, though the dead manager's replica holder lives and passed its word on.
#[test]
fn with_backups_a_node_dying_during_the_recovery_leaves_unreported_pages_lost() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let victim = NodeId(3);
        let holder = cluster.mem.snapshot().replica_holder(victim).expect("a replica holder");
        let other = NodeId(1);
        assert_ne!(holder, other);
        word_given(&cluster, victim).await;
        let pages = pages_managed_by(&cluster, victim, SEGMENT, 2048);
        assert!(pages.len() >= 2, "the victim manages pages: {pages:?}");
        // Written by the victim, backed up on the node after it, which lives.
        let written = PageId { segment: SEGMENT, page: pages[0] };
        put(&cluster.dsm(victim), written, 5).await;
        let unwritten = PageId { segment: SEGMENT, page: pages[1] };

        cluster.mem.fail_and_crash(victim, other).await;

        let reader = cluster.dsm(NodeId(2));
        assert_eq!(outcome(&reader, written).await, Ok(5));
        let read = outcome(&reader, unwritten).await;
        assert!(read.as_ref().is_err_and(|e| e.contains("lost")), "{read:?}");
    })
}

/// A manager whose word was taken back gives it again a while later, leaving out only the
/// slots that still hold a page with no copy elsewhere: its death then leaves a page never
/// written, in another slot, reading as zeros, not lost. Before, the word stayed taken back
/// until the next change (a soak saw a page never written reported lost so, after a single
/// failure).
#[test]
fn with_backups_a_manager_gives_its_word_again_once_it_took_it_back() {
    replay(async {
        let mut cluster = Cluster::with_backups(2).await;
        let (victim, survivor) = (NodeId(1), NodeId(2));
        word_given(&cluster, victim).await;
        let spec = gobelins_dsm::DsmNode::declaration();
        let pages = pages_managed_by(&cluster, victim, SEGMENT, 2048);
        let written = PageId { segment: SEGMENT, page: pages[0] };
        let slot = |p: PageId| spec.slot_of(p.key());
        let unwritten = pages[1..]
            .iter()
            .map(|&page| PageId { segment: SEGMENT, page })
            .find(|&p| slot(p) != slot(written))
            .expect("a page of another slot");
        word_taken_back(&cluster, victim, survivor, written).await;
        let word = || cluster.made.lock().expect("made")[1].word();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(word().is_some(), "the word is given again");

        cluster.mem.fail(victim).await;

        assert_eq!(outcome(&cluster.dsm(survivor), unwritten).await, Ok(0));
        // Its slot was left out, so the survivor's report decides: the copy the manager was
        // told had no backup was still there.
        assert_eq!(outcome(&cluster.dsm(survivor), written).await, Ok(1));
    })
}

/// Writes `written` from `manager`, then tells the manager the commit's backup,
/// `backup`, did not answer and no other node can take one: the manager then counts the
/// page as kept on itself alone (the backup's copy stays where it was), and takes its word
/// back.
async fn word_taken_back(cluster: &Cluster, manager: NodeId, backup: NodeId, written: PageId) {
    let request = written_without_backup(cluster, manager, backup, written).await;
    let ctx = cluster.mem.host(manager).context();
    let answer: gobelins_dsm::Response =
        ctx.request(gobelins_dsm::DSM, written.key(), &request).await.expect("asked");
    assert!(matches!(answer, gobelins_dsm::Response::Ok), "{answer:?}");
    let word = cluster.made.lock().expect("made")[manager.0 as usize].word();
    assert_eq!(word, None, "the word is taken back");
}

/// Writes `page` from `manager`, and returns what an owner tells its manager when a commit
/// cannot reach its backup, `backup`: sent to `manager` in a cluster of two, it leaves the
/// page with no copy on another node.
async fn written_without_backup(
    cluster: &Cluster,
    manager: NodeId,
    backup: NodeId,
    page: PageId,
) -> gobelins_dsm::Request {
    let mut g = cluster.dsm(manager).write(page).await.expect("write");
    g[0] = 1;
    let version = g.version();
    g.commit().await.expect("commit");
    gobelins_dsm::Request::Rebackup {
        node: manager,
        version,
        commit: 1,
        failed: backup,
        data: gobelins_dsm::PageBytes::from(vec![1; PAGE_SIZE]),
    }
}

/// A manager takes its word back before a page it manages stops having a copy elsewhere:
/// here its owner, the manager itself, is told its backup is unreachable and no other node
/// can take one. Its death then leaves its slots tainted: a page nobody reports reads lost.
#[test]
fn with_backups_a_manager_takes_its_word_back_when_a_page_has_no_copy_elsewhere() {
    replay(async {
        let mut cluster = Cluster::with_backups(2).await;
        let (victim, survivor) = (NodeId(1), NodeId(2));
        word_given(&cluster, victim).await;
        let pages = pages_managed_by(&cluster, victim, SEGMENT, 2048);
        assert!(pages.len() >= 2, "the victim manages pages: {pages:?}");
        let written = PageId { segment: SEGMENT, page: pages[0] };
        let unwritten = PageId { segment: SEGMENT, page: pages[1] };
        word_taken_back(&cluster, victim, survivor, written).await;

        cluster.mem.fail(victim).await;

        let read = outcome(&cluster.dsm(survivor), unwritten).await;
        assert!(read.as_ref().is_err_and(|e| e.contains("lost")), "{read:?}");
    })
}

/// A manager's holder changes with a join: the old holder keeps its older word, and the new
/// one gets the latest, then the manager's taking it back. The new holder is evicted, taking
/// that latest away; the manager dies before it gives its word again. The old holder's word
/// must not count then: the manager had taken it back, since a page had no copy outside it.
/// The eviction counts against it: never-written pages of the dead manager's read as lost,
/// not as zeros. Counting only the evictions whose leaver said it took a copy away (tried
/// once, and taken back) read them as zeros: the old word vouched for a page with no copy.
#[test]
fn with_backups_a_word_taken_back_at_an_evicted_holder_leaves_no_older_word_to_count() {
    replay(async {
        // Cells of two, so that the evicted holder's slots go to its cell only.
        let shape = TreeConfig::default().with_cell_capacity(2);
        let config = DsmConfig { backups: true, ..DsmConfig::default() };
        let mut cluster = Cluster::start_shaped(6, shape, config).await;
        for node in (1..=6).map(NodeId) {
            word_given(&cluster, node).await;
        }
        let before = cluster.mem.snapshot();
        let added = cluster.mem.add().await;
        let after = cluster.mem.snapshot();
        let holders = |n| (before.replica_holder(n), after.replica_holder(n));
        let receives = |n, from| cluster.mem.preview(&Change::Evict(from)).receivers().contains(&n);
        let manager = (1..=6)
            .map(NodeId)
            .find(|&n| match holders(n) {
                (Some(old), Some(new)) => old != new && new != n && !receives(n, new),
                _ => false,
            })
            .expect("a manager whose holder the join changed, taking none of its slots");
        let (Some(old_holder), Some(holder)) = holders(manager) else { unreachable!() };
        word_given(&cluster, manager).await;
        // A page of the manager's left with no copy outside it: its backup asks to be let go
        // (as a leaver would) while every other node but the holder is silent, so that no new
        // backup is found.
        let pages = pages_managed_by(&cluster, manager, SEGMENT, 2048);
        let written = PageId { segment: SEGMENT, page: pages[0] };
        put(&cluster.dsm(manager), written, 3).await;
        let others: Vec<NodeId> =
            (1..=added.0).map(NodeId).filter(|&n| n != manager && n != holder).collect();
        for &n in &others {
            cluster.mem.crash(n);
        }
        let ctx = cluster.mem.host(manager).context();
        for node in (1..=added.0).map(NodeId).filter(|&n| n != manager) {
            let abandon = gobelins_dsm::Request::Abandon { node, copy: None };
            let answer: gobelins_dsm::Response =
                ctx.request(gobelins_dsm::DSM, written.key(), &abandon).await.expect("asked");
            assert!(matches!(answer, gobelins_dsm::Response::Ok), "{answer:?}");
        }
        let word = cluster.made.lock().expect("made")[manager.0 as usize].word();
        assert_eq!(word, None, "taken back from the holder, {holder}");
        for &n in &others {
            cluster.mem.heal(n);
        }
        assert!(others.contains(&old_holder), "the old holder survives, with its older word");

        cluster.mem.evict(holder).await;
        cluster.mem.fail(manager).await;

        let reader = others.iter().copied().find(|&n| n != holder).expect("a reader");
        let unwritten = PageId { segment: SEGMENT, page: pages[1] };
        let read = outcome(&cluster.dsm(reader), unwritten).await;
        assert!(read.as_ref().is_err_and(|e| e.contains("lost")), "{read:?}");
    })
}

/// A cluster of two nodes with backups, `manager`'s word given, and a page it manages.
async fn two_nodes_and_a_page_of(manager: NodeId) -> (Cluster, PageId) {
    let cluster = Cluster::with_backups(2).await;
    word_given(&cluster, manager).await;
    let page = pages_managed_by(&cluster, manager, SEGMENT, 2048)[0];
    (cluster, PageId { segment: SEGMENT, page })
}

/// A leaving node asks the manager to move the backup it keeps of a page the manager owns,
/// and no other node can take one: the manager answers Ok, for the leaver's copy is not its to
/// keep, and takes its word back first, since the page then has no copy outside the manager.
/// Before, the copy on the leaver counted as kept elsewhere: the word stood while the page's
/// only other copy was leaving (a helper's review).
#[test]
fn with_backups_a_manager_whose_page_s_backup_leaves_unreplaced_takes_its_word_back() {
    replay(async {
        let (manager, leaver) = (NodeId(1), NodeId(2));
        let (cluster, page) = two_nodes_and_a_page_of(manager).await;
        put(&cluster.dsm(manager), page, 5).await;
        let word = || cluster.made.lock().expect("made")[manager.0 as usize].word();
        assert!(word().is_some(), "the page's backup is on the other node: the word stands");
        let abandon = gobelins_dsm::Request::Abandon { node: leaver, copy: None };
        let ctx = cluster.mem.host(manager).context();
        let answer: gobelins_dsm::Response =
            ctx.request(gobelins_dsm::DSM, page.key(), &abandon).await.expect("asked");
        assert!(matches!(answer, gobelins_dsm::Response::Ok), "{answer:?}");
        assert_eq!(word(), None, "the word is taken back");
    })
}

/// A manager whose replica holder does not answer, though the cluster has not given up on
/// it, cannot take its word back: the request that left a page with no copy elsewhere is
/// answered `Retry` after a bounded wait, rather than hang (a change waits for every handler)
/// or go out while the holder's word would read the page as zeros after the manager's death.
#[test]
fn with_backups_a_manager_whose_replica_holder_is_silent_answers_retry_rather_than_hang() {
    replay(async {
        let (manager, holder) = (NodeId(1), NodeId(2));
        let (cluster, page) = two_nodes_and_a_page_of(manager).await;
        let rebackup = written_without_backup(&cluster, manager, holder, page).await;
        let ctx = cluster.mem.host(manager).context();
        cluster.mem.crash(holder);
        let asked = tokio::time::Instant::now();
        let answer: gobelins_dsm::Response =
            ctx.request(gobelins_dsm::DSM, page.key(), &rebackup).await.expect("asked");
        assert!(matches!(answer, gobelins_dsm::Response::Retry), "{answer:?}");
        assert!(asked.elapsed() < Duration::from_secs(5), "answered in {:?}", asked.elapsed());
        // The holder answers again: the word is taken back, and the request goes through.
        cluster.mem.heal(holder);
        let answer: gobelins_dsm::Response =
            ctx.request(gobelins_dsm::DSM, page.key(), &rebackup).await.expect("asked");
        assert!(matches!(answer, gobelins_dsm::Response::Ok), "{answer:?}");
        assert_eq!(cluster.made.lock().expect("made")[1].word(), None, "the word is taken back");
    })
}

/// Pages only ever read hold zeros, which no failure can lose. Read through node 3, their
/// manager's failure made node 3 their owner in the rebuilt entries: its word then left their
/// slots out, and its own failure later lost them (`lost` to every reader and writer, though
/// nothing was ever written).
#[test]
fn with_backups_a_page_only_ever_read_reads_as_zeros_after_its_manager_then_its_reader_fail() {
    replay(async {
        let mut cluster = Cluster::with_backups(3).await;
        let (manager, reader) = (NodeId(2), NodeId(3));
        let pages = crate::harness::pages_by_manager(&cluster, manager, true, 6);
        let dsm = cluster.dsm(reader);
        for &page in &pages {
            assert_eq!(outcome(&dsm, page).await, Ok(0), "never written");
        }
        word_given(&cluster, manager).await;
        cluster.mem.fail(manager).await;
        cluster.rejoin(manager).await;
        word_given(&cluster, reader).await;
        cluster.mem.fail(reader).await;
        let dsm = cluster.dsm(NodeId(1));
        for &page in &pages {
            let read = dsm.read(page).await.map(|g| g.iter().all(|&b| b == 0));
            assert!(matches!(read, Ok(true)), "{page:?}: {read:?}");
        }
        assert_eq!(cluster.reported_lost(), 0);
        // Written after all: the zeros give way to what is written.
        put(&dsm, pages[0], 5).await;
        assert_eq!(outcome(&cluster.dsm(manager), pages[0]).await, Ok(5));
    })
}
