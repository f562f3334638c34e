//! Raft's log, vote and state machine, persisted in one redb file in the data directory.
//!
//! Tables: `logs` (index → encoded entry), `meta` (vote, committed, last purged, snapshot, the
//! store's owner and format). Every value is sealed with a checksum (`sealed`), and the store is
//! checked whole as it opens (`opening`). The state machine lives in memory and is rebuilt at
//! start from the last snapshot plus the log; a snapshot is written whenever openraft builds or
//! installs one.
//!
//! A durable write waits for the disk (redb syncs at every commit): on the agent's runtime it
//! runs on tokio's blocking threads, so that the node's requests, migrations, its leader's pings
//! and its failure detector go on meanwhile (see `crate::disk`).
//!
//! A node must restart from what is on disk: the stored snapshot, then the logs after it. Two
//! tasks write that pair: openraft's core purges logs, while the state machine's task installs a
//! received snapshot and a builder task stores a built one. openraft asks for the purge that an
//! install allows as soon as it hands the install over, so the store orders them itself: a
//! purge waits until a snapshot covering it is on disk (`Covered`; only a store that never
//! held nor received one purges without), and a snapshot never replaces a newer one (a build
//! that started before an install can end after it). The raft core waits out the install's write in that purge, and
//! handles nothing else meanwhile: that wait is also what keeps it from appending logs past a
//! snapshot that is not yet on disk.

// openraft fixes the error type of its storage traits; our helpers return the same one.
#![allow(clippy::result_large_err)]

use crate::state::ClusterState;
use crate::types::{Reply, TypeConfig};
use gobelins_adaptation::codec;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

mod opening;
mod sealed;
use opening::{check, quietly};
pub use opening::{claim, owner_of};
use sealed::{seal, unseal};

const LOGS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";
/// The stored snapshot's last log id, written with it: read to compare without decoding the
/// whole snapshot.
const SNAPSHOT_LAST: &str = "snapshot_last";
/// The cluster and node this store's raft state is of: see [`claim`].
const OWNER: &str = "owner";

/// How long a purge waits for the snapshot that covers it before it gives up: generous, as a
/// snapshot's write is one synced transaction. Giving up is an error that stops the raft node,
/// with the logs kept, rather than a core that waits forever.
const COVER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

type StorageResult<T> = Result<T, StorageError<u64>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write(&e).into()
}

fn codec_err(e: gobelins_adaptation::AdaptationError) -> StorageError<u64> {
    StorageIOError::read(&e).into()
}

/// Opens (or creates) the store in `path`, every write synced to disk before it is acknowledged.
pub fn open(path: &Path) -> Result<(LogStore, StateMachine), crate::SupervisorError> {
    open_with(path, true)
}

/// Opens the store; with `durable` false, writes reach the OS but are not synced (for
/// simulations only, where a crash cannot lose the page cache).
pub fn open_with(
    path: &Path,
    durable: bool,
) -> Result<(LogStore, StateMachine), crate::SupervisorError> {
    let db = Database::create(path).map_err(|e| {
        crate::SupervisorError::Storage(format!("opening {}: {e}; {}", path.display(), advice(&e)))
    })?;
    ready(db, durable, &path.display().to_string())
}

/// What to do about a store that does not open, by why: every failure said "is another agent
/// using this data directory?", a damaged file and a full disk included.
fn advice(error: &redb::DatabaseError) -> &'static str {
    use std::io::ErrorKind;
    match error {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            "another agent has it open: stop it first, or give this one another --data-dir"
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => match io.kind() {
            ErrorKind::WouldBlock => {
                "another agent has it open: stop it first, or give this one another --data-dir"
            }
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
                "the disk is full: free space, then start the agent again"
            }
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
                "the agent cannot write it: run it as the data directory's owner, on a \
                 writable filesystem"
            }
            _ => DAMAGED,
        },
        _ => DAMAGED,
    }
}

