//! The life of a host's shared state: its start, its end, what its requests wait on, and
//! what services send through it.

use super::{answers::forget_old_answers, Counters, HostConfig, Inner, Stats};
use crate::driver::{Driver, Input};
use crate::error::AdaptationError;
use crate::gate::Gate;
use crate::kept::KeptOrder;
use crate::link::Link;
use crate::mirrors::Mirrors;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::service::Context;
use crate::settled::{Outstanding, Settled};
use crate::wire::{Message, Reply, RequestId};
use bytes::Bytes;
use dashmap::DashMap;
use gobelins_locator::{Key, NodeId, ServiceId};
use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Numbers lives, so that a renewed host is told apart from the one it replaces.
static LIVES: AtomicU64 = AtomicU64::new(1);

impl Inner {
    pub(crate) fn spawn(
        me: NodeId,
        registry: Registry,
        link: Arc<dyn Link>,
        config: HostConfig,
    ) -> Arc<Inner> {
        let (inputs, receiver) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            life: LIVES.fetch_add(1, Ordering::Relaxed),
            me,
            registry,
            link,
            config,
            router: Mutex::new(None),
            epoch: watch::channel(0).0,
            released: watch::channel(0).0,
            begun: watch::channel(0).0,
            done: watch::channel(0).0,
            merging: tokio::sync::RwLock::new(0),
            gate: Gate::new(),
            answers: DashMap::default(),
            running: DashMap::default(),
            // Ids must not repeat across restarts of the node, or a manager would answer a new
            // request with an old request's remembered answer: start each life somewhere new.
            outstanding: Outstanding::new(boot_sequence()),
            relaying: AtomicUsize::new(0),
            settled: Mutex::new(Settled::default()),
            kept: Mutex::new(KeptOrder::default()),
            departed: watch::channel(BTreeSet::new()).0,
            inputs,
            counters: Counters::default(),
            earlier: Mutex::new(Stats::default()),
            history: Mutex::new(Vec::new()),
            stopped: watch::channel(false).0,
            lease: watch::channel(None).0,
            mirrors: Mirrors::new(),
            // Enough for the batches in flight and queued to two destinations at once.
            pool: Pool::new(16),
            malformed: crate::log_budget::noisy(),
        });
        tokio::spawn(Driver::new(Arc::clone(&inner)).run(receiver));
        tokio::spawn(forget_old_answers(Arc::downgrade(&inner)));
        inner
    }

    /// Stops the driver. Requests in flight end at once, not at their deadline: with
    /// `Refused` at their next attempt, or `Deadline` when held, as a life that stopped will
    /// not serve them.
    pub(crate) fn stop(&self) {
        self.stopped.send_replace(true);
        self.mirrors.stopped.store(true, Ordering::Release);
        let _ = self.inputs.send(Input::Stop);
    }

    /// A context at the epoch requests are routed by.
    pub(crate) fn context(self: &Arc<Self>, from: Option<NodeId>) -> Context {
        let (epoch, snapshot) = match &*self.router.lock().expect("router") {
            Some(r) => (r.epoch(), Some(Arc::clone(r.snapshot()))),
            None => (0, None),
        };
        Context::new(self.me, epoch, from, snapshot, Arc::clone(self))
    }
    pub(super) async fn wait_epoch(&self, at_least: u64, until: Instant) -> bool {
        let mut rx = self.epoch.subscribe();
        self.unless_stopped(until, async move { rx.wait_for(|&e| e >= at_least).await.is_ok() })
            .await
    }

    /// `wait`'s answer, or false at `until` or as soon as this life stops: a life renewed
    /// because the cluster declared it failed will never release what it holds, and the
    /// requesters should ask the node that manages the key now.
    ///
    /// Boxed: most requests never wait, and inline these timers would make every request's
    /// future (allocated for each request) a kilobyte larger, too large for the allocator's
    /// per-thread cache.
    pub(super) fn unless_stopped<'a>(
        &'a self,
        until: Instant,
        wait: impl Future<Output = bool> + Send + 'a,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let mut stopped = self.stopped.subscribe();
            // A stopped life first: with both ready, an unbiased choice said now and then that
            // a stopped life's lease held.
            tokio::select! {
                biased;
                _ = stopped.wait_for(|&s| s) => false,
                done = tokio::time::timeout_at(until, wait) => done.unwrap_or(false),
            }
        })
    }

    /// Returns once request `id` is no longer being handled here.
    pub(super) async fn running_ends(&self, id: RequestId) {
        loop {
            let signal = match self.running.get_mut(&id) {
                None => return,
                Some(mut run) => {
                    Arc::clone(run.get_or_insert_with(|| Arc::new(tokio::sync::Notify::new())))
                }
            };
            let ended = signal.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            // Looked at again once listening: an end between the two looks is not missed. A
            // run that ended and began again (another copy) is waited for afresh.
            let same = |run: &Option<Arc<tokio::sync::Notify>>| {
                run.as_ref().is_some_and(|s| Arc::ptr_eq(s, &signal))
            };
            if self.running.get(&id).is_some_and(|run| same(&run)) {
                ended.await;
            }
        }
    }

    /// Whether this node may act as a manager now.
    pub(crate) fn leased(&self) -> bool {
        self.leased_at(Instant::now())
    }

    /// Whether this node may act as a manager at `now`.
    pub(super) fn leased_at(&self, now: Instant) -> bool {
        // A life that stopped holds no lease, whatever its last one said: the supervisor renews
        // only the current life's.
        !self.mirrors.stopped.load(Ordering::Acquire) && self.mirrors.leased_at(now)
    }

    pub(super) async fn wait_lease(&self, until: Instant) -> bool {
        let mut rx = self.lease.subscribe();
        self.unless_stopped(until, async move {
            rx.wait_for(|l| l.is_none_or(|l| Instant::now() < l)).await.is_ok()
        })
        .await
    }

    pub(super) async fn wait_release(&self, seen: u64, until: Instant) -> bool {
        let mut rx = self.released.subscribe();
        self.unless_stopped(until, async move { rx.wait_for(|&r| r > seen).await.is_ok() }).await
    }

    /// Waits until the routing epoch moves past `epoch` or a short pause passes, whichever is
    /// first: the manager we tried is unreachable or behind.
    pub(super) async fn pause(&self, epoch: u64, until: Instant) {
        let soon = (Instant::now() + self.config.retry).min(until);
        self.wait_epoch(epoch + 1, soon).await;
    }
}

