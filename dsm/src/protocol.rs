//! What nodes say to page managers and to each other, and the entries that migrate.

use crate::freed::Freed;
use crate::page::{PageId, PAGE_SIZE};
use gobelins_locator::NodeId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A page's bytes in a message. Shared with the frame that holds the page, so that sending one
/// copies it only into the message being encoded (as a `ByteBuf` it was copied once more
/// first, into a buffer of its own). Read from a message, its size is checked before anything
/// is allocated, and its bytes are copied once: a peer's page of another size would otherwise
/// be installed, and a later access past its end would panic on every reader.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBytes(Arc<Vec<u8>>);

impl PageBytes {
    /// The bytes, as frames hold them.
    pub(crate) fn shared(data: &Arc<Vec<u8>>) -> PageBytes {
        PageBytes(Arc::clone(data))
    }

    /// The bytes, to be held by a frame.
    pub(crate) fn into_shared(self) -> Arc<Vec<u8>> {
        self.0
    }
}

impl From<Vec<u8>> for PageBytes {
    fn from(bytes: Vec<u8>) -> PageBytes {
        PageBytes(Arc::new(bytes))
    }
}

impl std::ops::Deref for PageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// The length, not 4,096 numbers: a response is printed whole in a protocol error.
impl std::fmt::Debug for PageBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBytes({} bytes)", self.0.len())
    }
}

impl Serialize for PageBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PageBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PageBytes, D::Error> {
        // `deserialize_bytes`: bincode lends the bytes where they lie. Asked for a buffer of
        // its own, it zero-fills one before copying into it, about 1,400 instructions a page.
        d.deserialize_bytes(PageVisitor)
    }
}

struct PageVisitor;

impl PageVisitor {
    fn checked<E: serde::de::Error>(len: usize) -> Result<(), E> {
        if len == PAGE_SIZE {
            Ok(())
        } else {
            Err(E::custom(format!("a page of {len} bytes, not {PAGE_SIZE}")))
        }
    }
}

impl<'de> serde::de::Visitor<'de> for PageVisitor {
    type Value = PageBytes;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a page of {PAGE_SIZE} bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<PageBytes, E> {
        Self::checked(bytes.len())?;
        Ok(PageBytes::from(bytes.to_vec()))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<PageBytes, E> {
        Self::checked(bytes.len())?;
        Ok(PageBytes::from(bytes))
    }
}

/// Who holds a lock: a node and the number it drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The holding node; its failure frees the lock.
    pub node: NodeId,
    /// Unique on that node.
    pub seq: u64,
}

