//! An in-memory transport with fault injection, for in-process cluster tests.
//!
//! Every node of a [`MemNetwork`] calls the others' handlers directly. Faults are set on the
//! network: links cut both ways (partitions), answers lost one way, raft's log replication
//! lost one way, every raft message lost one way, a leader's word of a change begun lost one
//! way, nodes taken down, a delay per message, and a seeded drop rate. A message that cannot
//! arrive makes the caller wait its full deadline, as a lost TCP segment would.

use crate::error::{Result, SupervisorError};
use crate::lane::Lane;
use crate::rpc::Request;
use crate::transport::{Handler, Transport};
use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Hub {
    handlers: HashMap<u64, Arc<dyn Handler>>,
    addrs: HashMap<String, u64>,
    cut: BTreeSet<(u64, u64)>,
    /// (answering, calling): the calling node's requests arrive, their answers do not.
    muted: BTreeSet<(u64, u64)>,
    /// (from, to): raft's log replication from `from` to `to` is lost, other calls arrive.
    stalled: BTreeSet<(u64, u64)>,
    /// (from, to): the leader's word of a change begun (`Request::Begun`) from `from` to `to`
    /// is lost, other calls arrive.
    untold: BTreeSet<(u64, u64)>,
    /// (from, to): every raft message from `from` to `to` is lost, heartbeats included, so
    /// `to` learns no leader from `from`; other calls arrive.
    unheard: BTreeSet<(u64, u64)>,
    down: BTreeSet<u64>,
    /// Calls made, whether or not they arrived, by (caller, callee).
    calls: HashMap<(u64, u64), u64>,
    delay: Duration,
    drop_rate: f64,
    rng: StdRng,
}

/// A simulated network of in-process nodes.
#[derive(Clone)]
pub struct MemNetwork {
    hub: Arc<Mutex<Hub>>,
}

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