/// What to do about a raft store that is damaged.
const DAMAGED: &str = "the file may be damaged. Move this data directory aside (keep it: \
     the damaged store may be read later), then start the agent on an empty --data-dir with \
     --join ADDR (a member's address) and the cluster's --secret-file: it joins as a new node \
     (without --node-id), and the cluster declares this one failed and rebuilds its entries \
     from replicas";

/// Opens the store on one of redb's storage backends rather than a file: for tests that make
/// the disk fail under a running node.
pub fn open_on(
    backend: impl redb::StorageBackend,
    durable: bool,
) -> Result<(LogStore, StateMachine), crate::SupervisorError> {
    let db = Database::builder()
        .create_with_backend(backend)
        .map_err(|e| crate::SupervisorError::Storage(format!("opening the store: {e}")))?;
    ready(db, durable, "the store")
}

/// Makes sure the tables exist and loads the state machine.
fn ready(
    db: Database,
    durable: bool,
    what: &str,
) -> Result<(LogStore, StateMachine), crate::SupervisorError> {
    let db = Arc::new(db);
    // redb panics on some damaged pages (a key that is not UTF-8, an allocator's range out of
    // bounds) rather than returning an error: caught here, where the whole store is read
    // once, they are the damage they are, said with the file and what to do.
    let checked = quietly(|| check(&db, what)).unwrap_or_else(|| {
        Err(crate::SupervisorError::Storage(format!(
            "reading {what}: its pages hold what no store writes; {DAMAGED}"
        )))
    });
    checked?;
    uncommit_vote(&db, durable).map_err(|e| {
        crate::SupervisorError::Storage(format!(
            "rewriting {what}'s vote: {e}; if the disk is full or read-only, free space or \
             remount it, then start the agent again; otherwise {DAMAGED}"
        ))
    })?;
    // What it keeps opens but does not decode (or fails its checksum): said with the file and
    // what to do, not as a bare read error at every restart.
    let machine = StateMachine::load(Arc::clone(&db), durable).map_err(|e| {
        crate::SupervisorError::Storage(format!(
            "reading {what}: {e}; if a newer build of gobelins ran on this data directory, \
                 run that build again; otherwise {DAMAGED}"
        ))
    })?;
    let log = LogStore { db, durable, covered: machine.covered.subscribe() };
    Ok((log, machine))
}

/// Stores a committed vote as uncommitted, the same term and the same choice. openraft starts
/// a node whose stored vote is committed and its own as the leader of that term, with no
/// election: a data directory restored from a copy taken while its node led went on leading
/// that term beside what a later life of the node had written in it, and its entries parted
/// from the followers' at the same index (a helper's review). Uncommitted, a node that led
/// stands for election again, as every restarted node does, and its vote in that term stays
/// what it was: nothing it granted or refused changes.
///
/// Only its own vote: a follower's committed vote for its leader refuses other candidates for
/// the leader's lease after a restart, which the managers' leases count on.
fn uncommit_vote(db: &Database, durable: bool) -> StorageResult<()> {
    let Some(mut vote) = get_meta::<Vote<u64>>(db, VOTE)? else { return Ok(()) };
    let own = get_meta::<(String, u64)>(db, OWNER)?.map(|(_, node)| node);
    if !vote.is_committed() || own.is_none() || vote.leader_id().voted_for() != own {
        return Ok(());
    }
    vote.committed = false;
    let bytes = seal(&codec::encode(&vote).map_err(codec_err)?);
    let txn = begin_write(db, durable)?;
    txn.open_table(META).map_err(write_err)?.insert(VOTE, bytes.as_slice()).map_err(write_err)?;
    txn.commit().map_err(write_err)
}

fn get_meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> StorageResult<Option<T>> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(META).map_err(read_err)?;
    match table.get(key).map_err(read_err)? {
        Some(bytes) => Ok(Some(codec::decode(unseal(bytes.value())?).map_err(codec_err)?)),
        None => Ok(None),
    }
}

