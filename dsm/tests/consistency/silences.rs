//! Leaves past nodes slow to answer (silent, or busy writing): bounded waits, no write lost.

use crate::checker::Value;
use crate::harness::{
    misread, misread_acked, pages_by_manager, six_in_cells_of_two, write_counts, Cluster, SEGMENT,
};
use gobelins_adaptation::testing::replay;
use gobelins_adaptation::HostConfig;
use gobelins_dsm::{Dsm, PageId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An owner that stops answering (stopped, or dead but not yet declared so) as the node
/// keeping its backups leaves costs each manager one call timeout, not one for every page it
/// asks that owner to move: the leave waits for them. The copies the managers store instead
/// hold the pages, which read back after the owner's death.
#[test]
fn with_backups_an_owner_silent_as_its_backups_leave_costs_one_call_timeout() {
    replay(async {
        // The owner (node 2) is in a cell the leave (of node 3, the next node, where its
        // backups are) does not touch.
        let mut cluster = six_in_cells_of_two().await;
        let nodes = cluster.mem.snapshot().nodes().to_vec();
        let (owner, leaver) = (nodes[1], nodes[2]);
        // None the owner manages: the leaver would wait for its answer, and then leave the
        // copy elsewhere, which another test sees to.
        let pages = pages_by_manager(&cluster, owner, false, 96);
        write_counts(&cluster.dsm(owner), &pages).await;
        let host = cluster.mem.host(leaver);
        cluster.mem.faults().slow(owner, Duration::from_secs(60));
        let owner_changes = cluster.mem.host(owner).history().len();
        cluster.mem.evict(leaver).await;
        assert_eq!(cluster.mem.host(owner).history().len(), owner_changes, "not a participant");
        let leave = host.history().last().cloned().expect("the leaver's record");
        let call_timeout = HostConfig::default().call_timeout.as_secs_f64() * 1e3;
        // 96 pages asked 16 at a time, a call timeout each: 12 s before.
        assert!(
            leave.before_ms < 1.5 * call_timeout,
            "the leaver handed over for {} ms (a call timeout is {call_timeout} ms)",
            leave.before_ms
        );
        cluster.mem.faults().slow(owner, Duration::ZERO);
        cluster.mem.fail(owner).await;
        let wrong = misread(&cluster.dsm(nodes[0]), &pages).await;
        assert!(wrong.is_empty(), "{} of {} pages: {wrong:?}", wrong.len(), pages.len());
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
    })
}

/// A manager that stops answering (stopped, or dead but not yet declared so) as a node leaves
/// costs the leave four seconds, not a request deadline (10 s): the leaver leaves the pages it
/// could not hand over where they can be found, and they read back once the manager answers.
#[test]
fn with_backups_a_manager_silent_as_a_node_leaves_costs_the_leave_four_seconds() {
    replay(async {
        // Node 2 takes no part in the leave of node 3.
        let mut cluster = six_in_cells_of_two().await;
        let nodes = cluster.mem.snapshot().nodes().to_vec();
        let (manager, leaver) = (nodes[1], nodes[2]);
        let pages = pages_by_manager(&cluster, manager, true, 32);
        assert!(pages.len() >= 16, "pages the silent manager manages");
        write_counts(&cluster.dsm(leaver), &pages).await;
        let host = cluster.mem.host(leaver);
        cluster.mem.faults().slow(manager, Duration::from_secs(60));
        let manager_changes = cluster.mem.host(manager).history().len();
        cluster.mem.evict(leaver).await;
        assert_eq!(cluster.mem.host(manager).history().len(), manager_changes, "not a participant");
        let leave = host.history().last().cloned().expect("the leaver's record");
        assert!(leave.before_ms < 5_000.0, "the leaver handed over for {} ms", leave.before_ms);
        cluster.mem.faults().slow(manager, Duration::ZERO);
        let wrong = misread(&cluster.dsm(nodes[0]), &pages).await;
        assert!(wrong.is_empty(), "{} of {} pages: {wrong:?}", wrong.len(), pages.len());
        assert_eq!(cluster.reported_lost(), 0, "nothing reported lost");
    })
}

/// An owner writing on while the node keeping its backups leaves, then dying: every page
/// reads its last acknowledged write. The leaving node's copy, which its manager may store
/// elsewhere, must hold every commit it acknowledged: it takes no more once it took it.
#[test]
fn with_backups_an_owner_writing_through_its_backups_leave_then_dying_loses_no_write() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let nodes = cluster.mem.snapshot().nodes().to_vec();
        let (owner, leaver) = (nodes[1], nodes[2]);
        let pages: Vec<PageId> =
            (0..16).map(|p| PageId { segment: SEGMENT, page: p * 131 }).collect();
        // Each write held a while, as a program computing does: a manager asking this owner
        // to move its backup meanwhile hears `Busy` until it gives up.
        let writer = Writer::start(cluster.dsm(owner), &pages, 0, Duration::from_millis(100));
        let rounds = |at_least: u64| {
            let acked = writer.acked.clone();
            async move {
                while acked.lock().expect("acked").iter().any(|&a| a < at_least) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        rounds(2).await;
        let before = writer.acked();
        cluster.mem.evict(leaver).await;
        // And on after the leave, to the backups the pages have now.
        let after = before.iter().max().expect("pages") + 2;
        tokio::time::timeout(Duration::from_secs(30), rounds(after)).await.expect("writes go on");
        let acked = writer.stop().await;
        cluster.mem.fail(owner).await;
        let wrong = misread_acked(&cluster.dsm(nodes[0]), &pages, &acked).await;
        assert!(wrong.is_empty(), "{wrong:?}");
    })
}