/// A request: to a page's (or lock's, or barrier's) manager, or to a node's local server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// To the manager: `node` wants a read copy.
    ReadFault {
        /// The reader.
        node: NodeId,
    },
    /// To the manager: `node` wants to write.
    WriteFault {
        /// The writer.
        node: NodeId,
        /// The version of the copy the writer holds, if any. An entry that names the writer as
        /// owner of a version it does not hold records a grant whose answer never reached it.
        have: Option<u64>,
        /// The newest version the writer refused a grant of (it had told a manager it lacked
        /// it, and the manager may have taken it back): the grant must be newer.
        refused: u64,
    },
    /// To the manager: an evicted owner hands over its page. `Ok` when the manager took it,
    /// `Missing` when its entry no longer names the sender as owner at that version.
    Surrender {
        /// The leaving owner.
        node: NodeId,
        /// The version it owns.
        version: u64,
        /// The page.
        data: PageBytes,
        /// Readers it served directly, which the manager did not know of.
        readers: BTreeSet<NodeId>,
    },
    /// To the manager: the owner could not reach its backup; choose another and store this
    /// content there.
    Rebackup {
        /// The owner.
        node: NodeId,
        /// Its version.
        version: u64,
        /// The commit whose content this is.
        commit: u64,
        /// The backup it could not reach.
        failed: NodeId,
        /// The content to back up.
        data: PageBytes,
    },
    /// To the manager: start a lost page afresh, zero-filled.
    Discard,
    /// To the manager of a slot's taint marker, from an operator who accepts what the slot's
    /// failed manager took with it: the slot's pages nobody reported read as zeros again, as
    /// never written, and so do those first asked for while it was tainted. `Kept` when the
    /// slot is not tainted.
    Forgive,
    /// To a lock's manager.
    Acquire(Token),
    /// To a lock's manager.
    Release(Token),
    /// To a barrier's manager: `participant` reached `generation` of a barrier of `parties`.
    Arrive {
        /// Who arrived.
        participant: u64,
        /// How many times it has passed this barrier before, plus one.
        generation: u64,
        /// How many participants the barrier waits for.
        parties: u32,
    },
    /// To a page's probable owner, from a reader that holds a hint: a read copy, if you
    /// still own the page (`Copy`), or `Missing` (the reader then asks the manager).
    Serve {
        /// The page.
        page: PageId,
        /// The reader.
        node: NodeId,
    },
    /// To a holder, from the manager: send your copy of `page` at `version`; keep a read
    /// copy (a reader faulted) or give it up to a writer, keeping it aside.
    Fetch {
        /// The page.
        page: PageId,
        /// The version the manager knows the holder has.
        version: u64,
        /// The writer the page is given up to; `None` keeps a read-only copy.
        writer: Option<NodeId>,
        /// With `writer`: the node the manager chose for that grant's backup, kept with the
        /// copy set aside. Should the writer die with its manager (one node writing a page it
        /// manages), that node reporting nothing newer in the recovery says the writer
        /// committed nothing (see `crate::directory::rebuild`).
        backup: Option<NodeId>,
    },
    /// To a copy holder, from the manager: drop copies of `page` at or below `version`; a
    /// node that stops being the page's backup drops its backup copy too.
    Invalidate {
        /// The page.
        page: PageId,
        /// The newest version to drop.
        version: u64,
        /// Drop the backup copy rather than the read copy.
        backup: bool,
        /// The node about to own the page: where to read it next (a hint).
        owner: Option<NodeId>,
    },
    /// To a reader, from a manager taking a grant back from an owner that lacks the page: make
    /// the read copy of `version` this node holds the page, owned, if it is still valid;
    /// `Missing` otherwise. Never a backup or a copy set aside, which may hold an older commit
    /// under the same label (see `Frame::adopt_read_copy`).
    Adopt {
        /// The page.
        page: PageId,
        /// The entry's version.
        version: u64,
    },
    /// To a backup node, from a manager whose page's owner died: make the backup the page,
    /// owned, at `version`.
    Promote {
        /// The page.
        page: PageId,
        /// The entry's version.
        version: u64,
        /// The label the copy must have: taking a grant back needs exactly the copy it took.
        /// `None` for a backup standing in for a dead owner, which holds the latest committed
        /// content whatever its label.
        label: Option<u64>,
    },
    /// To a page's previous owner, from the writer it gave the page up to: the grant landed,
    /// so the copy kept aside (at or below `version`) is no longer the page's last content.
    Retire {
        /// The page.
        page: PageId,
        /// The version the previous owner gave up.
        version: u64,
    },
    /// To a backup node, from the owner: keep this copy in case the owner fails.
    Backup {
        /// The page.
        page: PageId,
        /// The owner's version.
        version: u64,
        /// Which of the owner's commits at that version this is (see `FrameState::commits`).
        commit: u64,
        /// The page as last committed.
        data: PageBytes,
    },
    /// To the manager, from an evicted node: the copy it gave up to a writer and keeps aside
    /// until told the grant landed. `Ok` when the manager keeps it in its place (its entry still
    /// names the sender as where a grant of `label` took the page from, so that taking that
    /// grant back finds it), `Missing` when nothing needs it any more.
    KeepAside {
        /// The leaving node.
        node: NodeId,
        /// The version of the copy, as the grant named it.
        label: u64,
        /// The copy.
        data: PageBytes,
    },
    /// To every node, from [`crate::Dsm::free`]: drop every copy of the segment's pages and
    /// every entry managed for them, and count the segment freed in the slots whose manager
    /// died, so that its pages read as zeros there, not as lost. `Busy` while a change moves
    /// entries.
    Free {
        /// The segment.
        segment: u32,
    },
    /// To a page's manager, from a node leaving the cluster that keeps the page's backup:
    /// choose another backup before it goes. Always `Ok`.
    Abandon {
        /// The leaving node.
        node: NodeId,
        /// Its backup copy: the version, the owner's commit it holds, the page. Should the
        /// owner not answer (it may have died, and be declared so only after this leave), the
        /// manager stores it on the new backup node itself.
        copy: Option<(u64, u64, PageBytes)>,
    },
    /// To a page's owner, from its manager after a change left the page with no live backup
    /// (its backup's node died or is leaving, or the owner was promoted from its backup):
    /// store the page as last committed on `node`, and commit there from now on. `Ok` once
    /// done; `BackedUp(b)` when the owner already commits to a live backup `b` other than
    /// `replaces` (a commit found one meanwhile); `Busy` while a write is in progress (its
    /// commit finds a backup itself); `Missing` when it no longer owns the page at `version`.
    BackupTo {
        /// The page.
        page: PageId,
        /// The entry's version.
        version: u64,
        /// The new backup node.
        node: NodeId,
        /// The backup the manager's entry names, which is gone, leaving, or the owner itself.
        replaces: Option<NodeId>,
    },
    /// To the sender's replica holder, once a change is stable: every page of the slots the
    /// sender manages, but `unclean`, has a copy on another live node (see `crate::cover`).
    /// `Ok`.
    Cover {
        /// The stable epoch the word is given at.
        epoch: u64,
        /// Orders the sender's words: an older one arriving late is ignored.
        seq: u64,
        /// The slots left out.
        unclean: Vec<u32>,
    },
    /// To the sender's replica holder: the sender takes back its last [`Request::Cover`].
    /// `Ok`.
    Uncover {
        /// Orders the sender's words.
        seq: u64,
    },
    /// To a live node, from a leaving owner (or backup) whose page's manager did not answer
    /// (it may have died, and its entry with it): keep the page as a backup, which that
    /// manager's recovery finds, and hand it to the manager on the leaver's behalf should it
    /// answer after all. `Ok` once kept.
    Foster {
        /// The page.
        page: PageId,
        /// The leaving node.
        leaver: NodeId,
        /// The version it owns, or keeps the backup of.
        version: u64,
        /// The page as last committed.
        data: PageBytes,
        /// Readers the leaver served directly, which the manager did not know of.
        readers: BTreeSet<NodeId>,
        /// `None` when the leaver owned the page (it is handed on as a [`Request::Surrender`]);
        /// the owner's commit the copy holds when the leaver kept the page's backup (handed
        /// on as a [`Request::Abandon`]).
        backup: Option<u64>,
    },
    /// To every node, from [`crate::Dsm::losses`]: the pages this node manages that are lost,
    /// and its tainted slots. `Busy` while a change moves entries.
    Losses,
    /// To a live node, from a leaving node that gave its page up to a writer and keeps the
    /// copy aside until the grant lands, when the page's manager did not take that copy (it
    /// may have died before the grant reached the writer): keep it aside as the leaver did,
    /// for that manager's recovery to find. `Ok` once kept.
    KeepRetired {
        /// The page.
        page: PageId,
        /// The node whose grant it is, which the page's entry names: the leaver, or the
        /// leaver that left it on this leaver in turn.
        leaver: NodeId,
        /// The version given up.
        version: u64,
        /// The page as given up.
        data: PageBytes,
        /// The writer it was given up to.
        writer: Option<NodeId>,
        /// Where that writer's backup was to be kept.
        backup: Option<NodeId>,
    },
}

