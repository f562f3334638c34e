use super::answers::UNSETTLED_ROOM;
use super::deliver::REFUSED_PAUSE;
use super::*;
use crate::router::Verdict;
use crate::wire::{Answered, Settlement};
use async_trait::async_trait;
use std::sync::atomic::AtomicU64;

/// A link whose first `fails` calls find the connection closed and the `refusals` after
/// them are refused; the next are accepted.
struct Flaky {
    fails: u64,
    refusals: u64,
    calls: AtomicU64,
}

impl Flaky {
    fn new(fails: u64) -> Self {
        Flaky { fails, refusals: 0, calls: AtomicU64::new(0) }
    }
}

#[async_trait]
impl Link for Flaky {
    async fn call(
        &self,
        to: NodeId,
        _message: Bytes,
        _deadline: Duration,
    ) -> Result<Bytes, AdaptationError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.fails {
            return Err(AdaptationError::Unreachable {
                node: to.0,
                reason: "connection closed".into(),
            });
        }
        if call < self.fails + self.refusals {
            return Reply::Refused("entries do not decode".into()).encode().map(Bytes::from);
        }
        Reply::Accepted.encode().map(Bytes::from)
    }
}

/// How long `deliver` took over a link failing `fails` times, and the calls it made.
async fn deliver_over(fails: u64) -> (Duration, u64) {
    let link = Arc::new(Flaky::new(fails));
    let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
    let started = Instant::now();
    let batch = Bytes::from_static(b"batch");
    assert_eq!(inner.deliver(NodeId(2), batch, OnRefusal::SendAgain).await, Delivery::Taken);
    inner.stop();
    (started.elapsed(), link.calls.load(Ordering::SeqCst))
}

/// A stopped life tells nothing more: a handler of it still running would push what the
/// cluster has since replaced.
#[tokio::test(start_paused = true)]
async fn a_stopped_life_tells_nothing() {
    let link = Arc::new(Flaky::new(0));
    let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
    inner.stop();
    let told = inner.tell(NodeId(2), ServiceId(1), Key(7), b"replica".to_vec()).await;
    assert!(matches!(told, Err(AdaptationError::Refused(_))), "{told:?}");
    assert_eq!(link.calls.load(Ordering::SeqCst), 0, "the stopped life told its peer");
}

/// A life stopped while it sent a batch, which it then gave up, must not send the ack that
/// follows: its receiver would count the batch as taken.
#[tokio::test(start_paused = true)]
async fn a_stopped_life_sends_no_more_migration_messages() {
    let link = Arc::new(Flaky::new(0));
    let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
    inner.stop();
    let ack = Message::Ack { epoch: 2 }.encode().expect("an ack encodes");
    let delivered = inner.deliver(NodeId(2), inner.link.seal(ack), OnRefusal::SendAgain).await;
    assert_eq!(delivered, Delivery::Gone);
    assert_eq!(link.calls.load(Ordering::SeqCst), 0, "the stopped life sent its ack");
}

#[tokio::test(start_paused = true)]
async fn a_key_keeps_the_answers_retries_may_need_and_lets_settled_ones_go_first() {
    const KV: ServiceId = ServiceId(1);
    let link = Arc::new(Flaky::new(0));
    let config = HostConfig { answers_per_key: 2, ..HostConfig::default() };
    let inner = Inner::spawn(NodeId(1), Registry::new(), link, config);
    let answer = |seq| Answered {
        key: Key(7),
        id: RequestId { origin: NodeId(2), seq },
        response: Bytes::from_static(b"done"),
    };
    let now = Instant::now();
    for seq in 1..=5 {
        inner.keep(KV, answer(seq), now);
    }
    let held = || -> Vec<u64> {
        inner.answers.get(&(KV, Key(7))).expect("kept").iter().map(|(id, _, _)| id.seq).collect()
    };
    assert_eq!(held(), vec![1, 2, 3, 4, 5], "none settled: a retry of any may come");
    inner.settled.lock().expect("settled").note(NodeId(2), Settlement { since: 1, below: 3 }, now);
    inner.keep(KV, answer(6), now);
    assert_eq!(held(), vec![2, 3, 4, 5, 6], "a settled one goes first");
    // Past the room, the oldest goes.
    for seq in 7..40 {
        inner.keep(KV, answer(seq), now);
    }
    assert_eq!(held().len(), 2 * UNSETTLED_ROOM);
    assert_eq!(held()[0], 40 - 2 * UNSETTLED_ROOM as u64, "the oldest went first");
    inner.stop();
}

