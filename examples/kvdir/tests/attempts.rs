//! A request whose handler outlasts one attempt: the requester asks again by the same id, and
//! the manager makes the retry wait for the first run instead of running it twice.

use gobelins_adaptation::testing::{replay, MemCluster};
use gobelins_adaptation::{plugin, ChangeInfo, Context, HostConfig, Moving, Registry, Service};
use gobelins_locator::{Key, NodeId, ServiceId, ServiceSpec};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SLOW: ServiceId = ServiceId(9);

/// Each request sleeps the milliseconds it names, then answers how many runs began so far. An
/// odd number of milliseconds marks a request as repeatable; an answer of 0 changed nothing
/// (asked with 4 ms).
struct Slow {
    runs: Arc<AtomicU64>,
}

impl Service for Slow {
    type Request = u64;
    type Response = u64;
    type Entry = ();

    fn spec(&self) -> ServiceSpec {
        ServiceSpec::new(SLOW, "slow").with_slots(16)
    }

    fn repeatable(millis: &u64) -> bool {
        millis % 2 == 1
    }

    fn changed_nothing(run: &u64) -> bool {
        *run == 0
    }

    async fn handle(&self, _ctx: &Context, _key: Key, millis: u64) -> u64 {
        if millis == 4 {
            return 0;
        }
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(millis)).await;
        run
    }

    async fn before_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn send_out(&self, _ctx: &Context, _moving: &Moving) -> Vec<(Key, ())> {
        Vec::new()
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, _entries: Vec<(Key, ())>) {}

    async fn after_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn scan(&self, _ctx: &Context, _failed: NodeId, _orphans: &Moving) -> Vec<(Key, ())> {
        Vec::new()
    }
}

/// Two nodes hosting `Slow`, attempts cut at 100 ms, and a key node 2 manages.
async fn slow_cluster(runs: &Arc<AtomicU64>) -> (MemCluster, Key) {
    let config = HostConfig {
        attempt_timeout: Duration::from_millis(100),
        request_deadline: Duration::from_secs(5),
        ..HostConfig::default()
    };
    slow_nodes(2, config, runs).await
}

/// `nodes` nodes hosting `Slow` with `config`, and a key node 2 manages.
async fn slow_nodes(nodes: u64, config: HostConfig, runs: &Arc<AtomicU64>) -> (MemCluster, Key) {
    let counted = Arc::clone(runs);
    let cluster = MemCluster::start(nodes, config, move || {
        let mut registry = Registry::new();
        registry.register(plugin(Slow { runs: Arc::clone(&counted) })).expect("registers");
        registry
    })
    .await;
    let key = (0..)
        .map(Key)
        .find(|&k| cluster.snapshot().locate(SLOW, k) == Some(NodeId(2)))
        .expect("node 2 manages some key");
    (cluster, key)
}

#[test]
fn a_request_whose_handler_outlasts_an_attempt_is_retried_and_still_runs_once() {
    replay(async {
        let runs = Arc::new(AtomicU64::new(0));
        let (cluster, key) = slow_cluster(&runs).await;

        let requester = cluster.host(NodeId(1));
        let started = tokio::time::Instant::now();
        let answer: u64 = requester
            .context()
            .request(SLOW, key, &350u64)
            .await
            .expect("answered within the deadline");

        assert_eq!(answer, 1, "the answer is the first run's");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the retries waited for the first run");
        // The first run ends at about 350 ms. The retry waiting for it at the manager hears of
        // it then, not when its own wait there ends (about 361 ms).
        let took = started.elapsed();
        assert!(took < Duration::from_millis(356), "answered {took:?} after it was sent");
        assert_eq!(requester.stats().requests_delayed, 1, "the requester asked more than once");
    });
}

