//! Write grants that never reached their writer, and the copies kept aside for them.

use crate::checker::Value;
use crate::harness::{get, pid, put, three_roles, Cluster};
use gobelins_adaptation::testing::replay;
use gobelins_dsm::{Dsm, DsmConfig, DsmError, PageId};
use gobelins_locator::NodeId;

/// Grants `writer` write access to `page` in its name from another node, as a write fault whose
/// answer never reached its writer would (it gave up waiting): the manager records the grant,
/// the writer knows nothing of it.
async fn lose_a_grant(
    cluster: &Cluster,
    from: NodeId,
    writer: NodeId,
    page: PageId,
    have: Option<u64>,
) {
    use gobelins_adaptation::codec;
    use gobelins_dsm::{Request, Response, DSM};
    let fault =
        codec::encode(&Request::WriteFault { node: writer, have, refused: 0 }).expect("encode");
    let answer = cluster.mem.host(from).request(DSM, page.key(), fault).await.expect("asked");
    let answer: Response = codec::decode(&answer).expect("decode");
    assert!(matches!(answer, Response::Grant { .. }), "granted, then lost: {answer:?}");
}

#[test]
fn a_write_grant_that_never_reached_its_writer_is_taken_back_and_nothing_is_lost() {
    replay(async {
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let (previous, writer, reader) = (NodeId(1), NodeId(2), NodeId(3));
        let (p, w, r) = (cluster.dsm(previous), cluster.dsm(writer), cluster.dsm(reader));

        // Taken from its owner for a writer that never heard of it: a reader still gets the content,
        // then the writer's own write starts from it.
        let page = pid(4);
        put(&p, page, 1).await;
        lose_a_grant(&cluster, reader, writer, page, None).await;
        assert_eq!(get(&r, page).await, 1, "the previous owner's copy is the page again");
        put(&w, page, 2).await;
        assert_eq!((get(&r, page).await, get(&p, page).await), (2, 2));

        // The writer's own next write finds the grant it never got.
        let page = pid(5);
        put(&p, page, 1).await;
        lose_a_grant(&cluster, reader, writer, page, None).await;
        let mut g = w.write(page).await.expect("the writer's next fault");
        assert_eq!(Value::decode(&g).count, 1, "it starts from the content the lost grant carried");
        Value { count: 2, worker: 0, seq: 2 }.encode(&mut g);
        g.commit().await.expect("commit");
        assert_eq!(get(&r, page).await, 2);

        // An owner's upgrade that never arrived: the owner's own copy is the page.
        let page = pid(6);
        put(&w, page, 7).await;
        assert_eq!(get(&r, page).await, 7, "the owner now shares the page");
        let version = w.read(page).await.expect("read").version();
        lose_a_grant(&cluster, reader, writer, page, Some(version)).await;
        assert_eq!(get(&p, page).await, 7);
        put(&w, page, 8).await;
        assert_eq!((get(&r, page).await, get(&p, page).await), (8, 8));

        // A page never written, granted as zeros to a writer that never knew.
        let page = pid(7);
        lose_a_grant(&cluster, reader, writer, page, None).await;
        assert_eq!(get(&r, page).await, 0, "still a page never written");
        put(&w, page, 1).await;
        assert_eq!(get(&r, page).await, 1);
    });
}

#[test]
fn a_writer_whose_grant_was_lost_does_not_keep_reading_its_old_copy() {
    replay(async {
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let (previous, writer, other) = (NodeId(1), NodeId(2), NodeId(3));
        let (p, w, x) = (cluster.dsm(previous), cluster.dsm(writer), cluster.dsm(other));
        let page = pid(9);
        put(&p, page, 1).await;
        assert_eq!(get(&w, page).await, 1, "the writer holds a read copy");
        let version = w.read(page).await.expect("read").version();
        lose_a_grant(&cluster, other, writer, page, Some(version)).await;
        // Another node writes: the lost grant is taken back, and the writer's old copy must be
        // invalidated with the others.
        put(&x, page, 2).await;
        assert_eq!(get(&w, page).await, 2, "not the copy from before the lost grant");
        assert_eq!(get(&p, page).await, 2);
    });
}

#[test]
fn a_lost_grant_whose_only_source_died_is_reported_lost_not_stuck() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(11);
        let (manager, previous, writer) = three_roles(&cluster, page);
        put(&cluster.dsm(previous), page, 1).await;
        lose_a_grant(&cluster, manager, writer, page, None).await;
        // The only copy of the page is the one its previous owner kept aside, and it dies.
        cluster.mem.fail(previous).await;
        let w = cluster.dsm(writer);
        match w.write(page).await {
            Err(DsmError::Lost { .. }) => {}
            Err(e) => panic!("expected the page reported lost, got {e}"),
            Ok(_) => panic!("expected the page reported lost, got a write guard"),
        }
        w.discard(page).await.expect("discard");
        put(&w, page, 5).await;
        assert_eq!(get(&cluster.dsm(manager), page).await, 5, "started afresh");
    });
}

