//! Buffers for migration batches, used again once their batch is delivered.
//!
//! The first write to fresh memory costs a page fault per 4 KiB: on the machines we measure,
//! packing 3 MB of entries into fresh buffers took ten times as long as packing them into
//! buffers already touched (BENCHMARKS.md, "Migration in runs"). A sender packs while it
//! ships, so a batch's buffer comes back while the rest of the change is still being packed.

use bytes::Bytes;
use std::sync::Mutex;

/// Free batch buffers, at most `keep` of them.
pub(crate) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    /// The capacity a buffer must have to be kept: one made for a batch.
    capacity: usize,
    keep: usize,
}

impl Pool {
    /// Keeps up to `keep` buffers of at least `capacity` bytes.
    pub(crate) fn new(capacity: usize, keep: usize) -> Self {
        Pool { free: Mutex::new(Vec::new()), capacity, keep }
    }

    /// An empty buffer of at least `capacity` bytes: one given back, or a new one.
    pub(crate) fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Takes back the buffer behind `body`, a batch sent, unless something still holds it
    /// (a send abandoned half way, a receiver in this process still reading it).
    pub(crate) fn give(&self, body: Bytes) {
        let Ok(mut buffer) = body.try_into_mut() else { return };
        buffer.clear();
        // The whole allocation, from its start: the body began after the room left for its
        // head.
        let buffer = Vec::from(buffer);
        // One grown past twice a batch's size (an entry of megabytes) is freed, not kept for
        // the node's life.
        if buffer.capacity() < self.capacity || buffer.capacity() > 2 * self.capacity {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(buffer);
        }
    }

    /// Buffers free now.
    pub(crate) fn len(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_sent_and_released_is_used_again_whole() {
        let pool = Pool::new(1024, 2);
        let mut buffer = pool.take();
        assert!(buffer.capacity() >= 1024);
        let at = buffer.as_ptr();
        buffer.extend_from_slice(&[7; 600]);
        // As a batch is sent: frozen, its head skipped.
        let body = Bytes::from(buffer).slice(32..);
        let held = body.clone();
        pool.give(body);
        assert_eq!(pool.len(), 0, "a buffer still read elsewhere is not taken back");
        pool.give(held);
        assert_eq!(pool.len(), 1);
        let again = pool.take();
        assert_eq!(again.as_ptr(), at, "the same memory");
        assert!(again.is_empty() && again.capacity() >= 1024);
    }

    #[test]
    fn it_keeps_no_more_than_it_was_told_and_nothing_too_small() {
        let pool = Pool::new(64, 1);
        pool.give(Bytes::from(vec![0u8; 16]));
        assert_eq!(pool.len(), 0, "too small for a batch");
        pool.give(Bytes::from(vec![0u8; 1024]));
        assert_eq!(pool.len(), 0, "grown far past a batch");
        pool.give(Bytes::from(Vec::with_capacity(64)));
        pool.give(Bytes::from(Vec::with_capacity(64)));
        assert_eq!(pool.len(), 1);
    }
}
