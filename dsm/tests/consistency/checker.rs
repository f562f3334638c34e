//! The sequential-consistency checker the scenarios' histories go through, and its own test.

use std::collections::{BTreeMap, HashMap};

/// What a write leaves in a page: the page's write count, and who wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Value {
    pub(crate) count: u64,
    pub(crate) worker: u64,
    pub(crate) seq: u64,
}

impl Value {
    pub(crate) fn decode(page: &[u8]) -> Value {
        let word =
            |i: usize| u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Value { count: word(0), worker: word(1), seq: word(2) }
    }

    pub(crate) fn encode(&self, page: &mut [u8]) {
        page[0..8].copy_from_slice(&self.count.to_le_bytes());
        page[8..16].copy_from_slice(&self.worker.to_le_bytes());
        page[16..24].copy_from_slice(&self.seq.to_le_bytes());
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Read {
        page: u32,
        value: Value,
    },
    Write {
        page: u32,
        value: Value,
    },
    /// A write whose commit failed: it may or may not have happened.
    Maybe {
        page: u32,
        value: Value,
    },
}

/// Why a set of histories is not sequentially consistent, or `Ok`.
pub(crate) fn check(histories: &[Vec<Op>]) -> Result<(), String> {
    // A write that may have happened did, if anyone read it.
    let observed: std::collections::HashSet<(u32, Value)> = histories
        .iter()
        .flatten()
        .filter_map(|op| match op {
            Op::Read { page, value } => Some((*page, *value)),
            _ => None,
        })
        .collect();
    let mut written: HashMap<(u32, u64), Value> = HashMap::new();
    for op in histories.iter().flatten() {
        let definite = match op {
            Op::Write { page, value } => Some((page, value)),
            Op::Maybe { page, value } if observed.contains(&(*page, *value)) => Some((page, value)),
            _ => None,
        };
        if let Some((page, value)) = definite {
            if let Some(other) = written.insert((*page, value.count), *value) {
                return Err(format!(
                    "page {page}: two writes both made count {}: {other:?} and {value:?} (two writers at once)",
                    value.count
                ));
            }
        }
    }
    for (worker, history) in histories.iter().enumerate() {
        let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
        for op in history {
            match *op {
                Op::Read { page, value } => {
                    if value.count > 0 && written.get(&(page, value.count)) != Some(&value) {
                        return Err(format!(
                            "worker {worker} read {value:?} from page {page}, which nobody wrote"
                        ));
                    }
                    let last = seen.entry(page).or_insert(0);
                    if value.count < *last {
                        return Err(format!(
                            "worker {worker} read count {} from page {page} after seeing {last}",
                            value.count
                        ));
                    }
                    *last = value.count;
                }
                Op::Maybe { .. } => {}
                Op::Write { page, value } => {
                    let last = seen.entry(page).or_insert(0);
                    if value.count <= *last {
                        return Err(format!(
                            "worker {worker} wrote count {} to page {page} after seeing {last}",
                            value.count
                        ));
                    }
                    *last = value.count;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_checker_rejects_what_sequential_consistency_forbids() {
    let v = |count, worker, seq| Value { count, worker, seq };
    let w = |page, value| Op::Write { page, value };
    let r = |page, value| Op::Read { page, value };
    let fine =
        vec![vec![w(0, v(1, 0, 0)), r(0, v(2, 1, 0))], vec![r(0, v(1, 0, 0)), w(0, v(2, 1, 0))]];
    assert_eq!(check(&fine), Ok(()));
    let two_writers = vec![vec![w(0, v(1, 0, 0))], vec![w(0, v(1, 1, 0))]];
    assert!(check(&two_writers).is_err());
    let backwards =
        vec![vec![w(0, v(1, 0, 0)), w(0, v(2, 0, 1))], vec![r(0, v(2, 0, 1)), r(0, v(1, 0, 0))]];
    assert!(check(&backwards).is_err());
    let own_write_forgotten = vec![vec![w(0, v(1, 0, 0)), r(0, v(0, 0, 0))]];
    assert!(check(&own_write_forgotten).is_err());
    let invented = vec![vec![r(0, v(5, 9, 9))]];
    assert!(check(&invented).is_err());
    let stale_write =
        vec![vec![w(0, v(1, 0, 0)), w(0, v(2, 0, 1))], vec![r(0, v(2, 0, 1)), w(0, v(2, 1, 0))]];
    assert!(check(&stale_write).is_err());
}
