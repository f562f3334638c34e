//! What the cluster holds as lost, for an operator deciding what to discard or free.
//!
//! A lost page answers [`crate::DsmError::Lost`] until a program discards it or frees its
//! segment, but only the node that found it lost logs it and counts it, and only in that life:
//! once that node restarted, or the page's entry moved on, nothing said which pages were still
//! lost. Each manager knows: its entries marked lost, and its tainted slots, where a page no
//! survivor reported since the slot's manager failed reads as lost when first asked for.

use crate::client::Dsm;
use crate::error::DsmError;
use crate::node::{Live, NodeState, DSM};
use crate::page::{named, taint_key, Named, PageId};
use crate::protocol::{Request, Response};
use gobelins_locator::{Key, NodeId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long [`Dsm::losses`] asks again while nodes do not answer, or a change moves entries.
const PATIENCE: Duration = Duration::from_secs(5);
/// How long a node waits, in all, for entries that requests hold, before it counts them
/// not looked at.
const LOOK_WAIT: Duration = Duration::from_secs(1);

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
    /// Entries held by requests for longer than the look waited: not looked at.
    pub unlooked: u32,
}

/// What every node of the cluster holds as lost ([`Dsm::losses`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Losses {
    /// The cluster's epoch as the answers were gathered.
    pub epoch: u64,
    /// Every node answered, with no change between the first question and the last answer:
    /// no entry was on its way between two nodes, missed by both.
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

    /// How many slots are tainted, over every node that answered.
    pub fn tainted(&self) -> usize {
        self.nodes.iter().map(|(_, held)| held.tainted.len()).sum()
    }

    /// Nothing lost, nothing tainted, and every node said so.
    pub fn clean(&self) -> bool {
        self.settled && self.tainted() == 0 && self.pages().is_empty()
    }
}

impl Dsm {
    /// Asks every node of the cluster which pages it manages are lost, and which of its slots
    /// are tainted: what `gobelins dsm lost` shows. Asks again while a change moves entries or
    /// a node does not answer, for a few seconds; then returns what it has, the nodes that did
    /// not answer named ([`Losses::settled`] is `false`).
    pub async fn losses(&self) -> Result<Losses, DsmError> {
        self.alive()?;
        let started = Instant::now();
        loop {
            let ctx = self.host().context();
            let epoch = ctx.epoch();
            let nodes = ctx.snapshot().map(|s| s.nodes().to_vec()).unwrap_or_default();
            if nodes.is_empty() {
                return Err(DsmError::Protocol("this node has not joined a cluster".into()));
            }
            let request = Request::Losses;
            let answers = futures::future::join_all(
                nodes.iter().map(|&n| ctx.tell::<_, Response>(n, DSM, taint_key(0), &request)),
            )
            .await;
            let mut losses = Losses { epoch, ..Losses::default() };
            for (node, answer) in nodes.into_iter().zip(answers) {
                match answer {
                    Ok(Response::Losses(held)) => losses.nodes.push((node, held)),
                    Ok(Response::Busy) => {
                        losses.unanswered.push((node, "busy with a change of the cluster".into()))
                    }
                    Ok(other) => losses.unanswered.push((node, format!("answered {other:?}"))),
                    Err(e) => losses.unanswered.push((node, e.to_string())),
                }
            }
            losses.settled = losses.unanswered.is_empty() && self.host().context().epoch() == epoch;
            if losses.settled || started.elapsed() >= PATIENCE {
                return Ok(losses);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// This node's answer to [`Request::Losses`]: `Busy` while a change moves entries, which
/// could be on their way here or from here.
pub(crate) async fn look(st: &NodeState) -> Response {
    if st.change.lock().expect("change").is_some() {
        return Response::Busy;
    }
    let entries: Vec<(Key, Arc<tokio::sync::Mutex<Live>>)> =
        st.live.iter().map(|e| (*e.key(), Arc::clone(e.value()))).collect();
    let mut held = NodeLosses::default();
    let until = Instant::now() + LOOK_WAIT;
    for (key, entry) in entries {
        let live = match entry.try_lock() {
            Ok(live) => live,
            // A request holds it: wait a little, not for as long as it likes.
            Err(_) => match tokio::time::timeout_at(until, entry.lock()).await {
                Ok(live) => live,
                Err(_) => {
                    held.unlooked += 1;
                    continue;
                }
            },
        };
        match (&*live, named(key)) {
            (Live::Page(entry), Named::Page(page)) if entry.lost => held.pages.push(page),
            (Live::Taint, _) => held.tainted.push(st.spec.slot_of(key)),
            _ => {}
        }
    }
    held.pages.sort();
    held.tainted.sort();
    Response::Losses(held)
}
