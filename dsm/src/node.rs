//! One node's DSM: the frames it holds and the directory entries it manages, shared by the
//! service the adaptation layer calls and the [`crate::Dsm`] clients on the node.

use crate::frames::Frames;
use crate::freed::Freed;
use crate::protocol::{BarrierEntry, Entry, LockEntry, PageEntry, Token};
use crate::service::DsmService;
use dashmap::DashMap;
// Keys come from authenticated peers only; std's SipHash cost more than the maps' other work.
use foldhash::fast::RandomState as Hasher;
use gobelins_adaptation::ChangeInfo;
use gobelins_locator::{Key, ServiceId, ServiceSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Mutex as AsyncMutex, Notify};

/// The DSM's service id.
pub const DSM: ServiceId = ServiceId(1);

/// Slots of the DSM's directory.
pub const DSM_SLOTS: u32 = 4096;

/// How a node's DSM behaves.
#[derive(Clone, Debug)]
pub struct DsmConfig {
    /// Keep a backup copy of every page written on a second node (ICARE), so that a single
    /// failure loses no page, and give pages new backups after each change, so that failures
    /// one after another lose none either. Costs a round trip per commit, and one per page left
    /// without a backup by a change.
    pub backups: bool,
    /// How long a manager waits for a page's holder to hand it over before telling the
    /// faulting node to ask again.
    pub fetch_wait: Duration,
    /// How long an access keeps asking before it fails with [`crate::DsmError::Stuck`].
    pub access_deadline: Duration,
    /// How long a barrier waits for the other nodes, and a lock for its holder, before it
    /// fails with [`crate::DsmError::WaitedTooLong`]; `None` (the default): as long as it
    /// takes, as a program's phases may be long, with a line in the log every minute of it (a
    /// node that failed never arrives). An unreachable manager still fails the wait at the
    /// adaptation layer's request deadline.
    pub wait_deadline: Option<Duration>,
}

impl Default for DsmConfig {
    fn default() -> Self {
        DsmConfig {
            backups: false,
            fetch_wait: Duration::from_secs(1),
            access_deadline: Duration::from_secs(30),
            wait_deadline: None,
        }
    }
}

/// A directory entry as its manager keeps it.
#[derive(Debug)]
pub(crate) enum Live {
    Page(PageEntry),
    Lock(LockEntry),
    Barrier(BarrierEntry),
    /// The slot's manager died: see [`NodeState::freed`].
    Taint,
}

/// One node's DSM state. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct DsmNode {
    pub(crate) inner: Arc<NodeState>,
}

