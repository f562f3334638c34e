//! What the cluster holds as lost, for an operator deciding what to discard or free.
//!
//! A lost page answers [`crate::DsmError::Lost`] until a program discards it or frees its
//! segment, but only the node that found it lost logs it and counts it, and only in that life:
//! once that node restarted, or the page's entry moved on, nothing said which pages were still
//! lost. Each manager knows: its entries marked lost, and its tainted slots, where a page no
//! survivor reported since the slot's manager failed reads as lost when first asked for.

use crate::client::Dsm;
use crate::error::DsmError;
use crate::node::{Live, NodeState};
use crate::page::{named, taint_key, Named, PageId};
use crate::protocol::{Request, Response};
use gobelins_locator::NodeId;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How long [`Dsm::losses`] asks again while nodes do not answer, a change moves entries, or
/// requests hold entries.
const PATIENCE: Duration = Duration::from_secs(5);
/// Pages one node lists at most, so that its answer fits a frame (every page of a large
/// segment asked for after a restart of the whole cluster); it counts the others.
const LISTED: usize = 65_536;

/// What one node, as a manager, holds as lost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLosses {
    /// The pages it manages whose every copy died, or that were first asked for in a tainted
    /// slot: each answers `Lost` until discarded or freed.
    pub pages: Vec<PageId>,
    /// The slots it manages whose manager once failed without vouching for them: a page of
    /// theirs that nobody reported reads as lost when first asked for, unless its segment
    /// was freed since. Which pages that is, nobody can tell: only those asked for are listed
    /// in `pages`.
    pub tainted: Vec<u32>,
    /// Lost pages beyond those listed in `pages`, which stops at 65,536.
    pub unlisted: u64,
    /// Entries requests held as the node looked: not looked at.
    pub unlooked: u32,
}

/// What every node of the cluster holds as lost ([`Dsm::losses`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Losses {
    /// The cluster's epoch as the answers were gathered.
    pub epoch: u64,
    /// Every node answered, having looked at every entry, with no change between the first
    /// question and the last answer: no entry was on its way between two nodes, missed by
    /// both.
    pub settled: bool,
    /// Each node that answered, with what it holds, by node id.
    pub nodes: Vec<(NodeId, NodeLosses)>,
    /// The nodes that did not answer in time, with why.
    pub unanswered: Vec<(NodeId, String)>,
}

impl Losses {
    /// Every page listed lost, with its manager, in page order.
    pub fn pages(&self) -> Vec<(PageId, NodeId)> {
        let mut pages: Vec<_> = self
            .nodes
            .iter()
            .flat_map(|(node, held)| held.pages.iter().map(move |&page| (page, *node)))
            .collect();
        pages.sort();
        pages
    }

    /// How many pages are lost, listed or not, over every node that answered.
    pub fn lost(&self) -> u64 {
        self.nodes.iter().map(|(_, held)| held.pages.len() as u64 + held.unlisted).sum()
    }

    /// How many slots are tainted, over every node that answered.
    pub fn tainted(&self) -> usize {
        self.nodes.iter().map(|(_, held)| held.tainted.len()).sum()
    }

    /// Entries not looked at, over every node that answered.
    pub fn unlooked(&self) -> u64 {
        self.nodes.iter().map(|(_, held)| u64::from(held.unlooked)).sum()
    }

    /// Nothing lost, nothing tainted, and every node said so.
    pub fn clean(&self) -> bool {
        self.settled && self.tainted() == 0 && self.lost() == 0
    }
}

