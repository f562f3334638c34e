//! Entries grouped by the slot of their key.

use crate::Versioned;
use gobelins_locator::{Key, ServiceSpec};
use std::collections::HashMap;

/// One slot's entries. foldhash rather than the standard SipHash: a change merges every entry
/// it brings, and SipHash made that a tenth of a migration. foldhash is seeded per map, which
/// makes keys that collide hard to choose, though it claims no more than minimal resistance to
/// such attacks.
type Entries = HashMap<Key, Versioned, foldhash::fast::RandomState>;

/// Entries by slot, then by key. A change moves whole slots: grouped this way, `send_out`
/// takes out the slots that leave and never looks at the entries that stay. One flat map made
/// it visit every entry the node held, at every change, to find those that move: a cost that
/// grew with what the node holds rather than with what leaves it.
pub(crate) struct BySlot {
    spec: ServiceSpec,
    slots: Vec<Entries>,
    len: usize,
}

impl BySlot {
    /// An empty map for the slots of `spec`.
    pub(crate) fn new(spec: ServiceSpec) -> Self {
        let slots = (0..spec.slots).map(|_| Entries::default()).collect();
        BySlot { spec, slots, len: 0 }
    }

    fn slot(&self, key: Key) -> usize {
        self.spec.slot_of(key) as usize
    }

    /// How many entries it holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// How many entries `slot` holds.
    pub(crate) fn slot_len(&self, slot: u32) -> usize {
        self.slots.get(slot as usize).map_or(0, Entries::len)
    }

    /// The entry of `key`.
    pub(crate) fn get(&self, key: Key) -> Option<&Versioned> {
        self.slots[self.slot(key)].get(&key)
    }

    /// The entry of `key`, to change in place.
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut Versioned> {
        let slot = self.slot(key);
        self.slots[slot].get_mut(&key)
    }

    /// Whether `key`'s slot holds a marker that it lost entries (a key from
    /// [`crate::RESERVED`] up, at an even version: an odd one says the loss was forgiven).
    pub(crate) fn marked(&self, key: Key) -> bool {
        self.slots[self.slot(key)].iter().any(|(k, e)| k.0 >= crate::RESERVED && e.version % 2 == 0)
    }

    /// Stores `entry` under `key`, whatever its version.
    pub(crate) fn insert(&mut self, key: Key, entry: Versioned) {
        let slot = self.slot(key);
        if self.slots[slot].insert(key, entry).is_none() {
            self.len += 1;
        }
    }

    /// Forgets the entry of `key`.
    pub(crate) fn remove(&mut self, key: Key) {
        let slot = self.slot(key);
        if self.slots[slot].remove(&key).is_some() {
            self.len -= 1;
        }
    }

    /// Keeps the newer version of each entry: those already held, or those of `entries`.
    pub(crate) fn merge(&mut self, entries: impl IntoIterator<Item = (Key, Versioned)>) {
        for (key, entry) in entries {
            let slot = self.slot(key);
            match self.slots[slot].get(&key) {
                Some(old) if old.version >= entry.version => {}
                Some(_) => {
                    self.slots[slot].insert(key, entry);
                }
                None => {
                    self.slots[slot].insert(key, entry);
                    self.len += 1;
                }
            }
        }
    }

    /// Every entry, slot after slot.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &Versioned)> {
        self.slots.iter().flatten()
    }

    /// The entries of `slots`, which this map no longer holds.
    pub(crate) fn take(&mut self, slots: impl Iterator<Item = u32>) -> Vec<(Key, Versioned)> {
        let taken: Vec<Entries> =
            slots.map(|slot| std::mem::take(&mut self.slots[slot as usize])).collect();
        let mut out = Vec::with_capacity(taken.iter().map(Entries::len).sum());
        for entries in taken {
            self.len -= entries.len();
            out.extend(entries);
        }
        out
    }

    /// Takes the entries of `slots` out as they lie, for their caller to drop: a slot at a
    /// time, without moving an entry.
    pub(crate) fn detach(&mut self, slots: impl Iterator<Item = u32>) -> Detached {
        let detached: Vec<Entries> =
            slots.map(|slot| std::mem::take(&mut self.slots[slot as usize])).collect();
        self.len -= detached.iter().map(Entries::len).sum::<usize>();
        Detached(detached)
    }

    /// Copies of the entries of `slots`.
    pub(crate) fn copies(&self, slots: impl Iterator<Item = u32>) -> Vec<(Key, Versioned)> {
        slots
            .flat_map(|slot| self.slots[slot as usize].iter())
            .map(|(key, entry)| (*key, entry.clone()))
            .collect()
    }
}

/// Entries taken out of a [`BySlot`], slot by slot, that nothing reads any more.
pub(crate) struct Detached(Vec<Entries>);

impl Detached {
    /// Frees them a slot at a time, letting other tasks run in between: dropped at once, tens
    /// of thousands of entries held a runtime worker for 10 to 16 ms, and every request that
    /// worker had to serve waited as long.
    pub(crate) async fn free(self) {
        for entries in self.0 {
            drop(entries);
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(version: u64) -> Versioned {
        Versioned { version, value: Bytes::from_static(b"v") }
    }

    #[test]
    fn taking_slots_takes_their_entries_and_nothing_else() {
        let spec = crate::KvDir::declaration();
        let mut map = BySlot::new(spec.clone());
        map.merge((0..1_000).map(|k| (Key(k), entry(1))));
        assert_eq!(map.len(), 1_000);
        let leaving: Vec<u32> = (0..spec.slots).filter(|s| s.is_multiple_of(3)).collect();
        let taken = map.take(leaving.iter().copied());
        assert!(!taken.is_empty());
        assert!(
            taken.iter().all(|(k, _)| spec.slot_of(*k).is_multiple_of(3)),
            "only the slots asked for"
        );
        assert_eq!(map.len() + taken.len(), 1_000, "every entry either taken or kept");
        assert!(map.iter().all(|(k, _)| !spec.slot_of(*k).is_multiple_of(3)), "none of them kept");
        assert_eq!(map.iter().count(), map.len());
    }

    #[test]
    fn merging_keeps_the_newer_version_and_counts_each_key_once() {
        let mut map = BySlot::new(crate::KvDir::declaration());
        map.merge([(Key(7), entry(3)), (Key(8), entry(1))]);
        map.merge([(Key(7), entry(2)), (Key(8), entry(4))]);
        assert_eq!(map.get(Key(7)).map(|e| e.version), Some(3), "an older copy is ignored");
        assert_eq!(map.get(Key(8)).map(|e| e.version), Some(4), "a newer copy replaces");
        assert_eq!(map.len(), 2);
        map.insert(Key(7), entry(1));
        assert_eq!(map.get(Key(7)).map(|e| e.version), Some(1), "insert overwrites");
        map.remove(Key(7));
        map.remove(Key(7));
        assert_eq!((map.len(), map.get(Key(7))), (1, None));
        map.merge([(Key(7), entry(1))]);
        let slot = crate::KvDir::declaration().slot_of(Key(7));
        let _detached = map.detach([slot].into_iter());
        assert_eq!((map.len(), map.get(Key(7))), (1, None), "detached, no longer held");
    }
}
