//! Owners and their readers: hints straight to the owner, copies given up, readers invalidated.

use crate::checker::Value;
use crate::harness::{
    get, managed_by, pid, put, read_straight_from_the_owner, three_roles, Cluster,
};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, DsmError, FaultStats, PageId};
use gobelins_locator::NodeId;
use std::time::Duration;

#[test]
fn a_reader_goes_straight_to_the_owner_and_a_stale_hint_falls_back_on_the_manager() {
    replay(async {
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let (owner, reader, writer) = (NodeId(3), NodeId(1), NodeId(2));
        let (o, r, w) = (cluster.dsm(owner), cluster.dsm(reader), cluster.dsm(writer));
        let page = pid(5);
        put(&o, page, 1).await;
        assert_eq!(
            get(&r, page).await,
            1,
            "first read: through the manager, which names the owner"
        );
        put(&o, page, 2).await;
        assert_eq!(get(&r, page).await, 2, "the owner's write invalidated the reader");
        assert_eq!(cluster.stats(reader), FaultStats { hinted: 1, stale: 0 });

        // The manager never knew that reader: the owner's own next write must revoke it.
        put(&o, page, 3).await;
        assert_eq!(get(&r, page).await, 3);

        // Another node takes the page while the reader holds no copy: its hint goes stale.
        put(&o, page, 4).await;
        put(&w, page, 5).await;
        assert_eq!(get(&o, page).await, 5);
        assert_eq!(get(&r, page).await, 5, "the hint named the old owner: the manager answered");

        // An owner giving the page to another writer revokes the readers it served.
        put(&w, page, 6).await;
        assert_eq!(get(&r, page).await, 6);
        put(&o, page, 7).await;
        assert_eq!(get(&r, page).await, 7);
        assert_eq!(cluster.stats(reader), FaultStats { hinted: 3, stale: 1 });
    });
}

#[test]
fn an_owner_forgets_the_copy_it_gave_up_once_the_writer_has_it() {
    replay(async {
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let (a, b) = (NodeId(1), NodeId(2));
        let (da, db) = (cluster.dsm(a), cluster.dsm(b));
        let pages: Vec<PageId> = (0..16).map(pid).collect();
        for (i, &page) in pages.iter().enumerate() {
            put(&da, page, i as u64).await;
        }
        // Every page moves to b, and back to a: each owner in turn gives its copy up to a writer.
        for (i, &page) in pages.iter().enumerate() {
            put(&db, page, 100 + i as u64).await;
        }
        // The writer tells the previous owner in the background; give that a few turns.
        for _ in 0..100 {
            if cluster.kept_aside(a) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(cluster.kept_aside(a), 0, "copies given up to b are no longer kept on a");
        for (i, &page) in pages.iter().enumerate() {
            put(&da, page, 200 + i as u64).await;
            assert_eq!(get(&db, page).await, 200 + i as u64);
        }
        for _ in 0..100 {
            if cluster.kept_aside(b) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(cluster.kept_aside(b), 0, "nor those given back to a, on b");
    });
}

/// A writer that manages its page takes it from the previous owner, which keeps its copy
/// aside until the writer tells it the grant landed, in the background. Should the writer die
/// before that word arrives, it dies with the only entry of the page and with what it wrote:
/// the copy kept aside is the page as it was before, and must not come back as the page.
#[test]
fn a_writer_that_dies_with_its_manager_before_the_previous_owner_forgets_leaves_no_rollback() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(12);
        let (writer, previous, reader) = three_roles(&cluster, page);
        put(&cluster.dsm(previous), page, 1).await;
        // No await between the write and the crash: the word to the previous owner, sent in
        // the background, has not left. (With backups on, the commit waits for the backup,
        // and the word leaves meanwhile.)
        put(&cluster.dsm(writer), page, 2).await;
        cluster.mem.crash(writer);
        assert_eq!(cluster.kept_aside(previous), 1, "the previous owner still keeps its copy");
        cluster.mem.fail(writer).await;
        match cluster.dsm(reader).read(page).await {
            Err(DsmError::Lost { .. }) => {}
            Ok(g) => panic!("the page came back as {:?}, its write undone", Value::decode(&g)),
            Err(e) => panic!("expected the page reported lost, got {e}"),
        }
    });
}

#[test]
fn readers_a_dead_owner_served_are_invalidated_before_the_next_write() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let (owner, reader, writer) = (NodeId(3), NodeId(1), NodeId(2));
        let (o, r, w) = (cluster.dsm(owner), cluster.dsm(reader), cluster.dsm(writer));
        let page = pid(7);
        read_straight_from_the_owner(&cluster, &o, &r, reader, page).await;

        // The owner dies with the list of its readers; its backup takes over.
        cluster.mem.fail(owner).await;
        put(&w, page, 3).await;
        assert_eq!(get(&r, page).await, 3, "the reader's copy was invalidated, not kept");
    });
}

/// A write fault that took the page from its owner and then could not finish (the new backup
/// it chose was cut off) leaves the page with its owner: the owner's writes are not replaced
/// by zeros, or by an older copy, when the fault is asked again.
#[test]
fn a_write_fault_that_could_not_finish_leaves_the_owner_its_page() {
    replay(async {
        let cluster = Cluster::with_backups(3).await;
        let (owner, writer, cut) = (NodeId(1), NodeId(2), NodeId(3));
        // A page managed by neither the cut node nor the writer: its manager fetches from the
        // owner, then places the writer's backup on the node after the writer, the cut one.
        let page = managed_by(&cluster, owner);
        let (o, w) = (cluster.dsm(owner), cluster.dsm(writer));
        put(&o, page, 5).await;
        cluster.mem.crash(cut);
        let faults = cluster.mem.faults();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            faults.heal(cut);
        });
        let g = w.write(page).await.expect("granted once the cut node is back");
        assert_eq!(Value::decode(&g).count, 5, "the writer got the owner's page");
        drop(g);
        assert_eq!(get(&cluster.dsm(NodeId(3)), page).await, 5);
    });
}