/// A request its manager ran, whose answer never reached its sender, then a join that moved
/// its key (and the answer with it) to a node that died before the sender asked again: the
/// node that ran it still lives, and the retry at the key's next manager (the locator gives
/// the key back to it) gets the first run's answer, not a second run.
#[test]
fn an_answer_handed_to_a_joiner_that_died_is_not_lost_to_the_retry() {
    use bytes::Bytes;
    use gobelins_adaptation::codec;
    use gobelins_adaptation::wire::{Reply, RequestId, Routed, Settlement};
    replay(async {
        let config =
            HostConfig { request_deadline: Duration::from_secs(5), ..HostConfig::default() };
        let runs = Arc::new(AtomicU64::new(0));
        let (mut cluster, _) = slow_nodes(2, config.clone(), &runs).await;
        // Where the keys go once node 3 joins: one node 2 manages now that node 3 then takes.
        let (mut probe, _) = slow_nodes(2, config, &Arc::new(AtomicU64::new(0))).await;
        probe.add().await;
        let key = (0..1_000_000)
            .map(Key)
            .find(|&k| {
                cluster.snapshot().locate(SLOW, k) == Some(NodeId(2))
                    && probe.snapshot().locate(SLOW, k) == Some(NodeId(3))
            })
            .expect("a key the joiner takes from node 2");
        // Node 1's first attempt, as it reached node 2: the answer goes nowhere.
        let attempt = |epoch| {
            let routed = Routed {
                id: RequestId { origin: NodeId(1), seq: 77 },
                service: SLOW,
                key,
                epoch,
                body: Bytes::new(),
                wait_ms: 5_000,
                settled: Settlement::default(),
                repeatable: false,
            };
            Bytes::from(routed.encode_request(&codec::encode(&2u64).expect("encodes")))
        };
        let first = cluster.host(NodeId(2)).handle(NodeId(1), attempt(cluster.epoch())).await;
        assert!(matches!(Reply::decode(&Bytes::from(first)), Ok(Reply::Done(_))));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let joiner = cluster.add().await;
        assert_eq!(cluster.snapshot().locate(SLOW, key), Some(joiner));
        cluster.fail(joiner).await;
        let manager = cluster.snapshot().locate(SLOW, key).expect("a manager");
        let again = cluster.host(manager).handle(NodeId(1), attempt(cluster.epoch())).await;
        let again = Reply::decode(&Bytes::from(again)).expect("a reply");
        let Reply::Done(answer) = again else { panic!("answered: {again:?}") };
        assert_eq!(codec::decode::<u64>(&answer).expect("a count"), 1, "the first run's answer");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry did not run it again");
    });
}

#[test]
fn only_answers_to_requests_that_must_not_run_twice_are_kept() {
    replay(async {
        let runs = Arc::new(AtomicU64::new(0));
        let (cluster, key) = slow_cluster(&runs).await;
        let requester = cluster.host(NodeId(1)).context();
        let manager = cluster.host(NodeId(2));

        let _: u64 = requester.request(SLOW, key, &1u64).await.expect("a repeatable request");
        assert_eq!(
            manager.stats().answers_kept,
            0,
            "nothing kept for a request that may run again"
        );
        let _: u64 =
            requester.request(SLOW, key, &4u64).await.expect("an answer that changed nothing");
        assert_eq!(
            manager.stats().answers_kept,
            0,
            "nothing kept for an answer that changed nothing"
        );
        let _: u64 = requester.request(SLOW, key, &2u64).await.expect("a request to run once");
        assert_eq!(manager.stats().answers_kept, 1, "kept for its retries");
        // Past twice the request deadline (5 s here) no retry can come: the answer goes.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(manager.stats().answers_kept, 1, "still kept within twice the deadline");
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(manager.stats().answers_kept, 0, "forgotten once no retry can come");
    });
}

/// A lease that runs out 100 ms into a request of 300 ms.
const LAPSE: Duration = Duration::from_millis(100);