/// A config asking for no answer kept per key keeps one: with none, the first answer to
/// keep pushed out of an empty list panicked, under the settled map's lock.
#[tokio::test(start_paused = true)]
async fn a_config_of_no_answers_per_key_keeps_one_and_does_not_panic() {
    const KV: ServiceId = ServiceId(1);
    let link = Arc::new(Flaky::new(0));
    let config = HostConfig { answers_per_key: 0, ..HostConfig::default() };
    let inner = Inner::spawn(NodeId(1), Registry::new(), link, config);
    let now = Instant::now();
    for seq in 1..=3 {
        let id = RequestId { origin: NodeId(2), seq };
        inner.keep(KV, Answered { key: Key(7), id, response: Bytes::from_static(b"ok") }, now);
    }
    let kept = inner.answers.get(&(KV, Key(7))).map(|l| l.len());
    assert_eq!(kept, Some(3), "none settled: each may still be retried");
    assert!(!inner.settled.is_poisoned(), "no panic under the settled map's lock");
    inner.stop();
}

/// Nodes 1 to 3 holding a service of 1,024 slots, and their table at epoch 4.
fn three_nodes_at_epoch_4() -> (gobelins_locator::CellTree, Arc<gobelins_locator::Snapshot>) {
    use gobelins_locator::{CellTree, Epoch, Labels, ServiceSpec, TreeConfig};
    let mut tree = CellTree::new(TreeConfig::default()).expect("config");
    tree.register_service(ServiceSpec::new(ServiceId(1), "kv").with_slots(1024)).expect("kv");
    for n in 1..=3 {
        tree.add_node(NodeId(n), Labels::new()).expect("add");
    }
    let old = Arc::new(tree.snapshot(Epoch(4)).expect("snapshot"));
    (tree, old)
}

/// Node 4 joins. Node 1, which was to hand it some slots, died before node 4 even began the
/// change: node 4 learns of both at once, as a lagging node does. Those slots must stay
/// held after the change, until node 1's recovery rebuilds them, not be served empty.
#[tokio::test(start_paused = true)]
async fn slots_of_a_sender_dead_before_this_node_began_stay_held_after_the_change() {
    use gobelins_locator::{Epoch, Labels, MigrationPlan};
    const KV: ServiceId = ServiceId(1);
    let (mut tree, old) = three_nodes_at_epoch_4();
    tree.add_node(NodeId(4), Labels::new()).expect("add");
    let new = Arc::new(tree.snapshot(Epoch(5)).expect("snapshot"));
    let plan = MigrationPlan::between(&old, &new);
    let orphan = (0..)
        .map(Key)
        .find(|&k| old.locate(KV, k) == Some(NodeId(1)) && new.locate(KV, k) == Some(NodeId(4)))
        .expect("node 1 hands node 4 some keys");
    let host =
        Host::start(NodeId(4), Registry::new(), Arc::new(Flaky::new(0)), HostConfig::default());
    // As the supervisor hands it over: the dead node is out of the participants.
    let departed = BTreeSet::from([NodeId(1)]);
    let change = Progress {
        epoch: 5,
        change: Change::Add { node: NodeId(4), labels: Labels::new() },
        participants: BTreeSet::from([NodeId(4)]),
        plan,
        failed_moved_in: [None, None],
        failed_kept_since: None,
        leave: false,
    };
    let mut done = host.done();
    host.update(Update {
        epoch: 5,
        snapshot: Some(Arc::clone(&new)),
        change: Some(change),
        departed: departed.clone(),
    });
    tokio::time::timeout(Duration::from_secs(10), done.wait_for(|&d| d >= 5))
        .await
        .expect("node 4 finishes its part")
        .expect("host alive");
    host.update(Update { epoch: 5, snapshot: Some(new), change: None, departed });
    let inner = host.inner.load();
    let mut released = inner.released.subscribe();
    tokio::time::timeout(Duration::from_secs(10), released.wait_for(|&r| r >= 1))
        .await
        .expect("the change ends on node 4")
        .expect("host alive");
    let verdict = inner.router.lock().expect("router").as_ref().map(|r| r.route(KV, orphan, 5));
    assert_eq!(verdict, Some(Verdict::Hold));
    host.shutdown();
}

