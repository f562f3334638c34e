//! One node's part in one configuration change, as a pure state machine.
//!
//! ```text
//!  Begin(e) ─▶ HoldMovingKeys, BeforeMigration(s) for each service        phase Before
//!  BeforeDone(s) for every service ─▶ InstallSnapshot(e), SendOut(s) if this node sends
//!  SentOut(s) for every service ─▶ SendAck(p) to every participant, itself included
//!  Ack(p, e) from every live participant (only if this node receives)        phase Receiving
//!      ─▶ AfterMigration(s) for each service                               phase After
//!  AfterDone(s) for every service ─▶ ReleaseHeld(e), AfterRelease(s) each   phase Released
//!  ReleasedDone(s) for every service ─▶ ReportDone(e)                       phase Done
//!  Stable(e) ─▶ DropSent(e)                                                 phase Idle
//! ```
//!
//! The driver carries the commands out in the order given (services in registration order) and
//! reports back with events. Batches and the ack that follows them travel on one ordered
//! connection, so an ack from a sender means all its batches have arrived. A node that receives
//! nothing has nothing to wait for and goes straight from sending to after-migration. What a
//! node sent is kept until `Stable`, so that a failure in the middle can roll forward.
//!
//! After migration comes in two steps: what requests for the moved keys need (the merge) runs
//! while they are held, and what only the change's durability needs (a service copying what
//! it received to a backup) runs once they are released, before the change is reported done.
//! Until that report the senders keep their copies, so the second step loses nothing by
//! letting requests through, and they wait for the merge alone.

use crate::error::AdaptationError;
use gobelins_locator::{NodeId, ServiceId};
use std::collections::{BTreeMap, BTreeSet};

/// What this node does in a change, from its migration plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Gives entries away and takes some in (a member of the affected cell).
    Both,
    /// Only gives entries away (the evicted node).
    Sender,
    /// Only takes entries in (the added node).
    Receiver,
    /// Takes part but moves nothing (a survivor that holds nothing to rebuild).
    Bystander,
}

impl Role {
    fn sends(self) -> bool {
        matches!(self, Role::Both | Role::Sender)
    }

    fn receives(self) -> bool {
        matches!(self, Role::Both | Role::Receiver)
    }
}

/// What happened, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The replicated state began the change to `epoch`, and this node takes part.
    Begin {
        /// The epoch the change leads to.
        epoch: u64,
        /// Every node that takes part, this one included.
        participants: BTreeSet<NodeId>,
        /// Registered services, in registration order.
        services: Vec<ServiceId>,
        /// What this node does.
        role: Role,
    },
    /// A service finished `before_migration`.
    BeforeDone(ServiceId),
    /// A service's outgoing entries have all been handed to the transport.
    SentOut(ServiceId),
    /// A participant finished sending for `epoch`.
    Ack {
        /// Who.
        from: NodeId,
        /// For which epoch.
        epoch: u64,
    },
    /// A service finished `after_migration`.
    AfterDone(ServiceId),
    /// A service finished `after_release`.
    ReleasedDone(ServiceId),
    /// A participant of the change to `epoch` died; nobody waits for it any more (its failure
    /// is a change of its own). It may arrive before that change begins here.
    ParticipantFailed {
        /// The dead node.
        node: NodeId,
        /// The change it was to take part in.
        epoch: u64,
    },
    /// The cluster committed that `epoch` is stable.
    Stable(u64),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start holding requests for keys whose manager changes in `epoch`.
    HoldMovingKeys {
        /// The epoch being entered.
        epoch: u64,
    },
    /// Call the service's `before_migration`.
    BeforeMigration(ServiceId),
    /// Install the locator snapshot of `epoch`.
    InstallSnapshot {
        /// The epoch.
        epoch: u64,
    },
    /// Call the service's `send_out` and ship the entries, in batches, to their new managers.
    SendOut(ServiceId),
    /// Tell `to` that this node has sent everything for `epoch`.
    SendAck {
        /// The participant.
        to: NodeId,
        /// The epoch.
        epoch: u64,
    },
    /// Call the service's `after_migration`: merge what was received.
    AfterMigration(ServiceId),
    /// Release the held requests; they now route by the new epoch.
    ReleaseHeld {
        /// The epoch now in force.
        epoch: u64,
    },
    /// Call the service's `after_release`: what must end before the change is reported done
    /// but need not hold requests.
    AfterRelease(ServiceId),
    /// Report `MigrationDone` for `epoch` through consensus.
    ReportDone {
        /// The epoch.
        epoch: u64,
    },
    /// Forget the copies of entries sent in `epoch`: the cluster is stable without them.
    DropSent {
        /// The epoch.
        epoch: u64,
    },
}

