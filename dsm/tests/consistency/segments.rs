//! Segments: a free leaves nothing behind; ids and offsets past a segment are refused.

use crate::harness::{get, pid, put, Cluster, PAGES, SEGMENT};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{DsmConfig, DsmError, PageId, Segment, PAGE_SIZE};
use gobelins_locator::NodeId;

#[test]
fn a_freed_segment_leaves_nothing_on_any_node_and_reads_as_zeros() {
    replay(async {
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        let dsm = |i: usize| cluster.dsm(nodes[i % 3]);
        // Pages written from every node and read by every node: copies, owners, readers and
        // entries of the segment everywhere.
        for i in 0..PAGES {
            put(&dsm(i as usize), pid(i), u64::from(i) + 1).await;
        }
        for n in 0..3 {
            for i in 0..PAGES {
                assert_eq!(get(&dsm(n), pid(i)).await, u64::from(i) + 1);
            }
        }
        // Another segment's page, which the free must leave alone.
        let other = PageId { segment: SEGMENT + 1, page: 7 };
        put(&dsm(0), other, 42).await;
        let held = |cluster: &Cluster| {
            let made = cluster.made.lock().expect("made");
            let resident: usize = nodes.iter().map(|n| made[n.0 as usize].resident()).sum();
            let managed: usize = nodes.iter().map(|n| made[n.0 as usize].managed()).sum();
            (resident, managed)
        };
        let before = held(&cluster);
        assert!(before.0 >= 3 * PAGES as usize, "every node holds the segment: {before:?}");

        let segment = Segment::new(SEGMENT, u64::from(pid(PAGES - 1).page + 1) * PAGE_SIZE as u64);
        let endless = Segment::new(SEGMENT, u64::MAX);
        assert!(matches!(dsm(1).free(&endless).await, Err(DsmError::OutOfRange { .. })));
        assert_eq!(held(&cluster), before, "a free refused touches nothing");
        dsm(1).free(&segment).await.expect("freed");
        assert_eq!(held(&cluster), (1, 1), "only the other segment's page and its entry are left");

        for n in 0..3 {
            for i in 0..PAGES {
                assert_eq!(get(&dsm(n), pid(i)).await, 0, "a freed page reads as zeros");
            }
        }
        assert_eq!(get(&dsm(2), other).await, 42);
        // And the segment is usable again.
        put(&dsm(2), pid(3), 9).await;
        assert_eq!(get(&dsm(0), pid(3)).await, 9);
    });
}

/// Without backups, a page whose manager died and left no entry reads as lost; freed, the
/// segment's pages read as zeros there too.
#[test]
fn a_segment_freed_after_a_failure_reads_as_zeros_where_its_manager_died() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let victim = NodeId(3);
        for page in 0..PAGES {
            put(&cluster.dsm(victim), pid(page), 1).await;
        }
        cluster.mem.fail(victim).await;
        let reader = cluster.dsm(NodeId(1));
        assert!(matches!(reader.read(pid(1)).await, Err(DsmError::Lost { .. })), "lost first");

        // Far longer than the pages written: what a node does for a free does not grow with
        // the segment's length.
        let entries = |node: NodeId| cluster.made.lock().expect("made")[node.0 as usize].entries();
        let before: Vec<usize> = cluster.mem.nodes().into_iter().map(entries).collect();
        let segment = Segment::new(SEGMENT, 1 << 26);
        cluster.dsm(NodeId(2)).free(&segment).await.expect("freed");
        let after: Vec<usize> = cluster.mem.nodes().into_iter().map(entries).collect();
        assert!(after.iter().zip(&before).all(|(a, b)| a <= b), "entries {before:?} → {after:?}");
        for page in 0..PAGES {
            assert_eq!(get(&reader, pid(page)).await, 0, "page {page} reads as zeros");
        }
    });
}

/// A program that makes segments as it goes and frees them in turn, after a failure: what the
/// nodes keep of the frees stays one range per slot whose manager died, however many it frees.
#[test]
fn segments_freed_one_after_another_after_a_failure_cost_one_range_per_tainted_slot() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let victim = NodeId(3);
        put(&cluster.dsm(victim), pid(0), 1).await;
        cluster.mem.fail(victim).await;
        let nodes = cluster.mem.nodes();
        let kept = || -> usize {
            let made = cluster.made.lock().expect("made");
            nodes.iter().map(|n| made[n.0 as usize].freed_ranges()).sum()
        };
        let freer = cluster.dsm(NodeId(1));
        freer.free(&Segment::new(1000, 4096)).await.expect("freed");
        let one = kept();
        assert!(one > 0, "the slots whose manager died keep the free");
        for id in 1001..1200 {
            freer.free(&Segment::new(id, 4096)).await.expect("freed");
        }
        assert_eq!(kept(), one, "199 frees more, no range more");
        let page = PageId { segment: 1100, page: 0 };
        let mut g = freer.write(page).await.expect("a freed segment is written afresh");
        g[0] = 5;
        g.commit().await.expect("commit");
        assert_eq!(cluster.dsm(NodeId(2)).read(page).await.expect("read")[0], 5);
    });
}

