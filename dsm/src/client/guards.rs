//! What a program holds while it reads or writes a page, or holds a cluster-wide lock.

use super::Dsm;
use crate::error::DsmError;
use crate::frames::{Bytes, Frame};
use crate::node::DSM;
use crate::page::{lock_key, PageId};
use crate::protocol::{PageBytes, Request, Response, Token};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// A consistent copy of a page, as of when it was taken.
#[derive(Clone, Debug)]
pub struct ReadGuard {
    pub(super) version: u64,
    pub(super) data: Bytes,
}

impl ReadGuard {
    /// The version read.
    pub fn version(&self) -> u64 {
        self.version
    }
}

impl std::ops::Deref for ReadGuard {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

/// Exclusive write access to a page. Changes become visible to other nodes only at
/// [`WriteGuard::commit`]; dropping the guard discards them. Hold one write guard at a time:
/// a node that waits for a page while it holds another can deadlock with a node doing the
/// opposite (the access then fails with [`DsmError::Stuck`]).
pub struct WriteGuard {
    pub(super) dsm: Dsm,
    pub(super) page: PageId,
    pub(super) frame: Arc<Frame>,
    pub(super) version: u64,
    pub(super) data: Vec<u8>,
    pub(super) _writer: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGuard")
            .field("page", &self.page)
            .field("version", &self.version)
            .finish()
    }
}

impl WriteGuard {
    /// The version this node owns the page at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Publishes the changes. With backups on, the backup node stores them first, so that
    /// nothing another node can see is missing from the backup. A backup that does not answer
    /// is replaced (the manager chooses another); an error means the changes were discarded.
    pub async fn commit(self) -> Result<(), DsmError> {
        // A guard taken under the lease may be committed after it ran out: published then,
        // the write could be served to a reader, or acknowledged, after the cluster had given
        // the page up on this node. A lease renewed late (a leader whose acknowledgements lag
        // as the voters change, seen on the leader itself in an audit) is waited for a moment.
        self.dsm.alive()?;
        if !self.dsm.host.leased_within(LEASE_BACK).await {
            self.dsm.alive()?;
            return Err(DsmError::NoLease { page: self.page });
        }
        let data = Arc::new(self.data);
        let (backup, commit) = {
            let mut s = self.frame.lock();
            s.commits = s.commits.saturating_add(1);
            (s.backup_node, s.commits)
        };
        if let Some(node) = backup.filter(|&b| b != self.dsm.me()) {
            let request = Request::Backup {
                page: self.page,
                version: self.version,
                commit,
                data: PageBytes::shared(&data),
            };
            let ctx = self.dsm.host.context();
            let stored = ctx.tell::<_, Response>(node, DSM, self.page.key(), &request).await;
            if !matches!(stored, Ok(Response::Ok)) {
                tracing::info!(page = %self.page, backup = node.0, "dsm: backup did not answer; asking for another");
                let request = Request::Rebackup {
                    node: self.dsm.me(),
                    version: self.version,
                    commit,
                    failed: node,
                    data: PageBytes::shared(&data),
                };
                let asked = {
                    let _rebacking = self.frame.rebacking();
                    self.dsm.ask(self.page.key(), &request).await
                };
                match asked {
                    Ok(Response::BackedUp(new)) => self.frame.lock().backup_node = Some(new),
                    Ok(Response::Ok) => self.frame.lock().backup_node = None,
                    // Refused (`Invalid`): the manager's entry names another owner, or a newer
                    // version.
                    Err(DsmError::Protocol(_)) => {
                        // Not kept as the page either: read here, or served on a hint, it would
                        // go stale at the next write where the page lives now.
                        self.frame.invalidate(self.version);
                        return Err(DsmError::Disowned { page: self.page });
                    }
                    Ok(other) => {
                        self.frame.lock().write = false;
                        return Err(DsmError::Protocol(format!("rebackup answered {other:?}")));
                    }
                    Err(e) => {
                        self.frame.lock().write = false;
                        return Err(e);
                    }
                }
            }
        }
        self.frame.lock().data = Some(data);
        Ok(())
    }
}

impl std::ops::Deref for WriteGuard {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for WriteGuard {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

/// How long a commit waits for a lease that ran out to be renewed: a few ping intervals,
/// well under the failure timeout after which the cluster would declare the node failed.
const LEASE_BACK: Duration = Duration::from_millis(500);

/// A lock held; [`LockGuard::unlock`] releases it. A guard dropped without it (an early
/// return, a panic unwinding) releases the lock in a task of its own, as does an unlock whose
/// release failed: a lock is never left held by a node that no longer holds its guard.
#[derive(Debug)]
pub struct LockGuard {
    pub(super) dsm: Dsm,
    pub(super) id: u64,
    pub(super) token: Token,
    pub(super) released: bool,
    /// Made before the lock was granted, by a [`Dsm::lock`] still asking.
    pub(super) asking: bool,
}

impl LockGuard {
    /// Releases the lock. On an error the release is tried again in the background, a few
    /// times over (each up to the access deadline).
    pub async fn unlock(mut self) -> Result<(), DsmError> {
        release(&self.dsm, self.id, self.token).await?;
        self.released = true;
        Ok(())
    }
}

/// Asks the manager of lock `id` to release `token`. The node stops reporting the lock as
/// held first: it has left its critical section. Reported until the release was answered, a
/// manager that died between granting the lock to the next node and that answer was rebuilt
/// with two holders reporting, kept the first it heard, and the release then freed the lock
/// under its new holder. Released without a report, the lock is rebuilt free or held by the
/// next node, and a release that lands later frees nothing (it names its own token).
pub(super) async fn release(dsm: &Dsm, id: u64, token: Token) -> Result<(), DsmError> {
    {
        let mut held = dsm.state().held.lock().expect("held");
        if held.get(&id) == Some(&token) {
            held.remove(&id);
        }
    }
    dsm.ask(lock_key(id), &Request::Release(token)).await?;
    Ok(())
}

/// [`release`], asked again on failure a few times over: whether it was released.
async fn release_patiently(dsm: &Dsm, id: u64, token: Token) -> bool {
    // Each attempt asks until the access deadline; a node that cannot reach the lock's
    // manager for that long is about to be declared failed, which frees it too.
    for _ in 0..3 {
        match release(dsm, id, token).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(lock = id, error = %e, "dsm: releasing a dropped lock failed; asking again")
            }
        }
    }
    tracing::error!(
        lock = id,
        "dsm: a dropped lock could not be released; it stays held until this node leaves or fails"
    );
    false
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (dsm, id, token) = (self.dsm.clone(), self.id, self.token);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(lock = id, "dsm: a lock guard dropped outside a runtime cannot release its lock; it stays held until this node leaves or fails");
            return;
        };
        let asking = self.asking;
        runtime.spawn(async move {
            if !release_patiently(&dsm, id, token).await {
                return;
            }
            // A lock given up on while it was asked for: a copy of the request for it may
            // still be held at its manager (through a change) or on its way, and be granted
            // after this release. A manager serves a copy for up to the request's deadline
            // from when the copy reached it, so twice that is past the last (the margin the
            // layer keeps answers for, too).
            if asking {
                tokio::time::sleep(dsm.host.config().request_deadline * 2).await;
                release_patiently(&dsm, id, token).await;
            }
        });
    }
}