#[test]
fn a_writer_that_disowned_its_grant_takes_nothing_with_it_when_it_fails() {
    replay(async {
        use gobelins_adaptation::codec;
        use gobelins_dsm::{Request, Response, DSM};
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(15);
        let (manager, previous, writer) = three_roles(&cluster, page);
        put(&cluster.dsm(previous), page, 1).await;
        lose_a_grant(&cluster, manager, writer, page, None).await;
        // The manager learns that the writer lacks its grant, but the node that holds what the
        // grant carried is cut off for a moment: the grant cannot be taken back yet.
        cluster.mem.crash(previous);
        let fault = codec::encode(&Request::ReadFault { node: manager }).expect("encode");
        let answer =
            cluster.mem.host(manager).request(DSM, page.key(), fault).await.expect("asked");
        let answer: Response = codec::decode(&answer).expect("decode");
        assert!(matches!(answer, Response::Retry), "asked again later: {answer:?}");
        cluster.mem.heal(previous);
        // The writer fails before anyone asks again: it held nothing, so nothing is lost.
        cluster.mem.fail(writer).await;
        assert_eq!(
            get(&cluster.dsm(manager), page).await,
            1,
            "the page is where the grant took it from"
        );
        put(&cluster.dsm(manager), page, 2).await;
        assert_eq!(get(&cluster.dsm(previous), page).await, 2);
    });
}

/// The writer whose grant was lost writes `page` again: its write starts from the content the
/// lost grant carried (count 1), and `reader` then sees the write.
async fn writes_on_from_the_lost_grant(writer: &Dsm, page: PageId, reader: &Dsm) {
    let mut g = writer.write(page).await.expect("the writer's next write finds the page");
    assert_eq!(Value::decode(&g).count, 1, "it starts from the content the lost grant carried");
    Value { count: 2, worker: 0, seq: 2 }.encode(&mut g);
    g.commit().await.expect("commit");
    assert_eq!(get(reader, page).await, 2);
}

#[test]
fn a_lost_grant_is_taken_back_to_the_writers_own_read_copy_when_its_source_died() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(13);
        let (manager, previous, writer) = three_roles(&cluster, page);
        let w = cluster.dsm(writer);
        put(&cluster.dsm(previous), page, 1).await;
        assert_eq!(get(&w, page).await, 1, "the writer holds a read copy");
        let version = w.read(page).await.expect("read").version();
        lose_a_grant(&cluster, manager, writer, page, Some(version)).await;
        cluster.mem.fail(previous).await;
        // The writer's read copy is what the lost grant carried: the page is not lost.
        writes_on_from_the_lost_grant(&w, page, &cluster.dsm(manager)).await;
    });
}

#[test]
fn a_lost_grants_source_that_leaves_hands_its_copy_kept_aside_to_the_manager() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(17);
        let (manager, previous, writer) = three_roles(&cluster, page);
        put(&cluster.dsm(previous), page, 1).await;
        lose_a_grant(&cluster, manager, writer, page, None).await;
        // The only copy of the page is the one its previous owner kept aside, and it leaves.
        cluster.mem.evict(previous).await;
        writes_on_from_the_lost_grant(&cluster.dsm(writer), page, &cluster.dsm(manager)).await;
    });
}

#[test]
fn a_leaving_manager_that_was_a_lost_grants_source_sends_its_copy_with_the_entry() {
    replay(async {
        let mut cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(19);
        let (manager, other, writer) = three_roles(&cluster, page);
        // The manager owned the page and gave it up for a grant its writer never heard of.
        put(&cluster.dsm(manager), page, 1).await;
        lose_a_grant(&cluster, other, writer, page, None).await;
        cluster.mem.evict(manager).await;
        writes_on_from_the_lost_grant(&cluster.dsm(writer), page, &cluster.dsm(other)).await;
    });
}

#[test]
fn a_copy_kept_aside_for_a_grant_that_landed_is_released_by_the_manager() {
    replay(async {
        use gobelins_adaptation::codec;
        use gobelins_dsm::{Request, Response, DSM};
        let cluster = Cluster::start(3, DsmConfig::default()).await;
        let page = pid(23);
        let (manager, previous, writer) = three_roles(&cluster, page);
        let p = cluster.dsm(previous);
        put(&p, page, 1).await;
        let label = p.read(page).await.expect("read").version();
        put(&cluster.dsm(writer), page, 2).await;
        // The previous owner, leaving before the writer's word that the grant landed reached it,
        // hands the manager the copy it kept aside, which the entry still names.
        let aside = Request::KeepAside { node: previous, label, data: vec![1u8; 4096].into() };
        let answer = cluster
            .mem
            .host(previous)
            .request(DSM, page.key(), codec::encode(&aside).expect("encode"))
            .await
            .expect("asked");
        let answer: Response = codec::decode(&answer).expect("decode");
        assert!(matches!(answer, Response::Ok), "kept by the manager: {answer:?}");
        assert_eq!(cluster.kept_aside(manager), 1);
        // The next fault finds the owner holding its grant: the copy is no longer needed.
        assert_eq!(get(&cluster.dsm(manager), page).await, 2);
        assert_eq!(cluster.kept_aside(manager), 0, "released, not kept for ever");
    });
}
