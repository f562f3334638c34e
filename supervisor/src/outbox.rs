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
mod tests {
    use super::*;
    use futures::task::{Context, Poll};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_util::sync::CancellationToken;

    /// A sink that records what it is sent, counts its flushes, and can be made to wait.
    #[derive(Default)]
    struct Recorder {
        sent: Arc<Mutex<Vec<u64>>>,
        flushes: Arc<AtomicUsize>,
        stuck: Arc<std::sync::atomic::AtomicBool>,
        /// How many more times the sink says it has no room for a frame.
        full: Arc<AtomicUsize>,
    }

    impl Sink<Wire> for Recorder {
        type Error = SupervisorError;
        fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
            if self.full.load(Ordering::SeqCst) > 0 {
                self.full.fetch_sub(1, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, wire: Wire) -> Result<()> {
            let id = match wire {
                Wire::Request { id, .. } | Wire::Response { id, .. } => id,
            };
            self.sent.lock().unwrap().push(id);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
            if self.stuck.load(Ordering::SeqCst) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn request(id: u64) -> Wire {
        Wire::Request { id, body: bytes::Bytes::new() }
    }

    /// Every caller still waits.
    fn waited_for() -> Abandoned {
        Box::new(|_| false)
    }

    #[tokio::test]
    async fn frames_queued_while_the_socket_is_held_leave_with_the_holders_flush() {
        let recorder = Recorder::default();
        let (sent, flushes) = (Arc::clone(&recorder.sent), Arc::clone(&recorder.flushes));
        let outbox = Outbox::new(
            Box::pin(recorder),
            Closer::new(CancellationToken::new()),
            1 << 20,
            waited_for(),
        );
        for id in 0..5 {
            outbox.push(request(id)).unwrap();
        }
        outbox.send(request(5)).await.unwrap();
        assert_eq!(*sent.lock().unwrap(), vec![0, 1, 2, 3, 4, 5], "in order, every one");
        assert_eq!(flushes.load(Ordering::SeqCst), 1, "one flush for all of them");
    }

    /// A frame that finds the socket free but the sink without room waits in the queue, and
    /// leaves once the sink has room, alone and once.
    #[tokio::test]
    async fn a_frame_the_sink_has_no_room_for_yet_waits_its_turn_and_leaves_once() {
        let recorder = Recorder::default();
        let (sent, flushes, full) =
            (Arc::clone(&recorder.sent), Arc::clone(&recorder.flushes), Arc::clone(&recorder.full));
        full.store(2, Ordering::SeqCst);
        let outbox = Outbox::new(
            Box::pin(recorder),
            Closer::new(CancellationToken::new()),
            1 << 20,
            waited_for(),
        );
        outbox.send(request(1)).await.unwrap();
        assert_eq!(*sent.lock().unwrap(), vec![1]);
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        assert_eq!(full.load(Ordering::SeqCst), 0, "the sink was asked until it had room");
        assert!(outbox.queue().is_empty());
    }

    /// An outbox whose socket is full: a task holds it, stuck in its flush with request 1,
    /// and request 2 was left to that holder.
    struct Held {
        outbox: Arc<Outbox>,
        sent: Arc<Mutex<Vec<u64>>>,
        flushes: Arc<AtomicUsize>,
        stuck: Arc<std::sync::atomic::AtomicBool>,
        broken: Arc<Closer>,
        /// Requests whose callers gave up.
        gave_up: Arc<Mutex<Vec<u64>>>,
        holder: tokio::task::JoinHandle<Result<()>>,
    }

    async fn held() -> Held {
        let recorder = Recorder::default();
        let (sent, flushes, stuck) = (
            Arc::clone(&recorder.sent),
            Arc::clone(&recorder.flushes),
            Arc::clone(&recorder.stuck),
        );
        let broken = Closer::new(CancellationToken::new());
        let gave_up: Arc<Mutex<Vec<u64>>> = Arc::default();
        let abandoned = {
            let gave_up = Arc::clone(&gave_up);
            Box::new(move |id| gave_up.lock().unwrap().contains(&id))
        };
        let outbox = Outbox::new(Box::pin(recorder), Arc::clone(&broken), 1 << 20, abandoned);
        stuck.store(true, Ordering::SeqCst);
        let holder = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move { outbox.send(request(1)).await })
        };
        tokio::task::yield_now().await;
        outbox.send(request(2)).await.unwrap();
        assert_eq!(*sent.lock().unwrap(), vec![1], "left to the holder");
        Held { outbox, sent, flushes, stuck, broken, gave_up, holder }
    }