/// Node `from` sends node 2, whose lease runs out `lease` from now, a request that takes
/// `millis`; the cluster renews the lease 600 ms from now. The answer, how long it took, how many
/// times the request ran, and how many of `from`'s requests were answered only after a retry;
/// with the cluster, still running.
async fn across_a_lapsed_lease(
    from: NodeId,
    lease: Duration,
    millis: u64,
) -> (MemCluster, u64, Duration, u64, u64) {
    let runs = Arc::new(AtomicU64::new(0));
    let (cluster, key) = slow_cluster(&runs).await;
    let manager = cluster.host(NodeId(2));
    manager.lease(tokio::time::Instant::now() + lease);
    let renewing = manager.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        renewing.lease(tokio::time::Instant::now() + Duration::from_secs(60));
    });
    let requester = cluster.host(from);
    let asked = tokio::time::Instant::now();
    let answer: u64 = requester.context().request(SLOW, key, &millis).await.expect("answered");
    let took = asked.elapsed();
    let delayed = requester.stats().requests_delayed;
    (cluster, answer, took, runs.load(Ordering::SeqCst), delayed)
}

#[test]
fn a_request_whose_managers_lease_ran_out_while_it_ran_is_not_run_again() {
    replay(async {
        let (_cluster, answer, took, runs, _) = across_a_lapsed_lease(NodeId(1), LAPSE, 300).await;
        assert!(
            took >= Duration::from_millis(600),
            "answered after {took:?}, before the lease was renewed"
        );
        assert_eq!(answer, 1, "the first run's answer");
        assert_eq!(runs, 1, "not run again once the lease was renewed");
    });
}

/// The same, sent by the manager itself: its first attempt keeps no run-once record, except
/// on this path, where the answer is not given and a retry will come.
#[test]
fn a_managers_own_request_whose_lease_ran_out_while_it_ran_is_not_run_again() {
    replay(async {
        let (cluster, answer, took, runs, delayed) =
            across_a_lapsed_lease(NodeId(2), LAPSE, 300).await;
        assert!(took >= Duration::from_millis(600), "answered after {took:?}, before the renewal");
        assert_eq!(answer, 1, "the first run's answer");
        assert_eq!(runs, 1, "not run again once the lease was renewed");
        assert!(delayed >= 1, "answered by a retry, not by the first attempt");
        // The answer kept for that retry is the node's own, and no request of another node
        // settles it. The sweep (every request deadline, 5 s) notes what the node itself has
        // settled and drops it, well before it would expire (twice the deadline).
        let manager = cluster.host(NodeId(2));
        assert_eq!(manager.stats().answers_kept, 1, "kept for the retry");
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        assert_eq!(manager.stats().answers_kept, 0, "dropped at the sweep as settled");
    });
}

/// A manager without a lease may already be being replaced: it runs nothing, not even a
/// request that may run twice or its own request, until the lease is renewed. Each of these
/// takes a short path when nothing is in its way; a lapsed lease is in its way.
#[test]
fn a_manager_whose_lease_ran_out_runs_no_request_until_it_is_renewed() {
    replay(async {
        for (from, millis, what) in [
            (NodeId(1), 1, "another node's repeatable request"),
            (NodeId(1), 2, "another node's request"),
            (NodeId(2), 1, "its own repeatable request"),
            (NodeId(2), 2, "its own request"),
        ] {
            let (_cluster, _, took, runs, _) =
                across_a_lapsed_lease(from, Duration::ZERO, millis).await;
            assert_eq!(runs, 1, "{what}: run {runs} times, once only after the renewal");
            assert!(took >= Duration::from_millis(600), "{what}: answered after {took:?}");
        }
    });
}

