//! The segments freed since a slot's manager died, which read as zeros there.

use serde::{Deserialize, Serialize};

/// Segments freed, as ranges of ids: a program that makes segments as it goes and frees them
/// in turn keeps one range, where a set kept every id it ever freed, once per marker. Travels
/// as its ranges' bounds, checked as they are decoded: the set itself panics on a reversed
/// range, which a peer's bytes must not be able to cause.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u32, u32)>", into = "Vec<(u32, u32)>")]
pub struct Freed(rangemap::RangeInclusiveSet<u32>);

impl Freed {
    /// Counts segment `id` freed.
    pub(crate) fn insert(&mut self, id: u32) {
        self.0.insert(id..=id);
    }

    /// Whether segment `id` was freed.
    pub(crate) fn contains(&self, id: u32) -> bool {
        self.0.contains(&id)
    }

    /// How many ranges it keeps.
    pub(crate) fn ranges(&self) -> usize {
        self.0.len()
    }
}

impl TryFrom<Vec<(u32, u32)>> for Freed {
    type Error = String;

    fn try_from(bounds: Vec<(u32, u32)>) -> Result<Self, String> {
        let mut freed = Freed::default();
        for (start, end) in bounds {
            if start > end {
                return Err(format!("a range of freed segments from {start} down to {end}"));
            }
            freed.0.insert(start..=end);
        }
        Ok(freed)
    }
}

impl From<Freed> for Vec<(u32, u32)> {
    fn from(freed: Freed) -> Self {
        freed.0.iter().map(|r| (*r.start(), *r.end())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Entry;
    use gobelins_adaptation::codec;

    #[test]
    fn freed_segments_travel_as_ranges_and_a_reversed_one_is_refused_not_a_panic() {
        let mut freed = Freed::default();
        for id in [4, 5, 6, 9] {
            freed.insert(id);
        }
        let entry = codec::encode(&Entry::Taint { freed }).expect("encode");
        let Entry::Taint { freed } = codec::decode::<Entry>(&entry).expect("decode") else {
            panic!("a taint marker");
        };
        assert_eq!((freed.ranges(), freed.contains(5), freed.contains(7)), (2, true, false));
        let hostile = Entry::Taint { freed: Freed::default() };
        let mut bytes = codec::encode(&hostile).expect("encode");
        // One range, from 9 down to 3: the set would panic on it.
        bytes.truncate(bytes.len() - 1);
        bytes.extend_from_slice(&codec::encode(&vec![(9u32, 3u32)]).expect("encode"));
        assert!(codec::decode::<Entry>(&bytes).is_err(), "refused");
    }
}
