//! The writing side of a connection, shared by every task that sends on it: callers writing
//! their requests, the reader writing answers. Frames are queued, and whoever holds the socket
//! writes everything queued before one flush, so that many requests or answers in flight leave
//! in one system call instead of one each. A task that finds the socket busy leaves its frame
//! to the holder, which looks at the queue again before it lets go. A frame that finds the
//! socket free and nothing queued goes to it directly.

use crate::closer::Closer;
use crate::error::{Result, SupervisorError};
use crate::frame::Wire;
use futures::Sink;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

/// The frame sink of a connection.
pub(crate) type FrameSink = Pin<Box<dyn Sink<Wire, Error = SupervisorError> + Send>>;

/// Whether the caller of request `id` has stopped waiting for its answer.
pub(crate) type Abandoned = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// How many of the largest frames a connection may queue before it is given up on: beyond a
/// burst, what a peer does not read would otherwise grow without bound, answers to requests it
/// keeps sending most of all.
const QUEUED_FRAMES: usize = 16;

/// Frames waiting for the socket, and their bytes.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Wire>,
    bytes: usize,
}

impl Queue {
    fn push_back(&mut self, wire: Wire) {
        self.bytes += wire.frame_len();
        self.frames.push_back(wire);
    }

    fn pop_front(&mut self) -> Option<Wire> {
        let wire = self.frames.pop_front()?;
        self.bytes -= wire.frame_len();
        Some(wire)
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

/// Frames waiting to be written on one connection, and the socket they go to.
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    /// The futures crate's lock, not tokio's: taken and let go once per write, and tokio's
    /// took its waiter list's lock to let go even when nobody waited.
    sink: futures::lock::Mutex<FrameSink>,
    /// The connection's closer, closed when a write fails: the connection is then
    /// unusable, and its callers must hear `Closed` now rather than at their deadline, since
    /// another task wrote their frame. Once closed, nothing more is written.
    broken: Arc<Closer>,
    /// The largest frame the sink takes: a frame over it is refused to its own sender, not
    /// found by whoever writes it, which would break the connection for all.
    max_frame: usize,
    /// A request still queued when its caller gave up is not written: a peer already behind
    /// would spend its time on work nobody waits for, and fall further behind.
    abandoned: Abandoned,
}

impl Outbox {
    pub(crate) fn new(
        sink: FrameSink,
        broken: Arc<Closer>,
        max_frame: usize,
        abandoned: Abandoned,
    ) -> Arc<Outbox> {
        let sink = futures::lock::Mutex::new(sink);
        Arc::new(Outbox { queue: Mutex::default(), sink, broken, max_frame, abandoned })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `wire`, or, past [`QUEUED_FRAMES`] of the largest frames, gives the connection
    /// up: closes it and returns `Unread`.
    fn enqueue(&self, wire: Wire) -> Result<()> {
        let mut queue = self.queue();
        queue.push_back(wire);
        let bytes = queue.bytes;
        if bytes <= QUEUED_FRAMES * self.max_frame || queue.frames.len() == 1 {
            return Ok(());
        }
        drop(queue);
        Err(self.failed(SupervisorError::Unread { bytes }))
    }

    /// Queues `wire` without writing it: the reader does so while more requests are already
    /// read, and writes their answers together when it has to wait. `FrameTooLarge` for a
    /// frame the connection cannot carry.
    pub(crate) fn push(&self, wire: Wire) -> Result<()> {
        wire.fits(self.max_frame)?;
        self.enqueue(wire)
    }

    /// Writes `wire`, after what is queued, unless another task holds the socket: the frame is
    /// queued then, and that task writes it before it lets go. `Err` when the frame is too
    /// large or the connection broke.
    pub(crate) async fn send(self: &Arc<Self>, wire: Wire) -> Result<()> {
        wire.fits(self.max_frame)?;
        // The socket free and nothing older queued (a lone call, an answer): the frame goes
        // to the socket without passing through the queue, two of its locks fewer.
        if let Some(mut sink) = self.sink.try_lock() {
            if self.queue().is_empty() && !self.broken.is_closed() {
                match poll_fn(|cx| Poll::Ready(sink.as_mut().poll_ready(cx))).await {
                    Poll::Ready(Ok(())) => {
                        if let Err(error) = sink.as_mut().start_send(wire) {
                            return Err(self.failed(error));
                        }
                    }
                    Poll::Ready(Err(error)) => return Err(self.failed(error)),
                    // The sink is full: the frame waits its turn in the queue.
                    Poll::Pending => self.enqueue(wire)?,
                }
                self.drain(sink).await?;
                if self.queue().is_empty() {
                    return Ok(());
                }
                return self.write_queued().await;
            }
            drop(sink);
        }
        self.enqueue(wire)?;
        self.write_queued().await
    }

    /// Writes what is queued, unless another task holds the socket (it writes it then).
    pub(crate) async fn write_queued(self: &Arc<Self>) -> Result<()> {
        loop {
            let Some(sink) = self.sink.try_lock() else {
                return self.check();
            };
            self.drain(sink).await?;
            // A frame queued after the last look but before the socket was let go would wait
            // for the next write: look once more.
            if self.queue().is_empty() {
                return Ok(());
            }
        }
    }

    fn check(&self) -> Result<()> {
        if self.broken.is_closed() {
            return Err(SupervisorError::Closed);
        }
        Ok(())
    }

    /// Writes every queued frame, flushing once the queue is empty. Cancel-safe: a frame is
    /// taken from the queue only once the sink has room for it, and a holder dropped half way
    /// hands the rest to a task of its own.
    async fn drain(
        self: &Arc<Self>,
        mut sink: futures::lock::MutexGuard<'_, FrameSink>,
    ) -> Result<()> {
        if self.broken.is_closed() {
            return Err(self.failed(SupervisorError::Closed));
        }
        // Most often the socket takes everything at once. Nothing then waits, so there is
        // nothing to make cancel-safe and no close to race: a write is one pass of the loop
        // below, without the guard, the race and the future they cost.
        let at_once = poll_fn(|cx| Poll::Ready(self.write_now(&mut sink, cx))).await;
        let result = match at_once {
            Poll::Ready(result) => result,
            Poll::Pending => self.drain_waiting(sink).await,
        };
        result.map_err(|error| self.failed(error))
    }

    /// Hands the sink every queued frame it has room for, then flushes it, as far as the socket
    /// takes it without waiting. Frames handed over stay with the sink, which a later flush
    /// writes, whoever makes it.
    fn write_now(&self, sink: &mut FrameSink, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            ready!(sink.as_mut().poll_ready(cx))?;
            let Some(wire) = self.queue().pop_front() else { break };
            if matches!(wire, Wire::Request { id, .. } if (self.abandoned)(id)) {
                continue;
            }
            sink.as_mut().start_send(wire)?;
        }
        sink.as_mut().poll_flush(cx)
    }

