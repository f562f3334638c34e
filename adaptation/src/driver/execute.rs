//! The period's commands carried out: each service's callbacks called, the snapshot installed,
//! held requests released, and the clock of each phase kept.

use super::{Driver, HISTORY};
use crate::host::OnRefusal;
use crate::period::{Command, Event};
use crate::router::Router;
use crate::service::Moving;
use crate::wire::Message;
use gobelins_locator::Change;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Driver {
    pub(super) async fn execute(&mut self, command: Command) -> Vec<Event> {
        let inner = Arc::clone(&self.inner);
        let me = inner.me;
        match command {
            Command::HoldMovingKeys { epoch } => {
                let mut installed = None;
                {
                    let mut router = inner.router.lock().expect("router");
                    // A node joining: it has no old table; it routes by the new one and holds
                    // what it is about to receive. Made, held and published under one lock,
                    // and the epoch told only then: a request woken by a table installed
                    // apart from its holds (one waiting for this node's first epoch, on
                    // another thread) was served on an entry that had not arrived.
                    if router.is_none() {
                        if let Some(target) = self.target.clone() {
                            installed = Some(target.epoch().0);
                            *router = Some(Router::new(me, target));
                        }
                    }
                    if let (Some(router), Some(progress)) = (router.as_mut(), &self.progress) {
                        router.hold(&progress.plan);
                        for node in std::mem::take(&mut self.gone_at_begin) {
                            router.keep_orphans(node, &progress.plan);
                        }
                    }
                }
                if let Some(first) = installed {
                    self.announce(first);
                }
                inner.begun.send_replace(epoch);
                tracing::debug!(node = me.0, epoch, "change begun: moving keys held");
                // Wait out the handles that routed before the hold.
                inner.gate.hold().await;
                Vec::new()
            }
            Command::BeforeMigration(service) => {
                let (Some(plugin), Some(info)) = (inner.registry.get(service), self.info()) else {
                    return vec![Event::BeforeDone(service)];
                };
                let ctx = inner.context(None);
                let scan = match (&info.change, &self.progress, inner.registry.spec(service)) {
                    (Change::Fail(failed) | Change::Recover(failed), Some(p), Some(spec)) => {
                        self.packer(service).map(|packer| {
                            (
                                *failed,
                                Moving::new(spec.clone(), p.plan.outgoing_of(service, *failed)),
                                packer,
                            )
                        })
                    }
                    _ => None,
                };
                // Whatever happens to the scan, the service hears of the change.
                if let Some((failed, orphans, mut packer)) = scan {
                    // What the scan packed is rebuilt even if it failed part-way: an entry that
                    // did not encode is left out, not every entry with it.
                    if let Err(e) = plugin.scan(&ctx, failed, &orphans, &mut packer).await {
                        tracing::error!(
                            service = service.0,
                            error = %e,
                            packed = packer.count(),
                            "scan failed part-way; of the entries of node {failed} held here, only those packed are rebuilt: the others are lost unless another node rebuilds them"
                        );
                    }
                    let (runs, left_out) = orphans.keep_leaving(packer.finish());
                    if left_out > 0 {
                        tracing::warn!(
                            service = service.0,
                            left_out,
                            failed = failed.0,
                            "scan returned entries of keys the failed node did not manage; they \
                             were left out (a service's scan returns copies of the keys `orphans` \
                             names only)"
                        );
                    }
                    let n: u64 = runs.iter().map(|(_, run)| run.len() as u64).sum();
                    inner.counters.entries_rebuilt.fetch_add(n, Ordering::Relaxed);
                    if let Some(clock) = &mut self.clock {
                        clock.record.entries_rebuilt += n;
                    }
                    self.rebuilt.insert(service, runs);
                }
                plugin.before_migration(&ctx, &info).await;
                vec![Event::BeforeDone(service)]
            }
            Command::InstallSnapshot { .. } => {
                if let Some(target) = self.target.clone() {
                    self.install(target);
                }
                if let Some(clock) = &mut self.clock {
                    clock.record.before_ms = clock.lap();
                }
                Vec::new()
            }
            Command::SendOut(service) => {
                self.send_out(service).await;
                vec![Event::SentOut(service)]
            }
            Command::SendAck { to, epoch } => {
                if let Some(clock) = &mut self.clock {
                    if clock.record.sending_ms == 0.0 {
                        let from = clock.mark.into_std();
                        clock.record.sending_ms = clock.lap();
                        clock.record.sending = Some((from, clock.mark.into_std()));
                    }
                }
                if to == me {
                    return vec![Event::Ack { from: me, epoch }];
                }
                tokio::spawn(async move {
                    match (Message::Ack { epoch }).encode() {
                        Ok(ack) => {
                            inner.deliver(to, inner.link.seal(ack), OnRefusal::SendAgain).await;
                        }
                        Err(e) => tracing::error!(error = %e, "an ack could not be encoded"),
                    }
                });
                Vec::new()
            }
            Command::AfterMigration(service) => {
                if let Some(clock) = &mut self.clock {
                    if clock.record.receiving_ms == 0.0 {
                        clock.record.receiving_ms = clock.lap();
                    }
                    let now = inner.counters.entries_received.load(Ordering::Relaxed);
                    clock.record.entries_received = now.saturating_sub(clock.received_before);
                }
                if let (Some(plugin), Some(info)) = (inner.registry.get(service), self.info()) {
                    // Batches being staged go first; those that come after are refused.
                    *inner.merging.write().await = info.epoch;
                    plugin.after_migration(&inner.context(None), &info).await;
                }
                vec![Event::AfterDone(service)]
            }
            Command::ReleaseHeld { .. } => {
                if let Some(clock) = &mut self.clock {
                    clock.record.held_ms = clock.since_begin();
                }
                if let Some(router) = inner.router.lock().expect("router").as_mut() {
                    router.release();
                    match self.progress.as_ref().map(|p| (&p.change, p.epoch)) {
                        Some((Change::Fail(dead) | Change::Recover(dead), _)) => {
                            router.recovered(*dead)
                        }
                        Some((_, epoch)) => router.outlived(epoch),
                        None => {}
                    }
                }
                inner.released.send_modify(|r| *r += 1);
                inner.mirrors.released.fetch_add(1, std::sync::atomic::Ordering::Release);
                Vec::new()
            }
            Command::AfterRelease(service) => {
                if let (Some(plugin), Some(info)) = (inner.registry.get(service), self.info()) {
                    plugin.after_release(&inner.context(None), &info).await;
                }
                vec![Event::ReleasedDone(service)]
            }
            Command::ReportDone { epoch } => {
                inner.done.send_replace(epoch);
                if let Some(clock) = &mut self.clock {
                    clock.record.after_ms = clock.lap();
                    clock.done_at = Some(clock.mark);
                    let mut history = inner.history.lock().expect("history");
                    // The latest changes are what operators read; a node up for months
                    // would otherwise keep, and copy on every status, one record per change.
                    if history.len() >= HISTORY {
                        history.remove(0);
                    }
                    history.push(clock.record.clone());
                }
                Vec::new()
            }
            Command::DropSent { epoch } => {
                // Each service drops what it kept of the entries it sent.
                let ctx = inner.context(None);
                for plugin in inner.registry.iter() {
                    plugin.stable(&ctx, epoch).await;
                }
                if let Some(clock) = self.clock.take() {
                    let stable = clock.done_at.map(|at| at.elapsed().as_secs_f64() * 1e3);
                    let mut history = inner.history.lock().expect("history");
                    if let Some(record) = history.iter_mut().rev().find(|r| r.epoch == epoch) {
                        record.stable_ms = stable;
                    }
                }
                Vec::new()
            }
        }
    }
}
