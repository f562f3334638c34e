//! Leases: a node whose lease ran out neither reads its copies nor publishes its writes.

use crate::checker::Value;
use crate::harness::{outcome, pages_by_manager, put, Cluster};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, DsmError};
use gobelins_locator::NodeId;
use std::time::Duration;

/// A node cut off from the cluster reads none of its copies once its lease has run out: it
/// read them for as long as the cut lasted, though the cluster had declared it failed and
/// another node had written the pages since (an audit with real partitions: 1,144 stale reads
/// through one node). Under a lease, the same copy is read at once.
#[test]
fn a_node_whose_lease_ran_out_reads_none_of_its_copies() {
    replay(async {
        let mut cluster = Cluster::with_backups(4).await;
        let (cut, writer, other) = (NodeId(2), NodeId(1), NodeId(3));
        // Managed by neither node whose lease runs out here: it would hold the page's requests.
        let table = cluster.mem.snapshot();
        let page = pages_by_manager(&cluster, cut, false, 40)
            .into_iter()
            .find(|p| table.locate(gobelins_dsm::DSM, p.key()) != Some(other))
            .expect("a page node 1 or 4 manages");
        put(&cluster.dsm(writer), page, 1).await;
        let dsm = cluster.dsm(cut);
        assert_eq!(outcome(&dsm, page).await, Ok(1), "its copy, read under no lease");
        cluster.mem.fail_cut_off(cut).await;
        put(&cluster.dsm(writer), page, 2).await;
        assert_eq!(outcome(&dsm, page).await, Ok(1), "a lease never given: read as before");
        // Its lease runs out, as a node cut off from the leader's does.
        cluster.mem.host(cut).lease(tokio::time::Instant::now());
        let read = outcome(&dsm, page).await;
        assert!(read.is_err(), "cut off and without a lease, it read {read:?}");
        // A node in touch, its lease run out for a moment, reads through the manager.
        cluster.mem.host(other).lease(tokio::time::Instant::now());
        assert_eq!(outcome(&cluster.dsm(other), page).await, Ok(2));
    })
}

/// A write taken under the lease and committed after it ran out is discarded: published, it
/// could be read or acknowledged after the cluster had given the page up on this node.
#[test]
fn a_write_committed_after_the_lease_ran_out_is_discarded() {
    replay(async {
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let (writer, reader) = (NodeId(2), NodeId(1));
        let page = pages_by_manager(&cluster, writer, false, 1)[0];
        put(&cluster.dsm(writer), page, 1).await;
        let dsm = cluster.dsm(writer);
        cluster.mem.host(writer).lease(tokio::time::Instant::now() + Duration::from_millis(100));
        let mut g = dsm.write(page).await.expect("write access under the lease");
        Value { count: 2, worker: 0, seq: 2 }.encode(&mut g);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let committed = g.commit().await;
        assert!(matches!(committed, Err(DsmError::NoLease { .. })), "{committed:?}");
        assert!(committed.unwrap_err().to_string().contains("discarded"));
        assert_eq!(outcome(&cluster.dsm(reader), page).await, Ok(1), "the write was not seen");

        // Renewed a moment late, as a leader's acknowledgements lag while the voters change,
        // the lease is waited for and the write published.
        let mut g = dsm.write(page).await.expect("write access, through the manager");
        Value { count: 3, worker: 0, seq: 3 }.encode(&mut g);
        let host = cluster.mem.host(writer);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            host.lease(tokio::time::Instant::now() + Duration::from_secs(60));
        });
        assert!(g.commit().await.is_ok(), "published once the lease is back");
        assert_eq!(outcome(&cluster.dsm(reader), page).await, Ok(3));
    })
}