fn begin_write(db: &Database, durable: bool) -> StorageResult<redb::WriteTransaction> {
    let mut txn = db.begin_write().map_err(write_err)?;
    if !durable {
        txn.set_durability(redb::Durability::None).map_err(write_err)?;
    }
    Ok(txn)
}

/// Runs `work`, a write of `db`, off the runtime's workers when it is synced to disk (see the
/// module's doc); inline when it is not, since it does not wait for the disk then, and on a
/// current-thread runtime (see `crate::disk`).
async fn writing<T: Send + 'static>(
    db: &Arc<Database>,
    durable: bool,
    work: impl FnOnce(&Database) -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    if !durable {
        return work(db);
    }
    let db = Arc::clone(db);
    match crate::disk::on_disk(move || work(&db)).await {
        Ok(result) => result,
        Err(e) => {
            Err(write_err(std::io::Error::other(format!("a store write did not finish: {e}"))))
        }
    }
}

async fn put_meta<T: Serialize>(
    db: &Arc<Database>,
    durable: bool,
    key: &'static str,
    value: &T,
) -> StorageResult<()> {
    let bytes = seal(&codec::encode(value).map_err(codec_err)?);
    writing(db, durable, move |db| {
        let txn = begin_write(db, durable)?;
        {
            let mut table = txn.open_table(META).map_err(write_err)?;
            table.insert(key, bytes.as_slice()).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    })
    .await
}

/// The raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    durable: bool,
    covered: watch::Receiver<Covered>,
}

impl LogStore {
    /// Waits until a snapshot covering `log_id` is on disk (see the module's doc). `Err`, with
    /// nothing purged, if the snapshot's write failed or never came.
    async fn wait_covered(&self, log_id: LogId<u64>) -> StorageResult<()> {
        // With a snapshot stored, every purge openraft asks for is covered by it or by the one
        // being installed: only a store that never had one (openraft's storage suite) purges
        // uncovered.
        let bare = |c: &Covered| c.upto.is_none() && !c.receiving;
        let enough = |c: &Covered| c.upto >= Some(log_id) || c.failed || bare(c);
        let mut covered = self.covered.clone();
        if !enough(&covered.borrow()) {
            let waited = tokio::time::timeout(COVER_WAIT, covered.wait_for(enough)).await;
            if waited.is_err() {
                let why = format!(
                    "no snapshot covering them reached the disk in {} s",
                    COVER_WAIT.as_secs()
                );
                return Err(uncovered(log_id, &why));
            }
        }
        let now = *covered.borrow();
        if now.upto >= Some(log_id) || bare(&now) {
            Ok(())
        } else if now.failed {
            Err(uncovered(log_id, "the write of the snapshot covering them failed"))
        } else {
            Err(uncovered(log_id, "the state machine stopped before it stored their snapshot"))
        }
    }

