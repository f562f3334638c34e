//! What moves from one epoch to the next, for the adaptation layer to carry out and for an
//! operator to read first (`gobelins plan`).

use crate::ids::{Epoch, NodeId, ServiceId};
use crate::snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

/// A run of consecutive slots that changes manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMove {
    /// The slots, half open.
    pub slots: Range<u32>,
    /// Their manager in the old epoch.
    pub from: NodeId,
    /// Their manager in the new epoch.
    pub to: NodeId,
}

/// The moves of one service, ascending by slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// The service.
    pub service: ServiceId,
    /// Its name, for operators.
    pub name: String,
    /// Runs of slots that change manager.
    pub moves: Vec<SlotMove>,
}

impl ServicePlan {
    /// Slots that change manager.
    pub fn moved_slots(&self) -> u64 {
        self.moves.iter().map(|m| u64::from(m.slots.end - m.slots.start)).sum()
    }
}

/// Everything that moves between two snapshots, per service, and the nodes that take part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPlan {
    /// The epoch entries leave.
    pub from: Epoch,
    /// The epoch entries arrive in.
    pub to: Epoch,
    /// One plan per service present in both snapshots, ascending by id. A service present only
    /// in `new` has no entries yet and moves nothing.
    pub services: Vec<ServicePlan>,
    /// Every node that sends or receives.
    pub participants: BTreeSet<NodeId>,
}

impl MigrationPlan {
    /// A change that moves nothing: the first node of a cluster, a registration.
    pub fn nothing(from: Epoch, to: Epoch) -> MigrationPlan {
        MigrationPlan { from, to, services: Vec::new(), participants: BTreeSet::new() }
    }

    /// The moves out of `node` for `service`, in slot order.
    pub fn outgoing_of(&self, service: ServiceId, node: NodeId) -> Vec<SlotMove> {
        self.outgoing(node).filter(|(s, _)| *s == service).map(|(_, m)| m.clone()).collect()
    }

    /// The moves out of `node`, per service; services with none are left out. When `node`
    /// dies in the middle of the change, these are what it may not have handed over.
    pub fn moves_from(&self, node: NodeId) -> Vec<ServicePlan> {
        self.services
            .iter()
            .map(|s| ServicePlan {
                service: s.service,
                name: s.name.clone(),
                moves: s.moves.iter().filter(|m| m.from == node).cloned().collect(),
            })
            .filter(|s| !s.moves.is_empty())
            .collect()
    }

    /// Adds `extra` moves (what a node that died had not handed over, from earlier changes)
    /// to this plan, which leads to `new`. Each slot goes to its manager in `new`, not where
    /// the earlier change sent it: a change since may have moved it on, and whoever the
    /// earlier change named would rebuild entries it does not manage. Moves stay in slot
    /// order, services in id order, and every node that receives is a participant.
    pub fn absorb(&mut self, extra: Vec<ServicePlan>, new: &Snapshot) {
        for plan in extra {
            let table = new.table(plan.service);
            let mut moves: Vec<SlotMove> = Vec::new();
            for m in plan.moves {
                for slot in m.slots.clone() {
                    let to = table.and_then(|t| t.owner(slot)).unwrap_or(m.to);
                    match moves.last_mut() {
                        Some(last)
                            if last.slots.end == slot && last.from == m.from && last.to == to =>
                        {
                            last.slots.end += 1;
                        }
                        _ => moves.push(SlotMove { slots: slot..slot + 1, from: m.from, to }),
                    }
                }
            }
            self.participants.extend(moves.iter().map(|m| m.to));
            match self.services.iter_mut().find(|s| s.service == plan.service) {
                Some(service) => {
                    service.moves.extend(moves);
                    service.moves.sort_by_key(|m| m.slots.start);
                }
                None => self.services.push(ServicePlan {
                    service: plan.service,
                    name: plan.name,
                    moves,
                }),
            }
        }
        self.services.sort_by_key(|s| s.service);
    }