impl Dsm {
    /// Asks every node of the cluster which pages it manages are lost, and which of its slots
    /// are tainted: what `gobelins dsm lost` shows. Asks again while a change moves entries or
    /// a node does not answer, for a few seconds; then returns what it has, the nodes that did
    /// not answer named ([`Losses::settled`] is `false`).
    pub async fn losses(&self) -> Result<Losses, DsmError> {
        let started = Instant::now();
        loop {
            self.alive()?;
            let (epoch, answers) = self.tell_every_node(taint_key(0), &Request::Losses).await?;
            let mut losses = Losses { epoch, ..Losses::default() };
            for (node, answer) in answers {
                match answer {
                    Ok(Response::Losses(held)) => losses.nodes.push((node, held)),
                    Ok(Response::Busy) => {
                        losses.unanswered.push((node, "busy with a change of the cluster".into()))
                    }
                    Ok(other) => losses.unanswered.push((node, format!("answered {other:?}"))),
                    Err(e) => losses.unanswered.push((node, e.to_string())),
                }
            }
            losses.settled = losses.unanswered.is_empty()
                && losses.unlooked() == 0
                && self.host().context().epoch() == epoch;
            if losses.settled || started.elapsed() >= PATIENCE {
                return Ok(losses);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// This node's answer to [`Request::Losses`]: `Busy` while a change moves entries, which
/// could be on their way here or from here. Awaits nothing, and holds no entry beyond a look at
/// it: a change that begins meanwhile finds them as it would, and the answer is then `Busy`.
pub(crate) fn look(st: &NodeState) -> Response {
    let began = st.began.load(Ordering::SeqCst);
    if st.change.lock().expect("change").is_some() {
        return Response::Busy;
    }
    let mut held = NodeLosses::default();
    for e in st.live.iter() {
        // A request holds it: [`Dsm::losses`] asks again.
        let Ok(live) = e.value().try_lock() else {
            held.unlooked += 1;
            continue;
        };
        match (&*live, named(*e.key())) {
            (Live::Page(entry), Named::Page(page)) if entry.lost => {
                if held.pages.len() < LISTED {
                    held.pages.push(page);
                } else {
                    held.unlisted += 1;
                }
            }
            (Live::Taint, _) => held.tainted.push(st.spec.slot_of(*e.key())),
            _ => {}
        }
    }
    if st.began.load(Ordering::SeqCst) != began || st.change.lock().expect("change").is_some() {
        return Response::Busy;
    }
    held.pages.sort();
    held.tainted.sort();
    Response::Losses(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{DsmConfig, DsmNode};
    use crate::protocol::PageEntry;
    use std::sync::Arc;
    use tokio::sync::Mutex as AsyncMutex;

    fn entry(st: &NodeState, key: gobelins_locator::Key, live: Live) -> Arc<AsyncMutex<Live>> {
        let entry = Arc::new(AsyncMutex::new(live));
        st.live.insert(key, Arc::clone(&entry));
        entry
    }

    #[tokio::test]
    async fn a_node_lists_its_lost_pages_and_tainted_slots_and_counts_what_requests_hold() {
        let node = DsmNode::new(DsmConfig::default());
        let st = &*node.inner;
        let lost = PageId { segment: 4, page: 9 };
        let lost_entry = PageEntry { lost: true, ..PageEntry::default() };
        entry(st, lost.key(), Live::Page(lost_entry.clone()));
        let kept = PageId { segment: 4, page: 10 };
        entry(st, kept.key(), Live::Page(PageEntry::default()));
        entry(st, taint_key(17), Live::Taint);
        let busy = PageId { segment: 4, page: 11 };
        let busy = entry(st, busy.key(), Live::Page(lost_entry));
        let held = busy.lock().await;

        let Response::Losses(found) = look(st) else { panic!("an answer") };
        assert_eq!(found.pages, [lost]);
        assert_eq!(found.tainted, [17]);
        assert_eq!(found.unlooked, 1, "the entry a request holds is not looked at");
        drop(held);
        let Response::Losses(found) = look(st) else { panic!("an answer") };
        assert_eq!((found.pages.len(), found.unlooked), (2, 0));

        let change = gobelins_adaptation::ChangeInfo {
            epoch: 2,
            change: gobelins_locator::Change::Evict(gobelins_locator::NodeId(3)),
            participants: Default::default(),
            acked: Default::default(),
            failed_moved_in: [None, None],
            failed_kept_since: None,
        };
        *st.change.lock().expect("change") = Some(change);
        assert!(matches!(look(st), Response::Busy), "entries on the move: ask again after");
    }
}