    /// Changes the log table in one transaction, committed (see [`writing`]).
    async fn edit_logs(
        &self,
        edit: impl FnOnce(&mut redb::Table<'_, u64, &[u8]>) -> StorageResult<()> + Send + 'static,
    ) -> StorageResult<()> {
        let durable = self.durable;
        writing(&self.db, durable, move |db| {
            let txn = begin_write(db, durable)?;
            {
                let mut table = txn.open_table(LOGS).map_err(write_err)?;
                edit(&mut table)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + openraft::OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut out = Vec::new();
        for item in table.range::<u64>(bounds).map_err(read_err)? {
            let (_, bytes) = item.map_err(read_err)?;
            out.push(codec::decode(unseal(bytes.value())?).map_err(codec_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<u64>> = get_meta(&self.db, PURGED)?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, bytes)) => {
                let entry: Entry<TypeConfig> =
                    codec::decode(unseal(bytes.value())?).map_err(codec_err)?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        put_meta(&self.db, self.durable, VOTE, vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        get_meta(&self.db, VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        put_meta(&self.db, self.durable, COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        Ok(get_meta::<Option<LogId<u64>>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index, seal(&codec::encode(&entry).map_err(codec_err)?))))
            .collect::<StorageResult<Vec<(u64, Vec<u8>)>>>()?;
        // Committed, and synced unless the store was opened non-durable (for simulations): the
        // callback may then say the entries are written.
        let written = self
            .edit_logs(move |table| {
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice()).map_err(write_err)?;
                }
                Ok(())
            })
            .await;
        let result = written.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(result);
        written
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.edit_logs(move |table| {
            table.retain_in(log_id.index.., |_, _| false).map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.wait_covered(log_id).await?;
        let purged = seal(&codec::encode(&log_id).map_err(codec_err)?);
        let durable = self.durable;
        // The mark and the logs together: a restart never finds one without the other.
        writing(&self.db, durable, move |db| {
            let txn = begin_write(db, durable)?;
            {
                let mut meta = txn.open_table(META).map_err(write_err)?;
                meta.insert(PURGED, purged.as_slice()).map_err(write_err)?;
                let mut logs = txn.open_table(LOGS).map_err(write_err)?;
                logs.retain_in(..=log_id.index, |_, _| false).map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }
}

fn uncovered(log_id: LogId<u64>, why: &str) -> StorageError<u64> {
    write_err(std::io::Error::other(format!(
        "logs up to {log_id} were not purged: {why}; the logs are kept, and the node restarts \
         from them. Check the disk of the data directory"
    )))
}

/// What the log store knows of the snapshot on disk: the state machine moves it, purges wait on
/// it.
#[derive(Clone, Copy, Debug, Default)]
struct Covered {
    /// The last log id of the stored snapshot.
    upto: Option<LogId<u64>>,
    /// A snapshot is being received: openraft may ask to purge the logs it covers before the
    /// state machine's task has stored it.
    receiving: bool,
    /// A snapshot's write failed: openraft stops the node, and no purge waits for it any more.
    failed: bool,
}

/// A snapshot as stored: openraft's metadata and the encoded cluster state.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// The last log id of the snapshot in `table`; `None` if there is none.
fn stored_last(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> StorageResult<Option<LogId<u64>>> {
    // Always beside a stored snapshot: written with it, and made true at start (`load`).
    match table.get(SNAPSHOT_LAST).map_err(read_err)? {
        Some(bytes) => codec::decode(unseal(bytes.value())?).map_err(codec_err),
        None => Ok(None),
    }
}

/// Stores `stored` unless the stored snapshot is newer, checked in the same transaction, and
/// tells the waiting purges (see the module's doc).
async fn keep_snapshot(
    db: &Arc<Database>,
    durable: bool,
    covered: &watch::Sender<Covered>,
    stored: &StoredSnapshot,
) -> StorageResult<()> {
    let last = stored.meta.last_log_id;
    let written = write_snapshot(db, durable, stored).await;
    covered.send_modify(|c| match written {
        Ok(()) => c.upto = c.upto.max(last),
        Err(_) => c.failed = true,
    });
    written
}

/// [`keep_snapshot`]'s write.
async fn write_snapshot(
    db: &Arc<Database>,
    durable: bool,
    stored: &StoredSnapshot,
) -> StorageResult<()> {
    let last = stored.meta.last_log_id;
    let bytes = seal(&codec::encode(stored).map_err(codec_err)?);
    let last_bytes = seal(&codec::encode(&last).map_err(codec_err)?);
    writing(db, durable, move |db| {
        let txn = begin_write(db, durable)?;
        {
            let mut table = txn.open_table(META).map_err(write_err)?;
            if stored_last(&table)? > last {
                drop(table);
                return txn.abort().map_err(write_err);
            }
            table.insert(SNAPSHOT, bytes.as_slice()).map_err(write_err)?;
            table.insert(SNAPSHOT_LAST, last_bytes.as_slice()).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    })
    .await
}

/// The applied cluster state.
pub struct StateMachine {
    db: Arc<Database>,
    durable: bool,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: ClusterState,
    published: watch::Sender<Arc<ClusterState>>,
    covered: Arc<watch::Sender<Covered>>,
    snapshots_built: u64,
}

impl StateMachine {
    /// Takes the received snapshot as the applied state, and stores it.
    async fn install(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        data: Vec<u8>,
    ) -> StorageResult<()> {
        let state = codec::decode(&data).map_err(codec_err)?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        keep_snapshot(&self.db, self.durable, &self.covered, &stored).await?;
        self.state = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    fn load(db: Arc<Database>, durable: bool) -> StorageResult<Self> {
        let stored: Option<StoredSnapshot> = get_meta(&db, SNAPSHOT)?;
        let (last_applied, membership, state) = match stored {
            Some(s) => (
                s.meta.last_log_id,
                s.meta.last_membership,
                codec::decode(&s.data).map_err(codec_err)?,
            ),
            None => (None, StoredMembership::default(), ClusterState::default()),
        };
        // An agent older than the key stores snapshots without it: made true again here, or a
        // late build would be compared with a stale key.
        let last_kept = get_meta::<Option<LogId<u64>>>(&db, SNAPSHOT_LAST)?;
        if last_applied.is_some() && last_kept != Some(last_applied) {
            let bytes = seal(&codec::encode(&last_applied).map_err(codec_err)?);
            let txn = begin_write(&db, durable)?;
            {
                let mut table = txn.open_table(META).map_err(write_err)?;
                table.insert(SNAPSHOT_LAST, bytes.as_slice()).map_err(write_err)?;
            }
            txn.commit().map_err(write_err)?;
        }
        let (published, _) = watch::channel(Arc::new(state.clone()));
        let covered = Covered { upto: last_applied, ..Covered::default() };
        Ok(StateMachine {
            db,
            durable,
            last_applied,
            membership,
            state,
            published,
            covered: Arc::new(watch::Sender::new(covered)),
            snapshots_built: 0,
        })
    }

    /// The state raft brings this machine to as it starts: the stored one, with the entries
    /// `log` had committed when the node last ran applied again. Read before raft runs, it
    /// says what the node's last life knew, which the entries a leader sends next may hide
    /// (its life's end hides that it was leaving).
    pub fn replayed(&self, log: &LogStore) -> StorageResult<ClusterState> {
        let mut state = self.state.clone();
        let Some(committed) = get_meta::<Option<LogId<u64>>>(&log.db, COMMITTED)?.flatten() else {
            return Ok(state);
        };
        let from = self.last_applied.map_or(0, |applied| applied.index + 1);
        let txn = log.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        for item in table.range(from..=committed.index).map_err(read_err)? {
            let (_, bytes) = item.map_err(read_err)?;
            let entry: Entry<TypeConfig> =
                codec::decode(unseal(bytes.value())?).map_err(codec_err)?;
            if let EntryPayload::Normal(command) = entry.payload {
                let _ = state.apply(&command);
            }
        }
        Ok(state)
    }

    /// A receiver that sees each newly applied cluster state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.published.subscribe()
    }

    fn publish(&self) {
        self.published.send_replace(Arc::new(self.state.clone()));
    }
}

/// Builds snapshots from a copy of the state taken when openraft asks for a builder.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    durable: bool,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: ClusterState,
    covered: Arc<watch::Sender<Covered>>,
    id: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = codec::encode(&self.state).map_err(codec_err)?;
        let last = self
            .last_applied
            .map_or("none".to_string(), |l| format!("{}-{}", l.leader_id.term, l.index));
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{last}-{}", self.id),
        };
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        keep_snapshot(&self.db, self.durable, &self.covered, &stored).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            replies.push(match entry.payload {
                EntryPayload::Blank => Reply(None),
                EntryPayload::Normal(command) => Reply(Some(self.state.apply(&command))),
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Reply(None)
                }
            });
        }
        self.publish();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            durable: self.durable,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state: self.state.clone(),
            covered: Arc::clone(&self.covered),
            id: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        self.covered.send_modify(|c| c.receiving = true);
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let installed = self.install(meta, snapshot.into_inner()).await;
        // Whichever way it ends, the purge waiting for it must hear.
        self.covered.send_modify(|c| match installed {
            Ok(()) => c.receiving = false,
            Err(_) => c.failed = true,
        });
        installed?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> = get_meta(&self.db, SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_that_does_not_open_is_given_the_advice_its_cause_calls_for() {
        use redb::{DatabaseError, StorageError};
        let io = |kind| DatabaseError::Storage(StorageError::Io(std::io::Error::from(kind)));
        assert!(advice(&DatabaseError::DatabaseAlreadyOpen).contains("another agent"));
        assert!(advice(&io(std::io::ErrorKind::StorageFull)).contains("disk is full"));
        let damaged = DatabaseError::Storage(StorageError::Corrupted("bad magic".into()));
        assert!(advice(&damaged).contains("--join ADDR"), "{}", advice(&damaged));
        assert!(!advice(&damaged).contains("another agent"));
    }

    /// A store that opens but keeps a snapshot that does not decode is refused naming the file
    /// and what to do, where it said only "when Read Store".
    #[test]
    fn a_store_whose_snapshot_does_not_decode_is_said_to_be_damaged() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        drop(open(&path).expect("a fresh store"));
        let db = Database::create(&path).expect("reopened");
        let txn = db.begin_write().expect("a write");
        txn.open_table(META).expect("meta").insert(SNAPSHOT, &[0xFFu8; 3][..]).expect("put");
        txn.commit().expect("committed");
        drop(db);
        let Err(error) = open(&path) else { panic!("a snapshot of garbage opened") };
        let said = error.to_string();
        assert!(said.contains(&path.display().to_string()), "{said}");
        assert!(said.contains("may be damaged") && said.contains("--join ADDR"), "{said}");
    }

    /// A new store at `path`, claimed by node 3 of cluster c1, and closed.
    fn claimed_store(path: &Path) {
        let (log, _) = open(path).expect("a fresh store");
        claim(&log, "c1", 3, true, path).expect("claimed");
    }

    /// Edits the meta table of the closed store at `path`, as a disk that returns other bytes
    /// would.
    fn edit_meta(
        path: &Path,
        edit: impl FnOnce(&mut redb::Table<'_, &'static str, &'static [u8]>),
    ) {
        let db = Database::create(path).expect("reopened");
        let txn = db.begin_write().expect("a write");
        edit(&mut txn.open_table(META).expect("meta"));
        txn.commit().expect("committed");
    }

    /// Changes one byte of the value stored under `key` in the meta table of the store at
    /// `path`.
    fn damage(path: &Path, key: &str) {
        edit_meta(path, |meta| {
            let mut value = meta.get(key).expect("read").expect("a value").value().to_vec();
            let last = value.len() - 1;
            value[last] ^= 1;
            meta.insert(key, value.as_slice()).expect("put");
        });
    }

    /// One byte changed in a stored value decoded as another value, silently: a helper's
    /// test changed a zone in a log entry and the node replayed a membership nobody had. Now
    /// the store is refused as damaged, naming the file and what to do.
    #[test]
    fn a_store_with_one_byte_changed_is_refused_as_damaged() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        claimed_store(&path);
        damage(&path, OWNER);
        let Err(error) = open(&path) else { panic!("a damaged value opened") };
        let said = error.to_string();
        assert!(said.contains("does not match its checksum"), "{said}");
        assert!(said.contains("may be damaged") && said.contains("--join ADDR"), "{said}");
    }

    /// A store from a build that sealed nothing holds values without sums: they are sealed as
    /// it opens, and read back as they were (refused, every node of a cluster upgraded lost
    /// the cluster's state: the review of `7a67634`). From then on a byte changed is damage.
    #[test]
    fn a_store_of_a_build_before_checksums_is_sealed_as_it_opens_and_keeps_its_state() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        let vote = Vote::new(7, 2);
        let db = Database::create(&path).expect("created");
        let txn = db.begin_write().expect("a write");
        let unsealed = codec::encode(&vote).expect("encoded");
        txn.open_table(META).expect("meta").insert(VOTE, unsealed.as_slice()).expect("put");
        txn.open_table(LOGS).expect("logs");
        txn.commit().expect("committed");
        drop(db);
        let (log, _) = open(&path).expect("an older build's store opens");
        assert_eq!(get_meta::<Vote<u64>>(&log.db, VOTE).expect("read"), Some(vote));
        drop(log);
        let (log, _) = open(&path).expect("and again, sealed once");
        assert_eq!(get_meta::<Vote<u64>>(&log.db, VOTE).expect("read"), Some(vote));
        drop(log);
        damage(&path, VOTE);
        assert!(open(&path).is_err(), "sealed now: a byte changed is damage");
    }

    /// A committed vote for this node is stored uncommitted as the store opens, the same term
    /// and choice: a node that led does not start as that term's leader again without an
    /// election (a copy of its directory taken while it led would lead beside its later
    /// life's entries). A follower's committed vote for its leader stays as it was.
    #[tokio::test]
    async fn a_committed_vote_of_its_own_opens_uncommitted_in_the_same_term() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        let (mut log, _) = open(&path).expect("a new store");
        claim(&log, "aaaa", 3, true, &path).expect("node 3's");
        log.save_vote(&Vote::new_committed(8, 1)).await.expect("saved");
        drop(log);
        let (mut log, _) = open(&path).expect("opened again");
        assert_eq!(log.read_vote().await.expect("read"), Some(Vote::new_committed(8, 1)));
        log.save_vote(&Vote::new_committed(9, 3)).await.expect("saved");
        assert!(log.read_vote().await.expect("read").expect("a vote").is_committed());
        drop(log);
        let (mut log, _) = open(&path).expect("opened again");
        assert_eq!(log.read_vote().await.expect("read"), Some(Vote::new(9, 3)));
        log.save_vote(&Vote::new(10, 1)).await.expect("saved");
        drop(log);
        let (mut log, _) = open(&path).expect("opened again");
        assert_eq!(log.read_vote().await.expect("read"), Some(Vote::new(10, 1)), "as it was");
    }

    /// A store protocol 27's, 28's or 29's builds wrote, sealed or from before the sums, keeps the cluster's
    /// state in a layout without the fields added since: it is laid out anew as it opens, and
    /// its state read back whole (a field added to the state made every older snapshot
    /// unreadable, and a cluster upgraded whole lost its state).
    #[test]
    fn a_store_of_protocol_27_28_or_29_is_laid_out_anew_as_it_opens_and_keeps_its_state() {
        use crate::state::{NodeRecord, NodeStatus};
        let mut state = ClusterState { epoch: 12, ..ClusterState::default() };
        let labels = gobelins_locator::Labels::new();
        let record = NodeRecord {
            addr: "10.0.0.5:7000".into(),
            labels,
            status: NodeStatus::Failed,
            incarnation: 4,
            kept_out: false,
            removed_by: None,
        };
        state.nodes.insert(5, record);
        let last = Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 40));
        let meta = SnapshotMeta { last_log_id: last, ..SnapshotMeta::default() };
        let marks = [
            (27, Some(sealed::PROTOCOL_27)),
            (27, None),
            (28, Some(sealed::PROTOCOL_28)),
            (29, Some(sealed::PROTOCOL_29)),
        ];
        for (version, mark) in marks {
            let data = crate::layout::older(version, || codec::encode(&state)).expect("laid out");
            let meta = meta.clone();
            let stored = codec::encode(&StoredSnapshot { meta, data }).expect("snapshot");
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("raft.redb");
            let db = Database::create(&path).expect("created");
            let txn = db.begin_write().expect("a write");
            {
                let mut table = txn.open_table(META).expect("meta");
                let kept = match mark {
                    Some(mark) => {
                        table.insert(sealed::FORMAT, mark).expect("mark");
                        seal(&stored)
                    }
                    None => stored.clone(),
                };
                table.insert(SNAPSHOT, kept.as_slice()).expect("put");
            }
            txn.open_table(LOGS).expect("logs");
            txn.commit().expect("committed");
            drop(db);
            for start in ["first", "second"] {
                let (_, machine) = open(&path).expect("a store of an older protocol opens");
                assert_eq!(machine.state, state, "{mark:?}, {start} start");
                assert_eq!(machine.last_applied, last, "{mark:?}, {start} start");
            }
        }
    }

    /// A key with a byte changed (`vote` read back as `wote`) is damage too: the sums cover
    /// values, and a voter's vote was dropped without a word (a helper's black-box test).
    #[test]
    fn a_store_with_a_key_changed_is_refused_as_damaged() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        claimed_store(&path);
        edit_meta(&path, |meta| {
            let value = meta.remove(OWNER).expect("read").expect("a value").value().to_vec();
            meta.insert("nwner", value.as_slice()).expect("put");
        });
        let Err(error) = open(&path) else { panic!("a renamed key opened") };
        let said = error.to_string();
        assert!(
            said.contains("a key no build writes") && said.contains("may be damaged"),
            "{said}"
        );
    }

    /// A sealed store whose format mark was lost (a byte of its key changed) is marked again,
    /// not sealed twice: its values would no longer decode.
    #[test]
    fn a_sealed_store_that_lost_its_mark_is_not_sealed_twice() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        claimed_store(&path);
        // With a snapshot in today's layout: it is not laid out again as 27's.
        let mut state = ClusterState { epoch: 4, rules: crate::state::RULES, ..Default::default() };
        let labels = gobelins_locator::Labels::new();
        let status = crate::state::NodeStatus::Failed;
        let record = crate::state::NodeRecord {
            addr: "a".into(),
            labels,
            status,
            incarnation: 2,
            kept_out: true,
            removed_by: None,
        };
        state.nodes.insert(2, record);
        let last = Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 9));
        let meta = SnapshotMeta { last_log_id: last, ..SnapshotMeta::default() };
        let data = codec::encode(&state).expect("state");
        let stored = seal(&codec::encode(&StoredSnapshot { meta, data }).expect("snapshot"));
        edit_meta(&path, |meta| {
            meta.remove(sealed::FORMAT).expect("mark gone");
            meta.insert(SNAPSHOT, stored.as_slice()).expect("snapshot kept");
        });
        let (log, machine) = open(&path).expect("opens");
        claim(&log, "c1", 3, false, &path).expect("still node 3's of c1");
        assert_eq!(machine.state, state, "the snapshot read as it was written");
    }

