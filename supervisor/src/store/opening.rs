//! Opening the raft store: its format and every value checked once, an older build's store
//! sealed in place, and the store tied to the cluster and node it is of.

use super::{
    codec_err, get_meta, read_err, seal, sealed, unseal, LogStore, StorageResult, COMMITTED,
    DAMAGED, LOGS, META, OWNER, PURGED, SNAPSHOT, SNAPSHOT_LAST, VOTE,
};

/// Every key of the meta table a build writes.
const KEYS: [&str; 7] = [VOTE, COMMITTED, PURGED, SNAPSHOT, SNAPSHOT_LAST, OWNER, sealed::FORMAT];
use super::StoredSnapshot;
use crate::state::ClusterState;
use crate::types::TypeConfig;
use gobelins_adaptation::codec;
use openraft::{Entry, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::path::Path;
use std::sync::Arc;

/// Makes the tables on a new store, marked with the format its values are sealed in; on one
/// that holds something, checks its format and every value's sum.
pub(super) fn check(db: &Database, what: &str) -> Result<(), crate::SupervisorError> {
    let storage = |doing: &str, e: &dyn std::fmt::Display| {
        crate::SupervisorError::Storage(format!("{doing} {what}: {e}"))
    };
    let init = || -> Result<(Vec<u8>, Option<u8>), redb::Error> {
        let txn = db.begin_write()?;
        let format = {
            let meta = txn.open_table(META)?;
            let format = meta.get(sealed::FORMAT)?.map(|v| v.value().to_vec());
            format
        };
        // A new store is marked; one an older build wrote has its values sealed and its state
        // laid out anew, here, in the same transaction.
        let (format, from) = match format.as_deref() {
            None => {
                // A store whose mark alone was lost (a byte of its key changed) is sealed, in
                // today's layout; read as 27's, its snapshot was refused as damaged.
                let unsealed = sealed::upgrade(&txn)?;
                if unsealed {
                    relayout(&txn, 27)?;
                }
                (sealed::CURRENT.to_vec(), unsealed.then_some(27))
            }
            Some(older @ (sealed::PROTOCOL_27 | sealed::PROTOCOL_28 | sealed::PROTOCOL_29)) => {
                let from = match older {
                    sealed::PROTOCOL_27 => 27,
                    sealed::PROTOCOL_28 => 28,
                    _ => 29,
                };
                relayout(&txn, from)?;
                txn.open_table(META)?.insert(sealed::FORMAT, sealed::CURRENT)?;
                (sealed::CURRENT.to_vec(), Some(from))
            }
            Some(known) => (known.to_vec(), None),
        };
        txn.commit()?;
        Ok((format, from))
    };
    let (format, from) = init().map_err(|e| {
        let full = matches!(&e, redb::Error::Io(io)
            if matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded));
        let advice = if full { "the disk is full: free space, then start the agent again" } else { DAMAGED };
        storage("initialising", &format!("{e}; {advice}"))
    })?;
    match format.as_slice() {
        sealed::CURRENT => {}
        other => {
            return Err(storage(
                "reading",
                &format!(
                    "it is in a format this build does not know ({:?}): if a newer build of \
                     gobelins ran on this data directory, run that build again; otherwise \
                     {DAMAGED}",
                    String::from_utf8_lossy(other)
                ),
            ))
        }
    }
    let read = || -> StorageResult<()> {
        let txn = db.begin_read().map_err(read_err)?;
        let meta = txn.open_table(META).map_err(read_err)?;
        for item in meta.iter().map_err(read_err)? {
            let (key, value) = item.map_err(read_err)?;
            // The sums cover values, not keys: a key with a byte changed (`vote` read back as
            // `wote`) dropped its value silently, a voter's vote among them (a helper's test).
            if !KEYS.contains(&key.value()) {
                return Err(read_err(std::io::Error::other(format!(
                    "the store holds a key no build writes ({:?}): a byte of one changed",
                    key.value()
                ))));
            }
            if key.value() != sealed::FORMAT {
                unseal(value.value())?;
            }
        }
        // Under its own index: the sums cover values, not keys.
        let logs = txn.open_table(LOGS).map_err(read_err)?;
        for item in logs.iter().map_err(read_err)? {
            let (index, value) = item.map_err(read_err)?;
            let entry: Entry<TypeConfig> =
                codec::decode(unseal(value.value())?).map_err(codec_err)?;
            if entry.log_id.index != index.value() {
                return Err(read_err(std::io::Error::other(format!(
                    "the log entry kept under index {} is entry {}: the file is damaged",
                    index.value(),
                    entry.log_id.index
                ))));
            }
        }
        Ok(())
    };
    read().map_err(|e| storage("reading", &format!("{e}; {DAMAGED}")))?;
    if let Some(from) = from {
        // Once per upgrade, once the store read whole: the operator learns the way back is
        // closed without a copy.
        tracing::warn!(
            from,
            to = crate::frame::VERSION,
            "{what}: laid out anew from the format of protocol {from}'s builds, the cluster's state kept; those builds can no longer open it (a copy of the data directory taken before goes back)"
        );
    }
    Ok(())
}