/// The answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    /// A read copy. `data` is `None` for a page never written (all zeros).
    Copy {
        /// The page's version.
        version: u64,
        /// The page, unless zero.
        data: Option<PageBytes>,
        /// Its owner: where to read it next time (a hint).
        owner: Option<NodeId>,
    },
    /// Write access at `version`. `data` is `None` when the writer's copy is already current
    /// (or the page was never written and `zero` is set).
    Grant {
        /// The new version.
        version: u64,
        /// The page, when the writer lacks it.
        data: Option<PageBytes>,
        /// The page was never written: start from zeros.
        zero: bool,
        /// Where the owner keeps its backup copy, when backups are on.
        backup: Option<NodeId>,
        /// The owner the page was taken from, which keeps it aside until told the grant landed.
        previous: Option<NodeId>,
    },
    /// The new backup, which holds the content.
    BackedUp(NodeId),
    /// Every copy of the page was lost.
    Lost,
    /// The manager could not reach the page's holder this time; ask again.
    Retry,
    /// A fetched page.
    Page(PageBytes),
    /// The holder no longer has (or never had) that version.
    Missing,
    /// Done.
    Ok,
    /// The lock is yours.
    Granted,
    /// The lock is held by someone else.
    Busy,
    /// Everyone reached the barrier.
    Passed,
    /// Still waiting for others: arrive again.
    Waiting,
    /// The request does not fit the key it was sent to.
    Invalid(String),
    /// To a write fault: the writer is no longer in the cluster (it was being evicted).
    Departed,
    /// To a discard: the page was not lost, and keeps its contents. To a forgive: the slot
    /// was not tainted.
    Kept,
    /// To [`Request::Forgive`]: the slot's taint is lifted, and `reset` pages first asked for
    /// while it lasted, reported lost then, read as zeros again.
    Forgiven {
        /// How many such pages.
        reset: u64,
    },
    /// To [`Request::Losses`]: what this node, as a manager, holds as lost.
    Losses(crate::losses::NodeLosses),
}

