//! The redb store passes openraft's storage conformance suite, waits for its disk off the
//! runtime's threads, and orders its snapshot writes against purges.

use gobelins_supervisor::store::{self, LogStore, StateMachine};
use gobelins_supervisor::types::TypeConfig;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, StorageError,
    Vote,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = TempDir::new().expect("temporary directory");
        let (log, machine) = store::open(&dir.path().join("raft.redb")).expect("fresh store opens");
        Ok((dir, log, machine))
    }
}

#[test]
fn the_redb_store_keeps_openrafts_storage_contract() {
    if let Err(error) = Suite::test_all(RedbBuilder) {
        panic!("storage suite failed: {error}");
    }
}

/// A disk whose sync, once armed, waits until someone else says go (or gives up after a while):
/// a slow disk, made to wait for exactly what the test needs to see.
#[derive(Debug)]
struct SlowDisk {
    bytes: redb::backends::InMemoryBackend,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    armed: AtomicBool,
    syncing: AtomicBool,
    go: AtomicBool,
    /// Every sync fails.
    broken: AtomicBool,
}

impl redb::StorageBackend for SlowDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.bytes.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.bytes.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.bytes.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        if self.gate.broken.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the disk is broken"));
        }
        if self.gate.armed.load(Ordering::SeqCst) {
            self.gate.syncing.store(true, Ordering::SeqCst);
            let start = std::time::Instant::now();
            // Bounded, so that a store that syncs on the runtime's only thread fails the test
            // rather than hanging it.
            while !self.gate.go.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.bytes.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.bytes.write(offset, data)
    }
}

/// A durable write waits for the disk without holding the runtime: on an agent's runtime of one
/// worker, another task runs while the disk syncs, and it is that task that lets the sync finish.
#[test]
fn a_durable_write_lets_the_runtime_run_while_the_disk_syncs() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    // On the worker, not on this thread: `block_on` runs its future here, beside the worker.
    let on_the_worker = runtime.spawn(async {
        let gate = Arc::new(Gate::default());
        let disk = SlowDisk { bytes: redb::backends::InMemoryBackend::new(), gate: gate.clone() };
        let (mut log, _machine) = store::open_on(disk, true).expect("store opens");
        gate.armed.store(true, Ordering::SeqCst);
        let other = {
            let gate = gate.clone();
            tokio::spawn(async move {
                while !gate.syncing.load(Ordering::SeqCst) {
                    tokio::task::yield_now().await;
                }
                gate.go.store(true, Ordering::SeqCst);
            })
        };
        log.save_vote(&Vote::new(1, 1)).await.expect("the vote is saved");
        assert!(
            gate.go.load(Ordering::SeqCst),
            "the disk's sync held the runtime's only worker: nothing else ran until it gave up"
        );
        other.await.expect("the other task ends");
        assert_eq!(log.read_vote().await.expect("read"), Some(Vote::new(1, 1)));
    });
    runtime.block_on(on_the_worker).expect("the writer's task ends");
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// A state machine that has applied `count` blank entries of `term`.
async fn applied(machine: &mut StateMachine, term: u64, count: u64) {
    let entries = (1..=count)
        .map(|i| Entry::<TypeConfig> { log_id: log_id(term, i), payload: EntryPayload::Blank });
    machine.apply(entries).await.expect("blank entries apply");
}

/// A snapshot of `count` entries of `term`, as a leader's store builds it.
async fn leaders_snapshot(term: u64, count: u64) -> (TempDir, Snapshot<TypeConfig>) {
    let dir = TempDir::new().expect("temporary directory");
    let (_log, mut leader) = store::open(&dir.path().join("raft.redb")).expect("store opens");
    applied(&mut leader, term, count).await;
    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("built");
    (dir, snapshot)
}