/// Writes the state kept in the stored snapshot again in the current layout, read in the
/// layout of protocol `from` (see [`crate::layout`]).
fn relayout(txn: &redb::WriteTransaction, from: u8) -> Result<(), redb::Error> {
    let damaged = |e: &dyn std::fmt::Display| {
        redb::Error::Io(std::io::Error::other(format!(
            "the snapshot an older build kept cannot be read ({e})"
        )))
    };
    let mut meta = txn.open_table(META)?;
    let Some(kept) = meta.get(SNAPSHOT)?.map(|v| v.value().to_vec()) else { return Ok(()) };
    let mut stored: StoredSnapshot =
        codec::decode(unseal(&kept).map_err(|e| damaged(&e))?).map_err(|e| damaged(&e))?;
    let state: ClusterState =
        crate::layout::older(from, || codec::decode(&stored.data)).map_err(|e| damaged(&e))?;
    stored.data = codec::encode(&state).map_err(|e| damaged(&e))?;
    let sealed = seal(&codec::encode(&stored).map_err(|e| damaged(&e))?);
    meta.insert(SNAPSHOT, sealed.as_slice())?;
    Ok(())
}

std::thread_local! {
    /// Whether this thread runs [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work`, `None` if it panicked, without the panic's message and backtrace on the
/// terminal: the caller says what it means. The process's panic hook is wrapped once, and
/// stays silent for this thread only while it runs `work`: swapped in and out around each
/// call, two stores opened at once on two threads left the silent hook in place for good.
pub(super) fn quietly<T>(work: impl FnOnce() -> T) -> Option<T> {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                hook(info)
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    QUIET.with(|q| q.set(was));
    result.ok()
}

/// The cluster and node the store at `path` holds the raft state of ([`claim`]), if it says;
/// `None` for a store missing, unreadable, or of a build before the record. Read before the
/// store is opened for good: a directory whose `node.id` went takes its id back from it.
pub fn owner_of(path: &Path) -> Option<(String, u64)> {
    if !path.exists() {
        return None;
    }
    quietly(|| {
        let db = Database::open(path).ok()?;
        get_meta::<(String, u64)>(&db, OWNER).ok().flatten()
    })
    .flatten()
}

/// Ties the store to the cluster and node it holds the raft state of, or checks it is theirs.
/// A member's directory put together from parts (another cluster's `cluster.secret` copied in,
/// `node.id` edited) ran as a node of the wrong cluster with this one's votes and
/// log: a helper's test saw a data directory from one cluster, given another's secret, win an
/// election there and declare its members failed. `fresh`: the directory's node was never
/// admitted (its first start or join), and any store it holds is its own to claim.
pub fn claim(
    log: &LogStore,
    cluster: &str,
    node: u64,
    fresh: bool,
    path: &Path,
) -> Result<(), crate::SupervisorError> {
    let damaged = |e: StorageError<u64>| {
        crate::SupervisorError::Storage(format!("reading {}: {e}; {DAMAGED}", path.display()))
    };
    let owner: Option<(String, u64)> = get_meta(&log.db, OWNER).map_err(damaged)?;
    let dir = path.parent().unwrap_or(path).display();
    match owner {
        Some((theirs, of)) if !fresh && theirs != cluster => {
            Err(crate::SupervisorError::Config(format!(
                "{} holds the raft state of node {of} of cluster {theirs}, but this data \
                 directory's cluster.secret is cluster {cluster}'s: its files come from two \
                 clusters (a cluster.secret copied from another cluster's member?). To run \
                 node {of} again, put back cluster {theirs}'s cluster.secret. To join cluster \
                 {cluster}, start on an empty --data-dir with its --secret-file",
                path.display()
            )))
        }
        Some((_, of)) if !fresh && of != node => Err(crate::SupervisorError::Config(format!(
            "{} holds the raft state of node {of}, but this start is node {node}: {dir}/node.id \
             is missing or was changed. Write {of} into {dir}/node.id (or start with --node-id \
             {of}); to run node {node}, give it a data directory of its own",
            path.display()
        ))),
        Some(owner) if owner == (cluster.to_string(), node) => Ok(()),
        _ => {
            let db = Arc::clone(&log.db);
            let owner = seal(&codec::encode(&(cluster, node)).map_err(|e| {
                crate::SupervisorError::Storage(format!("encoding the store's owner: {e}"))
            })?);
            let write = || -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                txn.open_table(META)?.insert(OWNER, owner.as_slice())?;
                txn.commit()?;
                Ok(())
            };
            write().map_err(|e| {
                crate::SupervisorError::Storage(format!(
                    "writing {} (is the disk full or read-only? free space, then start the \
                     agent again with the same --data-dir): {e}",
                    path.display()
                ))
            })
        }
    }
}
