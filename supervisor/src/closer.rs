//! How a connection is closed, and how its tasks learn of it.
//!
//! Every frame read and every frame sent asks whether the connection is closed, and a
//! `CancellationToken` answers that under a mutex, while waiting on one registers in a waiter
//! list (another lock each way). A round trip did that about six times on each side. Here the
//! question is one atomic load, and the reader does not wait on the token at all: closing the
//! connection aborts it. The token stays for what waits on a close while it writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::AbortHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A connection's closed state, shared by its reader, its outbox and its callers.
pub(crate) struct Closer {
    closed: AtomicBool,
    token: CancellationToken,
    reader: Mutex<Option<AbortHandle>>,
}

impl Closer {
    /// Open, and closed with `token` only by [`Closer::close`]: a parent token cancelled
    /// alone wakes the writers that wait on it, not the reader, so whoever cancels a parent
    /// closes its connections too (the transport's shutdown does).
    pub(crate) fn new(token: CancellationToken) -> Arc<Closer> {
        Arc::new(Closer { closed: AtomicBool::new(false), token, reader: Mutex::new(None) })
    }

    /// Whether the connection is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection: its writers stop, its reader is aborted.
    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.token.cancel();
        if let Some(reader) = self.reader().take() {
            reader.abort();
        }
    }

    /// Resolves once the connection is closed (or its parent token cancelled).
    pub(crate) fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Names the task reading the connection, for [`Closer::close`] to abort. Closed before
    /// the reader was named: aborted at once.
    pub(crate) fn set_reader(&self, reader: AbortHandle) {
        *self.reader() = Some(reader);
        // `close` may have run between the spawn and the line above, and found no reader.
        if self.is_closed() {
            if let Some(reader) = self.reader().take() {
                reader.abort();
            }
        }
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Option<AbortHandle>> {
        self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn closing_aborts_the_reader_and_wakes_the_writers() {
        let closer = Closer::new(CancellationToken::new());
        let reader = tokio::spawn(std::future::pending::<()>());
        closer.set_reader(reader.abort_handle());
        let waiting = {
            let closer = Arc::clone(&closer);
            tokio::spawn(async move { closer.closed().await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!closer.is_closed());
        closer.close();
        assert!(closer.is_closed());
        let aborted = tokio::time::timeout(Duration::from_secs(1), reader).await;
        assert!(aborted.expect("the reader ended").expect_err("aborted").is_cancelled());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the writer woke")
            .expect("no panic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_named_after_the_close_is_aborted_at_once() {
        let closer = Closer::new(CancellationToken::new());
        closer.close();
        let reader = tokio::spawn(std::future::pending::<()>());
        closer.set_reader(reader.abort_handle());
        let aborted = tokio::time::timeout(Duration::from_secs(1), reader).await;
        assert!(aborted.expect("the reader ended").expect_err("aborted").is_cancelled());
    }
}