/// A free that races a join (entries moving to the new node) still leaves nothing behind
/// once it returns, the new node included.
#[test]
fn a_free_racing_a_join_leaves_nothing_once_it_returns() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        for i in 0..PAGES {
            put(&cluster.dsm(NodeId(u64::from(i % 3) + 1)), pid(i), 1).await;
        }
        for n in 1..=3 {
            for i in 0..PAGES {
                get(&cluster.dsm(NodeId(n)), pid(i)).await;
            }
        }
        let freer = cluster.dsm(NodeId(1));
        let segment = Segment::new(SEGMENT, u64::from(pid(PAGES - 1).page + 1) * PAGE_SIZE as u64);
        // Polled after the change has begun: the first round of the free meets entries on the
        // move. (Without both the nodes' `Busy` during a change and the free's second round,
        // the new node kept entries of the segment.)
        let (added, freed) = tokio::join!(cluster.mem.add(), freer.free(&segment));
        freed.expect("freed");
        let made = cluster.made.lock().expect("made");
        for node in [NodeId(1), NodeId(2), NodeId(3), added] {
            let dsm = &made[node.0 as usize];
            assert_eq!((dsm.resident(), dsm.managed()), (0, 0), "node {node} holds nothing");
        }
    });
}

#[test]
fn a_page_of_a_segment_past_the_last_id_is_refused_not_aliased() {
    replay(async {
        let cluster = Cluster::start(2, DsmConfig::default()).await;
        let dsm = cluster.dsm(NodeId(1));
        let past = PageId { segment: gobelins_dsm::MAX_SEGMENT + 1, page: 3 };
        assert!(matches!(dsm.read(past).await, Err(DsmError::NoSuchSegment { .. })));
        assert!(matches!(dsm.write(past).await, Err(DsmError::NoSuchSegment { .. })));
        assert!(matches!(dsm.discard(past).await, Err(DsmError::NoSuchSegment { .. })));
        // The byte-range calls too, saying so rather than that the bytes lie past its end.
        let segment = gobelins_dsm::Segment::new(past.segment, 8192);
        let said = dsm.write_at(&segment, 0, b"x").await.expect_err("no such segment").to_string();
        assert!(said.starts_with(&format!("segment {} does not exist", past.segment)), "{said}");
        let mut buf = [0u8; 1];
        let read = dsm.read_at(&segment, 0, &mut buf).await;
        assert!(matches!(read, Err(DsmError::NoSuchSegment { .. })), "{read:?}");
        let last = PageId { segment: gobelins_dsm::MAX_SEGMENT, page: 3 };
        put(&dsm, last, 5).await;
        assert_eq!(get(&cluster.dsm(NodeId(2)), last).await, 5);
    });
}

#[test]
fn an_access_outside_a_segment_is_refused() {
    replay(async {
        let cluster = Cluster::start(1, DsmConfig::default()).await;
        let dsm = cluster.dsm(NodeId(1));
        let segment = gobelins_dsm::Segment::new(4, 10_000);
        let mut buf = [0u8; 16];
        let refused = dsm.read_at(&segment, 9_990, &mut buf).await;
        assert!(matches!(refused, Err(DsmError::OutOfRange { end: 10_006, .. })), "{refused:?}");
        dsm.write_at(&segment, 4_090, &[7u8; 16]).await.expect("a write across two pages");
        dsm.read_at(&segment, 4_090, &mut buf).await.expect("read back");
        assert_eq!(buf, [7u8; 16]);

        // Ids and offsets that would wrap onto other pages are refused, not aliased.
        let too_far = gobelins_dsm::Segment::new(gobelins_dsm::MAX_SEGMENT + 1, 10_000);
        let refused = dsm.write_at(&too_far, 4_090, &[9u8; 16]).await;
        assert!(matches!(refused, Err(DsmError::NoSuchSegment { .. })), "{refused:?}");
        let page_space = (u64::from(u32::MAX) + 1) * gobelins_dsm::PAGE_SIZE as u64;
        let huge = gobelins_dsm::Segment::new(4, u64::MAX);
        let refused = dsm.write_at(&huge, page_space + 4_090, &[9u8; 16]).await;
        assert!(matches!(refused, Err(DsmError::OutOfRange { .. })), "{refused:?}");
        dsm.read_at(&segment, 4_090, &mut buf).await.expect("read back");
        assert_eq!(buf, [7u8; 16], "nothing written over the segment's pages");
    });
}
