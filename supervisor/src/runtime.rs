//! openraft's async runtime with a seedable random source.
//!
//! openraft draws each node's election timeout once, in `Raft::new`, through
//! `AsyncRuntime::thread_rng`. The stock runtime takes it from the OS, so a simulation could not
//! replay a seed; this one takes it from the calling thread's generator if [`seed_this_thread`]
//! fixed one (tests that run side by side in one process, each on its own thread), else from a
//! process-wide generator that [`seed`] fixes, and falls back to the OS when nothing was seeded.
//! Everything else is tokio, as in the stock runtime.

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use rand08::rngs::StdRng;
use rand08::{Rng, SeedableRng};
use std::cell::RefCell;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

static SEEDED: Mutex<Option<StdRng>> = Mutex::new(None);

/// Makes every later election timeout come from `seed`, in the order rafts are created.
pub fn seed(seed: u64) {
    *SEEDED.lock().unwrap_or_else(|p| p.into_inner()) = Some(StdRng::seed_from_u64(seed));
}

thread_local! {
    static THIS_THREAD: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes every later election timeout drawn on this thread come from `seed`, in the order
/// rafts are created on it, whatever other threads seeded: a test on a runtime of one thread
/// then replays its elections from its own seed alone.
pub fn seed_this_thread(seed: u64) {
    THIS_THREAD.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// tokio, with election timeouts drawn from a seedable generator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeededRuntime;

impl AsyncRuntime for SeededRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = StdRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        let here = THIS_THREAD.with(|rng| rng.borrow_mut().as_mut().map(|g| g.gen::<u64>()));
        if let Some(seed) = here {
            return StdRng::seed_from_u64(seed);
        }
        let mut seeded = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        match seeded.as_mut() {
            Some(rng) => StdRng::seed_from_u64(rng.gen()),
            None => StdRng::from_entropy(),
        }
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}