/// The seal on a leaving node's backups: an owner that its managers cannot reach (stopped,
/// say) writes on through the leave, its commits reaching the leaving node, and dies as soon
/// as the leave ends. Every page reads its last acknowledged write. The managers store the
/// leaving node's copy elsewhere, the owner not answering them; a commit the leaving node
/// acknowledged after it took that copy would be missing from it.
#[test]
fn with_backups_an_owner_out_of_its_managers_reach_writing_through_a_leave_loses_no_write() {
    replay(async {
        // The owner (node 2) takes no part in the leave of node 3.
        let mut cluster = six_in_cells_of_two().await;
        let nodes = cluster.mem.snapshot().nodes().to_vec();
        let (owner, leaver) = (nodes[1], nodes[2]);
        let pages = pages_by_manager(&cluster, owner, false, 32);
        write_counts(&cluster.dsm(owner), &pages).await;
        let writer = Writer::start(cluster.dsm(owner), &pages, 1000, Duration::from_millis(5));
        // Messages to the owner take a minute from now on; its own, and its answers, do not.
        cluster.mem.faults().slow(owner, Duration::from_secs(60));
        cluster.mem.evict(leaver).await;
        let acked = writer.stop().await;
        cluster.mem.fail(owner).await;
        let wrong = misread_acked(&cluster.dsm(nodes[0]), &pages, &acked).await;
        assert!(wrong.is_empty(), "{} of {}: {wrong:?}", wrong.len(), pages.len());
    })
}

/// A program writing round after round into each of its pages through one node, each write
/// held `hold` before its commit, until stopped.
struct Writer {
    /// Per page, the last round whose commit returned.
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Writes rounds `after + 1`, `after + 2`… into `pages` through `dsm`.
    fn start(dsm: Dsm, pages: &[PageId], after: u64, hold: Duration) -> Writer {
        let acked = Arc::new(Mutex::new(vec![0u64; pages.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (pages, task_acked, task_stop) = (pages.to_vec(), acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut round = after;
            while !task_stop.load(Ordering::SeqCst) {
                round += 1;
                for (i, &page) in pages.iter().enumerate() {
                    let Ok(mut g) = dsm.write(page).await else { continue };
                    Value { count: round, worker: 0, seq: round }.encode(&mut g);
                    tokio::time::sleep(hold).await;
                    if g.commit().await.is_ok() {
                        task_acked.lock().expect("acked")[i] = round;
                    }
                    if task_stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
            }
        });
        Writer { acked, stop, task }
    }

    fn acked(&self) -> Vec<u64> {
        self.acked.lock().expect("acked").clone()
    }

    /// Stops after the write in progress; what each page last had acknowledged.
    async fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the writer ends");
        let acked = self.acked.lock().expect("acked").clone();
        acked
    }
}