async fn install(machine: &mut StateMachine, snapshot: Snapshot<TypeConfig>) -> Result<(), String> {
    machine.begin_receiving_snapshot().await.expect("receiving begins");
    machine.install_snapshot(&snapshot.meta, snapshot.snapshot).await.map_err(|e| e.to_string())
}

/// A purge up to `upto` in a task of its own, checked to be still waiting a second later (on a
/// paused clock): `what` says what it would have run ahead of.
async fn purge_waiting(
    log: &LogStore,
    upto: LogId<u64>,
    what: &str,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let mut purging = tokio::spawn({
        let mut log = log.clone();
        async move { log.purge(upto).await.map_err(|e| e.to_string()) }
    });
    let early = tokio::time::timeout(Duration::from_secs(1), &mut purging).await;
    assert!(early.is_err(), "the purge {what}: {early:?}");
    purging
}

async fn last_purged(log: &LogStore) -> Option<LogId<u64>> {
    log.clone().get_log_state().await.expect("log state").last_purged_log_id
}

/// A build that began before an install and ends after it must not replace the installed
/// snapshot: openraft purges the logs the install covers, and a restart from the older snapshot
/// would find them gone.
#[tokio::test]
async fn a_snapshot_built_before_an_install_does_not_replace_it_when_it_ends_after() {
    let dir = TempDir::new().expect("temporary directory");
    let path = dir.path().join("raft.redb");
    let (_leader_dir, newer) = leaders_snapshot(2, 10).await;
    {
        let (_log, mut machine) = store::open(&path).expect("store opens");
        applied(&mut machine, 1, 3).await;
        let mut late = machine.get_snapshot_builder().await;
        install(&mut machine, newer).await.expect("the snapshot installs");
        let built = late.build_snapshot().await.expect("the late build ends");
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 3)), "the build kept its own state");
        let current = machine.get_current_snapshot().await.expect("read").expect("a snapshot");
        assert_eq!(
            current.meta.last_log_id,
            Some(log_id(2, 10)),
            "the late build replaced the newer, installed snapshot"
        );
    }
    let (_log, mut restarted) = store::open(&path).expect("store opens again");
    let (last_applied, _) = restarted.applied_state().await.expect("applied state");
    assert_eq!(last_applied, Some(log_id(2, 10)), "a restart begins from the older snapshot");
}

/// openraft asks to purge the logs an install covers as soon as it hands the install to the
/// state machine's task: the purge must wait until that snapshot is on disk.
#[tokio::test(start_paused = true)]
async fn logs_are_purged_only_once_the_snapshot_covering_them_is_on_disk() {
    let dir = TempDir::new().expect("temporary directory");
    let (log, mut machine) = store::open(&dir.path().join("raft.redb")).expect("store opens");
    let (_leader_dir, snapshot) = leaders_snapshot(2, 10).await;
    machine.begin_receiving_snapshot().await.expect("receiving begins");
    let purging = purge_waiting(&log, log_id(2, 10), "ran ahead of its snapshot").await;
    let purged = last_purged(&log).await;
    assert_eq!(purged, None, "logs were marked purged while the purge waited");

    machine.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("installs");
    purging.await.expect("the purge's task ends").expect("the purge ends once covered");
    let purged = last_purged(&log).await;
    assert_eq!(purged, Some(log_id(2, 10)));
}

/// A stream's install clears what the store knows of snapshots being received; a second stream
/// begun before that install ended must still hold the purge its own install allows.
#[tokio::test(start_paused = true)]
async fn a_purge_waits_for_its_own_snapshot_when_an_earlier_one_was_installed_meanwhile() {
    let dir = TempDir::new().expect("temporary directory");
    let (log, mut machine) = store::open(&dir.path().join("raft.redb")).expect("store opens");
    let (_first_dir, first) = leaders_snapshot(2, 10).await;
    let (_second_dir, second) = leaders_snapshot(2, 20).await;
    machine.begin_receiving_snapshot().await.expect("the first stream begins");
    machine.begin_receiving_snapshot().await.expect("the second stream begins");
    machine.install_snapshot(&first.meta, first.snapshot).await.expect("the first installs");
    let purging = purge_waiting(&log, log_id(2, 20), "ran ahead of its own snapshot").await;
    machine.install_snapshot(&second.meta, second.snapshot).await.expect("the second installs");
    purging.await.expect("the purge's task ends").expect("the purge ends once covered");
    let purged = last_purged(&log).await;
    assert_eq!(purged, Some(log_id(2, 20)));
}

