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
    let (sent, flushes, stuck) =
        (Arc::clone(&recorder.sent), Arc::clone(&recorder.flushes), Arc::clone(&recorder.stuck));
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
    assert_eq!(*h.sent.lock().unwrap(), vec![1, 2], "the holder looked again before letting go");
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
    let outbox = Outbox::new(Box::pin(Recorder::default()), Arc::clone(&broken), 64, waited_for());
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
