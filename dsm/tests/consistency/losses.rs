//! Without backups, a page whose only copy died: reported lost, never zeroed, listed, discarded.

use crate::checker::Value;
use crate::harness::{get, managed_by, pid, put, read_straight_from_the_owner, Cluster, PAGES};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, DsmError, PageId};
use gobelins_locator::NodeId;

#[test]
fn without_backups_a_page_whose_only_copy_died_is_reported_lost_never_zeroed() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let victim = NodeId(3);
        let writer = cluster.dsm(victim);
        let reader = cluster.dsm(NodeId(1));
        // Every page written by the victim alone; page 0 also read by node 1 (a surviving copy).
        for page in 0..PAGES {
            let mut g = writer.write(pid(page)).await.expect("write");
            Value { count: 1, worker: 7, seq: u64::from(page) }.encode(&mut g);
            g.commit().await.expect("commit");
        }
        let shared = reader.read(pid(0)).await.expect("read");
        assert_eq!(Value::decode(&shared).count, 1);

        cluster.mem.fail(victim).await;

        assert_eq!(Value::decode(&reader.read(pid(0)).await.expect("copy")).count, 1);
        let mut lost = 0;
        for page in 1..PAGES {
            match reader.read(pid(page)).await {
                Err(DsmError::Lost { .. }) => lost += 1,
                Ok(g) => {
                    panic!(
                        "page {page} came back as {:?} though its only copy died",
                        Value::decode(&g)
                    )
                }
                Err(e) => panic!("page {page}: {e}"),
            }
        }
        assert_eq!(lost, PAGES - 1);
        // What `gobelins stats` shows: each lost page once, on its manager, however often it
        // is read.
        assert_eq!(cluster.reported_lost(), u64::from(PAGES - 1));
        assert!(matches!(reader.read(pid(1)).await, Err(DsmError::Lost { .. })));
        assert_eq!(cluster.reported_lost(), u64::from(PAGES - 1), "counted once");
        // The program decides; then the page starts afresh. A page that was not lost is not
        // discarded, and says so.
        let page = pid(1);
        assert!(reader.discard(page).await.expect("discard"), "page 1 was lost");
        assert_eq!(Value::decode(&reader.read(page).await.expect("fresh")).count, 0);
        assert!(!reader.discard(pid(0)).await.expect("discard"), "page 0 was not lost");
        assert_eq!(Value::decode(&reader.read(pid(0)).await.expect("kept")).count, 1);
    })
}

/// What `gobelins dsm lost` shows: nothing on a healthy cluster; after a failure without
/// backups, the dead manager's slots tainted and every page whose only copy died, once known
/// lost, named with its manager; a discarded page no more.
#[test]
fn losses_name_every_lost_page_with_its_manager_and_the_tainted_slots() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let victim = NodeId(3);
        let reader = cluster.dsm(NodeId(1));
        for page in 0..PAGES {
            put(&cluster.dsm(victim), pid(page), 1).await;
        }
        let healthy = reader.losses().await.expect("losses");
        assert!(healthy.clean(), "{healthy:?}");
        assert_eq!(healthy.nodes.len(), 3, "every node answers");

        let victims_slots = {
            let snapshot = cluster.mem.snapshot();
            let table = snapshot.table(gobelins_dsm::DSM).expect("the DSM's table");
            table.owners().filter(|&n| n == victim).count()
        };
        cluster.mem.fail(victim).await;
        let after = reader.losses().await.expect("losses");
        assert!(after.settled, "{after:?}");
        assert_eq!(after.nodes.len(), 2, "the survivors answer: {after:?}");
        assert_eq!(after.tainted(), victims_slots, "the dead manager's slots, each tainted once");
        let all: Vec<PageId> = (0..PAGES).map(pid).collect();
        assert!(after.pages().iter().all(|(p, _)| all.contains(p)), "{after:?}");
        assert!(
            after.pages().len() < all.len(),
            "pages the victim managed are known only once asked for"
        );

        for &page in &all {
            assert!(matches!(reader.read(page).await, Err(DsmError::Lost { .. })));
        }
        let lost = reader.losses().await.expect("losses");
        assert_eq!(lost.pages().into_iter().map(|(p, _)| p).collect::<Vec<_>>(), all);
        let table = cluster.mem.snapshot();
        for (page, manager) in lost.pages() {
            assert_eq!(table.locate(gobelins_dsm::DSM, page.key()), Some(manager), "{page:?}");
        }

        assert!(reader.discard(pid(1)).await.expect("discard"));
        let left = reader.losses().await.expect("losses");
        assert!(!left.pages().iter().any(|(p, _)| *p == pid(1)), "{left:?}");
        assert_eq!(left.pages().len(), all.len() - 1);
        assert!(!left.clean());
    })
}

/// A lost page discarded reads as zeros everywhere, on the readers its dead owner served
/// directly too (unknown to the manager, they kept the lost contents).
#[test]
fn a_discarded_page_reads_as_zeros_on_the_readers_its_dead_owner_served() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let (manager, reader, owner) = (NodeId(1), NodeId(2), NodeId(3));
        let page = managed_by(&cluster, manager);
        let (o, r, m) = (cluster.dsm(owner), cluster.dsm(reader), cluster.dsm(manager));
        read_straight_from_the_owner(&cluster, &o, &r, reader, page).await;

        cluster.mem.fail(owner).await;
        assert!(matches!(m.read(page).await, Err(DsmError::Lost { .. })));
        m.discard(page).await.expect("discard");
        assert_eq!(get(&m, page).await, 0, "afresh");
        assert_eq!(get(&r, page).await, 0, "the stray copy went with the discard");
    });
}

/// A lost page discarded is gone from the backups too. A backup copy left on a node (here
/// one its owner stopped reaching) outlived the discard, and once the manager died in turn,
/// the recovery rebuilt the page from it: the old contents, under the old version, read
/// where the program had started the page afresh.
#[test]
fn a_discarded_page_does_not_come_back_from_a_backup_left_behind() {
    use gobelins_dsm::{PageBytes, Request, Response, DSM, PAGE_SIZE};
    replay(async {
        let mut cluster = Cluster::start(4, DsmConfig::default()).await;
        let (manager, holder, owner) = (NodeId(1), NodeId(2), NodeId(3));
        let page = managed_by(&cluster, manager);
        put(&cluster.dsm(owner), page, 1).await;
        let version = cluster.dsm(owner).read(page).await.expect("read").version();
        let mut old = vec![0u8; PAGE_SIZE];
        old.copy_from_slice(&cluster.dsm(owner).read(page).await.expect("read"));
        let left = Request::Backup { page, version, commit: 1, data: PageBytes::from(old) };
        let told = cluster.mem.host(owner).context().tell(holder, DSM, page.key(), &left).await;
        assert!(matches!(told, Ok(Response::Ok)), "{told:?}");

        cluster.mem.fail(owner).await;
        let m = cluster.dsm(manager);
        assert!(matches!(m.read(page).await, Err(DsmError::Lost { .. })));
        assert!(m.discard(page).await.expect("discard"));
        assert_eq!(get(&m, page).await, 0, "afresh");
        cluster.mem.fail(manager).await;
        let read = crate::harness::outcome(&cluster.dsm(holder), page).await;
        assert!(
            matches!(read, Ok(0)) || read.as_ref().is_err_and(|e| e.contains("lost")),
            "{read:?}"
        );
    });
}