    /// [`Outbox::drain`] once the socket is full: waits for it to take the rest. Cancel-safe:
    /// a frame is taken from the queue only once the sink has room for it, and a holder
    /// dropped half way hands the rest to a task of its own.
    async fn drain_waiting(
        self: &Arc<Self>,
        mut sink: futures::lock::MutexGuard<'_, FrameSink>,
    ) -> Result<()> {
        let mut unfinished = Unfinished { outbox: Some(Arc::clone(self)) };
        let writing = poll_fn(|cx| self.write_now(&mut sink, cx));
        // A connection closed (silent past a deadline, replaced, shut down) while its socket
        // is full must not keep a task writing to it, nor deliver its requests late. Raced
        // only once a write waits: waiting for the close costs a lock each way.
        let mut writing = std::pin::pin!(writing);
        let result = tokio::select! {
            biased;
            _ = self.broken.closed() => Err(SupervisorError::Closed),
            result = &mut writing => result,
        };
        unfinished.outbox = None;
        result
    }

    /// A write failed, or the connection closed while it waited: the connection is
    /// unusable. Returns `error`.
    fn failed(&self, error: SupervisorError) -> SupervisorError {
        // Once: every writer waiting on the connection fails with it.
        if !self.broken.is_closed() {
            if error.is_peer_gone() {
                tracing::debug!(%error, "the peer reset a connection being written; closing it (its callers retry on a new one)");
            } else {
                tracing::warn!(%error, "a connection's writing failed; closing it (its callers retry on a new one)");
            }
        }
        self.broken.close();
        self.queue().clear();
        error
    }
}

/// Dropped before the queue was written (its holder was cancelled): writes the rest from a
/// task of its own, so that no frame waits for a write that may never come.
struct Unfinished {
    outbox: Option<Arc<Outbox>>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(outbox) = self.outbox.take() else { return };
        if outbox.broken.is_closed() {
            return;
        }
        // Dropped with its runtime: nothing is left to write for.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let sink = outbox.sink.lock().await;
            // A failure closes `broken`; the callers then hear `Closed`.
            if outbox.drain(sink).await.is_ok() {
                // What was queued while this task wrote, by tasks that found the socket held.
                let _ = outbox.write_queued().await;
            }
        });
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