pub(crate) struct NodeState {
    pub(crate) config: DsmConfig,
    pub(crate) spec: ServiceSpec,
    pub(crate) frames: Frames,
    /// The entries this node manages.
    pub(crate) live: DashMap<Key, Arc<AsyncMutex<Live>>, Hasher>,
    /// Entries received during a change, merged when it ends.
    pub(crate) staged: Mutex<Vec<(Key, Entry)>>,
    /// Per taint marker this node holds (by its key), the segments freed since the slot's
    /// manager died: their pages read as zeros there. Beside the markers, not in them, so that
    /// a fault reads it without waiting for a marker a change holds.
    pub(crate) freed: Mutex<HashMap<Key, Freed>>,
    /// Held, shared, while a page's entry is made from its slot's taint; taken alone, empty,
    /// by `forgive` once the taint is gone, to wait for those being made: an entry made lost
    /// as the taint was lifted, after `forgive` looked for such entries, read as lost for
    /// good.
    pub(crate) minting: std::sync::RwLock<()>,
    /// Wakes arrivals waiting at a barrier this node manages.
    pub(crate) barriers: DashMap<Key, Arc<Notify>, Hasher>,
    /// The change in progress.
    pub(crate) change: Mutex<Option<ChangeInfo>>,
    /// Nodes whose failure the cluster confirmed (until their id comes back as a new life).
    pub(crate) failed: Mutex<crate::failed::Failed>,
    /// Locks this node's clients hold, for a rebuilding manager.
    pub(crate) held: Mutex<BTreeMap<u64, Token>>,
    /// Barriers this node's clients wait at: id → generation.
    pub(crate) waiting: Mutex<BTreeMap<u64, u64>>,
    /// Generations passed, per barrier, by this node's clients.
    pub(crate) generations: Mutex<BTreeMap<u64, u64>>,
    pub(crate) seq: std::sync::atomic::AtomicU64,
    /// Probable owners: where this node last learned each page lives.
    pub(crate) hints: DashMap<crate::page::PageId, gobelins_locator::NodeId, Hasher>,
    /// Read faults answered by the hinted owner, and hints found stale.
    pub(crate) hinted: AtomicU64,
    pub(crate) stale: AtomicU64,
    /// Pages this node, as their manager, found lost (each time one became so): what
    /// `reported_lost` says.
    pub(crate) lost: AtomicU64,
    /// Lines about pages found lost in a slot whose manager died: a program reading many such
    /// pages would log one each.
    pub(crate) lost_lines: Mutex<gobelins_adaptation::log_budget::LogBudget>,
    /// Lines about pages a leaving node left on another node, their manager silent: one per
    /// page flooded the log when a manager died during a leave (a helper's run: 28 lines for
    /// 240 pages).
    pub(crate) left_lines: Mutex<gobelins_adaptation::log_budget::LogBudget>,
    /// This node is being evicted: no more writes, no more direct reads.
    pub(crate) leaving: std::sync::atomic::AtomicBool,
    /// Held shared by each write fault in flight, from before it is sent until its grant is
    /// installed; an evicted node takes it exclusively to let them land before it hands its
    /// pages over.
    pub(crate) faults: tokio::sync::RwLock<()>,
    /// Pages the last change's sweep found without a live backup, with that change's epoch:
    /// given a new one in `after_release`, once the faults the change held are released.
    pub(crate) exposed: Mutex<Option<(u64, Vec<crate::service::Exposed>)>>,
    /// This node's word to its replica holder for the slots it manages (`crate::cover`).
    /// Held across the round trip that gives or takes it back, so that the two never cross.
    pub(crate) word: AsyncMutex<Word>,
    /// Counts entries found not kept elsewhere: a word being given is not sent if this moved
    /// meanwhile, as one of them may have been checked before it changed.
    pub(crate) exposures: AtomicU64,
    /// A forgive lifted a slot's taint, which the word left out: it is given again soon, not
    /// at the next of its pauses (up to 30 s), during which a failure of this node tainted
    /// the slot anew.
    pub(crate) word_wanted: tokio::sync::Notify,
    /// The latest stable epoch whose keeper gives this node's word (`keep_word`).
    pub(crate) keeping: AtomicU64,
    /// The last change this node carried out to its end (`after_release`): only its stable
    /// epoch gives a word, not one whose part here was cut short.
    pub(crate) finished: AtomicU64,
    /// The last change this node began (`before_migration`). A later stable epoch is one it
    /// took no part in: it gives a word there too, if it finished the last it began.
    pub(crate) began: AtomicU64,
    /// As a replica holder: each node's word.
    pub(crate) vouches: Mutex<HashMap<gobelins_locator::NodeId, crate::cover::Vouch>>,
    /// As a manager: owners that did not answer a request to move their backup off a leaving
    /// node, and when. A leave sends one such request per page, and an owner stopped or dead
    /// would cost each of them a call timeout in turn.
    pub(crate) unanswering: Mutex<HashMap<gobelins_locator::NodeId, tokio::time::Instant>>,
}

/// This node's word to its replica holder.
pub(crate) struct Word {
    /// The last message's number. Starts from the clock, so that a new life's words come after
    /// the last life's at a holder that still keeps one.
    pub(crate) seq: u64,
    /// The holder the word was last sent to, from the moment it is sent (its answer may be
    /// lost after it took the word), until the word is taken back.
    pub(crate) holder: Option<gobelins_locator::NodeId>,
    /// The epoch of the last word sent: a word for an older one, late, is not sent.
    pub(crate) epoch: u64,
    /// The slots the word leaves out: a page of theirs may have no copy elsewhere already.
    pub(crate) unclean: std::collections::BTreeSet<u32>,
    /// Of those, the slots that have a taint of their own: they stay left out whatever this
    /// node's pages do, so a word given again would leave them out again.
    pub(crate) tainted: std::collections::BTreeSet<u32>,
    /// The holder answered that it took this very word. Until then it may hold an earlier
    /// word of the same epoch, which may vouch for slots this one leaves out: only a
    /// confirmed word spares a slot it leaves out the taking back.
    pub(crate) confirmed: bool,
}

impl Word {
    /// Whether a word is to be given at `epoch`: none was yet, or the last was taken back,
    /// left slots out that a later look may find clean, or was not answered (words are given
    /// again at one epoch while so).
    pub(crate) fn stale(&self, epoch: u64) -> bool {
        self.epoch < epoch
            || self.holder.is_none()
            || !self.unclean.is_subset(&self.tainted)
            || !self.confirmed
    }

    /// Whether the holder has this word, and it leaves `slot` out: a page of that slot left
    /// with no copy elsewhere needs no taking back. A word not confirmed may have left there
    /// an earlier one of the same epoch, which vouches for `slot`.
    pub(crate) fn leaves_out(&self, slot: u32) -> bool {
        self.confirmed && self.unclean.contains(&slot)
    }
}

