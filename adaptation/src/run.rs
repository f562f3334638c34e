//! Entries encoded back to back: what a service's `send_out` and `scan` hand the layer, and
//! what one migration batch carries.
//!
//! One buffer per batch rather than one per entry: each entry is encoded once, straight into
//! its batch's run, which follows the batch message in the same buffer; the receiver decodes
//! each entry from the run, a slice of the frame it came in. A batch of a thousand 1 KiB entries used to cost a thousand allocations and a
//! copy more of each entry on the way out (BENCHMARKS.md, "Adaptation layer").

use crate::codec;
use crate::error::AdaptationError;
use crate::pool::Pool;
use bytes::Bytes;
use gobelins_locator::{Key, NodeId};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

/// Bytes an entry's header takes in a run: its key (8) and its length (4), little-endian.
const HEADER: usize = 12;

/// Bytes left free before a packed run's entries, for the head of the batch message that will
/// carry them: the message is written in front of its entries rather than the entries copied
/// behind it. A batch's head (its epoch and service) takes at most 16.
pub(crate) const HEADROOM: usize = 32;

/// Entries for one destination, each its key, its length and its encoded bytes, as they came
/// off the wire or out of a [`Packer`]. Shares its bytes: a run read from a frame is a slice of
/// that frame, not a copy, so a clone kept after `receive` keeps the whole frame in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Run {
    count: u32,
    bytes: Bytes,
}

impl Run {
    /// Reads the entries in `bytes`, refused whole if one is cut short: half a batch staged
    /// would be half an entry set.
    pub fn parse(bytes: Bytes) -> Result<Self, AdaptationError> {
        let mut count = 0u32;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = rest
                .get(8..HEADER)
                .map(|l| u32::from_le_bytes(l.try_into().expect("four bytes")) as usize);
            match len.and_then(|len| HEADER.checked_add(len)).and_then(|end| rest.get(end..)) {
                Some(after) => rest = after,
                None => {
                    return Err(AdaptationError::Codec(format!(
                        "a run cut short: {} bytes after its entry {count} do not make an entry",
                        rest.len()
                    )))
                }
            }
            count = count.checked_add(1).ok_or_else(|| {
                AdaptationError::Codec("a run of more than 4 billion entries".into())
            })?;
        }
        Ok(Run { count, bytes })
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

    /// Its bytes, as [`Run::parse`] reads them.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Its entries, in order: each key and encoded entry.
    pub fn entries(&self) -> impl Iterator<Item = (Key, &[u8])> + '_ {
        entries(&self.bytes, self.count)
    }

    /// Decodes every entry, or refuses the whole run.
    /// Byte strings marked [`crate::shared`] share the run's memory rather than being copied.
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<Vec<(Key, E)>, AdaptationError> {
        crate::shared::within(&self.bytes, || {
            // Sized once: collected into a `Result`, the vector grew from empty, a run's worth
            // of copies and reallocations per batch.
            let mut decoded = Vec::with_capacity(self.len());
            for (key, bytes) in self.entries() {
                decoded.push((key, codec::decode(bytes)?));
            }
            Ok(decoded)
        })
    }
}

/// The `count` entries `bytes` holds, in order; checked when their run was made: every header
/// is whole and every length in bounds.
fn entries(bytes: &[u8], count: u32) -> impl Iterator<Item = (Key, &[u8])> + '_ {
    let mut rest = bytes;
    (0..count).map(move |_| {
        let key = u64::from_le_bytes(rest[..8].try_into().expect("eight bytes"));
        let len = u32::from_le_bytes(rest[8..HEADER].try_into().expect("four bytes")) as usize;
        let entry = &rest[HEADER..HEADER + len];
        rest = &rest[HEADER + len..];
        (Key(key), entry)
    })
}

/// A run being packed: its entries after `HEADROOM` free bytes.
#[derive(Debug)]
pub struct Packed {
    count: u32,
    buf: Vec<u8>,
}

impl Packed {
    /// An empty run with room for `bytes` of entries.
    pub fn with_capacity(bytes: usize) -> Self {
        Packed::within(Vec::with_capacity(HEADROOM + bytes + codec::SPARE))
    }

    /// An empty run in `buf`, which has room for `HEADROOM` bytes at least.
    fn within(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.resize(HEADROOM, 0);
        Packed { count: 0, buf }
    }

