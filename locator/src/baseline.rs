//! The placement schemes gobelins is measured against. They take keys already mixed with
//! [`crate::mix`], so every scheme sees the same hash and only the schemes differ.

/// The report's static function: `hash % n`. Moves almost every key when `n` changes.
///
/// # Panics
///
/// If `n` is zero: there is no bucket to name.
#[inline(always)]
pub fn modulo(hash: u64, n: u32) -> u32 {
    (hash % u64::from(n)) as u32
}

/// Jump consistent hash (Lamping and Veach, 2014): a bucket in `0..n` that moves only the keys
/// the new bucket takes when `n` grows by one; it can only remove the last bucket cheaply.
///
/// # Panics
///
/// If `n` is zero: there is no bucket to name (the loop alone would return `u32::MAX`).
#[inline]
pub fn jump(hash: u64, n: u32) -> u32 {
    assert!(n > 0, "jump hash needs at least one bucket");
    let mut key = hash;
    let (mut bucket, mut next) = (-1i64, 0i64);
    while next < i64::from(n) {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

/// Rendezvous (highest random weight) hashing: the node whose combined hash with the key is
/// highest. Moves the fewest keys, but costs one hash per node per lookup.
///
/// # Panics
///
/// If `node_hashes` is empty: there is no node to name (the loop alone would return 0, an
/// index into nothing).
#[inline]
pub fn rendezvous(hash: u64, node_hashes: &[u64]) -> u32 {
    assert!(!node_hashes.is_empty(), "rendezvous hashing needs at least one node");
    let mut best = (0u64, 0u32);
    for (i, &node) in node_hashes.iter().enumerate() {
        let weight = crate::hash::mix(hash ^ node);
        if weight > best.0 || i == 0 {
            best = (weight, i as u32);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::mix;

    #[test]
    #[should_panic(expected = "at least one bucket")]
    fn jump_refuses_zero_buckets() {
        jump(mix(1), 0);
    }

    #[test]
    #[should_panic(expected = "at least one node")]
    fn rendezvous_refuses_an_empty_cluster() {
        rendezvous(mix(1), &[]);
    }

    #[test]
    fn jump_moves_only_keys_to_the_new_bucket() {
        for k in 0..10_000u64 {
            let (before, after) = (jump(mix(k), 10), jump(mix(k), 11));
            assert!(before == after || after == 10, "key {k}: {before} -> {after}");
        }
    }

    #[test]
    fn jump_fills_buckets_evenly() {
        let mut counts = [0u32; 7];
        for k in 0..70_000u64 {
            counts[jump(mix(k), 7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    }

    #[test]
    fn rendezvous_moves_only_the_removed_nodes_keys() {
        let nodes: Vec<u64> = (0..8u64).map(|n| mix(n + 1000)).collect();
        let without: Vec<u64> = nodes.iter().copied().filter(|&h| h != nodes[3]).collect();
        for k in 0..10_000u64 {
            let before = nodes[rendezvous(mix(k), &nodes) as usize];
            let after = without[rendezvous(mix(k), &without) as usize];
            assert!(before == after || before == nodes[3]);
        }
    }
}