    /// Compares two snapshots slot by slot.
    pub fn between(old: &Snapshot, new: &Snapshot) -> MigrationPlan {
        let mut services = Vec::new();
        let mut participants = BTreeSet::new();
        for new_table in new.tables() {
            let id = new_table.spec().id;
            let Some(old_table) = old.table(id) else { continue };
            let mut moves: Vec<SlotMove> = Vec::new();
            for (slot, (from, to)) in old_table.owners().zip(new_table.owners()).enumerate() {
                if from == to {
                    continue;
                }
                let slot = slot as u32;
                match moves.last_mut() {
                    Some(last) if last.slots.end == slot && last.from == from && last.to == to => {
                        last.slots.end += 1;
                    }
                    _ => moves.push(SlotMove { slots: slot..slot + 1, from, to }),
                }
                participants.insert(from);
                participants.insert(to);
            }
            services.push(ServicePlan { service: id, name: new_table.spec().name.clone(), moves });
        }
        MigrationPlan { from: old.epoch(), to: new.epoch(), services, participants }
    }

    /// Slots that change manager, over all services.
    pub fn moved_slots(&self) -> u64 {
        self.services.iter().map(ServicePlan::moved_slots).sum()
    }

    /// Whether nothing moves.
    pub fn is_empty(&self) -> bool {
        self.services.iter().all(|s| s.moves.is_empty())
    }

    /// The nodes this plan, leading from `old` to `new`, moves something of: slots to or from
    /// them, or where they keep their replicas ([`Snapshot::replica_holder`]; a joiner's is
    /// new). What else a change does leaves a node's copies on its holder as they were: a
    /// holder whose copy was current at the end of the last change that moved something of
    /// the node's is current still.
    pub fn touched(&self, old: Option<&Snapshot>, new: &Snapshot) -> BTreeSet<NodeId> {
        let mut touched: BTreeSet<NodeId> =
            self.all_moves().flat_map(|(_, m)| [m.from, m.to]).collect();
        // `None` for a node not in `old`: a joiner.
        let held_before = |n: NodeId| old.and_then(|o| o.replica_holder(n));
        touched.extend(
            new.nodes().iter().copied().filter(|&n| held_before(n) != new.replica_holder(n)),
        );
        touched
    }

    /// Nodes that give entries away.
    pub fn senders(&self) -> BTreeSet<NodeId> {
        self.all_moves().map(|(_, m)| m.from).collect()
    }

    /// Nodes that take entries in.
    pub fn receivers(&self) -> BTreeSet<NodeId> {
        self.all_moves().map(|(_, m)| m.to).collect()
    }

    /// What `node` must send, per service.
    pub fn outgoing(&self, node: NodeId) -> impl Iterator<Item = (ServiceId, &SlotMove)> + '_ {
        self.all_moves().filter(move |(_, m)| m.from == node)
    }

    /// What `node` will receive, per service.
    pub fn incoming(&self, node: NodeId) -> impl Iterator<Item = (ServiceId, &SlotMove)> + '_ {
        self.all_moves().filter(move |(_, m)| m.to == node)
    }

    fn all_moves(&self) -> impl Iterator<Item = (ServiceId, &SlotMove)> + '_ {
        self.services.iter().flat_map(|s| s.moves.iter().map(move |m| (s.service, m)))
    }
}

/// Ranges shown per pair of nodes before the rest is summed up.
const RANGES_SHOWN: usize = 4;

impl fmt::Display for MigrationPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan {} -> {}: {} slots move, {} nodes take part",
            self.from,
            self.to,
            self.moved_slots(),
            self.participants.len()
        )?;
        for service in &self.services {
            writeln!(f, "  {} {}: {} slots", service.service, service.name, service.moved_slots())?;
            let mut pairs: BTreeMap<(NodeId, NodeId), Vec<&Range<u32>>> = BTreeMap::new();
            for m in &service.moves {
                pairs.entry((m.from, m.to)).or_default().push(&m.slots);
            }
            for ((from, to), ranges) in pairs {
                let count: u32 = ranges.iter().map(|r| r.end - r.start).sum();
                let shown: Vec<String> = ranges
                    .iter()
                    .take(RANGES_SHOWN)
                    .map(|r| format!("{}..{}", r.start, r.end))
                    .collect();
                let more = ranges.len().saturating_sub(RANGES_SHOWN);
                let more = if more > 0 { format!(" (+{more} more)") } else { String::new() };
                writeln!(f, "    {from} -> {to}: {count} slots in {}", shown.join(" ") + &more)?;
            }
        }
        Ok(())
    }
}