    /// Appends an entry already encoded; one of 4 GiB or more is refused.
    pub fn push(&mut self, key: Key, entry: &[u8]) -> Result<(), AdaptationError> {
        let len = u32::try_from(entry.len())
            .map_err(|_| AdaptationError::Codec(format!("an entry of {} bytes", entry.len())))?;
        self.buf.extend_from_slice(&key.0.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(entry);
        self.count += 1;
        Ok(())
    }

    /// Appends `entry`, encoded in place.
    pub fn push_encoded<E: Serialize>(
        &mut self,
        key: Key,
        entry: &E,
    ) -> Result<(), AdaptationError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&key.0.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        if let Err(e) = codec::encode_into(entry, &mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        let len = self.buf.len() - start - HEADER;
        let Ok(len) = u32::try_from(len) else {
            self.buf.truncate(start);
            return Err(AdaptationError::Codec(format!("an entry of {len} bytes")));
        };
        self.buf[start + 8..start + HEADER].copy_from_slice(&len.to_le_bytes());
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

    /// Its entries' size in bytes, headers included.
    pub fn size(&self) -> usize {
        self.buf.len() - HEADROOM
    }

    /// Its entries so far, in order: each key and encoded entry.
    pub fn entries(&self) -> impl Iterator<Item = (Key, &[u8])> + '_ {
        entries(&self.buf[HEADROOM..], self.count)
    }

    /// Moves its last entry, which starts `at` bytes into its entries, to the empty `next`.
    fn move_last(&mut self, at: usize, mut next: Packed) -> Packed {
        debug_assert!(next.is_empty() && self.count > 1);
        next.buf.extend_from_slice(&self.buf[HEADROOM + at..]);
        next.count = 1;
        self.buf.truncate(HEADROOM + at);
        self.count -= 1;
        next
    }

    /// The run, as a receiver reads it.
    pub fn into_run(self) -> Run {
        let count = self.count;
        Run { count, bytes: Bytes::from(self.buf).slice(HEADROOM..) }
    }

    /// `head` then the entries, in the run's own buffer when `head` fits in front of them:
    /// the buffer and where the message starts in it.
    pub(crate) fn behind(mut self, head: &[u8]) -> (Vec<u8>, usize) {
        match HEADROOM.checked_sub(head.len()) {
            Some(at) => {
                self.buf[at..HEADROOM].copy_from_slice(head);
                (self.buf, at)
            }
            None => {
                let mut out = Vec::with_capacity(head.len() + self.size() + codec::SPARE);
                out.extend_from_slice(head);
                out.extend_from_slice(&self.buf[HEADROOM..]);
                (out, 0)
            }
        }
    }

    pub(crate) fn shrink(&mut self) {
        self.buf.shrink_to(self.buf.len() + codec::SPARE);
    }
}

/// Encodes entries into runs per destination, each cut at about `batch_bytes` (and never
/// empty), ready to ship as batches. During a sending phase it ships them as they fill
/// ([`Packer::flush`]), so that a migration holds a few batches in memory rather than all of
/// them, and the wire is busy while the rest is packed.
pub struct Packer {
    locate: Box<dyn Fn(Key) -> NodeId + Send + Sync>,
    batch_bytes: usize,
    open: BTreeMap<NodeId, Packed>,
    full: Vec<(NodeId, Packed)>,
    count: u64,
    pool: Option<Pool>,
    outlet: Option<Outlet>,
}

/// Where a packer that ships as it packs hands its full runs: a short queue per destination,
/// opened with its first run, read by that destination's shipper.
pub(crate) struct Outlet {
    /// Runs for this node are not shipped: they stay in the packer.
    keep_for: NodeId,
    lanes: BTreeMap<NodeId, mpsc::Sender<Packed>>,
    open: Box<dyn FnMut(NodeId) -> mpsc::Sender<Packed> + Send + Sync>,
}

impl Outlet {
    /// Runs for `keep_for` stay; the first run for any other node calls `open` for its queue.
    pub(crate) fn new(
        keep_for: NodeId,
        open: impl FnMut(NodeId) -> mpsc::Sender<Packed> + Send + Sync + 'static,
    ) -> Self {
        Outlet { keep_for, lanes: BTreeMap::new(), open: Box::new(open) }
    }
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
            pool: None,
            outlet: None,
        }
    }

    /// Packs into buffers from `pool` and hands full runs to `outlet` at each
    /// [`Packer::flush`].
    pub(crate) fn shipping(mut self, pool: Pool, outlet: Outlet) -> Self {
        self.pool = Some(pool);
        self.outlet = Some(outlet);
        self
    }

    /// Encodes `entry` into the run for its destination. A run holds at most `batch_bytes`,
    /// unless one entry alone is larger: the entry that overflows a run starts the next one.
    /// Over by one large entry, a run could be over the largest frame, and a batch that does
    /// not fit in one never lands.
    pub fn push<E: Serialize>(&mut self, key: Key, entry: &E) -> Result<(), AdaptationError> {
        let to = (self.locate)(key);
        // Room for a batch and an entry more, so that the buffer is not reallocated (and
        // copied) as it fills.
        let capacity = self.batch_bytes + 64 * 1024;
        let pool = &self.pool;
        let fresh = || match pool {
            Some(pool) => Packed::within(pool.take(HEADROOM + capacity + codec::SPARE)),
            None => Packed::with_capacity(capacity),
        };
        let run = self.open.entry(to).or_insert_with(&fresh);
        let at = run.size();
        run.push_encoded(key, entry)?;
        self.count += 1;
        if run.size() > self.batch_bytes && run.len() > 1 {
            let next = run.move_last(at, fresh());
            self.full.push((to, std::mem::replace(run, next)));
        }
        if run.size() >= self.batch_bytes {
            if let Some(run) = self.open.remove(&to) {
                self.full.push((to, run));
            }
        }
        Ok(())
    }

    /// Takes `run`'s entries as they are, already encoded, cut the same way.
    pub fn extend(&mut self, to: NodeId, run: Packed) {
        self.count += run.len() as u64;
        self.full.push((to, run));
    }

    /// Ships the runs that are full, waiting while their destination's shipper is behind.
    /// Does nothing for a packer that does not ship as it packs (in `scan`, say). A
    /// [`Plugin`](crate::Plugin) that packs its own entries calls it after each
    /// [`Packer::push`], as the typed services' plug-in does.
    pub async fn flush(&mut self) {
        let Some(Outlet { keep_for, lanes, open }) = self.outlet.as_mut() else { return };
        if self.full.iter().all(|(to, _)| to == keep_for) {
            return;
        }
        for (to, run) in std::mem::take(&mut self.full) {
            if to == *keep_for {
                self.full.push((to, run));
                continue;
            }
            let lane = lanes.entry(to).or_insert_with(|| open(to));
            // A shipper that ended (this node is stopping) takes no more; what it would have
            // carried is rebuilt from replicas like any entry of a node that stops mid-change.
            let _ = lane.send(run).await;
        }
    }

    /// Ships the runs still open, part full, and leaves the queues open for more.
    pub(crate) async fn ship_open(&mut self) {
        self.full.extend(std::mem::take(&mut self.open));
        self.flush().await;
    }

    /// Ships every run not yet shipped, the last ones not full; closes the queues.
    pub(crate) async fn ship_rest(&mut self) {
        self.ship_open().await;
        if let Some(outlet) = self.outlet.as_mut() {
            outlet.lanes.clear();
        }
    }

    /// Entries packed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The runs, per destination in the order they filled.
    pub fn finish(mut self) -> Vec<(NodeId, Packed)> {
        // The runs still open were sized for a whole batch; one may hold a single entry, and
        // rebuilt runs wait for the sending phase.
        for (_, run) in self.open.iter_mut() {
            run.shrink();
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
        let mut packed = Packed::with_capacity(0);
        packed.push_encoded(Key(7), &"seven".to_string()).unwrap();
        packed.push(Key(9), &codec::encode(&"nine".to_string()).unwrap()).unwrap();
        let run = packed.into_run();
        let back: Vec<(Key, String)> = run.decode().unwrap();
        assert_eq!(back, vec![(Key(7), "seven".into()), (Key(9), "nine".into())]);
        assert_eq!(run.len(), 2);
        assert_eq!(
            Run::parse(run.bytes().clone()).unwrap(),
            run,
            "what goes on the wire reads back"
        );
    }

    #[test]
    fn a_run_cut_short_is_refused_whole() {
        let mut packed = Packed::with_capacity(0);
        packed.push_encoded(Key(1), &1u64).unwrap();
        packed.push_encoded(Key(2), &2u64).unwrap();
        let bytes = packed.into_run().bytes().clone();
        assert_eq!(Run::parse(bytes.clone()).unwrap().len(), 2);
        for cut in 1..bytes.len() {
            let parsed = Run::parse(bytes.slice(..cut));
            let whole_first = cut == HEADER + 1;
            assert_eq!(parsed.is_ok(), whole_first, "cut at {cut}: {parsed:?}");
        }
        // A length that points past the end, or overflows.
        let mut lying = bytes.to_vec();
        lying[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Run::parse(Bytes::from(lying)).is_err());
    }

    #[test]
    fn a_message_goes_in_front_of_its_entries_without_moving_them() {
        let mut packed = Packed::with_capacity(64);
        packed.push_encoded(Key(3), &3u64).unwrap();
        let entries = packed.buf[HEADROOM..].to_vec();
        let at = packed.buf.as_ptr();
        let (buf, start) = packed.behind(b"head");
        assert_eq!(buf.as_ptr(), at, "the entries were not copied");
        assert_eq!(&buf[start..start + 4], b"head");
        assert_eq!(&buf[start + 4..], &entries[..]);
        // A head longer than the room there is costs a copy, not an error.
        let mut packed = Packed::with_capacity(64);
        packed.push_encoded(Key(3), &3u64).unwrap();
        let long = vec![7u8; HEADROOM + 1];
        let (buf, start) = packed.behind(&long);
        assert_eq!(start, 0);
        assert_eq!(&buf[..long.len()], &long[..]);
        assert_eq!(&buf[long.len()..], &entries[..]);
    }

    #[test]
    fn the_packer_cuts_runs_per_destination_and_loses_nothing() {
        for batch_bytes in [0, 30, 1 << 20] {
            let mut packer = Packer::new(|k: Key| NodeId(k.0 % 3), batch_bytes);
            for k in 0..100u64 {
                packer.push(Key(k), &k).unwrap();
            }
            packer.extend(NodeId(5), Packed::with_capacity(0));
            assert_eq!(packer.count(), 100);
            let runs = packer.finish();
            let mut seen = Vec::new();
            for (to, run) in runs.iter().map(|(to, p)| {
                (to, Run::parse(Bytes::copy_from_slice(&p.buf[HEADROOM..])).unwrap())
            }) {
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
            // 13 bytes an entry: the third would take a run over 30.
            if batch_bytes == 30 {
                assert!(runs.iter().all(|(_, r)| r.size() <= 30), "no run over batch_bytes");
                // 34, 33 and 33 entries: 17, 16 and 16 runs of two, and the last two a run of one.
                assert_eq!(runs.iter().filter(|(_, r)| r.len() == 2).count(), 49);
            }
        }
    }

    /// An entry larger than a batch goes alone, and the run it would have overflowed leaves
    /// without it: over `batch_bytes` by one large entry, a batch could be over the largest
    /// frame, and one that does not fit in a frame never lands.
    #[test]
    fn an_entry_that_overflows_a_run_starts_the_next_one() {
        let mut packer = Packer::new(|_| NodeId(1), 100);
        for k in 0..5u64 {
            packer.push(Key(k), &k).unwrap();
        }
        packer.push(Key(5), &vec![7u8; 200]).unwrap();
        packer.push(Key(6), &6u64).unwrap();
        let runs: Vec<(usize, usize)> =
            packer.finish().iter().map(|(_, run)| (run.len(), run.size())).collect();
        assert_eq!(runs, vec![(5, 65), (1, 213), (1, 13)], "(entries, bytes) per run");
    }

    #[tokio::test]
    async fn a_shipping_packer_hands_runs_over_as_they_fill_and_keeps_its_own() {
        use std::sync::{Arc, Mutex};
        let queues: Arc<Mutex<BTreeMap<NodeId, mpsc::Receiver<Packed>>>> = Arc::default();
        let outlet = {
            let queues = Arc::clone(&queues);
            Outlet::new(NodeId(0), move |to| {
                let (runs, queue) = mpsc::channel(16);
                queues.lock().unwrap().insert(to, queue);
                runs
            })
        };
        // 13 bytes an entry: a run is full at its third.
        let mut packer = Packer::new(|k: Key| NodeId(k.0 % 3), 39).shipping(Pool::new(4), outlet);
        for k in 0..30u64 {
            packer.push(Key(k), &k).unwrap();
            packer.flush().await;
        }
        let mut got: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        for (to, queue) in queues.lock().unwrap().iter_mut() {
            while let Ok(run) = queue.try_recv() {
                assert_eq!(run.len(), 3, "only full runs leave while packing");
                let keys = run.into_run().decode::<u64>().unwrap().into_iter().map(|(k, _)| k.0);
                got.entry(*to).or_default().extend(keys);
            }
        }
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![NodeId(1), NodeId(2)]);
        assert_eq!(got[&NodeId(1)].len(), 9, "three full runs before the end");
        packer.ship_rest().await;
        let mine = packer.finish();
        let kept: Vec<u64> = mine
            .into_iter()
            .flat_map(|(to, run)| {
                assert_eq!(to, NodeId(0));
                run.into_run().decode::<u64>().unwrap().into_iter().map(|(k, _)| k.0)
            })
            .collect();
        assert_eq!(kept, (0..30).step_by(3).collect::<Vec<_>>(), "its own runs stay");
        let queues = std::mem::take(&mut *queues.lock().unwrap());
        for (to, mut queue) in queues {
            while let Some(run) = queue.recv().await {
                let keys = run.into_run().decode::<u64>().unwrap().into_iter().map(|(k, _)| k.0);
                got.entry(to).or_default().extend(keys);
            }
        }
        for (to, keys) in got {
            let want: Vec<u64> = (0..30).filter(|k| k % 3 == to.0).collect();
            assert_eq!(keys, want, "every entry for {to:?}, once, and the queue closed");
        }
    }
}
