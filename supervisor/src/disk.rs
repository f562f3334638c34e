//! Work that waits for the disk, kept off the runtime's workers where that is safe.
//!
//! A synced write takes from a fraction of a millisecond to tens of milliseconds on a busy or
//! networked disk. On a multi-thread runtime, the agent's, a worker that waits for it holds every
//! task queued on it (requests, migrations, the leader's pings), so the wait goes to tokio's
//! blocking threads. In this repository a current-thread runtime is a simulation's or a scenario
//! test's: there a thread of its own would bring the wall clock into a run that must replay from
//! its seed, so the work stays inline.

/// Whether work that waits for the disk should leave the calling thread (see the module's doc).
pub(crate) fn off_workers() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Runs `work` on a blocking thread when [`off_workers`], inline otherwise. `Err` if the
/// blocking task panicked, or was cancelled by the runtime's shutdown before it began; inline,
/// a panic unwinds to the caller.
pub(crate) async fn on_disk<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if !off_workers() {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work).await
}