/// Where the node is in a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No change in progress.
    Idle,
    /// Services are preparing.
    Before,
    /// Services are sending out.
    Sending,
    /// Waiting for every participant's ack.
    Receiving,
    /// Services are merging what arrived.
    After,
    /// Held requests released; services are finishing the change (`after_release`).
    Released,
    /// Reported done; keeping what was sent until the epoch is stable.
    Done,
}

/// One node's adaptation period.
#[derive(Debug)]
pub struct Period {
    me: NodeId,
    phase: Phase,
    epoch: u64,
    role: Role,
    services: Vec<ServiceId>,
    participants: BTreeSet<NodeId>,
    /// Services whose callback for the current phase has not finished yet.
    waiting: BTreeSet<ServiceId>,
    acks: BTreeSet<NodeId>,
    /// Acks for epochs this node has not begun yet: a fast sender may finish first.
    early: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Participants of epochs not begun yet that are already known dead.
    early_failed: BTreeMap<u64, BTreeSet<NodeId>>,
    /// The last epoch that reached `Done`, so that late acks for it are ignored.
    finished: u64,
}

impl Period {
    /// An idle node.
    pub fn new(me: NodeId) -> Self {
        Period {
            me,
            phase: Phase::Idle,
            epoch: 0,
            role: Role::Bystander,
            services: Vec::new(),
            participants: BTreeSet::new(),
            waiting: BTreeSet::new(),
            acks: BTreeSet::new(),
            early: BTreeMap::new(),
            early_failed: BTreeMap::new(),
            finished: 0,
        }
    }

    /// Where the node is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The epoch of the change in progress (or last carried out).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Participants whose ack came in the change in progress (or last carried out).
    pub fn acked(&self) -> BTreeSet<NodeId> {
        self.acks.clone()
    }

    /// Participants whose ack is still awaited.
    pub fn awaiting(&self) -> BTreeSet<NodeId> {
        self.participants.difference(&self.acks).copied().collect()
    }

    /// Takes one event; returns what to do. On error nothing changed.
    pub fn handle(&mut self, event: Event) -> Result<Vec<Command>, AdaptationError> {
        match event {
            Event::Begin { epoch, participants, services, role } => {
                self.begin(epoch, participants, services, role)
            }
            Event::BeforeDone(service) => {
                self.done_with(Phase::Before, service, "before_migration")?;
                Ok(if self.waiting.is_empty() { self.start_sending() } else { Vec::new() })
            }
            Event::SentOut(service) => {
                self.done_with(Phase::Sending, service, "send_out")?;
                Ok(if self.waiting.is_empty() { self.acknowledge() } else { Vec::new() })
            }
            Event::Ack { from, epoch } => Ok(self.ack(from, epoch)),
            Event::AfterDone(service) => {
                self.done_with(Phase::After, service, "after_migration")?;
                Ok(if self.waiting.is_empty() { self.release() } else { Vec::new() })
            }
            Event::ReleasedDone(service) => {
                self.done_with(Phase::Released, service, "after_release")?;
                Ok(if self.waiting.is_empty() { self.report() } else { Vec::new() })
            }
            Event::ParticipantFailed { node, epoch } => {
                if node == self.me {
                    return Ok(Vec::new());
                }
                if self.phase != Phase::Idle && epoch == self.epoch {
                    self.participants.remove(&node);
                    return Ok(self.check_acks());
                }
                if epoch > self.epoch.max(self.finished) {
                    self.early_failed.entry(epoch).or_default().insert(node);
                }
                Ok(Vec::new())
            }
            Event::Stable(epoch) => Ok(self.stable(epoch)),
        }
    }

