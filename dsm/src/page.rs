//! Pages, and the directory keys of pages, locks and barriers.
//!
//! Every directory entry of the DSM is one key of one service. The two top bits of a key say
//! what it names, so that pages, locks and barriers share the service without colliding:
//!
//! ```text
//!   00 | segment (30 bits) | page × SPREAD + rotation (32 bits; segments start on different slots)
//!   01 | lock id (62 bits, low 32 spread)      a lock
//!   10 | barrier id (62 bits, low 32 spread)   a barrier
//!   11 | slot                                   "this slot's manager died": see `taint_key`
//! ```
//!
//! The service places keys by runs of one (`slot = key % slots`), so a taint marker for slot
//! `s` falls in slot `s`. A page's 32 bits are its number times an odd constant (a permutation
//! of the page numbers) plus the segment's rotation: the locator gives each node ranges of
//! consecutive slots (one each when a service's slots are first shared out; a node that joins
//! later takes a share from the end of every member's ranges), and consecutive pages step
//! through the slots by about 1/φ of their count, so any run of a segment's pages is shared out
//! evenly between the ranges, as `page % n` would share it. Consecutive pages in consecutive
//! slots piled a small segment onto one manager.

use gobelins_locator::Key;
use serde::{Deserialize, Serialize};

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;

/// The largest segment id (30 bits).
pub const MAX_SEGMENT: u32 = (1 << 30) - 1;

/// The most bytes a segment can hold: 2^32 pages (16 TiB). Past them, page ids would wrap
/// onto other segments' pages or the same segment's.
pub const MAX_SEGMENT_LEN: u64 = (u32::MAX as u64 + 1) * PAGE_SIZE as u64;

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

/// The page-number multiplier. Only its low bits decide the slot: 0x9e3 is 2531, the odd number
/// nearest 4096/φ.
const SPREAD: u32 = 0x9e37_79e3;

/// Its inverse modulo 2^32, by Newton's iteration (each step doubles the correct low bits).
const UNSPREAD: u32 = {
    let mut x = SPREAD;
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u32.wrapping_sub(SPREAD.wrapping_mul(x)));
        i += 1;
    }
    x
};

/// Where a segment's first page falls among the slots: segments start at different slots, so
/// that the pages of many small segments spread over every manager instead of piling onto the
/// first slots.
fn rotation(segment: u32) -> u32 {
    segment.wrapping_mul(0x9e37_79b9)
}

/// As an operator types it: `gobelins dsm discard 1 16` is "segment 1 page 16".
impl std::fmt::Display for PageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment {} page {}", self.segment, self.page)
    }
}

impl PageId {
    /// The page's directory key.
    pub fn key(self) -> Key {
        let segment = self.segment & MAX_SEGMENT;
        let spread = self.page.wrapping_mul(SPREAD).wrapping_add(rotation(segment));
        Key((u64::from(segment) << 32) | u64::from(spread))
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
            let page = (key.0 as u32).wrapping_sub(rotation(segment)).wrapping_mul(UNSPREAD);
            Named::Page(PageId { segment, page })
        }
        1 => Named::Lock(unspread_id(key.0 & ID_MASK)),
        2 => Named::Barrier(unspread_id(key.0 & ID_MASK)),
        _ => Named::Taint,
    }
}

/// Lock and barrier ids spread like pages: the low 32 bits multiplied by [`SPREAD`], so that
/// consecutive ids (a program's lock stripes, say) get managers across the cluster.
fn spread_id(id: u64) -> u64 {
    (id & ID_MASK & !0xffff_ffff) | u64::from((id as u32).wrapping_mul(SPREAD))
}

fn unspread_id(bits: u64) -> u64 {
    (bits & !0xffff_ffff) | u64::from((bits as u32).wrapping_mul(UNSPREAD))
}

/// The key of lock `id` (62 bits are kept): where the locator places its manager.
pub fn lock_key(id: u64) -> Key {
    Key(LOCK | spread_id(id))
}

/// The key of barrier `id` (62 bits are kept): where the locator places its manager.
pub fn barrier_key(id: u64) -> Key {
    Key(BARRIER | spread_id(id))
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
        let wide = (1 << 61) | 0xdead_beef;
        assert_eq!(named(lock_key(wide)), Named::Lock(wide));
        assert_eq!(named(barrier_key(u64::MAX >> 2)), Named::Barrier(u64::MAX >> 2));
        assert_eq!(named(taint_key(5)), Named::Taint);
        assert_ne!(lock_key(1), barrier_key(1));
    }

    #[test]
    fn a_taint_marker_falls_in_the_slot_it_describes() {
        // Through the declaration every node registers, as the locator places the marker.
        let spec = crate::DsmNode::declaration();
        for slot in [0, 17, crate::DSM_SLOTS / 2 + 3, crate::DSM_SLOTS - 1] {
            assert_eq!(spec.slot_of(taint_key(slot)), slot);
        }
    }

    #[test]
    fn segments_start_on_different_slots_and_every_page_key_names_its_page() {
        let slot = |segment, page| PageId { segment, page }.key().0 % 4096;
        assert_ne!(slot(1, 0), slot(2, 0));
        assert_eq!(SPREAD.wrapping_mul(UNSPREAD), 1);
        for page in [0, 1, 2, 4095, 4096, 1 << 20, u32::MAX - 1, u32::MAX] {
            for segment in [0, 1, 77, MAX_SEGMENT] {
                let id = PageId { segment, page };
                assert_eq!(named(id.key()), Named::Page(id));
            }
        }
    }

    /// When slots are first shared out, the locator gives each of `n` nodes one range of
    /// consecutive slots (later joins cut the ranges further): any run of pages, or of
    /// consecutive lock ids, must be shared out between such ranges about evenly, as `page % n`
    /// shares it.
    #[test]
    fn a_run_of_pages_is_shared_evenly_between_contiguous_slot_ranges() {
        for segment in 0..50 {
            for n in 2..=8u64 {
                for run in [8u32, 16, 64, 256, 2048] {
                    let mut per_node = vec![0i64; n as usize];
                    let mut locks = vec![0i64; n as usize];
                    for page in 0..run {
                        let slot = PageId { segment, page }.key().0 % 4096;
                        per_node[(slot * n / 4096) as usize] += 1;
                        let lock = lock_key(u64::from(segment) * 10_000 + u64::from(page));
                        locks[(lock.0 % 4096 * n / 4096) as usize] += 1;
                    }
                    let spread = per_node.iter().max().unwrap() - per_node.iter().min().unwrap();
                    assert!(spread <= 6, "segment {segment}, {n} nodes, {run} pages: {per_node:?}");
                    let spread = locks.iter().max().unwrap() - locks.iter().min().unwrap();
                    assert!(spread <= 6, "{n} nodes, {run} consecutive locks: {locks:?}");
                }
            }
        }
    }
}