/// A page's directory entry: the manager's knowledge of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageEntry {
    /// The node that wrote it last and answers for it; `None` if never written.
    pub owner: Option<NodeId>,
    /// Nodes holding a valid read copy at `version` (the owner among them once it shares).
    pub copyset: BTreeSet<NodeId>,
    /// Grows with every write grant.
    pub version: u64,
    /// Where the owner keeps its backup copy.
    pub backup: Option<NodeId>,
    /// Every copy died.
    pub lost: bool,
    /// The owner failed, or the entry was rebuilt: readers it served directly may still hold
    /// copies nobody knows of, so the next write invalidates every node.
    #[serde(default)]
    pub strays: bool,
    /// Where `version`'s content was before the grant that made `owner` its owner: what the
    /// manager takes back when that grant never reached the writer.
    #[serde(default)]
    pub granted: Granted,
}

/// Where a write grant took the page's content from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granted {
    /// Not known: the entry was rebuilt or never granted.
    #[default]
    Unknown,
    /// The page had never been written: zeros.
    Zero,
    /// This node's copy: the previous owner, which keeps it aside until the writer says the
    /// grant landed, or the writer itself, which already held it.
    From {
        /// The node.
        node: NodeId,
        /// Its copy's version.
        label: u64,
    },
    /// As `From`, and the owner has said it does not hold the version it was granted (the
    /// grant never reached it, and it refuses it now): the content is still at `node`. Kept
    /// while taking the grant back has not finished (a node did not answer), so that the owner
    /// leaving or failing meanwhile takes nothing with it.
    Disowned {
        /// The node.
        node: NodeId,
        /// Its copy's version.
        label: u64,
    },
}

impl Granted {
    /// The same record with `to` in place of `from`, when it says that a grant of `label`
    /// took the page from `from`: the copy kept aside for it moved to `to`.
    pub(crate) fn relocated(self, from: NodeId, label: u64, to: NodeId) -> Option<Granted> {
        match self {
            Granted::From { node, label: l } if node == from && l == label => {
                Some(Granted::From { node: to, label })
            }
            Granted::Disowned { node, label: l } if node == from && l == label => {
                Some(Granted::Disowned { node: to, label })
            }
            _ => None,
        }
    }