/// A manager cut off while it runs a request is declared failed: the request's sender stops
/// waiting for it at once and asks the new manager, instead of waiting out its attempt.
#[test]
fn a_request_held_by_a_manager_declared_failed_goes_to_the_new_manager_at_once() {
    replay(async {
        let runs = Arc::new(AtomicU64::new(0));
        let config = HostConfig {
            attempt_timeout: Duration::from_secs(2),
            request_deadline: Duration::from_secs(10),
            ..HostConfig::default()
        };
        let (mut cluster, key) = slow_nodes(3, config, &runs).await;
        let requester = cluster.host(NodeId(1));
        let started = tokio::time::Instant::now();
        // 1,001 ms, odd: repeatable, so the new manager runs it again.
        let request = tokio::spawn(async move {
            requester.context().request::<_, u64>(SLOW, key, &1001u64).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.fail_cut_off(NodeId(2)).await;
        request.await.expect("no panic").expect("answered");
        let took = started.elapsed();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "run by the cut-off manager, then by the new one"
        );
        assert!(
            took < Duration::from_millis(1500),
            "answered after {took:?}: the sender waited for the manager it had been told was gone"
        );
    });
}

/// A node passes on at most `max_relays` requests at once for senders routing by an old epoch;
/// the others are told `Moved`, and their senders ask the manager themselves.
#[test]
fn a_node_passes_on_at_most_so_many_requests_at_once() {
    replay(async {
        let runs = Arc::new(AtomicU64::new(0));
        let config = HostConfig { max_relays: 4, ..HostConfig::default() };
        let (cluster, key) = slow_nodes(3, config, &runs).await;
        let sender = cluster.host(NodeId(1));
        // 51 ms: odd, so repeatable, and long enough that all six are in flight at once.
        let body = gobelins_adaptation::codec::encode(&51u64).expect("encode");
        let sent = (0..6).map(|_| sender.request_via(NodeId(3), SLOW, key, body.clone()));
        let answers = futures::future::join_all(sent).await;

        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(cluster.host(NodeId(3)).stats().forwarded, 4, "four passed on");
        assert_eq!(cluster.host(NodeId(2)).stats().served, 6, "all six served by the manager");
        assert_eq!(sender.stats().requests_delayed, 2, "two told Moved, and sent again");
        // Their places are free again once they are answered.
        sender.request_via(NodeId(3), SLOW, key, body).await.expect("answered");
        assert_eq!(cluster.host(NodeId(3)).stats().forwarded, 5, "passed on");
    });
}

/// A request that waited at the gate while a change's hold waited out a slow handler, and
/// whose manager's lease ran out meanwhile, is served only once the lease is renewed. Its
/// handler never yields, so nothing looks at the lease after it runs: the look before the
/// wait must not stand for after it.
#[test]
fn a_request_that_waited_at_the_gate_while_the_lease_ran_out_waits_for_the_renewal() {
    replay(async {
        let config = HostConfig {
            attempt_timeout: Duration::from_secs(2),
            request_deadline: Duration::from_secs(5),
            ..HostConfig::default()
        };
        // The keys node 2 manages before node 3 joins and after: what the change leaves there
        // is served there throughout, through the gate (the same tree in every run).
        let staying: Vec<Key> = {
            let runs = Arc::new(AtomicU64::new(0));
            let (mut cluster, _) = slow_nodes(2, config.clone(), &runs).await;
            let before = cluster.snapshot();
            cluster.add().await;
            let after = cluster.snapshot();
            (0..)
                .map(Key)
                .filter(|&k| before.locate(SLOW, k) == Some(NodeId(2)))
                .filter(|&k| after.locate(SLOW, k) == Some(NodeId(2)))
                .take(4)
                .collect()
        };
        let runs = Arc::new(AtomicU64::new(0));
        let (mut cluster, slow_key) = slow_nodes(2, config, &runs).await;
        let (requester, manager) = (cluster.host(NodeId(1)), cluster.host(NodeId(2)));
        let start = tokio::time::Instant::now();
        manager.lease(start + Duration::from_millis(100));
        let renewing = manager.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            renewing.lease(tokio::time::Instant::now() + Duration::from_secs(60));
        });
        // Holds a pass until 400 ms: the change's hold waits for it, and keeps the gate shut.
        let slow = requester.context();
        let holding = tokio::spawn(async move {
            let _: Result<u64, _> = slow.request(SLOW, slow_key, &400u64).await;
        });
        let asking = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut answered = Vec::new();
            for &key in &staying {
                // 4 ms: answered at once, never yielding.
                let _: u64 = requester.context().request(SLOW, key, &4u64).await.expect("answered");
                answered.push(start.elapsed());
            }
            answered
        };
        let ((), answered) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                cluster.add().await;
            },
            asking
        );
        holding.await.expect("the slow request's task");
        assert_eq!(answered.len(), staying.len());
        for took in answered {
            assert!(took >= Duration::from_millis(600), "served {took:?} in, before the renewal");
        }
    });
}
