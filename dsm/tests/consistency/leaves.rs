//! Leaving nodes hand their pages over, or leave them where a recovery finds them: no page lost.

use crate::checker::Value;
use crate::harness::{
    every_write_survived, logs, misread, outcome, pid, put, write_all, write_counts, Cluster, Load,
    PAGES, SEGMENT,
};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, DsmError, PageId};
use gobelins_locator::{Change, NodeId, TreeConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[test]
fn with_backups_a_node_leaving_leaves_every_page_on_two_nodes() {
    // Twelve nodes, so that half of them take no part in the leave, and must still see to
    // the pages it was the backup of. Each survivor in turn is then the one to fail next.
    for victim in (1..=12).map(NodeId).filter(|&n| n != NodeId(1) && n != NodeId(3)) {
        replay(async {
            let mut cluster = Cluster::with_backups(12).await;
            // Pages owned by 2, some backed up on 3; and pages owned by 3, one managed by
            // each other node, which is also the page's backup: the node before it in the
            // table wrote it first, and a later writer keeps the backup it finds.
            let snapshot = cluster.mem.snapshot();
            let nodes = snapshot.nodes().to_vec();
            let before = |m: NodeId| {
                let at = nodes.iter().position(|&n| n == m).expect("a member");
                nodes[(at + nodes.len() - 1) % nodes.len()]
            };
            let mut written: Vec<(PageId, u64)> = Vec::new();
            for page in (0..PAGES).step_by(2) {
                written.push((pid(page), u64::from(page) + 200));
            }
            let mut managed = BTreeSet::new();
            for page in (0..100_000).map(|p| PageId { segment: SEGMENT, page: p * 7 + 1 }) {
                let Some(manager) = snapshot.locate(gobelins_dsm::DSM, page.key()) else { break };
                if manager != NodeId(3) && managed.insert(manager) {
                    written.push((page, u64::from(page.page) + 300));
                }
                if managed.len() == 11 {
                    break;
                }
            }
            assert_eq!(managed.len(), 11, "a page managed by every node but the leaver");
            for &(page, count) in &written {
                if count >= 300 {
                    let manager = snapshot.locate(gobelins_dsm::DSM, page.key()).expect("managed");
                    put(&cluster.dsm(before(manager)), page, 1).await;
                    put(&cluster.dsm(NodeId(3)), page, count).await;
                } else {
                    put(&cluster.dsm(NodeId(2)), page, count).await;
                }
            }
            // 3 leaves: 2's pages it keeps the backup of need one elsewhere, and its own pages,
            // handed to their managers, need one where the manager was their backup.
            cluster.mem.evict(NodeId(3)).await;
            cluster.mem.fail(victim).await;
            let reader = cluster.dsm(NodeId(1));
            let mut wrong = Vec::new();
            for &(page, count) in &written {
                match reader.read(page).await {
                    Ok(g) if Value::decode(&g).count == count => {}
                    Ok(g) => wrong.push(format!("{page:?} reads {:?}", Value::decode(&g))),
                    Err(e) => wrong.push(format!("{page:?}: {e}")),
                }
            }
            assert!(wrong.is_empty(), "3 left, then {victim} failed: {wrong:?}");
        })
    }
}

#[test]
fn with_backups_a_leave_and_then_a_failure_under_load_lose_no_page() {
    replay(async {
        let mut cluster = Cluster::with_backups(8).await;
        let mut load = Load::new();
        let mut on_node: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        for node in [1, 2, 4, 5].map(NodeId) {
            on_node.insert(node, load.start(&cluster, node));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Backups move off the leaving node while pages are written: owners busy committing,
        // commits asking for new backups, grants placing their own.
        cluster.mem.evict(NodeId(3)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let victim = NodeId(2);
        let mut done = load.stop(&on_node[&victim]).await;
        done.push(write_all(&cluster.dsm(victim), 99).await);
        cluster.mem.fail(victim).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Every worker ends its access: two nodes writing one page once took it from each
        // other for ever, neither writing.
        let rest = tokio::time::timeout(Duration::from_secs(30), load.stop_all()).await;
        done.extend(rest.expect("every access ends"));

        every_write_survived(&cluster, done).await;
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost either");
    })
}

/// Node 3 owns a page whose manager, node 2, is cut off while node 3 leaves, for longer than
/// node 3 asks it to take the page: the page cannot be handed over. Once the leave is done, an
/// access finds the page in its backup, or, without backups, is told it is lost; it is not
/// sent to node 3, gone, until it fails as stuck.
#[test]
fn a_page_its_leaving_owner_could_not_hand_over_is_rebuilt_or_reported_lost() {
    for backups in [true, false] {
        replay(async move {
            let mut cluster =
                Cluster::start(3, DsmConfig { backups, ..DsmConfig::default() }).await;
            let snapshot = cluster.mem.snapshot();
            let page = (0..)
                .map(pid)
                .find(|p| snapshot.locate(gobelins_dsm::DSM, p.key()) == Some(NodeId(2)))
                .expect("a page node 2 manages");
            put(&cluster.dsm(NodeId(3)), page, 7).await;
            let faults = cluster.mem.faults();
            faults.crash(NodeId(2));
            let healing = async {
                tokio::time::sleep(Duration::from_secs(40)).await;
                faults.heal(NodeId(2));
            };
            tokio::join!(cluster.mem.evict(NodeId(3)), healing);
            let read =
                tokio::time::timeout(Duration::from_secs(10), cluster.dsm(NodeId(1)).read(page))
                    .await
                    .expect("an answer well before the access deadline");
            match (backups, read.map(|guard| Value::decode(&guard).count)) {
                (true, Ok(7)) | (false, Err(DsmError::Lost { .. })) => {}
                (_, other) => panic!("backups {backups}: {other:?}"),
            }
        });
    }
}

/// With backups on, a leaving owner whose page's manager is also its backup, and is cut off,
/// leaves the page on another node. The manager answers again, alive: that node hands the
/// page on and keeps no copy nobody names, and the page reads back.
#[test]
fn with_backups_a_page_left_on_another_node_is_handed_on_once_its_manager_answers() {
    replay(async {
        let mut cluster = Cluster::with_backups(3).await;
        let (leaver, manager, fosterer) = (NodeId(1), NodeId(2), NodeId(3));
        let snapshot = cluster.mem.snapshot();
        let page = (0..)
            .map(pid)
            .find(|p| snapshot.locate(gobelins_dsm::DSM, p.key()) == Some(manager))
            .expect("a page node 2 manages");
        // Its backup goes on the node after its writer: node 2, its manager.
        put(&cluster.dsm(leaver), page, 7).await;
        let made = |n: NodeId| cluster.made.lock().expect("made")[n.0 as usize].clone();
        let faults = cluster.mem.faults();
        faults.crash(manager);
        let healing = async {
            tokio::time::sleep(Duration::from_secs(40)).await;
            faults.heal(manager);
        };
        // The leave itself waits for node 2, which receives entries from it.
        let meanwhile = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            made(fosterer).fostered()
        };
        let ((), (), fostered) = tokio::join!(cluster.mem.evict(leaver), healing, meanwhile);
        assert_eq!(fostered, 1, "the page was left on node 3");
        let mut waited = Duration::ZERO;
        while made(fosterer).fostered() > 0 {
            assert!(waited < Duration::from_secs(30), "node 3 hands the page on");
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += Duration::from_millis(100);
        }
        let read = outcome(&cluster.dsm(fosterer), page).await;
        assert_eq!(read, Ok(7));
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
    })
}

/// A page left on another node (its leaving owner's manager cut off) is left on another again
/// when that node leaves too, before the manager's recovery: that recovery then finds it.
/// Cells of two, so that the first leave takes no part of the manager's cell.
#[test]
fn with_backups_a_page_left_on_a_node_that_leaves_in_turn_goes_on_to_another() {
    replay(async {
        let shape = TreeConfig::default().with_cell_capacity(2);
        let config = DsmConfig { backups: true, ..DsmConfig::default() };
        let mut cluster = Cluster::start_shaped(6, shape, config).await;
        let table = cluster.mem.snapshot();
        let nodes = table.nodes().to_vec();
        let next = |n: NodeId| {
            nodes[(nodes.iter().position(|&m| m == n).expect("a node") + 1) % nodes.len()]
        };
        // The leaver writes the page, so its backup is on the next node: the manager, in
        // another cell. The page is left on the node after the manager, its cell mate.
        let leaver = nodes
            .iter()
            .copied()
            .find(|&l| !table.cell_mates(l).any(|m| m == next(l)) && next(next(l)) != l)
            .expect("a node whose next is in another cell");
        let (manager, fosterer) = (next(leaver), next(next(leaver)));
        let page = (0..)
            .map(pid)
            .find(|p| table.locate(gobelins_dsm::DSM, p.key()) == Some(manager))
            .expect("a page the manager manages");
        put(&cluster.dsm(leaver), page, 7).await;
        let made = |n: NodeId| cluster.made.lock().expect("made")[n.0 as usize].clone();
        cluster.mem.faults().crash(manager);
        cluster.mem.evict(leaver).await;
        assert_eq!(made(fosterer).fostered(), 1, "the page left on node {fosterer}");
        // The fosterer leaves as the manager dies: the page goes on before it does.
        cluster.mem.change_and_crash(Change::Evict(fosterer), manager).await;
        let reader = nodes.iter().copied().find(|n| ![leaver, manager, fosterer].contains(n));
        let read = outcome(&cluster.dsm(reader.expect("a node left")), page).await;
        assert_eq!(read, Ok(7), "leaver {leaver}, manager {manager}, fosterer {fosterer}");
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
    })
}

/// With backups on, a node that leaves as the owner of the pages it backs up dies loses none of
/// them: where the page's manager lives, it stores the leaver's copy on another node itself,
/// the owner not answering; where the manager is the dead owner, the leaver leaves its copy on
/// another node for the recovery to find.
#[test]
fn with_backups_a_node_leaving_as_the_owner_of_its_backups_dies_loses_no_page() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let nodes = cluster.mem.snapshot().nodes().to_vec();
        // The owner writes, so its backup is on the next node: the leaver.
        let (owner, leaver) = (nodes[1], nodes[2]);
        let pages: Vec<PageId> =
            (0..64).map(|p| PageId { segment: SEGMENT, page: p * 131 }).collect();
        write_counts(&cluster.dsm(owner), &pages).await;
        let table = cluster.mem.snapshot();
        let by_owner =
            pages.iter().filter(|p| table.locate(gobelins_dsm::DSM, p.key()) == Some(owner));
        assert!(by_owner.count() >= 8, "pages the owner manages too");
        cluster.mem.change_and_crash(Change::Evict(leaver), owner).await;
        let wrong = misread(&cluster.dsm(nodes[0]), &pages).await;
        assert!(wrong.is_empty(), "{} of {} pages: {wrong:?}", wrong.len(), pages.len());
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
    })
}

