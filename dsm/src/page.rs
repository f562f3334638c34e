//! Pages, and the directory keys of pages, locks and barriers.
//!
//! Every directory entry of the DSM is one key of one service. The two top bits of a key say
//! what it names, so that pages, locks and barriers share the service without colliding:
//!
//! ```text
//!   00 | segment (30 bits) | page + rotation (32 bits, so segments start on different slots)
//!   01 | lock id (62 bits)                      a lock
//!   10 | barrier id (62 bits)                   a barrier
//!   11 | slot                                   "this slot's manager died": see `taint_key`
//! ```
//!
//! The service places keys by runs of one (`slot = key % slots`), so neighbouring pages of a
//! segment fall in neighbouring slots, and a taint marker for slot `s` falls in slot `s`.

use gobelins_locator::Key;
use serde::{Deserialize, Serialize};

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;

/// The largest segment id (30 bits).
pub const MAX_SEGMENT: u32 = (1 << 30) - 1;

const KIND_SHIFT: u32 = 62;
const LOCK: u64 = 1 << KIND_SHIFT;
const BARRIER: u64 = 2 << KIND_SHIFT;
const TAINT: u64 = 3 << KIND_SHIFT;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// One page of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageId {
    /// The segment, at most [`MAX_SEGMENT`].
    pub segment: u32,
    /// The page within it.
    pub page: u32,
}

/// Where a segment's first page falls among the slots: segments start at different slots, so
/// that the pages of many small segments spread over every manager instead of piling onto the
/// first slots.
fn rotation(segment: u32) -> u32 {
    segment.wrapping_mul(0x9e37_79b9)
}

impl PageId {
    /// The page's directory key.
    pub fn key(self) -> Key {
        let segment = self.segment & MAX_SEGMENT;
        Key((u64::from(segment) << 32) | u64::from(self.page.wrapping_add(rotation(segment))))
    }
}

/// What a directory key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Named {
    /// A page.
    Page(PageId),
    /// A lock.
    Lock(u64),
    /// A barrier.
    Barrier(u64),
    /// The marker left on a slot whose manager died.
    Taint,
}

/// What `key` names.
pub(crate) fn named(key: Key) -> Named {
    match key.0 >> KIND_SHIFT {
        0 => {
            let segment = (key.0 >> 32) as u32;
            Named::Page(PageId { segment, page: (key.0 as u32).wrapping_sub(rotation(segment)) })
        }
        1 => Named::Lock(key.0 & ID_MASK),
        2 => Named::Barrier(key.0 & ID_MASK),
        _ => Named::Taint,
    }
}

/// The key of lock `id` (62 bits are kept).
pub(crate) fn lock_key(id: u64) -> Key {
    Key(LOCK | (id & ID_MASK))
}

/// The key of barrier `id` (62 bits are kept).
pub(crate) fn barrier_key(id: u64) -> Key {
    Key(BARRIER | (id & ID_MASK))
}

/// The key of the marker that says slot `slot`'s manager died and not every page in it could
/// be rebuilt. It lives in the slot it describes, so it migrates with the slot's pages: a page
/// of that slot with no entry was lost, not never written.
pub(crate) fn taint_key(slot: u32) -> Key {
    Key(TAINT | u64::from(slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_what_they_were_made_from() {
        let page = PageId { segment: 7, page: 12345 };
        assert_eq!(named(page.key()), Named::Page(page));
        assert_eq!(named(lock_key(99)), Named::Lock(99));
        assert_eq!(named(barrier_key(99)), Named::Barrier(99));
        assert_eq!(named(taint_key(5)), Named::Taint);
        assert_ne!(lock_key(1), barrier_key(1));
    }

    #[test]
    fn a_taint_marker_falls_in_the_slot_it_describes() {
        let slots = 4096u64;
        assert_eq!(taint_key(17).0 % slots, 17);
    }

    #[test]
    fn segments_start_on_different_slots_and_pages_keep_their_order() {
        let slot = |segment, page| PageId { segment, page }.key().0 % 4096;
        assert_ne!(slot(1, 0), slot(2, 0));
        assert_eq!((slot(5, 0) + 1) % 4096, slot(5, 1));
        let far = PageId { segment: MAX_SEGMENT, page: u32::MAX };
        assert_eq!(named(far.key()), Named::Page(far));
    }
}
