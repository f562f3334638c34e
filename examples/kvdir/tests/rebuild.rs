//! After a failure, what each survivor's `scan` returns is rebuilt at the new managers, even
//! when one of the entries does not encode.

use gobelins_adaptation::testing::{replay, MemCluster};
use gobelins_adaptation::{plugin, ChangeInfo, Context, HostConfig, Moving, Registry, Service};
use gobelins_locator::{Key, NodeId, ServiceId, ServiceSpec};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

const COPIES: ServiceId = ServiceId(11);
const KEYS: u64 = 400;

/// An entry whose value, if `POISON`, refuses to encode.
#[derive(Deserialize)]
struct Item(u64);

const POISON: u64 = u64::MAX;

impl Serialize for Item {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == POISON {
            return Err(serde::ser::Error::custom("this entry does not encode"));
        }
        s.serialize_u64(self.0)
    }
}

/// A service every node of which can rebuild every key (as if each held a copy of all), whose
/// scan poisons the lowest orphan key; the keys received are noted in `received`.
struct Copies {
    received: Arc<Mutex<BTreeSet<u64>>>,
}

impl Service for Copies {
    type Request = ();
    type Response = ();
    type Entry = Item;

    fn spec(&self) -> ServiceSpec {
        ServiceSpec::new(COPIES, "copies").with_slots(64)
    }

    async fn handle(&self, _ctx: &Context, _key: Key, _request: ()) {}

    async fn before_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn send_out(&self, _ctx: &Context, _moving: &Moving) -> Vec<(Key, Item)> {
        Vec::new()
    }

    async fn receive(&self, _ctx: &Context, _from: NodeId, entries: Vec<(Key, Item)>) {
        self.received.lock().expect("lock").extend(entries.iter().map(|(k, _)| k.0));
    }

    async fn after_migration(&self, _ctx: &Context, _change: &ChangeInfo) {}

    async fn scan(&self, _ctx: &Context, _failed: NodeId, orphans: &Moving) -> Vec<(Key, Item)> {
        let keys = (0..KEYS).filter(|&k| orphans.destination(Key(k)).is_some());
        keys.enumerate().map(|(i, k)| (Key(k), Item(if i == 0 { POISON } else { k }))).collect()
    }
}

#[test]
fn an_entry_that_does_not_encode_in_a_scan_leaves_the_others_rebuilt() {
    replay(async {
        let received = Arc::new(Mutex::new(BTreeSet::new()));
        let noted = Arc::clone(&received);
        let mut cluster = MemCluster::start(3, HostConfig::default(), move || {
            let mut registry = Registry::new();
            registry.register(plugin(Copies { received: Arc::clone(&noted) })).expect("registers");
            registry
        })
        .await;
        let dead = NodeId(3);
        let orphans: Vec<u64> = (0..KEYS)
            .filter(|&k| cluster.snapshot().locate(COPIES, Key(k)) == Some(dead))
            .collect();
        assert!(orphans.len() > 10, "node 3 manages some keys: {orphans:?}");
        cluster.fail(dead).await;

        let received = received.lock().expect("lock").clone();
        let expected: BTreeSet<u64> = orphans[1..].iter().copied().collect();
        assert_eq!(received, expected, "every orphan but the one that does not encode is rebuilt");
        let rebuilt: u64 =
            cluster.nodes().iter().map(|&n| cluster.host(n).stats().entries_rebuilt).sum();
        assert_eq!(rebuilt, 2 * (orphans.len() as u64 - 1), "each survivor rebuilt all it could");
    });
}