    /// The node a grant took the page from, and that copy's version.
    pub(crate) fn source(self) -> Option<(NodeId, u64)> {
        match self {
            Granted::From { node, label } | Granted::Disowned { node, label } => {
                Some((node, label))
            }
            _ => None,
        }
    }
}

/// A lock's entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    /// Who holds it.
    pub holder: Option<Token>,
}

/// A barrier's entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierEntry {
    /// Generations up to this one have passed.
    pub passed: u64,
    /// Who reached each generation not yet passed.
    pub arrived: BTreeMap<u64, BTreeSet<u64>>,
}

/// What travels from an old manager to a new one, or from a survivor to a rebuilding manager.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Entry {
    /// A page's entry; `frame` carries the page itself when its owner is the evicted sender.
    Page {
        /// The entry.
        entry: PageEntry,
        /// The page, handed over with its entry.
        frame: Option<PageBytes>,
        /// The copy the evicted sender gave up to a writer and keeps aside, with its version,
        /// when the entry's grant took the page from the sender: the new manager keeps it.
        aside: Option<(u64, PageBytes)>,
    },
    /// A survivor's copy of a page whose manager died, for `scan`.
    Copy(crate::directory::Report),
    /// A lock's entry.
    Lock(LockEntry),
    /// A barrier's entry.
    Barrier(BarrierEntry),
    /// The slot's manager died: pages of the slot with no entry were lost, except those of
    /// the segments freed since (`freed`), which read as zeros.
    Taint {
        /// The segments freed since the manager died.
        freed: Freed,
    },
    /// The dead manager's last word for the slot that one of its replica holders had, passed
    /// on by that holder (see `crate::cover`).
    Covered {
        /// The word's place among the manager's words and take-backs: the latest counts.
        seq: u64,
        /// The epoch it vouched for the slot at; `None` if it left the slot out, or was
        /// taken back.
        epoch: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_adaptation::codec;

    #[test]
    fn a_page_of_any_other_length_than_a_page_is_refused_as_it_is_read() {
        let page = PageId { segment: 1, page: 2 };
        let backup = |len| Request::Backup {
            page,
            version: 3,
            commit: 1,
            data: PageBytes::from(vec![7; len]),
        };
        let bytes = codec::encode(&backup(PAGE_SIZE)).expect("encode");
        let Ok(Request::Backup { data, .. }) = codec::decode::<Request>(&bytes) else {
            panic!("a whole page refused")
        };
        assert_eq!(&data[..], &[7; PAGE_SIZE][..]);
        // Laid out as a byte string was before (a length, then the bytes), which is how
        // bincode lays out a vector of bytes.
        let page = vec![9u8; PAGE_SIZE];
        assert_eq!(
            codec::encode(&PageBytes::from(page.clone())).expect("encode"),
            codec::encode(&page).expect("encode")
        );
        for len in [0, 100, PAGE_SIZE - 1, PAGE_SIZE + 1] {
            let bytes = codec::encode(&backup(len)).expect("encode");
            assert!(codec::decode::<Request>(&bytes).is_err(), "{len} bytes");
            let copy = Response::Copy {
                version: 1,
                data: Some(PageBytes::from(vec![0; len])),
                owner: None,
            };
            let bytes = codec::encode(&copy).expect("encode");
            assert!(codec::decode::<Response>(&bytes).is_err(), "a copy of {len} bytes");
            let entry = Entry::Page {
                entry: PageEntry::default(),
                frame: None,
                aside: Some((4, PageBytes::from(vec![0; len]))),
            };
            let bytes = codec::encode(&entry).expect("encode");
            assert!(codec::decode::<Entry>(&bytes).is_err(), "an entry's page of {len} bytes");
        }
        let zero = Response::Copy { version: 1, data: None, owner: None };
        assert!(codec::decode::<Response>(&codec::encode(&zero).expect("encode")).is_ok());
    }
}
