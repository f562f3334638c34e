//! Migration batch buffers kept for the next batch.
//!
//! A buffer fresh from the system costs a page fault for every 4 KiB the first time it is
//! written: about half of an export's time when every batch had a buffer of its own (measured
//! with `perf`, BENCHMARKS.md). Batches are shipped as they fill, a few in flight at a time, so
//! a handful of buffers, handed back when their batch's last reference drops, carry a whole
//! migration.

use bytes::Bytes;
use std::sync::{Arc, Mutex};

/// A few batch buffers, shared by the packers and the batches in flight.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl Pool {
    /// A pool that keeps at most `keep` buffers between uses.
    pub(crate) fn new(keep: usize) -> Self {
        Pool { free: Arc::default(), keep }
    }

    /// An empty buffer of at least `capacity` bytes, a kept one when there is one.
    pub(crate) fn take(&self, capacity: usize) -> Vec<u8> {
        let kept = {
            let mut free = self.free.lock().expect("pool");
            let at = free.iter().position(|b| b.capacity() >= capacity);
            at.map(|at| free.swap_remove(at))
        };
        kept.unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    /// `buf` as bytes that come back here once every copy of them has been dropped.
    pub(crate) fn bytes(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Lent { buf, pool: self.clone() })
    }

    /// Buffers waiting to be used again.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.free.lock().expect("pool").len()
    }
}

/// A buffer lent out as [`Bytes`].
struct Lent {
    buf: Vec<u8>,
    pool: Pool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut free = self.pool.free.lock().expect("pool");
        if free.len() < self.pool.keep {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_copy_drops_and_is_lent_again() {
        let pool = Pool::new(1);
        let mut buf = pool.take(1024);
        let at = buf.as_ptr();
        buf.extend_from_slice(b"batch");
        let bytes = pool.bytes(buf);
        let copy = bytes.slice(1..);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a slice still uses it");
        assert_eq!(&copy[..], b"atch");
        drop(copy);
        assert_eq!(pool.kept(), 1);
        let bigger = pool.take(4096);
        assert_ne!(bigger.as_ptr(), at, "too small a kept buffer is not lent");
        drop(bigger);
        assert_eq!(pool.kept(), 1);
        let again = pool.take(512);
        assert_eq!(again.as_ptr(), at, "the same memory, not a fresh allocation");
        assert!(again.is_empty());
    }

    #[test]
    fn no_more_than_it_may_keep_is_kept() {
        let pool = Pool::new(2);
        let lent: Vec<Bytes> = (0..5).map(|_| pool.bytes(pool.take(64))).collect();
        drop(lent);
        assert_eq!(pool.kept(), 2);
    }
}
