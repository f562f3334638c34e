//! The conformance suite against a small replicated service: it passes as written, and each
//! of six deliberate faults fails it, named with the step after which keys went missing or an
//! add counted twice.

use gobelins_adaptation::testing::{conformance, replay, Probe, Verdict};
use gobelins_adaptation::{ChangeInfo, Context, Moving, Service};
use gobelins_locator::{Key, NodeId, ServiceId, ServiceSpec};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

const MIRROR: ServiceId = ServiceId(42);

/// A fault to build in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// `send_out` leaves out one entry of each migration.
    DropsOneSent,
    /// `scan` rebuilds nothing.
    ScansNothing,
    /// A write whose copy did not reach the backup is acknowledged anyway.
    AcksUncopied,
    /// `after_migration` keeps the entry it had over a newer one received.
    KeepsOldest,
    /// `receive` takes a key that comes a second time in one change for a conflict, and drops
    /// it: as an author sure that each key comes once might.
    DropsKeysReceivedTwice,
    /// An add counts whatever its id: as an author sure that the layer runs each request once
    /// might.
    CountsEveryAdd,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Versioned {
    version: u64,
    value: u64,
    /// The id of the last add counted: a counter's adds come one after another, so its retry,
    /// after a failure rebuilt the entry from a copy that had it, is the only one that can
    /// come again.
    last_add: u64,
}

#[derive(Serialize, Deserialize)]
enum Request {
    Put(u64),
    /// Adds one, once per id.
    Add {
        id: u64,
    },
    Get,
    /// To the backup: keep these copies.
    Copy(Vec<(Key, Versioned)>),
}

#[derive(Serialize, Deserialize)]
enum Response {
    Done,
    Value(Option<u64>),
    /// The copy to the backup failed: the layer asks again.
    Uncopied,
}

/// A register per key, each write copied to the manager's replica holder before it is
/// acknowledged; replicas are never dropped, so `scan` always has the newest a survivor saw.
struct Mirror {
    live: Mutex<HashMap<Key, Versioned>>,
    staged: Mutex<Vec<(Key, Versioned)>>,
    replicas: Mutex<HashMap<Key, Versioned>>,
    fault: Fault,
}

/// Keeps the newer of two copies of each key.
fn keep_newest(
    into: &mut HashMap<Key, Versioned>,
    entries: impl IntoIterator<Item = (Key, Versioned)>,
) {
    for (key, entry) in entries {
        if into.get(&key).is_none_or(|had| had.version < entry.version) {
            into.insert(key, entry);
        }
    }
}

impl Mirror {
    async fn copy(&self, ctx: &Context, entries: Vec<(Key, Versioned)>) -> bool {
        let holder = ctx.snapshot().and_then(|s| s.replica_holder(ctx.node()));
        let (Some(holder), Some(&(key, _))) = (holder, entries.first()) else { return true };
        let sent = ctx.tell::<_, Response>(holder, MIRROR, key, &Request::Copy(entries)).await;
        matches!(sent, Ok(Response::Done))
    }
}

impl Service for Mirror {
    type Request = Request;
    type Response = Response;
    type Entry = Versioned;

    fn spec(&self) -> ServiceSpec {
        ServiceSpec::new(MIRROR, "mirror").with_slots(256)
    }

    fn must_retry(response: &Response) -> bool {
        matches!(response, Response::Uncopied)
    }

    fn repeatable(request: &Request) -> bool {
        matches!(request, Request::Get)
    }

