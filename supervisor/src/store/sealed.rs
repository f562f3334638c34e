//! Every value the raft store keeps carries a checksum of its bytes. redb keeps its own pages
//! consistent across crashes, but not their contents against the disk: one byte changed in an
//! entry read back as another valid entry, and the node replayed a membership no one else had
//! (a helper's test: a node shown in the wrong zone, a change that never ended). A value that
//! fails its sum is an error that names the damage, never a different state.

use super::{read_err, StorageResult, LOGS, META};
use redb::ReadableTable as _;
use sha2::Digest as _;

/// The bytes of a value's sum, before the value.
const SUM: usize = 8;

/// The store's format, kept unsealed under [`FORMAT`]: values sealed as here, and the state
/// as protocol 30 lays it out, which a build of 29 cannot read (`NodeRecord::removed_by`).
pub(super) const CURRENT: &[u8] = b"sealed-4";

/// The format of stores protocol 29's builds wrote: values sealed, the state in its layout.
pub(super) const PROTOCOL_29: &[u8] = b"sealed-3";

/// The format of stores protocol 28's builds wrote: values sealed, the state in its layout.
pub(super) const PROTOCOL_28: &[u8] = b"sealed-2";

/// The format of stores protocol 27's builds wrote: values sealed, the state in its layout.
pub(super) const PROTOCOL_27: &[u8] = b"sealed-1";

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
            "a value in the raft store does not match its checksum",
        ))),
    }
}

/// Seals, in `txn`, every value of a store an older build wrote without sums, and marks its
/// format: an upgrade keeps the cluster's state (refused, every node of a cluster restarted on
/// a new build lost it). A store whose every value opens already is sealed, its mark lost, and
/// only the mark is written again: sealed twice, its values would no longer decode. Returns
/// whether it sealed values: a store whose mark alone was lost is in today's layout.
pub(super) fn upgrade(txn: &redb::WriteTransaction) -> Result<bool, redb::Error> {
    let mut meta = txn.open_table(META)?;
    let mut logs = txn.open_table(LOGS)?;
    let kept: Vec<(String, Vec<u8>)> = meta
        .iter()?
        .map(|item| item.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    let logged: Vec<(u64, Vec<u8>)> = logs
        .iter()?
        .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    let values = kept.iter().map(|(_, v)| v).chain(logged.iter().map(|(_, v)| v));
    let unsealed = !values.into_iter().all(|v| unseal(v).is_ok());
    if unsealed {
        for (key, value) in &kept {
            meta.insert(key.as_str(), seal(value).as_slice())?;
        }
        for (index, value) in &logged {
            logs.insert(*index, seal(value).as_slice())?;
        }
    }
    meta.insert(FORMAT, CURRENT)?;
    Ok(unsealed)
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
