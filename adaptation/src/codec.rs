//! The one place that names bincode. Everything that crosses a socket or lands on disk, in this
//! crate and in the supervisor above it, is encoded here, with a size limit on decoding so that a
//! hostile length prefix inside a payload cannot make us allocate more than a frame may hold.
//! Three exceptions, the most frequent messages of all, are laid out by hand in [`crate::wire`]:
//! a routed request's header, a told message's header and a `Done` reply (bincode's varints
//! cost more than the rest of the layer's work on a request).

use crate::error::AdaptationError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes every encoded message leaves free behind it: the supervisor marks each message with a
/// trailing lane byte, which then fits without reallocating (and copying) a migration batch.
pub const SPARE: usize = 1;

/// Largest value decoding will materialise; matches the largest frame we accept.
pub const DECODE_LIMIT: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AdaptationError> {
    encode_leaving(value, SPARE)
}

/// Encodes `value`, leaving `room` bytes free behind it for what will be pushed after it.
pub fn encode_leaving<T: Serialize>(value: &T, room: usize) -> Result<Vec<u8>, AdaptationError> {
    encode_after(&[], value, room)
}

/// Encodes `value` behind `prefix`, leaving `room` bytes free behind it.
pub fn encode_after<T: Serialize>(
    prefix: &[u8],
    value: &T,
    room: usize,
) -> Result<Vec<u8>, AdaptationError> {
    let failed = |e: bincode::error::EncodeError| AdaptationError::Codec(e.to_string());
    // Measured first, so that the buffer is allocated once at its size: grown as it fills, it
    // is reallocated a dozen times for a 1 KiB entry and copies a migration batch twice over.
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config()).map_err(failed)?;
    let mut out = Vec::with_capacity(prefix.len() + size.bytes_written + room);
    out.extend_from_slice(prefix);
    bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(failed)?;
    Ok(out)
}

/// Encodes `value` at the end of `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), AdaptationError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| AdaptationError::Codec(e.to_string()))
}

/// Decodes a whole `T` from `bytes`; trailing bytes are an error, since they mean the two ends
/// disagree about the format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdaptationError> {
    let (value, used) = decode_prefix(bytes)?;
    if used != bytes.len() {
        return Err(AdaptationError::Codec(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(value)
}

/// Decodes a `T` from the start of `bytes`, and says how many bytes it took: for a format that
/// puts raw bytes after a message. The decoder borrows from `bytes`: a type that asks for a byte
/// string with `deserialize_bytes` gets it where it lies and copies it once (`deserialize_byte_buf`,
/// as `ByteBuf` asks, makes bincode zero-fill a buffer of its own and copy into it).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), AdaptationError> {
    bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| AdaptationError::Codec(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let value = (7u64, "seven".to_string(), vec![1u8, 2, 3]);
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&encode(&value).unwrap()).unwrap(), value);
    }

    #[test]
    fn a_huge_announced_length_is_refused_without_allocating() {
        // A Vec<u8> claiming u64::MAX elements, as varint: 0xff then 8 bytes.
        let mut bytes = vec![0xff];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<Vec<u8>>(&bytes), Err(AdaptationError::Codec(_))));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&5u32).unwrap();
        bytes.push(0);
        assert!(decode::<u32>(&bytes).is_err());
    }
}
