//! Holds on nodes whose lives keep failing: lifting them, and the stops on purpose that do not
//! count.

use super::Supervisor;
use crate::rpc::{Request, Response};
use crate::state::{ClusterState, Refusal};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Whether a hold keeps `node` out of `state`'s cluster: only a life that ended (the same life
/// asking again is answered with where it stands), and only while at least two members are
/// in (one alone keeps no replica, and a recovery may be waiting for a node to join).
pub(super) fn holds_out(state: &ClusterState, node: u64) -> bool {
    state.nodes.get(&node).is_some_and(|r| !r.status.is_live()) && state.live().len() >= 2
}

/// What [`Supervisor::unhold`] did.
#[derive(Debug, Default)]
pub struct Unheld {
    /// Whether any member held the node out.
    pub held: bool,
    /// Whether any member had counted short lives of it.
    pub counted: bool,
    /// The other members that lifted it.
    pub answered: Vec<u64>,
    /// Those that did not answer: one of them leading next may still hold the node.
    pub silent: Vec<u64>,
}

impl Supervisor {
    /// Lifts the hold on `node` at every other live member and here, each of which keeps its
    /// own count of the node's failures (the next leader must not hold it either). The
    /// members that answered, those that did not, and whether any held the node or counted
    /// short lives of it.
    pub async fn unhold(&self, node: u64) -> Unheld {
        let (held, counted) = self.unhold_here(node, self.me.id);
        let mut unheld = Unheld { held, counted, ..Unheld::default() };
        let others = self.state().live().into_iter().filter(|&n| n != self.me.id && n != node);
        let asked = others.map(|n| async move {
            (n, self.call(n, &Request::Unhold(node), self.config.rpc_timeout).await)
        });
        for (n, answer) in futures::future::join_all(asked).await {
            match answer {
                Ok(Response::Unheld { held, counted }) => {
                    unheld.answered.push(n);
                    unheld.held |= held;
                    unheld.counted |= counted;
                }
                _ => unheld.silent.push(n),
            }
        }
        unheld
    }

    /// Tells every other live member that this life stops on purpose (the agent got SIGTERM
    /// or SIGINT), so that none counts its failure as a short life: restarted a few times in a
    /// row by an operator, the node would be held out. Waits for the answers at most `wait`;
    /// how many members took the notice, of how many told. A member that did not take it
    /// counts the failure, as before.
    pub async fn announce_stopping(&self, wait: Duration) -> (usize, usize) {
        let life = self.incarnation();
        let others: Vec<u64> =
            self.state().live().into_iter().filter(|&n| n != self.me.id).collect();
        let told = others.iter().map(|&n| async move {
            matches!(self.call(n, &Request::Stopping(life), wait).await, Ok(Response::Heard(true)))
        });
        let heard = futures::future::join_all(told).await.into_iter().filter(|&h| h).count();
        (heard, others.len())
    }

    /// [`Supervisor::unhold`] at this node, asked by node `by`: whether it held the node, and
    /// whether it had counted short lives of it.
    pub(super) fn unhold_here(&self, node: u64, by: u64) -> (bool, bool) {
        let (held, counted) = self.flaps.lock().expect("flaps").unhold(node, Instant::now());
        if held {
            tracing::warn!(node, by, "node {node}'s hold is lifted, its short lives forgotten");
        } else if counted {
            tracing::info!(node, by, "node {node}'s short lives are forgotten (it was not held)");
        }
        (held, counted)
    }

    /// Keeps what a refusal said of this node's hold, for its own view while it waits;
    /// whether it is a hold not heard of before.
    pub(super) fn note_held(&self, refusal: &Refusal) -> bool {
        let Refusal::Held { failures, left_ms, .. } = refusal else { return false };
        let now = Instant::now();
        let life = self.incarnation();
        let mut new = false;
        self.held_back.send_modify(|held| {
            // Not by life: a held node renews its incarnation between two asks of the same
            // hold.
            new = held.is_none_or(|(_, known, until)| known != *failures || until <= now);
            *held = Some((life, *failures, now + Duration::from_millis(*left_ms)));
        });
        new
    }

    /// Resolves once this node is held out of the cluster ([`Supervisor::held_back`]), with
    /// what that says. A request that waits for a configuration races it: the node learns of
    /// its hold only when it asks to rejoin, and a request that reached it before then would
    /// otherwise wait out its whole deadline for a configuration that is not coming.
    pub async fn until_held(&self) -> (u32, Duration) {
        let mut held = self.held_back.subscribe();
        loop {
            if let Some(hold) = self.held_back() {
                return hold;
            }
            // `self` owns the sender: it does not close while this runs.
            if held.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The nodes whose short lives in a row still count here, with how many and how much
    /// longer each is held out (zero when not), in milliseconds; and this node itself, while a
    /// refusal of its rejoin holds it.
    pub fn held_out(&self) -> BTreeMap<u64, (u32, u64)> {
        let state = self.state();
        let now = Instant::now();
        let streaks = self.flaps.lock().expect("flaps").streaks(now);
        let mut held: BTreeMap<u64, (u32, u64)> = streaks
            .into_iter()
            .map(|(n, (failures, left))| {
                let left = if holds_out(&state, n) { left.as_millis() as u64 } else { 0 };
                (n, (failures, left))
            })
            .collect();
        if let Some((failures, left)) = self.held_back() {
            held.insert(self.me.id, (failures, left.as_millis() as u64));
        }
        held
    }

    /// While the cluster holds this node out for failing again and again, and it is not back:
    /// its short lives failed in a row, and how much longer the hold lasts.
    pub fn held_back(&self) -> Option<(u32, Duration)> {
        let (life, failures, until) = (*self.held_back.borrow())?;
        let left = until.saturating_duration_since(Instant::now());
        let current = life == self.incarnation() && !self.life_admitted();
        (current && !left.is_zero()).then_some((failures, left))
    }
}
