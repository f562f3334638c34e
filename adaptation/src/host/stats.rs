//! What a host counts and records of each change, for operators and the demo.

use super::Inner;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one host, for operators and the demo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests issued here that completed.
    pub requests_ok: u64,
    /// Of those, requests that waited: held, redirected or retried.
    pub requests_delayed: u64,
    /// Requests issued here that failed (deadline, unknown service, refused), and those its agent
    /// refused before they reached the host ([`Host::count_refused`](super::Host::count_refused)).
    pub requests_failed: u64,
    /// Requests this node served as manager.
    pub served: u64,
    /// Requests this node held because their key was moving.
    pub held: u64,
    /// Entries shipped to new managers.
    pub entries_sent: u64,
    /// Entries received from old managers.
    pub entries_received: u64,
    /// Entries `scan` rebuilt after failures.
    pub entries_rebuilt: u64,
    /// Entry bytes shipped.
    pub bytes_sent: u64,
    /// Answers this node keeps as a manager so that retries run nothing twice (mostly at most
    /// `answers_per_key` per key; [`crate::Service::repeatable`] requests keep none, nor does
    /// a manager's own request served on its first attempt, of which no copy exists, unless
    /// its lease runs out while it runs).
    #[serde(default)]
    pub answers_kept: u64,
    /// Requests for keys this node no longer manages that it passed on to their manager,
    /// relaying the manager's reply to their sender (who counts them as neither delayed nor
    /// redirected: nothing told it to ask again).
    #[serde(default)]
    pub forwarded: u64,
    /// Times a migration message this node sent was refused by its receiver. A batch of
    /// entries refused is sent again until taken, and its change waits for it: a count that
    /// grows means a change that cannot end (the log names the receiver and why). A batch of
    /// answers alone is given up.
    #[serde(default)]
    pub batches_refused: u64,
    /// Per service, by name: how much it reported lost after failures, in its own unit
    /// ([`crate::Service::reported_lost`]). Anything but 0 means data may be gone: the
    /// service's log says what.
    #[serde(default)]
    pub reported_lost: BTreeMap<String, u64>,
}

impl Stats {
    /// Adds the counters of `earlier`, a life before this one. `answers_kept` counts what is
    /// kept now, so only this life's.
    fn add_earlier(&mut self, earlier: &Stats) {
        // Taken apart whole, without `..`: a counter added to `Stats` fails to build here until
        // it is said whether it adds up over lives.
        let Stats {
            requests_ok,
            requests_delayed,
            requests_failed,
            served,
            held,
            entries_sent,
            entries_received,
            entries_rebuilt,
            bytes_sent,
            answers_kept: _,
            forwarded,
            batches_refused,
            reported_lost,
        } = earlier;
        self.requests_ok += requests_ok;
        self.requests_delayed += requests_delayed;
        self.requests_failed += requests_failed;
        self.served += served;
        self.held += held;
        self.entries_sent += entries_sent;
        self.entries_received += entries_received;
        self.entries_rebuilt += entries_rebuilt;
        self.bytes_sent += bytes_sent;
        self.forwarded += forwarded;
        self.batches_refused += batches_refused;
        for (name, lost) in reported_lost {
            *self.reported_lost.entry(name.clone()).or_default() += lost;
        }
    }
}

/// One change as this node carried it out: what moved and how long each phase took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The epoch it led to.
    pub epoch: u64,
    /// The change, printed.
    pub change: String,
    /// Milliseconds in before migration (scan included).
    pub before_ms: f64,
    /// Milliseconds sending out.
    pub sending_ms: f64,
    /// Milliseconds waiting for the other participants' entries and acks.
    pub receiving_ms: f64,
    /// Milliseconds in after migration: `after_migration`, then (requests released)
    /// `after_release`.
    pub after_ms: f64,
    /// Milliseconds from the change's start here to the release of the requests it held for
    /// the keys that moved: how long such a request waited at most, on this node. Absent
    /// (0) from the stats of a build before it.
    #[serde(default)]
    pub held_ms: f64,
    /// Milliseconds from the report of done to the stable epoch (`None` until then).
    pub stable_ms: Option<f64>,
    /// Entries this node sent.
    pub entries_sent: u64,
    /// Entries it received.
    pub entries_received: u64,
    /// Entries it rebuilt with `scan`.
    pub entries_rebuilt: u64,
    /// When this node began the change: from then on it stages the batches sent to it. An
    /// instant of this process, for an observer in it (the migration benchmark sets one node's
    /// against another's); not carried in `stats`.
    #[serde(skip)]
    pub begun_at: Option<std::time::Instant>,
    /// When its sending phase began (its new table installed) and ended, as `begun_at`.
    #[serde(skip)]
    pub sending: Option<(std::time::Instant, std::time::Instant)>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests_ok: AtomicU64,
    pub(crate) requests_delayed: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) served: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) entries_sent: AtomicU64,
    pub(crate) entries_received: AtomicU64,
    pub(crate) entries_rebuilt: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) batches_refused: AtomicU64,
}

impl Inner {
    /// This life's counters, with its earlier lives' added.
    pub(super) fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut stats = Stats {
            requests_ok: get(&c.requests_ok),
            requests_delayed: get(&c.requests_delayed),
            requests_failed: get(&c.requests_failed),
            served: get(&c.served),
            held: get(&c.held),
            entries_sent: get(&c.entries_sent),
            entries_received: get(&c.entries_received),
            entries_rebuilt: get(&c.entries_rebuilt),
            bytes_sent: get(&c.bytes_sent),
            answers_kept: self.answers.iter().map(|answers| answers.len() as u64).sum(),
            forwarded: get(&c.forwarded),
            batches_refused: get(&c.batches_refused),
            reported_lost: self.registry.iter().fold(BTreeMap::new(), |mut lost, plugin| {
                // Names need not be unique: two services of one name add up.
                *lost.entry(plugin.spec().name).or_default() += plugin.reported_lost();
                lost
            }),
        };
        stats.add_earlier(&self.earlier.lock().expect("earlier"));
        stats
    }
}