    /// A store is its node's and its cluster's: a directory with another cluster's secret, or
    /// another node's id, is refused saying which file to put back; a directory never admitted
    /// claims the store afresh.
    #[test]
    fn a_store_is_refused_to_another_cluster_or_node_unless_never_admitted() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("raft.redb");
        let (log, _) = open(&path).expect("a fresh store");
        claim(&log, "aaaa", 3, false, &path).expect("an unclaimed store is claimed");
        claim(&log, "aaaa", 3, false, &path).expect("its own");
        let other = claim(&log, "bbbb", 3, false, &path).expect_err("another cluster's");
        let said = other.to_string();
        assert!(said.contains("node 3 of cluster aaaa") && said.contains("two clusters"), "{said}");
        let other = claim(&log, "aaaa", 921981, false, &path).expect_err("another node's");
        let said = other.to_string();
        assert!(said.contains("Write 3 into") && said.contains("node.id"), "{said}");
        claim(&log, "bbbb", 9, true, &path).expect("never admitted: claimed afresh");
        claim(&log, "bbbb", 9, false, &path).expect("the new owner's");
    }

    #[test]
    fn a_panic_in_a_quiet_read_is_no_crash() {
        assert_eq!(quietly(|| 7), Some(7));
        assert_eq!(quietly(|| -> u8 { panic!("a damaged page") }), None);
    }
}
