//! An example service for gobelins: a key-value directory that keeps a replica of every entry
//! on a second node, so that the failure of any one node loses nothing.
//!
//! It is the service `docs/writing-a-service.md` walks through, and the one `gobelins agent`
//! hosts for `gobelins demo`.
//!
//! - The manager of a key holds its entry: a value and a version that grows with every write.
//! - Every write is copied to the manager's *backup*, the locator's replica holder (in another
//!   zone under label levels, else the next node of its cell), before it is acknowledged.
//!   After each change the manager copies its backup what it received, or every entry if the
//!   backup is new (or a copy to it failed since).
//! - Entries are grouped by slot: a change takes out the slots that leave, whole, and never
//!   looks at the entries that stay.
//! - `scan(failed, orphans)` returns the replicas this node holds of the orphaned keys. Two
//!   survivors may hold different versions of one key; the newest wins when they are merged.
//! - A survivor that holds every entry of an orphaned slot vouches for it to its new manager,
//!   which reports the slots nobody could vouch for: their entries may be lost (`ledger`). Such
//!   a slot keeps a marker, and a read of a key it lacks answers `Lost`, not `Value(None)`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod by_slot;
mod ledger;
mod unstored;

use by_slot::BySlot;
use bytes::Bytes;
use gobelins_adaptation::{ChangeInfo, Context, Moving, Service};
use gobelins_locator::{Change, Key, NodeId, ServiceId, ServiceSpec, Snapshot};
use ledger::{Ledger, Vouch};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The service's id in the cluster.
pub const KVDIR: ServiceId = ServiceId(10);

/// Replicas are copied in messages of at most this many entries...
const REPLICATE_CHUNK: usize = 4096;

/// ... and about this many bytes of values: cut by count alone, 4,096 entries of 4 KiB or more
/// made a message larger than a frame may be, and a copy in full then failed every time.
const REPLICATE_BYTES: usize = 4 << 20;

/// The largest value a `Put` may store. An entry migrates in a batch of about
/// `HostConfig::batch_bytes` with others, or alone when it is larger, and a batch larger than a
/// frame can never move (its change waits for ever): this keeps every batch of the default
/// configuration well within the 16 MiB frame.
pub const MAX_VALUE: usize = 4 << 20;

/// How long a change waits for this node's backup to take the entries it received: past a
/// failure detector's verdict on a backup that is down, short of holding up the changes behind
/// it for a backup that is only cut off from this node.
const REPLICA_PATIENCE: Duration = Duration::from_secs(10);

/// How long a change waits for the nodes told to forget their copies of this node's entries:
/// a node that does not answer keeps them until the next change, which costs memory, not data.
const FORGET_PATIENCE: Duration = Duration::from_millis(500);

/// How long a survivor waits for a new manager to take its word for slots it rebuilds, and a
/// manager for its backup to take its word that it holds every entry. Either unheard makes a
/// recovery report slots lost that were not.
const WORD_PATIENCE: Duration = Duration::from_secs(2);

/// A value and its version: the entry that migrates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// Grows by one with every write of the key.
    pub version: u64,
    /// The bytes stored. `Bytes`, not `Vec<u8>`: the copy an entry leaves behind as a replica
    /// when it moves, and the copies sent to the backup, share its memory instead of copying
    /// it. Serialized as a byte string either way; received in a migration batch, it is a
    /// slice of the batch rather than a copy, which kvdir copies into memory of its own in the
    /// background once the change is stable (`own_memory`).
    #[serde(with = "gobelins_adaptation::shared")]
    pub value: Bytes,
}

/// What clients and peers ask.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Store `value` under the key (to its manager).
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Read the key (to its manager).
    Get,
    /// Keep these copies (to a backup's local server).
    Replicate {
        /// The epoch the sender was at: a `Forget` of an earlier one must not drop them.
        epoch: u64,
        /// The copies.
        entries: Vec<(Key, Versioned)>,
    },
    /// Every entry the sender manages at `epoch` now has a copy on the sender's backup: drop
    /// the copies of them you hold, unless you are that backup (to the local server of the
    /// nodes that may hold them from an earlier configuration).
    Forget {
        /// The epoch whose table says which entries the sender manages.
        epoch: u64,
    },
    /// Every entry the sender manages has a copy here: it copied them at the end of the
    /// change to `epoch` (to its backup's local server).
    Copied {
        /// The epoch the change led to.
        epoch: u64,
    },
    /// The sender holds every entry of these slots of `failed`, and rebuilds them (to the
    /// local server of their new manager, as the recovery of `failed` begins).
    Vouch {
        /// The node that failed.
        failed: NodeId,
        /// The epoch the sender's table was at.
        at: u64,
        /// Slots whose every entry it holds, up to the latest write.
        current: Vec<u32>,
        /// Slots whose every entry it holds as of the last change's start: the writes since
        /// are on the failed node's backup at the recovery's start.
        older: Vec<u32>,
        /// How many entries of these slots it sends this node.
        entries: u64,
    },
    /// The caller accepts that the entries the key's slot was reported to have lost are gone
    /// (to the key's manager): the keys the slot lacks read as absent again, not as `Lost`,
    /// until a later failure loses entries of it again.
    Forgive,
}

/// The answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The write is stored at this version, on the manager and (if one exists) its backup.
    Stored {
        /// The key's new version.
        version: u64,
    },
    /// The key's entry, if it has one.
    Value(Option<Versioned>),
    /// Replicas kept.
    Kept,
    /// The write could not be copied to the backup. Never seen by a client: the layer retries
    /// the request ([`Service::must_retry`]).
    Unreplicated,
    /// The value is larger than [`MAX_VALUE`]; nothing was stored.
    TooLarge {
        /// The largest value accepted, in bytes.
        max: u64,
    },
    /// The key has no entry, and its slot lost entries: its manager failed with no survivor
    /// holding all of them (see [`KvDir::slots_lost`]). It may have had a value, which is
    /// gone; nobody can tell. Until the key is written again, or the slot forgiven
    /// ([`Request::Forgive`]), a read answers this, never `Value(None)`.
    Lost,
    /// Keys from [`RESERVED`] up are kvdir's own; nothing was read or stored.
    Reserved,
    /// The key's slot no longer says it lost entries (or never did).
    Forgiven,
    /// A write or a forgive told to a node ([`Context::tell`]) rather than routed to the key's
    /// manager: only the manager writes a key, where the layer holds requests while it moves
    /// and keeps their answers for retries. Nothing was stored.
    NotManaged,
}