/// Nanoseconds since the epoch, where a node's words start counting.
fn clock_seq() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
}

/// How this node's read faults went: straight to the probable owner, or by way of the manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Read faults the hinted owner answered: one round trip, no manager.
    pub hinted: u64,
    /// Hints that were stale (the node no longer owned the page): the manager answered.
    pub stale: u64,
}

impl DsmNode {
    /// A node's DSM with nothing in it.
    pub fn new(config: DsmConfig) -> Self {
        DsmNode {
            inner: Arc::new(NodeState {
                config,
                spec: DsmNode::declaration(),
                frames: Frames::default(),
                live: DashMap::default(),
                staged: Mutex::new(Vec::new()),
                freed: Mutex::default(),
                minting: std::sync::RwLock::default(),
                barriers: DashMap::default(),
                change: Mutex::new(None),
                exposed: Mutex::new(None),
                failed: Mutex::new(Default::default()),
                held: Mutex::new(BTreeMap::new()),
                waiting: Mutex::new(BTreeMap::new()),
                generations: Mutex::new(BTreeMap::new()),
                seq: std::sync::atomic::AtomicU64::new(0),
                hints: DashMap::default(),
                hinted: AtomicU64::new(0),
                stale: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                lost_lines: gobelins_adaptation::log_budget::noisy(),
                left_lines: gobelins_adaptation::log_budget::noisy(),
                leaving: std::sync::atomic::AtomicBool::new(false),
                faults: tokio::sync::RwLock::new(()),
                word: AsyncMutex::new(Word {
                    seq: clock_seq(),
                    holder: None,
                    epoch: 0,
                    unclean: Default::default(),
                    tainted: Default::default(),
                    confirmed: false,
                }),
                finished: AtomicU64::new(0),
                began: AtomicU64::new(0),
                exposures: AtomicU64::new(0),
                word_wanted: tokio::sync::Notify::new(),
                keeping: AtomicU64::new(0),
                vouches: Mutex::default(),
                unanswering: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The declaration every node registers: keys placed by runs of one, so that a key's low
    /// bits are its slot; page keys spread a segment's pages over the slots (see the key
    /// layout in `page.rs`).
    pub fn declaration() -> ServiceSpec {
        ServiceSpec::new(DSM, "dsm").with_slots(DSM_SLOTS).with_runs(1)
    }

    /// The plug-in to register with the adaptation layer.
    pub fn service(&self) -> DsmService {
        DsmService { node: self.clone() }
    }

    /// Directory entries this node manages.
    pub fn managed(&self) -> usize {
        self.inner.live.len()
    }

    /// How this node's read faults used probable-owner hints so far.
    pub fn fault_stats(&self) -> FaultStats {
        FaultStats {
            hinted: self.inner.hinted.load(Ordering::Relaxed),
            stale: self.inner.stale.load(Ordering::Relaxed),
        }
    }

    /// Ranges of freed segment ids this node keeps, over the markers of the slots it manages
    /// whose manager died: what frees after a failure cost in memory.
    pub fn freed_ranges(&self) -> usize {
        self.inner.freed.lock().expect("freed").values().map(Freed::ranges).sum()
    }

    /// Pages whose copy this node gave up to a writer and still keeps aside, until the writer
    /// says it has the page.
    pub fn kept_aside(&self) -> usize {
        self.inner.frames.all().iter().filter(|(_, f)| f.has_retired()).count()
    }

    /// Pages a leaving node left here because their manager did not answer it, not yet handed
    /// on to that manager nor found by its recovery.
    pub fn fostered(&self) -> usize {
        self.inner.frames.all().iter().filter(|(_, f)| f.lock().fostered.is_some()).count()
    }

    /// Directory entries this node manages: pages, locks, barriers, and markers of slots
    /// whose manager died.
    pub fn entries(&self) -> usize {
        self.inner.live.len()
    }

    /// Barriers this node keeps a wake-up for: those it manages and has seen a node arrive
    /// at.
    pub fn barrier_wakeups(&self) -> usize {
        self.inner.barriers.len()
    }

    /// The node this node last gave its word to, that every page of the slots it manages has
    /// a copy elsewhere, and the epoch of that word; `None` once taken back, or while it is
    /// being given or taken back. With backups on, a failure of this node then leaves the
    /// slots it vouched for with no page lost (see `cover.rs`).
    pub fn word(&self) -> Option<(gobelins_locator::NodeId, u64)> {
        let word = self.inner.word.try_lock().ok()?;
        word.holder.map(|h| (h, word.epoch))
    }

    /// Pages this node holds a valid copy of.
    pub fn resident(&self) -> usize {
        self.inner.frames.all().iter().filter(|(_, f)| f.readable().is_some()).count()
    }
}
