//! The redb store passes openraft's storage conformance suite, and waits for its disk off the
//! runtime's threads.

use gobelins_supervisor::store::{self, LogStore, StateMachine};
use gobelins_supervisor::types::TypeConfig;
use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, Vote};
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