/// A node that asked to leave is shown so in the change's record, not as evicted: a helper's
/// soak saw every `gobelins leave` in `stats` as `evict nN`.
#[tokio::test(start_paused = true)]
async fn a_leave_is_recorded_as_a_leave_and_an_eviction_as_an_eviction() {
    use gobelins_locator::{Epoch, MigrationPlan};
    let (mut tree, old) = three_nodes_at_epoch_4();
    tree.apply(&Change::Evict(NodeId(3))).expect("evicted");
    let new = Arc::new(tree.snapshot(Epoch(5)).expect("snapshot"));
    for (leave, shown) in [(true, "leave n3"), (false, "evict n3")] {
        let host =
            Host::start(NodeId(2), Registry::new(), Arc::new(Flaky::new(0)), HostConfig::default());
        host.update(Update {
            epoch: 4,
            snapshot: Some(Arc::clone(&old)),
            change: None,
            departed: BTreeSet::new(),
        });
        let change = Progress {
            epoch: 5,
            change: Change::Evict(NodeId(3)),
            participants: BTreeSet::from([NodeId(2)]),
            plan: MigrationPlan::between(&old, &new),
            failed_moved_in: [None, None],
            failed_kept_since: None,
            leave,
        };
        let mut done = host.done();
        let snapshot = Some(Arc::clone(&new));
        host.update(Update { epoch: 5, snapshot, change: Some(change), departed: BTreeSet::new() });
        tokio::time::timeout(Duration::from_secs(10), done.wait_for(|&d| d >= 5))
            .await
            .expect("node 2 finishes its part")
            .expect("host alive");
        let history = host.history();
        assert_eq!(history.last().map(|r| r.change.as_str()), Some(shown), "{history:?}");
        host.shutdown();
    }
}

/// A node the cluster gave up on is counted once, and the count stays moved on once the
/// node is back as a new life, where `gone` says no again: a callback that began for the
/// old life can tell.
#[tokio::test(start_paused = true)]
async fn a_departure_stays_counted_once_the_node_is_back() {
    let host =
        Host::start(NodeId(4), Registry::new(), Arc::new(Flaky::new(0)), HostConfig::default());
    let ctx = host.context();
    let seen = |n| (ctx.gone(NodeId(n)), ctx.departures(NodeId(n)));
    assert_eq!(seen(1), (false, 0));
    let departed = BTreeSet::from([NodeId(1)]);
    host.update(Update { epoch: 1, snapshot: None, change: None, departed });
    assert_eq!(seen(1), (true, 1));
    let departed = BTreeSet::new();
    host.update(Update { epoch: 2, snapshot: None, change: None, departed });
    assert_eq!(seen(1), (false, 1), "back as a new life");
    let departed = BTreeSet::from([NodeId(1), NodeId(2)]);
    host.update(Update { epoch: 3, snapshot: None, change: None, departed });
    assert_eq!((seen(1), seen(2), seen(3)), ((true, 2), (true, 1), (false, 0)));
    host.shutdown();
}

/// Receives `KV`'s entries and counts them; its merge waits for the test.
struct SlowMerge {
    received: Arc<AtomicU64>,
    merging: Arc<tokio::sync::Notify>,
    merge: Arc<tokio::sync::Notify>,
}

