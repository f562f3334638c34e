//! Raw loopback TCP moving the bytes a migration moved, in the same write sizes: the baseline
//! of the migration figures of both examples.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where a raw transfer's bytes come from and where they land.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Landing {
    /// One `write_size` chunk sent again and again and read into one reused buffer, both staying
    /// in the cache: the wire alone.
    Reused,
    /// Every byte its own, filled before the clock starts, and kept where it lands in memory the
    /// reader touched before the clock: TCP at its best for the same bytes.
    Touched,
    /// Every byte its own, kept where it lands in memory fresh from the kernel, each page faulted
    /// in as the bytes reach it. A joining node keeps what it receives in memory it did not have
    /// (the transport's frame buffers, which the decoded entries keep), so this is the raw
    /// transfer doing the joiner's job; it is the dearer end, since a joiner's allocator may hand
    /// it memory freed before. A buffer from the allocator is neither this nor `Touched`
    /// for sure: 20.8 MB took from 5.9 to 25.5 ms depending on what the process freed before
    /// (BENCHMARKS.md, adaptation layer, stop 40), and the old baseline, such a buffer, swung
    /// with it. How dear a fresh page is depends on the machine (a VM here; transparent huge
    /// pages on `madvise`, so this mapping faults 4 KiB at a time): the example prints the
    /// setting.
    Fresh,
    /// As `Fresh`, the mapping advised to be backed by 2 MiB pages where the kernel has
    /// transparent huge pages on `madvise`: how an agent's transport lands large frames since
    /// stop 62 (`supervisor/src/huge_pages.rs`), so this is the raw transfer with the same help.
    FreshHuge,
}

/// One raw loopback TCP connection made ready to move `total` bytes: its reader waiting with its
/// buffer made, its writer with its bytes.
struct RawStream {
    socket: TcpStream,
    source: Vec<u8>,
    total: usize,
    write_size: usize,
    distinct: bool,
    reader: tokio::task::JoinHandle<(Option<memmap2::MmapMut>, Vec<u8>)>,
}

impl RawStream {
    async fn open(total: usize, write_size: usize, landing: Landing) -> RawStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut fresh = matches!(landing, Landing::Fresh | Landing::FreshHuge).then(|| {
                let mapping = memmap2::MmapMut::map_anon(total)
                    .expect("an anonymous mapping for the raw baseline");
                if landing == Landing::FreshHuge {
                    // Advice only: refused, the baseline is `Fresh`'s.
                    let _ = mapping.advise(memmap2::Advice::HugePage);
                }
                mapping
            });
            let heap_bytes = match landing {
                Landing::Reused => 1 << 20,
                Landing::Touched => total,
                Landing::Fresh | Landing::FreshHuge => 0,
            };
            let mut heap = vec![0u8; heap_bytes];
            // `vec!` of zeros may be fresh pages the kernel has not given yet; touch one byte a
            // page.
            heap.iter_mut().step_by(4096).for_each(|b| *b = 1);
            let buf: &mut [u8] = match fresh.as_mut() {
                Some(mapping) => &mut mapping[..],
                None => &mut heap[..],
            };
            ready.send(()).expect("the writer waits");
            let mut got = 0;
            while got < total {
                let at = if landing == Landing::Reused { 0 } else { got };
                let n = socket.read(&mut buf[at..]).await.expect("read");
                assert!(n > 0, "sender closed early");
                got += n;
            }
            socket.write_all(&[1]).await.expect("ack");
            (fresh, heap)
        });
        let socket = TcpStream::connect(addr).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        let distinct = landing != Landing::Reused;
        let source: Vec<u8> =
            (0..if distinct { total } else { write_size }).map(|i| i as u8).collect();
        if is_ready.await.is_err() {
            // The reader ended before it was ready: its panic says why.
            reader.await.expect("the raw baseline's reader");
            unreachable!("a reader that ended without a panic was ready");
        }
        RawStream { socket, source, total, write_size, distinct, reader }
    }

    /// Writes every byte once `go` opens, and returns when the reader has them all: when it
    /// began and ended, and what is dropped only after the clock stops (its bytes and the
    /// reader, with the reader's buffers: freeing megabytes may be an munmap).
    async fn send(mut self, go: Arc<tokio::sync::Barrier>) -> Sent {
        go.wait().await;
        let began = Instant::now();
        let mut sent = 0;
        while sent < self.total {
            let n = self.write_size.min(self.total - sent);
            let at = if self.distinct { sent } else { 0 };
            self.socket.write_all(&self.source[at..at + n]).await.expect("write");
            sent += n;
        }
        let mut ack = [0u8; 1];
        self.socket.read_exact(&mut ack).await.expect("ack");
        Sent { began, ended: Instant::now(), source: self.source, reader: self.reader }
    }
}

/// One connection's transfer, timed by its writer.
struct Sent {
    began: Instant,
    ended: Instant,
    source: Vec<u8>,
    reader: tokio::task::JoinHandle<(Option<memmap2::MmapMut>, Vec<u8>)>,
}

/// Raw loopback TCP moving `shares` bytes over as many connections at once (one per sender of
/// the migration it is compared with, each its sender's bytes), in writes of `write_size`:
/// from the first write of any until the last reader has every byte, each connection timed by
/// its own writer (the first past the barrier may start before any other task wakes). The
/// readers' buffers are made before and dropped after.
async fn raw_transfer(shares: &[usize], write_size: usize, landing: Landing) -> Duration {
    let mut streams = Vec::new();
    for &total in shares {
        streams.push(RawStream::open(total, write_size, landing).await);
    }
    let go = Arc::new(tokio::sync::Barrier::new(streams.len()));
    let writers: Vec<_> =
        streams.into_iter().map(|s| tokio::spawn(s.send(Arc::clone(&go)))).collect();
    let mut done = Vec::new();
    for writer in writers {
        done.push(writer.await.expect("writer"));
    }
    let (Some(began), Some(ended)) =
        (done.iter().map(|s| s.began).min(), done.iter().map(|s| s.ended).max())
    else {
        return Duration::ZERO;
    };
    for sent in done {
        drop(sent.source);
        drop(sent.reader.await.expect("reader"));
    }
    ended - began
}

/// The median of three raw transfers: two of the same bytes a moment apart differed by up to
/// 3.6x here (BENCHMARKS.md, adaptation layer, stop 36), and one sample went into a ratio whole.
pub(crate) async fn raw_median(shares: &[usize], write_size: usize, landing: Landing) -> Duration {
    let mut samples = [
        raw_transfer(shares, write_size, landing).await,
        raw_transfer(shares, write_size, landing).await,
        raw_transfer(shares, write_size, landing).await,
    ];
    samples.sort();
    samples[1]
}
