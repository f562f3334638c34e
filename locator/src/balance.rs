//! Moving slots in and out of one cell while its members stay within one slot of each other.
//!
//! Both functions rely on the cell being balanced before (counts within one). Under that
//! condition no member both gives and receives, so the slots that move are exactly the slots
//! taken or brought: the fewest possible.

use crate::ids::NodeId;

/// The slots one member of a cell manages for one service, ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Holding {
    pub(crate) node: NodeId,
    pub(crate) slots: Vec<u32>,
}

/// Target counts for `total` slots over `holdings`: the fullest members keep the extra slots, so
/// that as few as possible move. Returned in the order of `holdings`.
fn targets(holdings: &[Holding], total: usize) -> Vec<usize> {
    let m = holdings.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| {
        holdings[b]
            .slots
            .len()
            .cmp(&holdings[a].slots.len())
            .then(holdings[a].node.cmp(&holdings[b].node))
    });
    let (base, extra) = (total / m, total % m);
    let mut target = vec![base; m];
    for &i in order.iter().take(extra) {
        target[i] = base + 1;
    }
    target
}

/// Takes `quota` slots out of the cell, from the fullest members first, and returns them
/// ascending. The remaining members stay within one slot of each other.
pub(crate) fn withdraw(holdings: &mut [Holding], quota: usize) -> Vec<u32> {
    let held: usize = holdings.iter().map(|h| h.slots.len()).sum();
    let target = targets(holdings, held - quota.min(held));
    let mut taken = Vec::with_capacity(quota);
    for (holding, target) in holdings.iter_mut().zip(target) {
        let give = holding.slots.len().saturating_sub(target);
        // The highest slots go, so a member keeps a prefix and the mover gets runs.
        let keep = holding.slots.len() - give;
        taken.extend(holding.slots.drain(keep..));
    }
    taken.sort_unstable();
    taken
}

/// Hands `incoming` (ascending) to the members, the emptiest first, in contiguous runs. Returns
/// `(receiver, slot)` pairs; the members then stay within one slot of each other.
pub(crate) fn deposit(holdings: &[Holding], incoming: &[u32]) -> Vec<(NodeId, u32)> {
    let held: usize = holdings.iter().map(|h| h.slots.len()).sum();
    let target = targets(holdings, held + incoming.len());
    let mut out = Vec::with_capacity(incoming.len());
    let mut rest = incoming;
    for (holding, target) in holdings.iter().zip(target) {
        let take = target.saturating_sub(holding.slots.len()).min(rest.len());
        let (mine, others) = rest.split_at(take);
        out.extend(mine.iter().map(|&slot| (holding.node, slot)));
        rest = others;
    }
    // Not reached: the targets add up to what the cell holds with `incoming`, so the members'
    // shortfalls add up to `incoming` at least, however unbalanced the cell. Kept so that no
    // slot is ever left without a manager, should the targets be computed otherwise.
    for (i, &slot) in rest.iter().enumerate() {
        out.push((holdings[i % holdings.len()].node, slot));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(counts: &[usize]) -> Vec<Holding> {
        let mut next = 0u32;
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let slots = (next..next + c as u32).collect();
                next += c as u32;
                Holding { node: NodeId(i as u64 + 1), slots }
            })
            .collect()
    }

    #[test]
    fn withdraw_takes_from_the_fullest_and_leaves_the_rest_within_one() {
        let mut h = cell(&[4, 4, 3, 3]);
        let taken = withdraw(&mut h, 2);
        assert_eq!(taken, vec![3, 7]);
        let counts: Vec<usize> = h.iter().map(|h| h.slots.len()).collect();
        assert_eq!(counts, vec![3, 3, 3, 3]);
    }

    #[test]
    fn withdraw_for_a_newcomer_gives_it_the_floor_share() {
        // 14 slots over 4 members; a fifth member gets floor(14 / 5) = 2.
        let mut h = cell(&[4, 4, 3, 3]);
        let taken = withdraw(&mut h, 14 / 5);
        assert_eq!(taken.len(), 2);
        let counts: Vec<usize> = h.iter().map(|h| h.slots.len()).collect();
        assert_eq!(counts, vec![3, 3, 3, 3]);
    }

    #[test]
    fn deposit_fills_the_emptiest_first_in_runs() {
        let h = cell(&[3, 2, 2]);
        let got = deposit(&h, &[10, 11, 12]);
        assert_eq!(got, vec![(NodeId(1), 10), (NodeId(2), 11), (NodeId(3), 12)]);
        let got = deposit(&h, &[10, 11, 12, 13]);
        assert_eq!(got, vec![(NodeId(1), 10), (NodeId(2), 11), (NodeId(2), 12), (NodeId(3), 13)]);
    }

    #[test]
    fn deposit_into_an_unbalanced_cell_places_every_slot_where_it_is_short() {
        let h = cell(&[9, 0]);
        let got = deposit(&h, &[20, 21]);
        assert_eq!(got, vec![(NodeId(2), 20), (NodeId(2), 21)], "the empty member takes both");
        // More than the empty member is short of: the full one takes the rest.
        let incoming: Vec<u32> = (20..32).collect();
        let got = deposit(&h, &incoming);
        let to = |n: u64| got.iter().filter(|(m, _)| *m == NodeId(n)).count();
        assert_eq!((to(1), to(2)), (2, 10), "to targets of 11 and 10");
        let placed: Vec<u32> = got.iter().map(|&(_, slot)| slot).collect();
        assert_eq!(placed, incoming, "each slot once, in order");
    }
}