    async fn handle(&self, ctx: &Context, key: Key, request: Request) -> Response {
        match request {
            Request::Copy(entries) => {
                keep_newest(&mut self.replicas.lock().expect("replicas"), entries);
                Response::Done
            }
            Request::Get => {
                Response::Value(self.live.lock().expect("live").get(&key).map(|e| e.value))
            }
            Request::Put(value) => {
                let entry = {
                    let mut live = self.live.lock().expect("live");
                    let entry = live.entry(key).or_default();
                    *entry = Versioned { version: entry.version + 1, value, ..*entry };
                    *entry
                };
                if !self.copy(ctx, vec![(key, entry)]).await && self.fault != Fault::AcksUncopied {
                    return Response::Uncopied;
                }
                Response::Done
            }
            Request::Add { id } => {
                let entry = {
                    let mut live = self.live.lock().expect("live");
                    let entry = live.entry(key).or_default();
                    // Counted already, on this node (its copy failed, and `must_retry` runs
                    // it again), or on a manager that died after its copy landed here.
                    if entry.last_add != id || self.fault == Fault::CountsEveryAdd {
                        let (version, value) = (entry.version + 1, entry.value + 1);
                        *entry = Versioned { version, value, last_add: id };
                    }
                    *entry
                };
                if !self.copy(ctx, vec![(key, entry)]).await {
                    return Response::Uncopied;
                }
                Response::Done
            }
        }
    }

    async fn before_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn send_out(&self, _ctx: &Context, moving: &Moving) -> Vec<(Key, Versioned)> {
        let mut live = self.live.lock().expect("live");
        let leaving: Vec<Key> =
            live.keys().copied().filter(|k| moving.destination(*k).is_some()).collect();
        let mut out: Vec<_> =
            leaving.into_iter().filter_map(|k| live.remove(&k).map(|e| (k, e))).collect();
        if self.fault == Fault::DropsOneSent && !out.is_empty() {
            out.remove(0);
        }
        out
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, entries: Vec<(Key, Versioned)>) {
        let mut staged = self.staged.lock().expect("staged");
        if self.fault == Fault::DropsKeysReceivedTwice {
            let seen: HashSet<Key> = staged.iter().map(|(k, _)| *k).collect();
            let again: HashSet<Key> =
                entries.iter().map(|(k, _)| *k).filter(|k| seen.contains(k)).collect();
            staged.retain(|(k, _)| !again.contains(k));
            staged.extend(entries.into_iter().filter(|(k, _)| !again.contains(k)));
            return;
        }
        staged.extend(entries);
    }

    async fn after_migration(&self, ctx: &Context, _change: &ChangeInfo) {
        let mut arrived = std::mem::take(&mut *self.staged.lock().expect("staged"));
        // Replicas of keys this node now manages: the newest may be here.
        if let Some(table) = ctx.snapshot() {
            let replicas = self.replicas.lock().expect("replicas");
            let mine =
                replicas.iter().filter(|(k, _)| table.locate(MIRROR, **k) == Some(ctx.node()));
            arrived.extend(mine.map(|(k, e)| (*k, *e)));
        }
        let mut live = self.live.lock().expect("live");
        if self.fault == Fault::KeepsOldest {
            for (key, entry) in arrived {
                live.entry(key).or_insert(entry);
            }
        } else {
            keep_newest(&mut live, arrived);
        }
    }

