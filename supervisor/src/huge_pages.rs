//! Asks the kernel to back a buffer with 2 MiB pages.
//!
//! A joining node receives tens of megabytes in memory it did not have. Faulted in 4 KiB at a
//! time, that memory cost the joiner most of its time during a migration: a trap, a page-table
//! lock both runtime workers fight over, and a charge to the memory cgroup, every 4 KiB
//! (BENCHMARKS.md, adaptation layer, stop 62). With transparent huge pages on `madvise` (the
//! default of most distributions), a region so advised faults 2 MiB at a time.

/// The size of a huge page on x86-64 and on most arm64 kernels.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Advises the 2 MiB-aligned part of `spare` (none if it holds no whole huge page) to be
/// backed by huge pages when first touched, and returns that part, if the kernel took the
/// advice. Advice only: the bytes are not touched, and nothing changes where the kernel has
/// transparent huge pages off or refuses.
pub(crate) fn advise(spare: &mut [std::mem::MaybeUninit<u8>]) -> Option<std::ops::Range<usize>> {
    let start = spare.as_ptr() as usize;
    let from = start.next_multiple_of(HUGE_PAGE);
    let to = (start + spare.len()) / HUGE_PAGE * HUGE_PAGE;
    (to > from && advise_range(from, to - from)).then_some(from..to)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn advise_range(at: usize, len: usize) -> bool {
    // SAFETY: `MADV_HUGEPAGE` is a hint about pages of a range this process owns (the spare
    // capacity of a buffer the caller borrows mutably): it neither reads, writes nor unmaps
    // them, whatever the allocator does with the range later.
    let refused = unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if refused != 0 {
        // A kernel built without transparent huge pages: 4 KiB pages, as without the advice.
        tracing::trace!(error = %std::io::Error::last_os_error(), "huge pages refused for a receive buffer");
    }
    refused == 0
}

#[cfg(not(target_os = "linux"))]
fn advise_range(_at: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags of the mapping of this process that holds `at`, from `/proc/self/smaps`.
    fn flags_of_mapping_holding(at: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&at);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    #[test]
    fn the_whole_huge_pages_of_a_buffer_are_advised_and_its_bytes_kept() {
        let mut buf: Vec<u8> = Vec::with_capacity(3 * HUGE_PAGE);
        buf.extend_from_slice(b"kept");
        let advised = advise(buf.spare_capacity_mut());
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists();
        if cfg!(target_os = "linux") && thp {
            let range = advised.expect("a kernel with transparent huge pages takes the advice");
            assert_eq!(range.start % HUGE_PAGE, 0);
            assert!(range.len() >= HUGE_PAGE, "3 huge pages of room hold a whole one");
            let flags = flags_of_mapping_holding(range.start).expect("the buffer is mapped");
            assert!(flags.split(' ').any(|f| f == "hg"), "not advised: {flags}");
        }
        buf.resize(3 * HUGE_PAGE, 7);
        assert_eq!(&buf[..4], b"kept");
        assert!(buf[4..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_buffer_without_a_whole_huge_page_is_left_alone() {
        let mut buf: Vec<u8> = Vec::with_capacity(HUGE_PAGE / 2);
        assert_eq!(advise(buf.spare_capacity_mut()), None);
        buf.resize(HUGE_PAGE / 2, 1);
        assert!(buf.iter().all(|&b| b == 1));
    }
}
