//! The writing half of an admitted connection: frames of [`Wire`] messages (see
//! [`crate::frame`]) written with one vectored write for many, each body straight from its own
//! buffer.
//!
//! A `FramedWrite` copied every body into its buffer first, and went through a codec and a
//! buffer's bookkeeping per frame; on a 15-byte request that bookkeeping was most of the cost
//! of writing it, and on a migration batch the copy was megabytes.

use crate::error::{Result, SupervisorError};
use crate::frame::{Wire, FRAME_HEADER};
use bytes::Bytes;
use futures::Sink;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// Bytes queued past which a new frame waits for a flush: the socket, not memory, absorbs a
/// fast sender.
const BACKPRESSURE: usize = 64 * 1024;

/// Slices handed to one vectored write; the kernel takes at most 1024.
const SLICES: usize = 64;

/// Queues frames and writes them out. Partial writes are picked up where they stopped.
pub(crate) struct FrameWriter<W> {
    io: W,
    max_frame: usize,
    /// Each queued frame's header and body, oldest first.
    frames: VecDeque<([u8; FRAME_HEADER], Bytes)>,
    /// Bytes of the oldest frame already written.
    written: usize,
    /// Bytes queued and not yet written.
    queued: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer that refuses frames longer than `max_frame` (version byte included).
    pub(crate) fn new(io: W, max_frame: usize) -> Self {
        FrameWriter { io, max_frame, frames: VecDeque::new(), written: 0, queued: 0 }
    }

    /// Writes until nothing is queued.
    fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        while !self.frames.is_empty() {
            // One frame (an answer, a lone call) is written from its two parts as they lie:
            // making sixty-four slices ready for it cost more than the rest of this function,
            // and walking the queue for two, a tenth of a frame's writing.
            let lone = self.frames.front().filter(|_| self.frames.len() == 1);
            let n = if let Some((header, body)) = lone {
                let written = self.written;
                let io = Pin::new(&mut self.io);
                let result = if written < header.len() {
                    io.poll_write_vectored(
                        cx,
                        &[IoSlice::new(&header[written..]), IoSlice::new(body)],
                    )
                } else {
                    io.poll_write(cx, &body[written - header.len()..])
                };
                ready!(result)
            } else {
                let mut slices = [IoSlice::new(&[]); SLICES];
                let count = slices_of(&self.frames, self.written, &mut slices);
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))
            }
            .map_err(|e| SupervisorError::io("writing to a peer", e))?;
            if n == 0 {
                let zero = std::io::Error::from(std::io::ErrorKind::WriteZero);
                return Poll::Ready(Err(SupervisorError::io("writing to a peer", zero)));
            }
            self.consume(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Marks `n` more bytes written, dropping the frames they finish.
    fn consume(&mut self, n: usize) {
        self.queued -= n;
        self.written += n;
        while let Some((header, body)) = self.frames.front() {
            let size = header.len() + body.len();
            if self.written < size {
                break;
            }
            self.written -= size;
            self.frames.pop_front();
        }
    }
}

/// Fills `slices` with what is left to write of `frames`, the first `skip` bytes written
/// already; returns how many it filled.
fn slices_of<'a>(
    frames: &'a VecDeque<([u8; FRAME_HEADER], Bytes)>,
    mut skip: usize,
    slices: &mut [IoSlice<'a>],
) -> usize {
    let mut count = 0;
    for (header, body) in frames {
        for part in [&header[..], &body[..]] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            if count == slices.len() {
                return count;
            }
            slices[count] = IoSlice::new(&part[skip..]);
            count += 1;
            skip = 0;
        }
    }
    count
}

impl<W: AsyncWrite + Unpin> Sink<Wire> for FrameWriter<W> {
    type Error = SupervisorError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if this.queued >= BACKPRESSURE {
            ready!(this.poll_write_queued(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, wire: Wire) -> Result<()> {
        let this = self.get_mut();
        wire.fits(this.max_frame)?;
        let (header, body) = wire.into_frame();
        this.queued += header.len() + body.len();
        this.frames.push_back((header, body));
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_queued(cx))?;
        let flushed = ready!(Pin::new(&mut this.io).poll_flush(cx));
        Poll::Ready(flushed.map_err(|e| SupervisorError::io("writing to a peer", e)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let shut = ready!(Pin::new(&mut self.get_mut().io).poll_shutdown(cx));
        Poll::Ready(shut.map_err(|e| SupervisorError::io("closing a connection", e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameCodec;
    use futures::{SinkExt, StreamExt};
    use tokio_util::codec::FramedRead;

    fn wires() -> Vec<Wire> {
        (0..200u64)
            .map(|i| {
                let body = Bytes::from(vec![i as u8; (i as usize * 37) % 3000]);
                if i % 2 == 0 {
                    Wire::Request { id: i, body }
                } else {
                    Wire::Response { id: i, body }
                }
            })
            .collect()
    }

    /// Through a pipe that takes a few bytes at a time, every write partial, the frames arrive
    /// whole and in order, and the codec that reads them agrees with the writer.
    #[tokio::test]
    async fn frames_written_in_pieces_read_back_whole_and_in_order() {
        let (ours, theirs) = tokio::io::duplex(7);
        let mut writer = FrameWriter::new(ours, 1 << 20);
        let reading = tokio::spawn(async move {
            let mut frames = FramedRead::new(theirs, FrameCodec::new(1 << 20));
            let mut got = Vec::new();
            while let Some(frame) = frames.next().await {
                got.push(Wire::decode(frame.expect("frame")).expect("wire"));
            }
            got
        });
        for (i, wire) in wires().into_iter().enumerate() {
            writer.feed(wire).await.expect("queued");
            if i % 17 == 0 {
                writer.flush().await.expect("flushed");
            }
        }
        writer.close().await.expect("closed");
        assert_eq!(reading.await.expect("reader"), wires());
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_and_nothing_is_queued() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(ours, 100);
        let big = Wire::Request { id: 1, body: Bytes::from(vec![0; 100]) };
        assert!(matches!(writer.feed(big).await, Err(SupervisorError::FrameTooLarge { .. })));
        assert_eq!((writer.frames.len(), writer.queued), (0, 0));
    }
}