/// What a [`Context`] sends through.
impl Inner {
    /// [`Service::repeatable`](crate::Service::repeatable) of `request`, if it is of the type
    /// `service` takes.
    pub(crate) fn repeatable_of(&self, service: ServiceId, request: &dyn Any) -> Option<bool> {
        self.registry.get(service)?.repeatable_typed(request)
    }

    /// Sends `message` (the whole `Message::Local`, as [`Message::encode_local`] wrote it for
    /// the same `service` and `key`) to the local server of `service` on `node`.
    pub(crate) async fn tell(
        self: &Arc<Self>,
        node: NodeId,
        service: ServiceId,
        key: Key,
        message: Vec<u8>,
    ) -> Result<Bytes, AdaptationError> {
        // A stopped life's handlers may still run, and what they would tell (a replica, say)
        // is of a life the cluster has ended or is ending: its node may be back as a new one,
        // which the receiver could not tell apart by its id.
        if self.mirrors.stopped.load(Ordering::Acquire) {
            return Err(AdaptationError::Refused(
                "this life of the node has stopped: it tells nothing more".into(),
            ));
        }
        let reply = if node == self.me {
            self.local(node, service, key, Message::local_body(&message)).await
        } else {
            let bytes = self.link.seal(message);
            let answer = self.link.call(node, bytes, self.config.call_timeout).await?;
            Reply::decode(&answer)?
        };
        match reply {
            Reply::Done(response) => Ok(response),
            Reply::Unknown(s) => Err(AdaptationError::UnknownService(s)),
            Reply::Refused(why) => Err(AdaptationError::Refused(why)),
            other => Err(AdaptationError::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// Whether nothing sent to `node` will land any more.
    pub(crate) fn gone(&self, node: NodeId) -> bool {
        let stopped = node == self.me && self.mirrors.stopped.load(Ordering::Acquire);
        stopped || self.mirrors.is_departed(node)
    }

    /// How many times the cluster gave up on `node`, as this host heard it.
    pub(crate) fn departures(&self, node: NodeId) -> u64 {
        self.mirrors.departures(node)
    }
}

/// A starting point for request numbers that differs from one start of the process to the next.
fn boot_sequence() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // The top bit clear leaves 2^63 requests before wrapping.
    gobelins_locator::mix(nanos ^ u64::from(std::process::id())) >> 1
}