impl SlowMerge {
    /// One whose merge the test never lets through, and the count of what it received.
    fn counting() -> (SlowMerge, Arc<AtomicU64>) {
        let received: Arc<AtomicU64> = Arc::default();
        let service = SlowMerge {
            received: Arc::clone(&received),
            merging: Arc::default(),
            merge: Arc::default(),
        };
        (service, received)
    }
}

impl crate::Service for SlowMerge {
    type Request = ();
    type Response = ();
    type Entry = u64;

    fn spec(&self) -> gobelins_locator::ServiceSpec {
        gobelins_locator::ServiceSpec::new(ServiceId(1), "kv").with_slots(1024)
    }

    async fn handle(&self, _: &Context, _: Key, _: ()) {}

    async fn before_migration(&self, _: &Context, _: &crate::ChangeInfo) {}

    async fn send_out(&self, _: &Context, _: &crate::Moving) -> Vec<(Key, u64)> {
        Vec::new()
    }

    async fn receive(&self, _: &Context, _: NodeId, entries: Vec<(Key, u64)>) {
        self.received.fetch_add(entries.len() as u64, Ordering::SeqCst);
    }

    async fn after_migration(&self, _: &Context, _: &crate::ChangeInfo) {
        self.merging.notify_one();
        self.merge.notified().await;
    }

    async fn scan(&self, _: &Context, _: NodeId, _: &crate::Moving) -> Vec<(Key, u64)> {
        Vec::new()
    }
}

/// Node 2 joins and node 1 hands it entries. A batch node 1 sends again (its first answer
/// lost), which comes in while node 2 merges the change's entries, is refused: staged
/// then, it stayed for the next change's merge and overwrote what its entries had become.
const KV: ServiceId = ServiceId(1);

/// Node 2's host, running `service`, in the change to `epoch` that adds it next to node
/// 1; and a key node 1 hands it.
fn node_two_joining(epoch: u64, service: SlowMerge) -> (Host, Key) {
    let (host, moved, update) = node_two_before_joining(epoch, service);
    host.update(update);
    (host, moved)
}

/// [`node_two_joining`]'s host before it hears of the change, and the update that tells it.
fn node_two_before_joining(epoch: u64, service: SlowMerge) -> (Host, Key, Update) {
    use gobelins_locator::{CellTree, Epoch, Labels, MigrationPlan, ServiceSpec, TreeConfig};
    let mut tree = CellTree::new(TreeConfig::default()).expect("config");
    tree.register_service(ServiceSpec::new(KV, "kv").with_slots(1024)).expect("register");
    tree.add_node(NodeId(1), Labels::new()).expect("add");
    let old = Arc::new(tree.snapshot(Epoch(epoch - 1)).expect("snapshot"));
    tree.add_node(NodeId(2), Labels::new()).expect("add");
    let new = Arc::new(tree.snapshot(Epoch(epoch)).expect("snapshot"));
    let plan = MigrationPlan::between(&old, &new);
    let moved = (0..).map(Key).find(|&k| new.locate(KV, k) == Some(NodeId(2))).expect("a key");
    let mut registry = Registry::new();
    registry.register(crate::plugin(service)).expect("register");
    let link = Arc::new(Flaky::new(0));
    let host = Host::start(NodeId(2), registry, link, HostConfig::default());
    let update = Update {
        epoch,
        snapshot: Some(Arc::clone(&new)),
        change: Some(Progress {
            epoch,
            change: Change::Add { node: NodeId(2), labels: Labels::new() },
            participants: BTreeSet::from([NodeId(1), NodeId(2)]),
            plan,
            failed_moved_in: [None, None],
            failed_kept_since: None,
            leave: false,
        }),
        departed: BTreeSet::new(),
    };
    (host, moved, update)
}

/// A migration batch of the change to `epoch` carrying `key`.
fn batch(epoch: u64, key: Key) -> Bytes {
    let mut entries = crate::run::Packed::with_capacity(0);
    entries.push_encoded(key, &7u64).expect("encode");
    let entries = entries.into_run();
    let message =
        Message::Batch { epoch, service: KV, entries, answered: Vec::new(), settled: Vec::new() };
    Bytes::from(message.encode().expect("encode"))
}

