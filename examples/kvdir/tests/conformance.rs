//! The replicated directory against the adaptation layer's conformance suite, on an in-memory
//! cluster under a paused clock.

use gobelins_adaptation::testing::{conformance, Probe};
use gobelins_kvdir::{KvDir, Request, Response};

struct KvProbe;

impl Probe for KvProbe {
    type S = KvDir;

    fn make(&self) -> KvDir {
        KvDir::new()
    }

    fn write(&self, value: u64) -> Request {
        Request::Put(value.to_le_bytes().to_vec())
    }

    fn read(&self) -> Request {
        Request::Get
    }

    fn value(&self, response: Response) -> Option<u64> {
        match response {
            Response::Value(Some(v)) => Some(u64::from_le_bytes(v.value.try_into().ok()?)),
            _ => None,
        }
    }

    fn survives_one_failure(&self) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_keys_survive_additions_evictions_a_failure_and_a_death_mid_eviction_under_load(
) {
    let verdict = conformance(KvProbe, 10_000).await;
    eprintln!("{verdict:?}");
    assert_eq!(verdict.failed, 0, "{verdict:?}");
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert!(verdict.ok > 10_000, "the writers ran during the changes: {verdict:?}");
    assert_eq!(verdict.changes, 9);
}
