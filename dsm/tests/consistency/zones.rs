//! Failure domains: under label levels, a written page's backup lives in another zone.

use crate::harness::{outcome, pid, put, Cluster, PAGES};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::DsmConfig;
use gobelins_locator::{Labels, NodeId, TreeConfig};

/// Two zones: nodes 1 to 3 in `zone=b`, nodes 4 and 5 in `zone=a`. Node 4 writes every page,
/// so owns it. Zone a is lost whole, node 5 dying as node 4's recovery begins: every page
/// reads back through node 1 as node 4 wrote it, and none is reported lost. With backups on
/// the next node of the table, node 5, the pages node 4 owned had both copies in zone a.
#[test]
fn pages_written_in_a_zone_lost_whole_read_back() {
    replay(async {
        let shape = TreeConfig::default().with_label_levels(["zone"]);
        let config = DsmConfig { backups: true, ..DsmConfig::default() };
        let mut cluster = Cluster::start_shaped(0, shape, config).await;
        for z in ["b", "b", "b", "a", "a"] {
            cluster.mem.add_labelled(Labels::from([("zone".to_string(), z.to_string())])).await;
        }
        let writer = cluster.dsm(NodeId(4));
        for i in 0..PAGES {
            put(&writer, pid(i), u64::from(i) + 1).await;
        }
        cluster.mem.fail_and_crash(NodeId(4), NodeId(5)).await;
        let reader = cluster.dsm(NodeId(1));
        for i in 0..PAGES {
            assert_eq!(outcome(&reader, pid(i)).await, Ok(u64::from(i) + 1), "page {i}");
        }
        assert_eq!(cluster.reported_lost(), 0, "pages reported lost with zone a");
    });
}