fn reply(bytes: Vec<u8>) -> Reply {
    Reply::decode(&Bytes::from(bytes)).expect("a reply")
}

#[tokio::test(start_paused = true)]
async fn a_batch_sent_again_during_the_merge_is_refused_not_kept_for_the_next_merge() {
    let (received, merging, merge) = Default::default();
    let service = SlowMerge {
        received: Arc::clone(&received),
        merging: Arc::clone(&merging),
        merge: Arc::clone(&merge),
    };
    let (host, moved) = node_two_joining(2, service);
    let batch = || batch(2, moved);
    assert!(matches!(reply(host.handle(NodeId(1), batch()).await), Reply::Accepted));
    let ack = Bytes::from((Message::Ack { epoch: 2 }).encode().expect("encode"));
    assert!(matches!(reply(host.handle(NodeId(1), ack).await), Reply::Accepted));
    tokio::time::timeout(Duration::from_secs(10), merging.notified())
        .await
        .expect("node 2 begins its merge");

    let again = reply(host.handle(NodeId(1), batch()).await);
    assert!(matches!(again, Reply::Merged { epoch: 2 }), "{again:?}");
    assert_eq!(received.load(Ordering::SeqCst), 1, "the entry was received once");
    merge.notify_one();
    let mut done = host.done();
    tokio::time::timeout(Duration::from_secs(10), done.wait_for(|&d| d >= 2))
        .await
        .expect("node 2 finishes its part")
        .expect("host alive");
    host.shutdown();
}

/// Node 2, a new life, begins the change that adds it (epoch 5). A copy of a batch of an
/// earlier change (epoch 2), sent again by a node that did not hear that this node's
/// former life was declared failed, is refused: staged, it was merged into epoch 5.
#[tokio::test(start_paused = true)]
async fn a_batch_of_a_change_before_the_one_begun_is_refused_not_merged_into_it() {
    let (service, received) = SlowMerge::counting();
    let (host, moved) = node_two_joining(5, service);
    assert!(matches!(reply(host.handle(NodeId(1), batch(5, moved)).await), Reply::Accepted));
    let stale = reply(host.handle(NodeId(3), batch(2, moved)).await);
    assert!(matches!(stale, Reply::Merged { epoch: 2 }), "{stale:?}");
    assert_eq!(received.load(Ordering::SeqCst), 1, "only the batch of the change begun");
    host.shutdown();
}

/// A batch that comes before its receiver has begun the change waits for it, but answers
/// before its sender gives up: else a receiver that began just before the sender's deadline
/// staged a copy the sender sent again, and counted its entries twice.
#[tokio::test(start_paused = true)]
async fn a_batch_waiting_for_its_change_answers_before_its_sender_gives_up() {
    let (service, received) = SlowMerge::counting();
    let (host, moved, update) = node_two_before_joining(2, service);
    let deadline = HostConfig::default().call_timeout;
    let told = tokio::spawn({
        let host = host.clone();
        async move {
            tokio::time::sleep(deadline * 9 / 10).await;
            host.update(update);
        }
    });
    let started = Instant::now();
    let first = reply(host.handle(NodeId(1), batch(2, moved)).await);
    assert!(matches!(first, Reply::Late), "{first:?}");
    assert!(started.elapsed() <= deadline / 2, "answered in {:?}", started.elapsed());
    told.await.expect("task");
    // Sent again, as its sender does: taken, once.
    assert!(matches!(reply(host.handle(NodeId(1), batch(2, moved)).await), Reply::Accepted));
    assert_eq!(received.load(Ordering::SeqCst), 1, "the entry was received once");
    host.shutdown();
}