    #[tokio::test]
    async fn a_frame_queued_while_the_holder_flushes_is_written_by_the_holder() {
        let h = held().await;
        h.stuck.store(false, Ordering::SeqCst);
        h.holder.await.unwrap().unwrap();
        assert_eq!(
            *h.sent.lock().unwrap(),
            vec![1, 2],
            "the holder looked again before letting go"
        );
        // Taken into the write the holder was waiting on, not one of its own.
        assert_eq!(h.flushes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_while_it_was_queued_is_not_written() {
        let h = held().await;
        h.outbox.push(Wire::Response { id: 3, body: bytes::Bytes::new() }).unwrap();
        h.gave_up.lock().unwrap().extend([2, 3]);
        h.stuck.store(false, Ordering::SeqCst);
        h.holder.await.unwrap().unwrap();
        assert_eq!(
            *h.sent.lock().unwrap(),
            vec![1, 3],
            "request 2 was dropped; an answer is always written"
        );
    }

    #[tokio::test]
    async fn a_holder_cancelled_while_flushing_leaves_nothing_behind() {
        let h = held().await;
        h.holder.abort();
        assert!(h.holder.await.unwrap_err().is_cancelled());
        h.stuck.store(false, Ordering::SeqCst);
        for _ in 0..100 {
            if h.flushes.load(Ordering::SeqCst) > 0 && h.sent.lock().unwrap().len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*h.sent.lock().unwrap(), vec![1, 2], "the second frame was written too");
        assert!(h.flushes.load(Ordering::SeqCst) >= 1, "and flushed by the task left behind");
    }

    #[tokio::test]
    async fn a_frame_too_large_is_refused_to_its_sender_alone() {
        let recorder = Recorder::default();
        let sent = Arc::clone(&recorder.sent);
        let broken = Closer::new(CancellationToken::new());
        let outbox = Outbox::new(Box::pin(recorder), Arc::clone(&broken), 64, waited_for());
        let big = Wire::Request { id: 1, body: bytes::Bytes::from(vec![0u8; 100]) };
        assert!(matches!(outbox.send(big).await, Err(SupervisorError::FrameTooLarge { .. })));
        assert!(!broken.is_closed(), "the connection stays up for everyone else");
        outbox.send(request(2)).await.unwrap();
        assert_eq!(*sent.lock().unwrap(), vec![2]);
    }

    /// A peer that sends requests and reads nothing: the answers queued for it grow only to
    /// a bound, then the connection is given up on, and what it held goes.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_given_up_on_before_its_answers_grow_without_bound() {
        let broken = Closer::new(CancellationToken::new());
        let outbox =
            Outbox::new(Box::pin(Recorder::default()), Arc::clone(&broken), 64, waited_for());
        let answer = |id| Wire::Response { id, body: bytes::Bytes::from(vec![0u8; 40]) };
        let fit = QUEUED_FRAMES * 64 / answer(0).frame_len();
        for id in 0..fit as u64 {
            outbox.push(answer(id)).expect("a burst fits");
        }
        assert!(!broken.is_closed());
        let refused = outbox.push(answer(fit as u64));
        assert!(matches!(refused, Err(SupervisorError::Unread { .. })), "{refused:?}");
        assert!(broken.is_closed(), "the connection is given up on");
        assert!(outbox.queue().is_empty(), "and nothing it queued is kept");
    }

    #[tokio::test]
    async fn a_connection_closed_while_its_socket_is_full_stops_writing_and_keeps_nothing() {
        let h = held().await;
        h.broken.close();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), h.holder).await;
        assert!(matches!(stopped.expect("stopped").unwrap(), Err(SupervisorError::Closed)));
        assert!(h.outbox.queue().is_empty(), "no request delivered late on a closed connection");
        assert!(h.outbox.send(request(3)).await.is_err(), "and nothing more is sent on it");
    }

    #[tokio::test]
    async fn a_failed_write_breaks_the_connection_for_every_sender() {
        struct Failing;
        impl Sink<Wire> for Failing {
            type Error = SupervisorError;
            fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn start_send(self: Pin<&mut Self>, _: Wire) -> Result<()> {
                Err(SupervisorError::Closed)
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let broken = Closer::new(CancellationToken::new());
        let outbox = Outbox::new(Box::pin(Failing), Arc::clone(&broken), 1 << 20, waited_for());
        assert!(outbox.send(request(1)).await.is_err());
        assert!(broken.is_closed(), "the connection is closed, so its callers hear it");
    }
}