/// With backups on, a node that leaves as another dies loses no page: the pages it owns whose
/// manager died with their backup (which it cannot hand over) it leaves on a live node for
/// the recovery to find. Its leave also does not wait on the dead manager page by page, nor
/// at all once the cluster declares it failed.
#[test]
fn with_backups_a_node_leaving_as_another_dies_loses_no_page() {
    replay(async {
        logs();
        let mut cluster = Cluster::with_backups(5).await;
        let (leaver, victim) = (NodeId(4), NodeId(5));
        // Pages the leaver owns, a fifth of them managed by the victim, some backed up there.
        let pages: Vec<PageId> =
            (0..64).map(|p| PageId { segment: SEGMENT, page: p * 131 }).collect();
        write_counts(&cluster.dsm(leaver), &pages).await;
        // The victim manages some, their backup on it too (the node after their writer); the
        // leaver manages others, which travel to the four nodes left, the victim among them
        // (without their second copy, seven of them were lost).
        let table = cluster.mem.snapshot();
        let managed_by = |n| {
            let at = |p: &&PageId| table.locate(gobelins_dsm::DSM, p.key()) == Some(n);
            pages.iter().filter(at).count()
        };
        assert!(managed_by(victim) >= 8, "pages the victim manages");
        assert!(managed_by(leaver) >= 8, "pages the leaver manages");
        let began = tokio::time::Instant::now();
        cluster.mem.change_and_crash(Change::Evict(leaver), victim).await;
        let took = began.elapsed();
        let wrong = misread(&cluster.dsm(NodeId(1)), &pages).await;
        assert!(wrong.is_empty(), "{} of {} pages: {wrong:?}", wrong.len(), pages.len());
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
        // In the test's paused time: nothing waits out the leaver's 4 s of patience with a
        // manager the cluster has declared failed (it did in every run of a helper's black-box
        // run: an eviction asked just after a `kill -9`).
        assert!(took < Duration::from_secs(1), "the leave and the recovery took {took:?}");
    })
}

