//! Entries encoded back to back: what a service's `send_out` and `scan` hand the layer, and
//! what one migration batch carries.
//!
//! One buffer per batch rather than one per entry: each entry is encoded once, straight into
//! its batch's run, which the batch message then carries whole; the receiver decodes each entry
//! from the run. A batch of a thousand 1 KiB entries used to cost a thousand allocations and a
//! copy more of each entry on the way out (BENCHMARKS.md, "Adaptation layer").

use crate::codec;
use crate::error::AdaptationError;
use gobelins_locator::{Key, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bytes an entry's header takes in a run: its key (8) and its length (4), little-endian.
const HEADER: usize = 12;

/// Entries for one destination, each its key, its length and its encoded bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    count: u32,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl Run {
    /// An empty run with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        Run { count: 0, bytes: Vec::with_capacity(bytes) }
    }

    /// Appends an entry already encoded; one of 4 GiB or more is refused.
    pub fn push(&mut self, key: Key, entry: &[u8]) -> Result<(), AdaptationError> {
        let len = u32::try_from(entry.len())
            .map_err(|_| AdaptationError::Codec(format!("an entry of {} bytes", entry.len())))?;
        self.bytes.extend_from_slice(&key.0.to_le_bytes());
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(entry);
        self.count += 1;
        Ok(())
    }

    /// Appends `entry`, encoded in place.
    pub fn push_encoded<E: Serialize>(
        &mut self,
        key: Key,
        entry: &E,
    ) -> Result<(), AdaptationError> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&key.0.to_le_bytes());
        self.bytes.extend_from_slice(&[0; 4]);
        if let Err(e) = codec::encode_into(entry, &mut self.bytes) {
            self.bytes.truncate(start);
            return Err(e);
        }
        let len = self.bytes.len() - start - HEADER;
        let Ok(len) = u32::try_from(len) else {
            self.bytes.truncate(start);
            return Err(AdaptationError::Codec(format!("an entry of {len} bytes")));
        };
        self.bytes[start + 8..start + HEADER].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Its size in bytes, headers included.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Its entries, checked: a run that came off the wire may be truncated or lie about its
    /// count, and then the last item is an error.
    pub fn entries(&self) -> Entries<'_> {
        Entries { rest: &self.bytes, left: self.count, failed: false }
    }

    /// Decodes every entry, or refuses the whole run: half a batch staged would be half an
    /// entry set.
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<Vec<(Key, E)>, AdaptationError> {
        // The count came off the wire: reserve no more than the bytes could hold.
        let mut out = Vec::with_capacity(self.len().min(self.bytes.len() / HEADER));
        for item in self.entries() {
            let (key, bytes) = item?;
            out.push((key, codec::decode(bytes)?));
        }
        Ok(out)
    }
}

/// The entries of a [`Run`], in order.
pub struct Entries<'a> {
    rest: &'a [u8],
    left: u32,
    failed: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(Key, &'a [u8]), AdaptationError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.left == 0 {
            if self.rest.is_empty() {
                return None;
            }
            self.failed = true;
            return Some(Err(AdaptationError::Codec(format!(
                "{} bytes after the last entry of a run",
                self.rest.len()
            ))));
        }
        let entry = (|| {
            let header = self.rest.get(..HEADER)?;
            let key = u64::from_le_bytes(header[..8].try_into().ok()?);
            let len = u32::from_le_bytes(header[8..].try_into().ok()?) as usize;
            let bytes = self.rest.get(HEADER..HEADER.checked_add(len)?)?;
            self.rest = &self.rest[HEADER + len..];
            Some((Key(key), bytes))
        })();
        self.left -= 1;
        match entry {
            Some(entry) => Some(Ok(entry)),
            None => {
                self.failed = true;
                Some(Err(AdaptationError::Codec(format!(
                    "a run cut short: {} entries announced were not there",
                    self.left + 1
                ))))
            }
        }
    }
}

/// Encodes entries into runs per destination, each cut at about `batch_bytes` (and never
/// empty), ready to ship as batches.
pub struct Packer {
    locate: Box<dyn Fn(Key) -> NodeId + Send + Sync>,
    batch_bytes: usize,
    open: BTreeMap<NodeId, Run>,
    full: Vec<(NodeId, Run)>,
    count: u64,
}