    fn begin(
        &mut self,
        epoch: u64,
        mut participants: BTreeSet<NodeId>,
        services: Vec<ServiceId>,
        role: Role,
    ) -> Result<Vec<Command>, AdaptationError> {
        let mut commands = Vec::new();
        match self.phase {
            // A redelivered or old Begin must not restart an epoch: its acks are gone.
            Phase::Idle if epoch > self.epoch.max(self.finished) => {}
            Phase::Idle => {
                return Err(AdaptationError::Stale {
                    last: self.epoch.max(self.finished),
                    got: epoch,
                })
            }
            // The cluster moved on, so the last epoch is stable even if we did not hear it.
            Phase::Done if epoch > self.epoch => {
                commands.push(Command::DropSent { epoch: self.epoch })
            }
            _ => return Err(AdaptationError::Overlap { current: self.epoch, new: epoch }),
        }
        participants.insert(self.me);
        self.phase = Phase::Before;
        self.epoch = epoch;
        self.role = role;
        self.acks = self.early.remove(&epoch).unwrap_or_default();
        self.early.retain(|&e, _| e > epoch);
        for dead in self.early_failed.remove(&epoch).unwrap_or_default() {
            if dead != self.me {
                participants.remove(&dead);
            }
        }
        self.early_failed.retain(|&e, _| e > epoch);
        self.participants = participants;
        self.waiting = services.iter().copied().collect();
        commands.push(Command::HoldMovingKeys { epoch });
        commands.extend(services.iter().map(|&s| Command::BeforeMigration(s)));
        self.services = services;
        if self.waiting.is_empty() {
            commands.extend(self.start_sending());
        }
        Ok(commands)
    }

    fn done_with(
        &mut self,
        phase: Phase,
        service: ServiceId,
        name: &'static str,
    ) -> Result<(), AdaptationError> {
        if self.phase != phase || !self.waiting.remove(&service) {
            return Err(AdaptationError::Unexpected { service: service.0, phase: name });
        }
        Ok(())
    }

    fn start_sending(&mut self) -> Vec<Command> {
        let mut commands = vec![Command::InstallSnapshot { epoch: self.epoch }];
        if self.role.sends() && !self.services.is_empty() {
            self.phase = Phase::Sending;
            self.waiting = self.services.iter().copied().collect();
            commands.extend(self.services.iter().map(|&s| Command::SendOut(s)));
        } else {
            commands.extend(self.acknowledge());
        }
        commands
    }

    fn acknowledge(&mut self) -> Vec<Command> {
        let epoch = self.epoch;
        let mut commands: Vec<Command> =
            self.participants.iter().map(|&to| Command::SendAck { to, epoch }).collect();
        self.phase = Phase::Receiving;
        commands.extend(self.check_acks());
        commands
    }

    fn ack(&mut self, from: NodeId, epoch: u64) -> Vec<Command> {
        let current = self.phase != Phase::Idle && epoch == self.epoch;
        if !current {
            if epoch > self.epoch.max(self.finished) {
                self.early.entry(epoch).or_default().insert(from);
            }
            return Vec::new();
        }
        self.acks.insert(from);
        self.check_acks()
    }

    fn check_acks(&mut self) -> Vec<Command> {
        let complete = !self.role.receives() || self.acks.is_superset(&self.participants);
        if self.phase != Phase::Receiving || !complete {
            return Vec::new();
        }
        self.phase = Phase::After;
        self.waiting = self.services.iter().copied().collect();
        let mut commands: Vec<Command> =
            self.services.iter().map(|&s| Command::AfterMigration(s)).collect();
        if self.waiting.is_empty() {
            commands.extend(self.release());
        }
        commands
    }

    fn release(&mut self) -> Vec<Command> {
        self.phase = Phase::Released;
        self.waiting = self.services.iter().copied().collect();
        let mut commands = vec![Command::ReleaseHeld { epoch: self.epoch }];
        commands.extend(self.services.iter().map(|&s| Command::AfterRelease(s)));
        if self.waiting.is_empty() {
            commands.extend(self.report());
        }
        commands
    }

    fn report(&mut self) -> Vec<Command> {
        self.phase = Phase::Done;
        self.finished = self.epoch;
        vec![Command::ReportDone { epoch: self.epoch }]
    }

    fn stable(&mut self, epoch: u64) -> Vec<Command> {
        if epoch != self.epoch || self.phase == Phase::Idle {
            return Vec::new();
        }
        let mut commands = Vec::new();
        if self.phase == Phase::Before {
            // Released requests must route by the new epoch, never the old one: a key that
            // moved would otherwise be served by two managers.
            commands.push(Command::InstallSnapshot { epoch });
        }
        if !matches!(self.phase, Phase::Released | Phase::Done) {
            // The cluster declared the epoch stable without us (we were presumed dead, say):
            // release what we hold rather than hold it for ever.
            commands.push(Command::ReleaseHeld { epoch });
        }
        commands.push(Command::DropSent { epoch });
        self.phase = Phase::Idle;
        self.finished = self.finished.max(epoch);
        commands
    }
}

#[cfg(test)]
#[path = "period_tests.rs"]
mod tests;