/// A node gave its page up to a writer: its manager fetched it for the writer's grant, and
/// died before the grant reached the writer. The page's backup was on that manager too, so the
/// copy the old owner keeps aside is the page's last. That node then leaves, as the manager is
/// declared failed: it cannot hand the copy to the manager, and leaves it on another node, from
/// which the manager's recovery rebuilds the page. Before, the leave took it away, and the page
/// read as lost (a helper's review).
#[test]
fn with_backups_a_copy_kept_aside_for_a_grant_outlives_its_holder_s_leave_as_the_manager_dies() {
    replay(async {
        let (mut cluster, [reader, owner, manager, _], page) = given_up().await;

        cluster.mem.change_and_crash(Change::Evict(owner), manager).await;

        assert_eq!(outcome(&cluster.dsm(reader), page).await, Ok(7));
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
    })
}

/// As above, but the manager only does not answer for a while: the leaver cannot wait, and
/// leaves its kept-aside copy on another node, which hands it to the manager once it answers.
/// Here the manager made no grant of it (it settled, as far as it knows): the copy goes. Before,
/// the node it was left on kept it for ever, a copy no manager knew of (a helper's review).
#[test]
fn with_backups_a_kept_aside_copy_left_on_another_node_goes_once_the_manager_answers() {
    replay(async {
        let (mut cluster, [kept_on, owner, manager, _], page) = given_up().await;
        let made = cluster.made.lock().expect("made")[kept_on.0 as usize].clone();
        let faults = cluster.mem.faults();
        faults.crash(manager);
        let (meanwhile, kept) = tokio::sync::oneshot::channel();
        let watched = made.clone();
        tokio::spawn(async move {
            // The leaver gave up on the manager after the request's deadline (10 s).
            tokio::time::sleep(Duration::from_secs(15)).await;
            let _ = meanwhile.send(watched.kept_aside());
            tokio::time::sleep(Duration::from_secs(5)).await;
            faults.heal(manager);
        });

        cluster.mem.evict(owner).await;

        assert_eq!(kept.await.expect("watched"), 1, "left on node {kept_on} meanwhile");
        for _ in 0..600 {
            if made.kept_aside() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(made.kept_aside(), 0, "released once the manager answered");
        // The manager's backup copy stays the page.
        assert_eq!(outcome(&cluster.dsm(kept_on), page).await, Ok(7));
    })
}

/// Four nodes; the second writes 7 into a page the third manages (its backup goes on the next
/// node: the manager), then gives it up to the fourth as the manager would for a write grant,
/// keeping the copy aside. Returns the nodes and the page.
async fn given_up() -> (Cluster, [NodeId; 4], PageId) {
    let cluster = Cluster::with_backups(4).await;
    let nodes = cluster.mem.snapshot().nodes().to_vec();
    let (owner, manager, writer) = (nodes[1], nodes[2], nodes[3]);
    let table = cluster.mem.snapshot();
    let page = (0..)
        .map(pid)
        .find(|p| table.locate(gobelins_dsm::DSM, p.key()) == Some(manager))
        .expect("a page the manager manages");
    let version = {
        let mut g = cluster.dsm(owner).write(page).await.expect("write");
        Value { count: 7, worker: 0, seq: 7 }.encode(&mut g);
        let version = g.version();
        g.commit().await.expect("commit");
        version
    };
    // What the manager asks of the owner for the writer's grant, before it dies.
    let fetch = gobelins_dsm::Request::Fetch {
        page,
        version,
        writer: Some(writer),
        backup: Some(nodes[0]),
    };
    let ctx = cluster.mem.host(manager).context();
    let given: gobelins_dsm::Response =
        ctx.tell(owner, gobelins_dsm::DSM, page.key(), &fetch).await.expect("told");
    assert!(matches!(given, gobelins_dsm::Response::Page(_)), "{given:?}");
    (cluster, [nodes[0], owner, manager, writer], page)
}
