//! The redb store passes openraft's storage conformance suite.

use gobelins_supervisor::store::{self, LogStore, StateMachine};
use gobelins_supervisor::types::TypeConfig;
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
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