    async fn after_release(&self, ctx: &Context, _change: &ChangeInfo) {
        let all: Vec<_> = self.live.lock().expect("live").iter().map(|(k, e)| (*k, *e)).collect();
        for _ in 0..50 {
            if all.is_empty() || self.copy(ctx, all.clone()).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn scan(
        &self,
        _ctx: &Context,
        _failed: NodeId,
        orphans: &Moving,
    ) -> Vec<(Key, Versioned)> {
        if self.fault == Fault::ScansNothing {
            return Vec::new();
        }
        let replicas = self.replicas.lock().expect("replicas");
        replicas
            .iter()
            .filter(|(k, _)| orphans.destination(**k).is_some())
            .map(|(k, e)| (*k, *e))
            .collect()
    }
}

struct MirrorProbe(Fault);

impl Probe for MirrorProbe {
    type S = Mirror;

    fn make(&self) -> Mirror {
        Mirror {
            live: Mutex::default(),
            staged: Mutex::default(),
            replicas: Mutex::default(),
            fault: self.0,
        }
    }

    fn write(&self, value: u64) -> Request {
        Request::Put(value)
    }

    fn read(&self) -> Request {
        Request::Get
    }

    fn add(&self, id: u64) -> Option<Request> {
        Some(Request::Add { id })
    }

    fn value(&self, response: Response) -> Option<u64> {
        match response {
            Response::Value(value) => value,
            _ => None,
        }
    }

    fn survives_one_failure(&self) -> bool {
        true
    }
}

fn run(fault: Fault) -> Verdict {
    replay(conformance(MirrorProbe(fault), 2_000))
}

/// The steps after which keys went missing.
fn lost_after(verdict: &Verdict) -> Vec<&str> {
    verdict.stages.iter().filter(|s| s.lost > 0).map(|s| s.name.as_str()).collect()
}

#[test]
fn a_service_that_keeps_its_contract_passes() {
    let verdict = run(Fault::None);
    verdict.assert_conforms();
    assert_eq!(verdict.stages.len(), 8, "{verdict}");
    assert!(verdict.cut_off_failed > 0, "the cut-off node could not copy its writes: {verdict}");
}

#[test]
fn an_entry_left_out_of_a_migration_is_named_after_the_change_that_lost_it() {
    let verdict = run(Fault::DropsOneSent);
    let after = lost_after(&verdict);
    assert!(after.contains(&"node 4 joined"), "{verdict}");
    let stage = verdict.stages.iter().find(|s| s.name == "node 4 joined").expect("the step");
    assert!(!stage.wrong.is_empty() && stage.wrong.len() as u64 <= stage.lost, "{stage:?}");
    let problems = verdict.problems().join("\n");
    assert!(problems.contains("after \"node 4 joined\""), "{problems}");
}

#[test]
fn a_scan_that_rebuilds_nothing_loses_the_failed_nodes_keys() {
    let verdict = run(Fault::ScansNothing);
    let after = lost_after(&verdict);
    assert!(after.contains(&"node 4 failed"), "{verdict}");
    assert!(!after.contains(&"node 4 joined"), "nothing lost before a failure: {verdict}");
}

#[test]
fn a_write_acknowledged_without_its_copy_is_lost_when_its_cut_off_manager_is_declared_failed() {
    let verdict = run(Fault::AcksUncopied);
    let after = lost_after(&verdict);
    let cut = "node 7 was cut off as its own clients wrote, and declared failed";
    assert_eq!(after, [cut], "{verdict}");
    assert_eq!(verdict.cut_off_failed, 0, "every cut-off write was acknowledged: {verdict}");
}

#[test]
fn a_receive_that_drops_a_key_received_twice_is_caught() {
    let verdict = run(Fault::DropsKeysReceivedTwice);
    let after = lost_after(&verdict);
    assert!(
        after.contains(&"node 3 was evicted, each of its batches delivered twice"),
        "{verdict}"
    );
    assert!(!after.contains(&"node 4 joined"), "each batch once: {verdict}");
}

#[test]
fn an_add_that_counts_whatever_its_id_counts_twice_across_a_failure() {
    let verdict = run(Fault::CountsEveryAdd);
    assert!(verdict.counted_twice > 0, "{verdict}");
    assert_eq!(verdict.lost, 0, "nothing lost: {verdict}");
    let problems = verdict.problems().join("\n");
    assert!(problems.contains("read more adds than were asked"), "{problems}");
    let twice: Vec<&str> =
        verdict.stages.iter().filter(|s| s.counted_twice > 0).map(|s| s.name.as_str()).collect();
    assert!(!twice.contains(&"node 4 joined"), "no add runs twice in a join: {verdict}");
}

#[test]
fn a_merge_that_keeps_an_older_copy_is_caught() {
    let verdict = run(Fault::KeepsOldest);
    let after = lost_after(&verdict);
    // A recovery merges copies from every survivor, older replicas among them.
    assert!(after.contains(&"node 4 failed"), "{verdict}");
    assert!(!after.contains(&"node 4 joined"), "one copy of each key arrives in a join: {verdict}");
}
