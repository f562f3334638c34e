//! New backups after a failure: each page gets one that holds it, without holding up faults.

use crate::checker::Value;
use crate::harness::{
    consistent, every_write_read_back, final_counts, get, managed_by, pid, put, Cluster, Load,
    PAGES,
};
use gobelins_adaptation::testing::replay;
use gobelins_adaptation::HostConfig;
use gobelins_locator::NodeId;
use std::time::Duration;

/// With backups on, a failure leaves the pages the dead node backed up with one copy, and
/// their managers give each a new backup before the change ends. That copy runs once the
/// change has released the faults it held, so it delays the change, not the programs; and
/// every page is on two nodes again once the change is done.
#[test]
fn with_backups_pages_get_new_backups_after_faults_are_released() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        // Node 1 owns every page; the next live node, node 2, keeps their backups.
        let writer = cluster.dsm(NodeId(1));
        for page in 0..PAGES {
            put(&writer, pid(page), 1).await;
        }
        cluster.mem.fail(NodeId(2)).await;
        let released_first: Vec<NodeId> = (cluster.mem.nodes().into_iter())
            .filter(|&n| {
                let history = cluster.mem.host(n).history();
                let r = history.last().expect("the recovery's record");
                let done = r.before_ms + r.sending_ms + r.receiving_ms + r.after_ms;
                done - r.held_ms > 0.1
            })
            .collect();
        assert!(!released_first.is_empty(), "some manager restored backups after the release");
        // Node 1 dies too: the backups given after the first failure hold every page.
        cluster.mem.fail(NodeId(1)).await;
        let counts = final_counts(&cluster.dsm(NodeId(3))).await.expect("no page lost");
        assert_eq!(counts, vec![1; PAGES as usize]);
    })
}

/// With backups on, a failure under load gives pages new backups while the programs' faults go
/// on. The backups it recorded must hold the pages: the owners then die one after another,
/// each once the cluster has recovered from the one before, and every committed write must
/// still be read back. (Without the restore, a page is lost; a restore that ignored a fault
/// having moved its entry on is caught by
/// `a_write_during_the_restore_of_its_pages_backup_keeps_the_writers_backup`.)
#[test]
fn with_backups_the_backups_a_failure_under_load_placed_survive_their_owners() {
    replay(async {
        let mut cluster = Cluster::with_backups(6).await;
        let mut load = Load::new();
        for node in [1, 2, 3, 4].map(NodeId) {
            load.start(&cluster, node);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        cluster.mem.fail(NodeId(5)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let done = load.stop_all().await;
        let histories = consistent(done);
        for owner in [2, 3, 4].map(NodeId) {
            cluster.mem.fail(owner).await;
        }
        every_write_read_back(&cluster, &histories).await;
    })
}

/// An owner promoted from the backup it kept must be given a new backup that holds the page,
/// even when it owned the page once before: the backup of that time holds nothing of the
/// version since (`BackupTo` once named it without copying a byte there, and the page was then
/// lost with its owner).
#[test]
fn an_owner_promoted_from_its_backup_gives_the_page_a_backup_that_holds_it() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let page = managed_by(&cluster, NodeId(3));
        // A backup stays where it is until its own node writes: it then moves to the node
        // after that writer. Node 1 writes first, backed up on node 2; the backup then moves
        // to node 3, to node 4, and back to node 1, which holds node 4's last write.
        for writer in 1..=4 {
            put(&cluster.dsm(NodeId(writer)), page, writer).await;
        }
        // Node 4 dies: node 1 is promoted from its backup and given a new one, node 2.
        // (Nothing reads the page meanwhile: a reader's copy would outlive node 1 too.)
        cluster.mem.fail(NodeId(4)).await;
        // Node 1 dies: the page lives on in the backup the recovery gave it.
        cluster.mem.fail(NodeId(1)).await;
        let read = cluster.dsm(NodeId(3)).read(page).await.map(|p| Value::decode(&p).count);
        assert_eq!(read.ok(), Some(4), "the last committed write survived both failures");
    })
}

