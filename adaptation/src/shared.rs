//! Byte strings in migrated entries that share the batch they arrived in instead of being
//! copied out of it.
//!
//! A receiver used to decode each value of a batch into a fresh, zeroed allocation and copy it
//! there: for 1 KiB values, most of a receiver's time went on the allocations and the page
//! faults of that new memory (BENCHMARKS.md). A service marks a [`Bytes`] field of its entry
//! `#[serde(with = "gobelins_adaptation::shared")]`; decoded from a batch, the field is then a
//! slice of the batch's frame, and decoded from anything else, a copy as usual. The encoding is
//! the same byte string as [`Bytes`]'s own.
//!
//! The cost: a frame stays in memory while any value sliced from it does. While most of a
//! batch's values live, that is about what was received. Once most are overwritten, the few
//! left keep what they were read into: over the supervisor's TCP transport, large frames share
//! an arena of 8 MiB (on 2 MiB pages, so that a joiner does not fault its memory in 4 KiB at a
//! time), and one value of 1 KiB can hold thousands of times its size. A service whose values
//! are overwritten unevenly, or that keeps a few small values from large batches, should copy
//! them (`Bytes::copy_from_slice`): the example service, kvdir, copies what it received once
//! the change is stable.

use bytes::Bytes;
use serde::de::{Deserializer, Error, Visitor};
use serde::Serializer;
use std::cell::RefCell;

thread_local! {
    /// The frame entries are being decoded from on this thread, while they are.
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `decode` with `frame` as the memory [`deserialize`] may share. Decoding is synchronous,
/// so the frame is this thread's for exactly as long as `decode` runs.
pub(crate) fn within<R>(frame: &Bytes, decode: impl FnOnce() -> R) -> R {
    struct Reset(Option<Bytes>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let before = self.0.take();
            FRAME.with(|f| *f.borrow_mut() = before);
        }
    }
    let before = FRAME.with(|f| f.borrow_mut().replace(frame.clone()));
    let _reset = Reset(before);
    decode()
}

/// Serializes `bytes` as a byte string, as [`Bytes`] does.
pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Deserializes a byte string: a slice of the frame being decoded when it lies in one, else a
/// copy.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
    deserializer.deserialize_bytes(Shared)
}

struct Shared;

impl<'de> Visitor<'de> for Shared {
    type Value = Bytes;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        let shared = FRAME.with(|f| {
            let frame = f.borrow();
            let frame = frame.as_ref()?;
            let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
            let at = v.as_ptr() as usize;
            (at >= start && at + v.len() <= end).then(|| frame.slice_ref(v))
        });
        Ok(shared.unwrap_or_else(|| Bytes::copy_from_slice(v)))
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Entry {
        version: u64,
        #[serde(with = "crate::shared")]
        value: Bytes,
    }

    #[test]
    fn a_value_decoded_from_a_frame_is_a_slice_of_it_and_elsewhere_a_copy() {
        let entry = Entry { version: 3, value: Bytes::from(vec![9u8; 100]) };
        let frame = Bytes::from(codec::encode(&entry).unwrap());
        let inside: Entry = within(&frame, || codec::decode(&frame)).unwrap();
        assert_eq!(inside, entry);
        let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
        let at = inside.value.as_ptr() as usize;
        assert!(at >= start && at + 100 <= end, "shares the frame's memory");

        let other = frame.to_vec();
        let outside: Entry = within(&frame, || codec::decode(&other)).unwrap();
        assert_eq!(outside, entry);
        let at = outside.value.as_ptr() as usize;
        assert!(at + 100 <= start || at >= end, "bytes from elsewhere are copied");
        let plain: Entry = codec::decode(&frame).unwrap();
        assert_ne!(plain.value.as_ptr(), inside.value.as_ptr(), "no frame: a copy");
    }

    #[test]
    fn it_encodes_as_bytes_does() {
        #[derive(Serialize)]
        struct Plain {
            version: u64,
            value: Bytes,
        }
        let value = Bytes::from_static(b"same");
        let ours = codec::encode(&Entry { version: 1, value: value.clone() }).unwrap();
        assert_eq!(ours, codec::encode(&Plain { version: 1, value }).unwrap());
    }
}