impl Packer {
    /// Entries go to `locate(key)`, in runs of about `batch_bytes`.
    pub fn new(locate: impl Fn(Key) -> NodeId + Send + Sync + 'static, batch_bytes: usize) -> Self {
        Packer {
            locate: Box::new(locate),
            batch_bytes,
            open: BTreeMap::new(),
            full: Vec::new(),
            count: 0,
        }
    }

    /// Encodes `entry` into the run for its destination.
    pub fn push<E: Serialize>(&mut self, key: Key, entry: &E) -> Result<(), AdaptationError> {
        let to = (self.locate)(key);
        // Room for a batch and the entry that overflows it, so that the buffer is not
        // reallocated (and copied) as it fills.
        let capacity = self.batch_bytes + 64 * 1024;
        let run = self.open.entry(to).or_insert_with(|| Run::with_capacity(capacity));
        run.push_encoded(key, entry)?;
        let filled = run.size() >= self.batch_bytes;
        self.count += 1;
        if filled {
            if let Some(run) = self.open.remove(&to) {
                self.full.push((to, run));
            }
        }
        Ok(())
    }

    /// Takes `run`'s entries as they are, already encoded, cut the same way.
    pub fn extend(&mut self, to: NodeId, run: Run) {
        self.count += run.len() as u64;
        self.full.push((to, run));
    }

    /// Entries packed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The runs, per destination in the order they filled.
    pub fn finish(mut self) -> Vec<(NodeId, Run)> {
        // The runs still open were sized for a whole batch; one may hold a single entry, and
        // rebuilt runs wait for the sending phase.
        for (_, run) in self.open.iter_mut() {
            run.bytes.shrink_to_fit();
        }
        self.full.extend(std::mem::take(&mut self.open));
        self.full.retain(|(_, run)| !run.is_empty());
        self.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_order_with_their_keys() {
        let mut run = Run::default();
        run.push_encoded(Key(7), &"seven".to_string()).unwrap();
        run.push(Key(9), &codec::encode(&"nine".to_string()).unwrap()).unwrap();
        let back: Vec<(Key, String)> = run.decode().unwrap();
        assert_eq!(back, vec![(Key(7), "seven".into()), (Key(9), "nine".into())]);
        assert_eq!(run.len(), 2);
    }

    #[test]
    fn a_run_cut_short_or_with_a_wrong_count_is_refused_whole() {
        let mut run = Run::default();
        run.push_encoded(Key(1), &1u64).unwrap();
        run.push_encoded(Key(2), &2u64).unwrap();
        let mut short = run.clone();
        short.bytes.pop();
        assert!(short.decode::<u64>().is_err());
        let mut more = run.clone();
        more.count = 3;
        assert!(more.decode::<u64>().is_err());
        let mut fewer = run.clone();
        fewer.count = 1;
        assert!(fewer.decode::<u64>().is_err(), "trailing bytes must not pass unnoticed");
        // A length that points past the end, or overflows.
        // A count announcing billions of entries is refused without reserving room for them.
        let mut huge = run.clone();
        huge.count = u32::MAX;
        assert!(huge.decode::<u64>().is_err());
        let mut lying = Run::default();
        lying.push(Key(3), &[0; 4]).unwrap();
        lying.bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(lying.decode::<u32>().is_err());
    }

    #[test]
    fn the_packer_cuts_runs_per_destination_and_loses_nothing() {
        for batch_bytes in [0, 30, 1 << 20] {
            let mut packer = Packer::new(|k: Key| NodeId(k.0 % 3), batch_bytes);
            for k in 0..100u64 {
                packer.push(Key(k), &k).unwrap();
            }
            packer.extend(NodeId(5), Run::default());
            assert_eq!(packer.count(), 100);
            let runs = packer.finish();
            let mut seen = Vec::new();
            for (to, run) in &runs {
                for (key, value) in run.decode::<u64>().unwrap() {
                    assert_eq!(NodeId(key.0 % 3), *to);
                    assert_eq!(key.0, value);
                    seen.push(key.0);
                }
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..100).collect::<Vec<_>>(), "batch_bytes {batch_bytes}");
            if batch_bytes == 0 {
                assert!(runs.iter().all(|(_, r)| r.len() == 1), "one entry per run at 0");
            }
        }
    }
}