/// Keys from here up are kvdir's own: a slot that lost entries keeps a marker under one of
/// them, which migrates, is copied to the backup and is rebuilt with the slot's other entries.
/// A client's `Put`, `Get` or `Forgive` of one is refused ([`Response::Reserved`]).
pub const RESERVED: u64 = 1 << 63;

/// A marker's version says what it says, and orders what was said at different epochs: a
/// loss judged at epoch `e` is `2e`, its forgiveness at epoch `f` (never before `e`) `2f + 1`,
/// so that the later word wins wherever copies of the two meet (a merge keeps the newer
/// version).
fn marker_version(epoch: u64, forgiven: bool) -> u64 {
    2 * epoch + u64::from(forgiven)
}

/// The key of the marker that says `slot` lost entries: the first reserved key in that slot.
fn marker_key(spec: &ServiceSpec, slot: u32) -> Key {
    // Keys hash onto slots: a slot has one reserved key in `spec.slots` or so.
    (RESERVED..).map(Key).find(|&k| spec.slot_of(k) == slot).expect("every slot has reserved keys")
}

/// One node's part of the directory.
pub struct KvDir {
    /// Shared with the task that gives values received in a change memory of their own once
    /// it is stable (`own_memory`).
    live: Arc<Mutex<BySlot>>,
    staged: Mutex<Vec<(Key, Versioned)>>,
    /// The keys received in batches, and where each value lay: a slice of its batch, until
    /// `own_memory` copies it.
    arrived: Mutex<Arrived>,
    /// The task copying what the last stable change brought (`own_memory`): the next change
    /// waits for it, lest it take values away before they are copied.
    owning: Mutex<Option<tokio::task::JoinHandle<()>>>,
    replicas: Mutex<BySlot>,
    /// Copies of the entries this node sent away, kept until a stable epoch finds them safe
    /// with their managers. Apart from `replicas` rather than merged into it: a merge hashes
    /// every entry, and `sent` runs while the last batches are still on their way.
    sent: Mutex<Vec<(Key, Versioned)>>,
    /// The backup this node last copied every entry to, in full: while it stays the backup,
    /// a change copies it only what this node received.
    replicated: Mutex<Replicated>,
    /// What the last change's `after_migration` left its `after_release` to copy to the
    /// backup.
    copying: Mutex<Option<Copying>>,
    /// The latest epoch copies came from. Updated under the `replicas` lock, read under it by
    /// `forget`.
    copies_at: AtomicU64,
    /// Who holds whole copies of what, for a recovery to say what it could not rebuild.
    ledger: Mutex<Ledger>,
    /// What the recovery beginning's `scan` found, for `before_migration` to vouch for: only
    /// it is told which changes last moved something of the failed node's.
    scanned: Mutex<Option<Scanned>>,
    /// Slots this node rebuilt after a failure that no survivor could vouch for.
    slots_lost: AtomicU64,
    /// Copies the backup did not store, for the log.
    unstored: Mutex<unstored::Unstored>,
}

/// What a recovery's `scan` found of a failed node's slots.
struct Scanned {
    failed: NodeId,
    orphans: Moving,
    /// How many entries of each orphan slot this node holds (none for a slot left out).
    entries: std::collections::BTreeMap<u32, u64>,
}

/// Where a node's entries were last copied in full, and how many writes' copies failed.
#[derive(Default)]
struct Replicated {
    /// The backup, until a copy to it fails.
    to: Option<NodeId>,
    /// The last backup a change copied entries to, whether it stays the backup or not: once
    /// another backup holds them all, it is told to forget its copies.
    last: Option<NodeId>,
    /// Writes whose copy failed, counted so that a change that began before one of them does
    /// not set `to` again as it ends.
    missed: u64,
}

/// Where the values received in batches lay, by key.
#[derive(Default)]
struct Arrived {
    /// Received in the change under way, not merged into `live` yet.
    pending: Vec<(Key, usize)>,
    /// Merged, to copy once their change is stable.
    merged: Vec<(Key, usize)>,
}

/// Entries a change leaves to copy to the backup once its requests are released.
struct Copying {
    /// The epoch the change led to.
    epoch: u64,
    /// The backup.
    to: NodeId,
    entries: Vec<(Key, Versioned)>,
    /// [`Replicated::missed`] when the change merged what it received.
    missed: u64,
}

impl Default for KvDir {
    fn default() -> Self {
        KvDir {
            live: Arc::new(Mutex::new(BySlot::new(KvDir::declaration()))),
            staged: Mutex::default(),
            arrived: Mutex::default(),
            owning: Mutex::default(),
            replicas: Mutex::new(BySlot::new(KvDir::declaration())),
            sent: Mutex::default(),
            replicated: Mutex::default(),
            copying: Mutex::default(),
            copies_at: AtomicU64::new(0),
            ledger: Mutex::default(),
            scanned: Mutex::default(),
            slots_lost: AtomicU64::new(0),
            unstored: Mutex::default(),
        }
    }
}

impl KvDir {
    /// An empty directory.
    pub fn new() -> Self {
        KvDir::default()
    }

    /// The spec every node registers.
    pub fn declaration() -> ServiceSpec {
        ServiceSpec::new(KVDIR, "kvdir").with_slots(4096)
    }

    /// Entries this node manages right now (a slot's mark that it lost entries counts as one).
    pub fn managed(&self) -> usize {
        self.live.lock().expect("live").len()
    }

    /// The version of the copy this node holds of `key`'s entry, as a backup or as the
    /// sender of a change not yet stable (the newer, if both).
    pub fn copy_of(&self, key: Key) -> Option<u64> {
        let sent = self.sent.lock().expect("sent");
        let kept = sent.iter().filter(|(k, _)| *k == key).map(|(_, e)| e.version);
        kept.chain(self.replicas.lock().expect("replicas").get(key).map(|e| e.version)).max()
    }

    /// The version of this node's entry of `key`, if it manages it.
    pub fn version_of(&self, key: Key) -> Option<u64> {
        self.live.lock().expect("live").get(key).map(|e| e.version)
    }

    /// Slots this node rebuilt after failures, as their new manager, that no survivor holding
    /// every entry of them could vouch for: their entries may be lost (see `after_migration`).
    pub fn slots_lost(&self) -> u64 {
        self.slots_lost.load(Ordering::Relaxed)
    }