/// If the install's write fails, the waiting purge fails too, at once, with nothing purged:
/// openraft then stops the node, rather than its core waiting forever.
#[tokio::test(start_paused = true)]
async fn a_purge_waiting_for_a_snapshot_whose_write_failed_fails_with_the_logs_kept() {
    let gate = Arc::new(Gate::default());
    let disk = SlowDisk { bytes: redb::backends::InMemoryBackend::new(), gate: gate.clone() };
    let (log, mut machine) = store::open_on(disk, true).expect("store opens");
    let (_leader_dir, snapshot) = leaders_snapshot(2, 10).await;
    machine.begin_receiving_snapshot().await.expect("receiving begins");
    let purging = purge_waiting(&log, log_id(2, 10), "ran ahead of its snapshot").await;
    gate.broken.store(true, Ordering::SeqCst);
    let installed = machine.install_snapshot(&snapshot.meta, snapshot.snapshot).await;
    assert!(installed.is_err(), "the install's write should fail on the broken disk");
    let started = tokio::time::Instant::now();
    let error = purging.await.expect("the purge's task ends").expect_err("nothing is purged");
    assert!(error.contains("were not purged"), "the purge did not say why: {error}");
    assert!(error.contains("failed"), "the purge did not say the write failed: {error}");
    assert!(started.elapsed() < Duration::from_secs(1), "the purge waited out its bound");
    gate.broken.store(false, Ordering::SeqCst);
    let purged = last_purged(&log).await;
    assert_eq!(purged, None, "logs were marked purged");
}

const META: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("meta");

fn raw_meta(path: &std::path::Path, key: &str) -> Option<Vec<u8>> {
    use redb::ReadableDatabase as _;
    let db = redb::Database::create(path).expect("the store's file opens");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(META).expect("meta");
    table.get(key).expect("get").map(|v| v.value().to_vec())
}

/// An agent older than the `snapshot_last` key stores a snapshot without updating it; the next
/// start makes the key true again, so that a late build is compared with the snapshot stored.
#[tokio::test]
async fn a_snapshot_stored_without_its_last_log_key_has_the_key_made_true_at_the_next_start() {
    let (newer_dir, _) = leaders_snapshot(2, 10).await;
    let (older_dir, _) = leaders_snapshot(1, 3).await;
    let (newer, older) = (newer_dir.path().join("raft.redb"), older_dir.path().join("raft.redb"));
    let newer_key = raw_meta(&newer, "snapshot_last").expect("the key beside the snapshot");
    assert_ne!(raw_meta(&older, "snapshot_last"), Some(newer_key.clone()));
    {
        // What an older agent does: the snapshot replaced, the key left as it was.
        let snapshot = raw_meta(&newer, "snapshot").expect("a stored snapshot");
        let db = redb::Database::create(&older).expect("the store's file opens");
        let txn = db.begin_write().expect("write");
        txn.open_table(META).expect("meta").insert("snapshot", snapshot.as_slice()).expect("put");
        txn.commit().expect("commit");
    }
    let (_log, mut machine) = store::open(&older).expect("the store opens");
    let (last_applied, _) = machine.applied_state().await.expect("applied state");
    assert_eq!(last_applied, Some(log_id(2, 10)));
    drop((_log, machine));
    assert_eq!(raw_meta(&older, "snapshot_last"), Some(newer_key), "the key is still stale");
}