/// A write fault served while the page's manager gives the page a new backup after a failure
/// (in `after_release`, faults flowing) moves the entry on: the writer commits to a backup of
/// its own, and the restore must not record its own choice over it. Recorded, the entry would
/// name a backup holding the version before the write, and the writer's failure would bring
/// that version back.
#[test]
fn a_write_during_the_restore_of_its_pages_backup_keeps_the_writers_backup() {
    replay(async {
        let mut cluster = Cluster::with_backups(5).await;
        let page = managed_by(&cluster, NodeId(5));
        // Node 1 owns the page, backed up on node 2.
        put(&cluster.dsm(NodeId(1)), page, 1).await;
        // Once node 2 is gone, node 3 (the node after node 1) gets the page's new backup.
        // Slow to reach, it keeps the restore's request on its way for a while.
        cluster.mem.faults().slow(NodeId(3), Duration::from_millis(50));
        // Node 4 writes the page 10 ms into node 2's recovery: after the manager's sweep found
        // the page without a backup, while its restore waits for node 3.
        let w = cluster.dsm(NodeId(4));
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            put(&w, page, 2).await;
        });
        cluster.mem.fail(NodeId(2)).await;
        writer.await.expect("written");
        let record = cluster.mem.host(NodeId(5)).history().last().cloned().expect("record");
        let done = record.before_ms + record.sending_ms + record.receiving_ms + record.after_ms;
        assert!(
            record.held_ms < 10.0 && 10.0 < done,
            "the write began within the manager's restore: released at {} ms, done at {done} ms",
            record.held_ms
        );
        cluster.mem.faults().slow(NodeId(3), Duration::ZERO);
        cluster.mem.fail(NodeId(4)).await;
        assert_eq!(get(&cluster.dsm(NodeId(5)), page).await, 2, "the write survived its writer");
    })
}

/// A page owner that stops answering during a failure's restore of backups, without being
/// declared failed (slow, or hung), costs each manager's restore one call timeout, not one for
/// every 16 of its pages: the change, and the next one behind it, waited that long.
#[test]
fn an_owner_that_stops_answering_costs_the_restore_one_call_timeout() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        // Node 1 owns 192 pages, backed up on node 2: each manager has more than three times
        // the 16 a restore asks for at once.
        let owner = cluster.dsm(NodeId(1));
        for page in 0..192 {
            put(&owner, pid(page), 1).await;
        }
        // Node 2 fails. Node 3 is slow to reach by 100 ms, which draws the recovery out; 10 ms
        // in, once node 1 has sent its part, node 1 stops answering: every message to it takes
        // a minute. Nodes 3 and 4 then restore the backups of the pages they manage, which
        // means asking node 1.
        let faults = cluster.mem.faults();
        faults.slow(NodeId(3), Duration::from_millis(100));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            faults.slow(NodeId(1), Duration::from_secs(60));
        });
        cluster.mem.fail(NodeId(2)).await;
        // Asked 16 pages at a time, 64 each, one call timeout a round: 8 s before.
        let call_timeout = HostConfig::default().call_timeout.as_secs_f64() * 1e3;
        for manager in [3, 4].map(NodeId) {
            let r = cluster.mem.host(manager).history().last().cloned().expect("record");
            let restoring = r.before_ms + r.sending_ms + r.receiving_ms + r.after_ms - r.held_ms;
            assert!(r.held_ms > 10.0, "node {manager} restored after node 1 went quiet: {r:?}");
            assert!(
                call_timeout <= restoring && restoring < 1.5 * call_timeout,
                "node {manager} restored for {restoring} ms (a call timeout is {call_timeout} ms)"
            );
        }
        cluster.mem.faults().slow(NodeId(1), Duration::ZERO);
        cluster.mem.faults().slow(NodeId(3), Duration::ZERO);
        let counts = final_counts(&cluster.dsm(NodeId(3))).await.expect("no page lost");
        assert_eq!(counts, vec![1; PAGES as usize]);
    })
}
