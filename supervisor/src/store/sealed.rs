//! Every value the raft store keeps carries a checksum of its bytes. redb keeps its own pages
//! consistent across crashes, but not their contents against the disk: one byte changed in an
//! entry read back as another valid entry, and the node replayed a membership no one else had
//! (a helper's test: a node shown in the wrong zone, a change that never ended). A value that
//! fails its sum is an error that names the damage, never a different state.

use super::{read_err, StorageResult};
use sha2::Digest as _;

/// The bytes of a value's sum, before the value.
const SUM: usize = 8;

/// The store's format, kept unsealed under [`FORMAT`]: values sealed as here.
pub(super) const CURRENT: &[u8] = b"sealed-1";

/// The meta key of the store's format.
pub(super) const FORMAT: &str = "format";

fn sum(bytes: &[u8]) -> [u8; SUM] {
    let digest = sha2::Sha256::digest(bytes);
    digest[..SUM].try_into().expect("a SHA-256 sum is 32 bytes")
}

/// `bytes` with their sum in front, as stored.
pub(super) fn seal(bytes: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(SUM + bytes.len());
    sealed.extend_from_slice(&sum(bytes));
    sealed.extend_from_slice(bytes);
    sealed
}

/// The value `stored` holds, if it matches its sum.
pub(super) fn unseal(stored: &[u8]) -> StorageResult<&[u8]> {
    match stored.split_at_checked(SUM) {
        Some((kept, value)) if kept == sum(value) => Ok(value),
        _ => Err(read_err(std::io::Error::other(
            "a value in the raft store does not match its checksum: the file is damaged",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_and_any_byte_changed_is_refused() {
        let sealed = seal(b"a raft entry");
        assert_eq!(unseal(&sealed).expect("intact"), b"a raft entry");
        for at in 0..sealed.len() {
            let mut damaged = sealed.clone();
            damaged[at] ^= 1;
            assert!(unseal(&damaged).is_err(), "byte {at} changed went unnoticed");
        }
        assert!(unseal(&sealed[..SUM - 1]).is_err(), "shorter than a sum");
    }
}