/// A change waits for the handlers of a key's manager, not for a message told to the
/// local server: only the first hears of it, and a told handler that answered at once was
/// asked again at once, over and over while the change's first step lasted.
#[tokio::test(start_paused = true)]
async fn only_a_managers_handler_hears_that_a_change_waits_for_it() {
    let inner =
        Inner::spawn(NodeId(1), Registry::new(), Arc::new(Flaky::new(0)), HostConfig::default());
    let inside = inner.gate.try_pass().expect("passes");
    let holding = tokio::spawn({
        let inner = Arc::clone(&inner);
        async move { inner.gate.hold().await }
    });
    tokio::task::yield_now().await;
    let managing = inner.context(None);
    tokio::time::timeout(Duration::from_secs(1), managing.change_waits())
        .await
        .expect("a manager's handler hears of the change");
    let told = inner.context(Some(NodeId(2)));
    let heard = tokio::time::timeout(Duration::from_secs(1), told.change_waits()).await;
    assert!(heard.is_err(), "a told handler does not: the change does not wait for it");
    drop(inside);
    holding.await.expect("task");
    inner.stop();
}

#[tokio::test(start_paused = true)]
async fn a_migration_message_whose_connection_closed_is_sent_again_at_once() {
    assert_eq!(deliver_over(1).await, (Duration::ZERO, 2));
}

#[tokio::test(start_paused = true)]
async fn a_migration_message_that_fails_again_waits_before_each_further_try() {
    let retry = HostConfig::default().retry;
    assert_eq!(deliver_over(3).await, (retry * 2, 4));
}

/// A refusal is not the end of a batch: dropped, its entries were lost, and the change
/// reported done over them. It is sent again, with pauses that grow, until taken.
#[tokio::test(start_paused = true)]
async fn a_refused_migration_message_is_sent_again_until_it_is_taken() {
    let link = Arc::new(Flaky { refusals: 4, ..Flaky::new(0) });
    let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
    let started = Instant::now();
    let batch = Bytes::from_static(b"batch");
    assert_eq!(inner.deliver(NodeId(2), batch, OnRefusal::SendAgain).await, Delivery::Taken);
    assert_eq!(link.calls.load(Ordering::SeqCst), 5, "four refusals, then taken");
    assert_eq!(inner.counters.batches_refused.load(Ordering::Relaxed), 4, "each counted");
    let retry = HostConfig::default().retry;
    assert_eq!(started.elapsed(), retry * (2 + 4 + 8 + 16), "pauses that double");
    inner.stop();
}

/// Refused for ever, a batch waits for as long as its receiver lives; once the receiver is
/// gone, `scan` rebuilds what it carried, and delivering ends.
#[tokio::test(start_paused = true)]
async fn a_message_refused_for_ever_is_given_up_only_once_its_receiver_is_gone() {
    let link = Arc::new(Flaky { refusals: u64::MAX / 2, ..Flaky::new(0) });
    let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
    let delivering = {
        let inner = Arc::clone(&inner);
        let batch = Bytes::from_static(b"batch");
        tokio::spawn(async move { inner.deliver(NodeId(2), batch, OnRefusal::SendAgain).await })
    };
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!delivering.is_finished(), "still trying after ten minutes");
    let calls = link.calls.load(Ordering::SeqCst);
    assert!((100..=200).contains(&calls), "a try every {REFUSED_PAUSE:?} at most: {calls}");
    inner.mirrors.mirror_departed(&BTreeSet::from([NodeId(2)]));
    let ended = tokio::time::timeout(REFUSED_PAUSE * 2, delivering).await;
    assert_eq!(ended.expect("ends").expect("joins"), Delivery::Gone);
    inner.stop();
}

/// A batch of answers alone carries no entry: refused, it is given up at once rather
/// than hold up the change for what a late retry may need.
#[tokio::test(start_paused = true)]
async fn a_refused_message_of_answers_alone_is_given_up_at_once() {
    let link = Arc::new(Flaky { refusals: 1, ..Flaky::new(0) });
    let inner = Inner::spawn(NodeId(1), Registry::new(), link.clone(), HostConfig::default());
    let answers = Bytes::from_static(b"answers");
    assert_eq!(inner.deliver(NodeId(2), answers, OnRefusal::GiveUp).await, Delivery::Refused);
    assert_eq!(link.calls.load(Ordering::SeqCst), 1, "not sent again");
    assert_eq!(inner.counters.batches_refused.load(Ordering::Relaxed), 1, "counted");
    inner.stop();
}