impl MemNetwork {
    /// A network without faults; `seed` drives the drop decisions.
    pub fn new(seed: u64) -> Self {
        MemNetwork {
            hub: Arc::new(Mutex::new(Hub {
                handlers: HashMap::new(),
                addrs: HashMap::new(),
                cut: BTreeSet::new(),
                muted: BTreeSet::new(),
                stalled: BTreeSet::new(),
                untold: BTreeSet::new(),
                unheard: BTreeSet::new(),
                down: BTreeSet::new(),
                calls: HashMap::new(),
                delay: Duration::ZERO,
                drop_rate: 0.0,
                rng: StdRng::seed_from_u64(seed),
            })),
        }
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches node `node`, reachable at `addr`, answering with `handler`; returns its transport.
    pub fn attach(&self, node: u64, addr: &str, handler: Arc<dyn Handler>) -> MemTransport {
        let mut hub = self.hub();
        hub.handlers.insert(node, handler);
        hub.addrs.insert(addr.to_string(), node);
        hub.down.remove(&node);
        MemTransport { net: self.clone(), me: node, forgotten: Mutex::default() }
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn partition(&self, a: u64, b: u64) {
        self.hub().cut.insert(pair(a, b));
    }

    /// Cuts `node` off from every other node.
    pub fn isolate(&self, node: u64, others: impl IntoIterator<Item = u64>) {
        for other in others {
            self.partition(node, other);
        }
    }

    /// Loses every answer `answering` sends to a call made by `calling`; the calls themselves
    /// arrive and are carried out, and calls the other way are untouched: an answer lost after
    /// the work was done, as when a leader commits and crashes before it replies.
    pub fn mute(&self, answering: u64, calling: u64) {
        self.hub().muted.insert((answering, calling));
    }

    /// Loses the raft log replication (`AppendEntries` with entries, `InstallSnapshot`) `from`
    /// sends to `to`; heartbeats and every other call arrive, both ways, so `to` keeps its
    /// leader: a leader whose replication to `to` lags behind its other calls.
    pub fn stall_log(&self, from: u64, to: u64) {
        self.hub().stalled.insert((from, to));
    }

    /// Loses the leader's word of a change begun (`Request::Begun`) that `from` sends to `to`;
    /// every other call arrives, both ways: `to` hears of the change only from its log or from
    /// the answer to its own join.
    pub fn lose_begun(&self, from: u64, to: u64) {
        self.hub().untold.insert((from, to));
    }

    /// Loses every raft message `from` sends to `to` (appends, heartbeats and snapshots, votes);
    /// every other call arrives, both ways: a joiner that has not heard from its leader yet.
    pub fn lose_raft(&self, from: u64, to: u64) {
        self.hub().unheard.insert((from, to));
    }

    /// Lets the answers `answering` sends to `calling`'s calls through again (see
    /// [`MemNetwork::mute`]); every other fault stays.
    pub fn unmute(&self, answering: u64, calling: u64) {
        self.hub().muted.remove(&(answering, calling));
    }

    /// Restores every cut link, muted answer, stalled log, lost word and lost raft message.
    pub fn heal(&self) {
        let mut hub = self.hub();
        hub.cut.clear();
        hub.muted.clear();
        hub.stalled.clear();
        hub.untold.clear();
        hub.unheard.clear();
    }

    /// Takes `node` down: nothing reaches it and it reaches nothing, until attached again.
    pub fn crash(&self, node: u64) {
        let mut hub = self.hub();
        hub.down.insert(node);
        hub.handlers.remove(&node);
    }

    /// How many calls `from` made to `to` so far, whether or not they arrived.
    pub fn calls(&self, from: u64, to: u64) -> u64 {
        self.hub().calls.get(&(from, to)).copied().unwrap_or(0)
    }

    /// Delays every message by `delay`, each way.
    pub fn set_delay(&self, delay: Duration) {
        self.hub().delay = delay;
    }

    /// Drops this fraction of requests (and of responses).
    pub fn set_drop_rate(&self, rate: f64) {
        self.hub().drop_rate = rate;
    }

    /// The handler of `to` if `message` from `from` can get there now, and the delay; `answer`
    /// says the message answers a call `to` made.
    fn route(
        &self,
        from: u64,
        to: u64,
        message: &Bytes,
        answer: bool,
    ) -> (Option<Arc<dyn Handler>>, Duration) {
        let mut hub = self.hub();
        let stalled = !answer && hub.stalled.contains(&(from, to)) && replicates_log(message);
        let untold = !answer && hub.untold.contains(&(from, to)) && tells_begun(message);
        let unheard = !answer && hub.unheard.contains(&(from, to)) && is_raft(message);
        if !answer {
            *hub.calls.entry((from, to)).or_default() += 1;
        }
        let rate = hub.drop_rate.clamp(0.0, 1.0);
        let dropped = rate > 0.0 && hub.rng.random_bool(rate);
        let blocked = dropped
            || stalled
            || untold
            || unheard
            || (answer && hub.muted.contains(&(from, to)))
            || hub.down.contains(&from)
            || hub.down.contains(&to)
            || hub.cut.contains(&pair(from, to));
        let handler = if blocked { None } else { hub.handlers.get(&to).cloned() };
        (handler, hub.delay)
    }
}

/// The supervisor's request `message` carries, if it carries one.
fn supervisor_request(message: &Bytes) -> Option<Request> {
    let Ok((Lane::Supervisor, body)) = Lane::open(message.clone()) else { return None };
    gobelins_adaptation::codec::decode::<Request>(&body).ok()
}

/// Whether `message` is a supervisor's `AppendEntries` with entries or `InstallSnapshot`.
fn replicates_log(message: &Bytes) -> bool {
    match supervisor_request(message) {
        Some(Request::AppendEntries(r)) => !r.entries.is_empty(),
        Some(Request::InstallSnapshot(_)) => true,
        _ => false,
    }
}

/// Whether `message` is one of raft's own: an append, a snapshot, a vote.
fn is_raft(message: &Bytes) -> bool {
    matches!(
        supervisor_request(message),
        Some(Request::AppendEntries(_) | Request::InstallSnapshot(_) | Request::Vote(_))
    )
}

/// Whether `message` is a supervisor's `Begun`: a leader's word of a change begun.
fn tells_begun(message: &Bytes) -> bool {
    matches!(supervisor_request(message), Some(Request::Begun(_)))
}

/// One node's end of a [`MemNetwork`].
pub struct MemTransport {
    net: MemNetwork,
    me: u64,
    /// Per node called, what its calls watch for [`Transport::forget`]: as over TCP, where
    /// forgetting a node closes its connections, its calls in flight fail at once.
    forgotten: Mutex<HashMap<u64, tokio::sync::watch::Sender<bool>>>,
}

impl MemTransport {
    async fn deliver(&self, to: u64, request: Bytes, deadline: Duration) -> Result<Bytes> {
        let lost = || SupervisorError::Timeout {
            what: format!("request to node {to}"),
            after_ms: deadline.as_millis() as u64,
        };
        let exchange = async {
            let (handler, delay) = self.net.route(self.me, to, &request, false);
            tokio::time::sleep(delay).await;
            let Some(handler) = handler else {
                std::future::pending::<()>().await;
                unreachable!("pending never completes");
            };
            let response = handler.handle(self.me, request).await;
            let (back, delay) = self.net.route(to, self.me, &response, true);
            tokio::time::sleep(delay).await;
            if back.is_none() {
                std::future::pending::<()>().await;
            }
            response
        };
        let mut forgotten = {
            let mut watched = self.forgotten.lock().unwrap_or_else(|p| p.into_inner());
            watched.entry(to).or_insert_with(|| tokio::sync::watch::channel(false).0).subscribe()
        };
        tokio::select! {
            answered = tokio::time::timeout(deadline, exchange) => answered.map_err(|_| lost()),
            _ = forgotten.wait_for(|&gone| gone) => Err(SupervisorError::Closed),
        }
    }
}

#[async_trait]
impl Transport for MemTransport {
    async fn call(&self, to: u64, request: Bytes, deadline: Duration) -> Result<Bytes> {
        self.deliver(to, request, deadline).await
    }

    async fn call_addr(
        &self,
        addr: &str,
        request: Bytes,
        deadline: Duration,
    ) -> Result<(u64, Bytes)> {
        let to = self.net.hub().addrs.get(addr).copied().ok_or_else(|| {
            SupervisorError::io(
                format!("connecting to {addr}"),
                std::io::ErrorKind::ConnectionRefused.into(),
            )
        })?;
        Ok((to, self.deliver(to, request, deadline).await?))
    }

    fn set_peer(&self, _node: u64, _addr: String) {}

    fn forget(&self, node: u64) {
        let watched = self.forgotten.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
        if let Some(gone) = watched {
            gone.send_replace(true);
        }
    }
}