    /// Copies this node holds right now: of the entries it backs up, and of those it sent
    /// away in a change not yet stable (a key can count in both).
    pub fn replicas(&self) -> usize {
        let sent = self.sent.lock().expect("sent").len();
        sent + self.replicas.lock().expect("replicas").len()
    }

    /// How many of the entries this node manages share their value's memory with another
    /// handle: most often, values received in a change not yet stable, still slices of the
    /// batches they came in (see [`Versioned::value`]). A lower bound: the last value left of
    /// a batch holds the only handle to it, and `Bytes` cannot tell it from a value of its own.
    pub fn shared_values(&self) -> usize {
        let live = self.live.lock().expect("live");
        live.iter().filter(|(_, e)| !e.value.is_empty() && !e.value.is_unique()).count()
    }
}

/// Values copied out of their batches at a time, between which requests get the lock.
const OWN_MEMORY_CHUNK: usize = 1024;

/// Gives each value of `received` that `live` still holds as it came (a slice of its batch, at
/// the address recorded) memory of its own. Values a batch brought share its memory, which
/// spared the receiver a copy while requests waited for the change. But the few values of a
/// batch that later writes do not replace would keep the whole batch: so they are copied once
/// the change is stable, in the background, a chunk at a time. A value is replaced only by a
/// copy of itself, read under the same lock, so a write racing the copy is never undone. Ends
/// early when this life of the node has ended (`live` dropped).
async fn own_memory(live: Weak<Mutex<BySlot>>, received: Vec<(Key, usize)>) {
    for chunk in received.chunks(OWN_MEMORY_CHUNK) {
        let Some(live) = live.upgrade() else { return };
        let found: Vec<(Key, Bytes)> = {
            let live = live.lock().expect("live");
            let held = |&(key, at): &(Key, usize)| {
                let e = live.get(key).filter(|e| e.value.as_ptr() as usize == at)?;
                Some((key, e.value.clone()))
            };
            chunk.iter().filter_map(held).collect()
        };
        let copies: Vec<Bytes> = found.iter().map(|(_, v)| Bytes::copy_from_slice(v)).collect();
        {
            let mut live = live.lock().expect("live");
            for ((key, was), copy) in found.into_iter().zip(copies) {
                // Unless a write replaced it meanwhile.
                let same = |e: &&mut Versioned| {
                    e.value.as_ptr() == was.as_ptr() && e.value.len() == was.len()
                };
                if let Some(e) = live.get_mut(key).filter(same) {
                    e.value = copy;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Where `node` keeps its replicas: under label levels, a node of another zone (or rack);
/// else the next node of its own cell, wrapping around, or, alone in its cell, the next node
/// of the table. This is the locator's replica holder
/// (`Snapshot::replica_holder`): every change that moves it takes part `node` and the new
/// holder, so `node` copies its entries to the new backup in `after_release`, and tells it so
/// (`Copied`), which the ledger's vouch needs.
pub(crate) fn backup(snapshot: &Snapshot, node: NodeId) -> Option<NodeId> {
    snapshot.replica_holder(node)
}

/// Tells `request` to `node`'s kvdir and waits at most `patience` for it to be kept.
async fn tell_within(
    ctx: &Context,
    node: NodeId,
    request: &Request,
    patience: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(patience, ctx.tell(node, KVDIR, Key(0), request)).await {
        Ok(Ok(Response::Kept)) => Ok(()),
        Ok(Ok(other)) => Err(format!("answered {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".to_string()),
    }
}

/// Tells `request` to `node`'s kvdir, asking again until it is kept, `node` is gone or
/// `patience` runs out: a call on a connection that closed meanwhile fails at once, and the
/// next dials anew. For words whose loss reports entries lost though none were: the backup's
/// `Copied` and a survivor's `Vouch`, each harmless to hear twice.
async fn tell_until(
    ctx: &Context,
    node: NodeId,
    request: &Request,
    patience: Duration,
) -> Result<(), String> {
    // This node's own life ended, every call fails at once, and a peer that counts it
    // departed refuses it: nothing to ask again for.
    let gone = || ctx.gone(node) || ctx.gone(ctx.node());
    again_until(patience, gone, |left| tell_within(ctx, node, request, left)).await
}

/// Runs `attempt` with the patience left until it succeeds, `gone()` says there is no one to
/// ask any more, or `patience` runs out; pauses from 10 ms doubling to 200 ms between tries.
/// The last error otherwise.
async fn again_until<F, Fut>(
    patience: Duration,
    gone: impl Fn() -> bool,
    mut attempt: F,
) -> Result<(), String>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let until = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(10);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let error = match attempt(left).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if gone() || tokio::time::Instant::now() + pause >= until {
            return Err(error);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `entries` in slices of at most [`REPLICATE_CHUNK`] entries and, unless one value alone is
/// larger, [`REPLICATE_BYTES`] of values.
fn chunks(entries: &[(Key, Versioned)]) -> impl Iterator<Item = &[(Key, Versioned)]> {
    let mut rest = entries;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        while end < rest.len().min(REPLICATE_CHUNK) {
            bytes += rest[end].1.value.len();
            if end > 0 && bytes > REPLICATE_BYTES {
                break;
            }
            end += 1;
        }
        let (chunk, after) = rest.split_at(end);
        rest = after;
        Some(chunk)
    })
}

impl KvDir {
    /// Drops the copies this node holds of what `from` manages at `epoch`, which `from`'s
    /// backup now holds too: a former backup's copies, and those a backup kept of entries its
    /// manager has since sent away. Kept, they made every node hold in time a copy of every
    /// entry that ever passed through its cell. Only at the epoch the sender meant: a table
    /// read at another could name slots this node must keep copies of.
    fn forget(&self, ctx: &Context, from: NodeId, epoch: u64) {
        let Some(table) = ctx.snapshot().filter(|t| t.epoch().0 == epoch) else {
            tracing::debug!(
                node = from.0,
                epoch,
                at = ctx.epoch(),
                "kvdir: copies to forget read at another epoch; kept"
            );
            return;
        };
        let Some(slots) = table.table(KVDIR) else { return };
        // A node given up on and not yet recovered: what it managed is rebuilt from copies
        // like these, and the sender may manage slots whose entries have not reached it.
        if backup(table, from) == Some(ctx.node()) || table.nodes().iter().any(|&n| ctx.gone(n)) {
            return;
        }
        let theirs = slots.owners().enumerate().filter(|&(_, owner)| owner == from);
        let forgotten = {
            let mut replicas = self.replicas.lock().expect("replicas");
            // Copies from a later epoch came meanwhile: this message was delayed, and this
            // node, no part of that change, may not have installed its table yet.
            if self.copies_at.load(Ordering::Relaxed) > epoch {
                return;
            }
            replicas.detach(theirs.map(|(slot, _)| slot as u32))
        };
        // Holding none of them, this node must not vouch for them as a backup before: it did
        // (a backup replaced while it lived), and a recovery took its word for entries gone.
        self.ledger.lock().expect("ledger").forgot(from);
        // Freed in a task of its own: tens of thousands of entries took 10 to 16 ms to free,
        // and the sender's change waits for this answer.
        tokio::spawn(forgotten.free());
    }

    /// Tells the nodes that may hold copies of what this node manages, other than its backup
    /// `to`, which now holds them all, to forget theirs: the change's other participants (the
    /// cell, where backups and senders are), and the last backup before `to`. Waited for, a
    /// little: an answer seen means the copies went before this change is done, so before a
    /// later change can make that node a backup again.
    async fn tell_to_forget(
        &self,
        ctx: &Context,
        change: &ChangeInfo,
        to: NodeId,
        last: Option<NodeId>,
    ) {
        let me = ctx.node();
        let Some(table) = ctx.snapshot() else { return };
        if !table.table(KVDIR).is_some_and(|t| t.owners().any(|owner| owner == me)) {
            return;
        }
        // A participant that died during the change, or a node given up on and not recovered
        // yet, leaves this node managing slots whose entries have not all reached it: their
        // recovery rebuilds them from the copies others hold. A leaver is out of the table,
        // and, dead, out of the participants too for a node that heard of its leave and its
        // death at once (helper-54): it is looked for by name.
        let leaver = match change.change {
            Change::Evict(node) => Some(node),
            _ => None,
        };
        if change.participants.iter().chain(table.nodes()).chain(&leaver).any(|&n| ctx.gone(n)) {
            return;
        }
        let mut told: Vec<NodeId> = change.participants.iter().copied().chain(last).collect();
        told.sort_unstable();
        told.dedup();
        told.retain(|&n| n != me && n != to && !ctx.gone(n));
        let forget = &Request::Forget { epoch: table.epoch().0 };
        let calls = told.iter().map(|&n| async move {
            let Err(error) = tell_within(ctx, n, forget, FORGET_PATIENCE).await else { return };
            tracing::debug!(node = n.0, %error, "kvdir: a node may keep copies of entries this node manages, until a later change tells it again");
        });
        futures::future::join_all(calls).await;
    }

    /// Tells `to`, this node's backup, that it holds a copy of every entry this node manages
    /// since the change to `epoch`: should this node fail, it vouches for them.
    async fn say_copied(&self, ctx: &Context, to: NodeId, epoch: u64) {
        // Said once, a call that failed on a connection the cut had just closed left the
        // backup unable to vouch, and this node's failure in the next change had its slots
        // reported lost though the backup held every entry (`sim_kvdir`, seed 59). Hearing
        // the word twice changes nothing (`Ledger::copied` keeps the newest epoch).
        let copied = &Request::Copied { epoch };
        let Err(error) = tell_until(ctx, to, copied, WORD_PATIENCE).await else { return };
        if ctx.gone(to) {
            // Dead (killed as the change ran, say): its recovery comes next, and gives this
            // node a new backup, which it tells then. Routine after a `kill -9`, not an alarm
            // (a helper's black-box run saw this warning on survivors of every such run).
            tracing::info!(backup = to.0, epoch, "kvdir: this node's backup was declared failed before it heard that it holds every entry; its recovery gives this node a new one");
            return;
        }
        tracing::warn!(backup = to.0, epoch, %error, "kvdir: the backup did not hear that it holds every entry of this node; should this node fail before the next change, its recovery reports its slots lost");
    }

    /// Tells the new managers of the failed node's slots those of them this node holds every
    /// entry of, as the recovery begins, `moved_in` being the last changes that moved
    /// something of its own. Waited for: a new manager judges what it rebuilt once this node's
    /// batches have come, and they follow.
    async fn vouch(&self, ctx: &Context, scanned: Scanned, moved_in: [Option<u64>; 2]) {
        let Some(table) = ctx.snapshot() else { return };
        let me = ctx.node();
        let Scanned { failed, orphans, entries } = scanned;
        let all: Vec<u32> = orphans.slots().collect();
        let vouched = self.ledger.lock().expect("ledger").vouch(me, failed, table, &all, moved_in);
        let Some(vouch) = vouched else { return };
        // Both lists ascend, as the moves do: each move's share is a range of each.
        let share = |slots: &[u32], of: &std::ops::Range<u32>| -> Vec<u32> {
            let from = slots.partition_point(|&s| s < of.start);
            let to = slots.partition_point(|&s| s < of.end).max(from);
            slots[from..to].to_vec()
        };
        let mut words: std::collections::BTreeMap<NodeId, Vouch> = Default::default();
        for m in orphans.moves() {
            let word = words.entry(m.to).or_insert_with(|| Vouch {
                current: Vec::new(),
                older: Vec::new(),
                ..vouch.clone()
            });
            let (current, older) = (share(&vouch.current, &m.slots), share(&vouch.older, &m.slots));
            word.entries +=
                current.iter().chain(&older).filter_map(|s| entries.get(s)).sum::<u64>();
            word.current.extend(current);
            word.older.extend(older);
        }
        words.retain(|_, w| !w.current.is_empty() || !w.older.is_empty());
        let calls = words.into_iter().map(|(node, word)| async move {
            if node == me {
                self.ledger.lock().expect("ledger").heard(failed, word);
                return;
            }
            // Should `node` die before it copies them on, this node rebuilds them again, and
            // vouches for them as their sender: for what it holds up to the latest write only.
            // Its word for the rest (`older`) held while `failed`'s backup lived, which the
            // recovery of `node` cannot check: those slots are reported then.
            self.ledger.lock().expect("ledger").vouched_to(node, word.current.iter().copied());
            let Vouch { at, current, older, entries, .. } = word;
            let word = Request::Vouch { failed, at, current, older, entries };
            // Asked again as `Copied` is: said once, a failed call left the slots reported
            // lost. Its batches wait for it, and a word heard twice counts once (`heard`).
            if let Err(error) = tell_until(ctx, node, &word, WORD_PATIENCE).await {
                tracing::warn!(node = node.0, failed = failed.0, %error, "kvdir: a new manager did not hear that this node holds every entry of slots it rebuilds; it reports them lost");
            }
        });
        futures::future::join_all(calls).await;
    }

    /// The recovery of `failed` ends here: reports the slots this node rebuilt that no
    /// survivor could vouch for, and marks them. What was found of them is kept; a read of a
    /// key they lack answers `Lost`, a key never written too: kvdir cannot tell the two apart.
    fn report_lost(&self, ctx: &Context, failed: NodeId, epoch: u64) {
        let me = ctx.node();
        let lost =
            self.ledger.lock().expect("ledger").unvouched(me, failed, epoch, |n| ctx.gone(n));
        if lost.is_empty() {
            return;
        }
        self.slots_lost.fetch_add(lost.len() as u64, Ordering::Relaxed);
        // Staged, so that they are merged and copied to the backup with what was received.
        let spec = KvDir::declaration();
        let marker = Versioned { version: marker_version(epoch, false), value: Bytes::new() };
        let markers = lost.iter().map(|&slot| (marker_key(&spec, slot), marker.clone()));
        self.staged.lock().expect("staged").extend(markers);
        tracing::error!(
            failed = failed.0,
            epoch,
            slots = lost.len(),
            first = ?&lost[..lost.len().min(8)],
            "kvdir: node {failed} failed, and no survivor holding every entry of {} of its slots is left (its backup died too, or before it held them all): those slots are rebuilt from what copies remained, and entries written to them may be lost; a read of a key they lack answers Lost until it is written again. Restore those keys from outside the cluster if they matter, then send Forgive for a key of each slot: the keys it still lacks then read as absent",
            lost.len()
        );
    }

    /// Copies `entry`, just written under `key` here, to this node's backup: `done` once it
    /// holds it.
    async fn store(&self, ctx: &Context, key: Key, entry: Versioned, done: Response) -> Response {
        if self.replicate(ctx, vec![(key, entry)]).await {
            return done;
        }
        // A write acknowledged with one copy would be lost if this node failed now, or already
        // has been declared failed and the survivors rebuilt the key from the backup's older
        // copy: the layer retries it instead. It stays here meanwhile, not undone: the backup
        // may have stored it though its answer was lost, and an entry must never mean two
        // values at one version. Should every retry fail too, a read may still see it: the
        // next change copies the backup every entry, this one among them.
        let mut replicated = self.replicated.lock().expect("replicated");
        replicated.to = None;
        replicated.missed += 1;
        Response::Unreplicated
    }

    /// Copies `entries` to this node's backup; false if some were not stored there.
    async fn replicate(&self, ctx: &Context, entries: Vec<(Key, Versioned)>) -> bool {
        let Some(to) = ctx.snapshot().and_then(|s| backup(s, ctx.node())) else { return true };
        let mut stored = true;
        for chunk in chunks(&entries) {
            let key = chunk[0].0;
            let copies = Request::Replicate { epoch: ctx.epoch(), entries: chunk.to_vec() };
            let sent: Result<Response, _> = ctx.tell(to, KVDIR, key, &copies).await;
            if let Err(e) = sent {
                // The backup is dying or gone, or has learned that this node was declared
                // failed; either way the cluster is about to change.
                let now = tokio::time::Instant::now();
                let said = self.unstored.lock().expect("unstored").refused(to, now);
                if let Some(unsaid) = said {
                    tracing::warn!(backup = to.0, error = %e, more_since_last_said = unsaid, said_again_after_s = unstored::SAY_EVERY.as_secs(), "kvdir: replicas not stored on the backup (it is dying or gone, or this node was declared failed); the writes are retried until the cluster changes, and the next change copies the backup every entry");
                }
                stored = false;
            }
        }
        stored
    }
}

impl Service for KvDir {
    type Request = Request;
    type Response = Response;
    type Entry = Versioned;

    fn spec(&self) -> ServiceSpec {
        KvDir::declaration()
    }

    fn must_retry(response: &Response) -> bool {
        matches!(response, Response::Unreplicated)
    }

    /// A read that runs again only reads again: its answer need not be kept for retries.
    fn repeatable(request: &Request) -> bool {
        matches!(request, Request::Get)
    }

    async fn handle(&self, ctx: &Context, key: Key, request: Request) -> Response {
        match (ctx.from(), request) {
            (Some(_), Request::Replicate { epoch, entries }) => {
                let mut replicas = self.replicas.lock().expect("replicas");
                replicas.merge(entries);
                self.copies_at.fetch_max(epoch, Ordering::Relaxed);
                Response::Kept
            }
            // A told write would land on a node that may not manage the key (its entry then
            // moves with this node's slots, perhaps over the manager's), or during a move.
            (Some(_), Request::Put(_) | Request::Forgive) => Response::NotManaged,
            (_, Request::Put(_) | Request::Get | Request::Forgive) if key.0 >= RESERVED => {
                Response::Reserved
            }
            (_, Request::Put(value)) if value.len() > MAX_VALUE => {
                Response::TooLarge { max: MAX_VALUE as u64 }
            }
            (_, Request::Put(value)) => {
                let entry = {
                    let mut live = self.live.lock().expect("live");
                    let version = live.get(key).map_or(1, |e| e.version + 1);
                    let entry = Versioned { version, value: Bytes::from(value) };
                    live.insert(key, entry.clone());
                    entry
                };
                let version = entry.version;
                self.store(ctx, key, entry, Response::Stored { version }).await
            }
            (_, Request::Forgive) => {
                let spec = KvDir::declaration();
                let marker = marker_key(&spec, spec.slot_of(key));
                let entry = {
                    let mut live = self.live.lock().expect("live");
                    match live.get(marker) {
                        Some(lost) if lost.version % 2 == 0 => {
                            let version = marker_version(ctx.epoch(), true).max(lost.version + 1);
                            let entry = Versioned { version, value: Bytes::new() };
                            live.insert(marker, entry.clone());
                            entry
                        }
                        _ => return Response::Forgiven,
                    }
                };
                self.store(ctx, marker, entry, Response::Forgiven).await
            }
            (_, Request::Get) => {
                let live = self.live.lock().expect("live");
                match live.get(key) {
                    None if live.marked(key) => Response::Lost,
                    entry => Response::Value(entry.cloned()),
                }
            }
            (Some(from), Request::Forget { epoch }) => {
                self.forget(ctx, from, epoch);
                Response::Kept
            }
            (Some(from), Request::Copied { epoch }) => {
                self.ledger.lock().expect("ledger").copied(from, epoch);
                Response::Kept
            }
            (Some(from), Request::Vouch { failed, at, current, older, entries }) => {
                let vouch = Vouch { by: from, at, current, older, entries };
                self.ledger.lock().expect("ledger").heard(failed, vouch);
                Response::Kept
            }
            (
                None,
                Request::Replicate { .. }
                | Request::Forget { .. }
                | Request::Copied { .. }
                | Request::Vouch { .. },
            ) => Response::Kept,
        }
    }

    async fn before_migration(&self, ctx: &Context, change: &ChangeInfo) {
        let scanned = self.scanned.lock().expect("scanned").take();
        if let (Change::Fail(failed) | Change::Recover(failed), Some(scanned)) =
            (&change.change, scanned)
        {
            if scanned.failed == *failed {
                self.vouch(ctx, scanned, change.failed_moved_in).await;
            }
        }
        // A value `send_out` took before its copy would keep its batch from `sent`, then from
        // `replicas`. Most often long done: it began when the last change was stable.
        let owning = self.owning.lock().expect("owning").take();
        if let Some(task) = owning {
            let _ = task.await;
        }
        let table = ctx.shared_snapshot();
        self.ledger.lock().expect("ledger").begin(change.epoch, table);
    }

    async fn send_out(&self, _ctx: &Context, moving: &Moving) -> Vec<(Key, Versioned)> {
        self.ledger.lock().expect("ledger").send_out(moving.moves());
        self.live.lock().expect("live").take(moving.slots())
    }

    /// Kept as they are: should the receiver die before it copies them on, `scan` has them.
    async fn sent(&self, _ctx: &Context, entries: Vec<(Key, Versioned)>) {
        let mut sent = self.sent.lock().expect("sent");
        if sent.is_empty() {
            *sent = entries;
        } else {
            sent.extend(entries);
        }
    }

    /// A copy kept of an entry sent away goes once it is safe without it: its receiver
    /// manages it and lives (the change is stable, so it has copied it on to its backup), or
    /// it has moved on since to a live manager (the change that moved it, a recovery say, is
    /// stable too). Kept while its manager has failed: the recovery to come rebuilds it from
    /// this copy. And kept, as a replica, if this node is now the backup of its manager. Kept
    /// for ever, every node would in time hold a replica of every entry that ever left it.
    async fn stable(&self, ctx: &Context, epoch: u64) {
        self.ledger.lock().expect("ledger").stable(epoch, |n| ctx.gone(n));
        // Left by a change the cluster finished without this node's `after_release`: the next
        // change copies every entry (`replicated.to` stays unset), so these need not wait.
        self.copying.lock().expect("copying").take_if(|c| c.epoch <= epoch);
        let merged = std::mem::take(&mut self.arrived.lock().expect("arrived").merged);
        if !merged.is_empty() {
            // After the copy before it, if one still runs: a change this node took no part
            // in has no `before_migration` to wait for it, and one handle is kept.
            let before = self.owning.lock().expect("owning").take();
            let live = Arc::downgrade(&self.live);
            let task = tokio::spawn(async move {
                if let Some(before) = before {
                    let _ = before.await;
                }
                own_memory(live, merged).await;
            });
            *self.owning.lock().expect("owning") = Some(task);
        }
        let Some(table) = ctx.snapshot() else { return };
        let me = ctx.node();
        let mut sent = self.sent.lock().expect("sent");
        let mut replicas = self.replicas.lock().expect("replicas");
        for (key, entry) in std::mem::take(&mut *sent) {
            let manager = table.locate(KVDIR, key);
            // Its manager failed (the receiver, or the node a recovery rebuilt it on): the
            // recovery to come may need this copy.
            if manager.is_some_and(|m| ctx.gone(m)) {
                sent.push((key, entry));
            } else if manager.and_then(|m| backup(table, m)) == Some(me) {
                replicas.merge([(key, entry)]);
            } else {
                // Any older replica of it too: this node backs up neither the key's manager
                // nor, since it managed the key, the node that did before.
                replicas.remove(key);
            }
        }
    }

    async fn receive(&self, _ctx: &Context, from: NodeId, entries: Vec<(Key, Versioned)>) {
        {
            // Counted only from a node that vouched to this one, in a recovery.
            let mut ledger = self.ledger.lock().expect("ledger");
            if ledger.expects(from) {
                let spec = KvDir::declaration();
                ledger.received(from, entries.iter().map(|(k, _)| (spec.slot_of(*k), *k)));
            }
        }
        let sliced = entries.iter().filter(|(_, e)| !e.value.is_empty());
        let at = sliced.map(|(k, e)| (*k, e.value.as_ptr() as usize));
        self.arrived.lock().expect("arrived").pending.extend(at);
        self.staged.lock().expect("staged").extend(entries);
    }

    async fn after_migration(&self, ctx: &Context, change: &ChangeInfo) {
        self.ledger.lock().expect("ledger").end(change.epoch);
        if let Change::Fail(failed) | Change::Recover(failed) = change.change {
            self.report_lost(ctx, failed, change.epoch);
        }
        let snapshot = ctx.snapshot();
        let to = snapshot.and_then(|s| backup(s, ctx.node()));
        // A backup that stays holds every entry but those received: copying it all again made
        // each change cost as much as the whole directory, on every node. It stayed: its
        // death and its return as a new life, its memory gone, are each a change that moves
        // this node's replica holder, which the locator makes this node take part in.
        let (whole, missed) = {
            let mut replicated = self.replicated.lock().expect("replicated");
            let whole = replicated.to != to;
            // Set again once the copy succeeds, unless a write's copy failed meanwhile: either
            // leaves the next change to copy every entry.
            replicated.to = None;
            (whole, replicated.missed)
        };
        // Copies this node holds of entries it now manages, as a former backup of their last
        // manager, would die with it: merged with what it received (the newer version wins,
        // and goes to the backup), they leave the replicas.
        let own_copies = snapshot.and_then(|s| s.table(KVDIR)).map(|slots| {
            let mine = slots.owners().enumerate().filter(|&(_, owner)| owner == ctx.node());
            self.replicas.lock().expect("replicas").take(mine.map(|(slot, _)| slot as u32))
        });
        let all: Vec<(Key, Versioned)> = {
            let mut staged = std::mem::take(&mut *self.staged.lock().expect("staged"));
            let mut arrived = self.arrived.lock().expect("arrived");
            let pending = std::mem::take(&mut arrived.pending);
            arrived.merged.extend(pending);
            drop(arrived);
            staged.extend(own_copies.into_iter().flatten());
            let received: Vec<Key> =
                if whole { Vec::new() } else { staged.iter().map(|(k, _)| *k).collect() };
            let mut live = self.live.lock().expect("live");
            live.merge(staged);
            if whole {
                live.iter().map(|(k, v)| (*k, v.clone())).collect()
            } else {
                received.iter().filter_map(|&k| live.get(k).map(|v| (k, v.clone()))).collect()
            }
        };
        // Copied once the requests held for the moved keys are released (`after_release`):
        // they wait for the merge above, not for the copy, which was most of a join's
        // after-migration phase (BENCHMARKS.md, stop 49).
        let copying = to.map(|to| Copying { epoch: change.epoch, to, entries: all, missed });
        *self.copying.lock().expect("copying") = copying;
    }

    async fn after_release(&self, ctx: &Context, change: &ChangeInfo) {
        let copying = self.copying.lock().expect("copying").take();
        let Some(Copying { epoch, to, entries, missed }) = copying else { return };
        if epoch != change.epoch {
            return;
        }
        // The backup may have changed with the configuration. Until it holds them, the copies
        // the senders kept are the only others, and a leaver takes its own away once this
        // node reports the change done: so the change waits for them, unless the cluster gives
        // up on the backup (its recovery copies them on again) or on this node. A backup cut
        // off from this node alone is never given up on: after `REPLICA_PATIENCE` the change
        // goes on, and the entries have one copy until they are next written. Writes served
        // meanwhile copy themselves, and the backup keeps the newer version of an entry
        // whichever copy comes first.
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(10);
        while !self.replicate(ctx, entries.clone()).await {
            if ctx.gone(to) || ctx.gone(ctx.node()) || started.elapsed() >= REPLICA_PATIENCE {
                tracing::warn!(backup = to.0, "kvdir: entries left without a replica until they are next written, or the next change copies every entry: their backup did not take them");
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        let last = {
            let mut replicated = self.replicated.lock().expect("replicated");
            if replicated.missed == missed {
                replicated.to = Some(to);
            }
            replicated.last.replace(to)
        };
        // Even if a write's copy failed meanwhile: that write was not acknowledged.
        self.say_copied(ctx, to, change.epoch).await;
        self.tell_to_forget(ctx, change, to, last).await;
    }

    /// Slots, not entries: a slot no survivor vouched for may have lost any of its entries,
    /// or none (see [`KvDir::slots_lost`]).
    fn reported_lost(&self) -> u64 {
        self.slots_lost()
    }

    /// Every slot is marked as having lost entries: a key read answers `Lost`, not "no
    /// value", until written again or forgiven.
    async fn restarted_alone(&self, ctx: &Context) {
        let spec = KvDir::declaration();
        let marker = Versioned { version: marker_version(ctx.epoch(), false), value: Bytes::new() };
        let markers = (0..spec.slots).map(|slot| (marker_key(&spec, slot), marker.clone()));
        self.live.lock().expect("live").merge(markers);
        self.slots_lost.fetch_add(u64::from(spec.slots), Ordering::Relaxed);
        tracing::error!(
            slots = spec.slots,
            "kvdir: this node came back as the only node of its cluster, its entries gone with its last life: every key reads Lost until written again. Write again the keys that matter from outside the cluster; `gobelins kv forgive KEY` makes the keys of KEY's slot (one of {}) that are not written again read as absent, `gobelins kv forgive --all` those of every slot",
            spec.slots
        );
    }

    async fn scan(&self, ctx: &Context, failed: NodeId, orphans: &Moving) -> Vec<(Key, Versioned)> {
        let mine: Vec<u32> = orphans.slots_to(ctx.node()).collect();
        if let (Some(table), false) = (ctx.shared_snapshot(), mine.is_empty()) {
            self.ledger.lock().expect("ledger").rebuild(failed, table, mine);
        }
        let mut found = BySlot::new(KvDir::declaration());
        {
            // Locked in the order `stable` locks them, so that neither waits on the other.
            let sent = self.sent.lock().expect("sent");
            found.merge(self.replicas.lock().expect("replicas").copies(orphans.slots()));
            found.merge(
                sent.iter()
                    .filter(|(k, _)| orphans.destination(*k).is_some())
                    .map(|(k, v)| (*k, v.clone())),
            );
        }
        // Once found: each word says how many entries of its slots follow. Said in
        // `before_migration`, which is told what last moved of the failed node's, and runs
        // before any batch goes.
        let entries = (orphans.slots())
            .map(|s| (s, found.slot_len(s) as u64))
            .filter(|&(_, n)| n > 0)
            .collect();
        *self.scanned.lock().expect("scanned") =
            Some(Scanned { failed, orphans: orphans.clone(), entries });
        found.take(orphans.slots())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_locator::{CellTree, Epoch, Labels, TreeConfig};
    use std::sync::Arc;

    /// Nodes 1 to `n` in one cell, at `epoch`.
    fn table(n: u64, epoch: u64) -> Arc<Snapshot> {
        let nodes: Vec<u64> = (1..=n).collect();
        table_of(&nodes, epoch)
    }

    /// `nodes`, added in this order to one cell, at `epoch`.
    pub(crate) fn table_of(nodes: &[u64], epoch: u64) -> Arc<Snapshot> {
        let mut tree = CellTree::new(TreeConfig::default()).expect("default config");
        tree.register_service(KvDir::declaration()).expect("register");
        for &i in nodes {
            tree.add_node(NodeId(i), Labels::new()).expect("add");
        }
        Arc::new(tree.snapshot(Epoch(epoch)).expect("non-empty"))
    }

    fn copies_of(table: &Snapshot, manager: NodeId) -> Vec<(Key, Versioned)> {
        (0..2_000)
            .map(Key)
            .filter(|&k| table.locate(KVDIR, k) == Some(manager))
            .map(|k| (k, Versioned { version: 1, value: Bytes::from_static(b"v") }))
            .collect()
    }

    #[test]
    fn copies_go_in_messages_cut_by_bytes_as_well_as_by_count() {
        let entry = |n: usize| Versioned { version: 1, value: Bytes::from(vec![0u8; n]) };
        let big: Vec<(Key, Versioned)> = (0..5_000).map(|k| (Key(k), entry(4096))).collect();
        let cut: Vec<usize> = chunks(&big).map(<[_]>::len).collect();
        assert_eq!(cut.iter().sum::<usize>(), 5_000, "every entry travels");
        assert!(cut.iter().all(|&n| n * 4096 <= REPLICATE_BYTES), "{cut:?}");
        let small: Vec<(Key, Versioned)> = (0..5_000).map(|k| (Key(k), entry(8))).collect();
        let cut: Vec<usize> = chunks(&small).map(<[_]>::len).collect();
        assert_eq!(cut, vec![REPLICATE_CHUNK, 5_000 - REPLICATE_CHUNK], "by count");
        let huge = vec![(Key(1), entry(REPLICATE_BYTES + 1)), (Key(2), entry(1))];
        let cut: Vec<usize> = chunks(&huge).map(<[_]>::len).collect();
        assert_eq!(cut, vec![1, 1], "a value larger than a message goes alone");
    }

    /// A word whose call fails is asked again, with growing pauses, until it is kept, until
    /// there is no one to ask, or until its patience runs out, with the last error.
    #[tokio::test(start_paused = true)]
    async fn a_word_is_asked_again_until_kept_gone_or_out_of_patience() {
        use std::cell::Cell;
        let tries = Cell::new(0u32);
        let failing_twice = |_left| {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move {
                if n <= 2 {
                    Err(format!("closed {n}"))
                } else {
                    Ok(())
                }
            }
        };
        let start = tokio::time::Instant::now();
        assert_eq!(again_until(WORD_PATIENCE, || false, failing_twice).await, Ok(()));
        assert_eq!((tries.get(), start.elapsed()), (3, Duration::from_millis(30)), "10 + 20 ms");

        let lefts = std::cell::RefCell::new(Vec::new());
        let never = |left: Duration| {
            lefts.borrow_mut().push(left);
            let n = lefts.borrow().len();
            async move { Err(format!("closed {n}")) }
        };
        let start = tokio::time::Instant::now();
        let last = again_until(WORD_PATIENCE, || false, never).await;
        assert_eq!(last, Err("closed 14".to_string()), "the last try's error");
        assert!(start.elapsed() <= WORD_PATIENCE, "{:?}", start.elapsed());
        // Tries at 0, 10, 30, 70, 150 and 310 ms, then every 200 ms until 1,910 ms, each
        // given the patience left.
        let lefts = lefts.into_inner();
        assert_eq!(lefts.len(), 14);
        assert_eq!(lefts[0], WORD_PATIENCE);
        assert_eq!(lefts[5], Duration::from_millis(2000 - 310));
        assert_eq!(lefts[13], Duration::from_millis(2000 - 1910));

        let tries = Cell::new(0u32);
        let gone = |_left| {
            tries.set(tries.get() + 1);
            async { Err("closed".to_string()) }
        };
        assert!(again_until(WORD_PATIENCE, || true, gone).await.is_err());
        assert_eq!(tries.get(), 1, "no one left to ask");
    }

    #[tokio::test]
    async fn a_value_too_large_to_migrate_is_refused_and_nothing_is_stored() {
        let kv = KvDir::new();
        let ctx = Context::detached(NodeId(1), 5, Some(table(1, 5)));
        let put = Request::Put(vec![0; MAX_VALUE + 1]);
        let refused = kv.handle(&ctx, Key(3), put).await;
        assert_eq!(refused, Response::TooLarge { max: MAX_VALUE as u64 });
        assert_eq!((kv.managed(), kv.version_of(Key(3))), (0, None));
        let stored = kv.handle(&ctx, Key(3), Request::Put(vec![0; MAX_VALUE])).await;
        assert_eq!(stored, Response::Stored { version: 1 });
    }

    /// Node 1 holds copies of what node 2 manages, though it is not node 2's backup (node 3
    /// is). A `Forget` from node 2 drops them at the epoch it names; not at another, and not
    /// once copies from a later epoch have come: the message was delayed, and those may be
    /// copies this node must keep, sent by a manager whose table this node has not installed.
    #[tokio::test]
    async fn copies_are_forgotten_only_at_the_epoch_named_and_not_after_later_copies() {
        let at_5 = table(3, 5);
        assert_eq!(backup(&at_5, NodeId(2)), Some(NodeId(3)));
        let kv = KvDir::new();
        let ctx = |epoch: u64| Context::detached(NodeId(1), epoch, Some(table(3, epoch)));
        let copies = |epoch| Request::Replicate { epoch, entries: copies_of(&at_5, NodeId(2)) };
        let held = copies_of(&at_5, NodeId(2)).len();
        assert!(held > 0);

        kv.handle(&ctx(5).told_by(NodeId(2)), Key(0), copies(5)).await;
        kv.handle(&ctx(6).told_by(NodeId(2)), Key(0), Request::Forget { epoch: 5 }).await;
        assert_eq!(kv.replicas(), held, "a table at another epoch is not the one meant");

        kv.handle(&ctx(5).told_by(NodeId(2)), Key(0), copies(6)).await;
        kv.handle(&ctx(5).told_by(NodeId(2)), Key(0), Request::Forget { epoch: 5 }).await;
        assert_eq!(kv.replicas(), held, "copies from a later epoch came before the message");

        let kv = KvDir::new();
        kv.handle(&ctx(5).told_by(NodeId(2)), Key(0), copies(5)).await;
        kv.handle(&ctx(5).told_by(NodeId(3)), Key(0), Request::Forget { epoch: 5 }).await;
        assert_eq!(kv.replicas(), held, "node 3 manages none of them");
        kv.handle(&ctx(5).told_by(NodeId(2)), Key(0), Request::Forget { epoch: 5 }).await;
        assert_eq!(kv.replicas(), 0, "forgotten");
    }
}
