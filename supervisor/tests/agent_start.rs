//! An agent whose start fails once its supervisor runs leaves nothing running behind it.

use gobelins_adaptation::{HostConfig, Registry};
use gobelins_locator::Labels;
use gobelins_supervisor::agent::{Agent, AgentOptions, Start};
use gobelins_supervisor::net::TokioNet;
use gobelins_supervisor::secret::ClusterSecret;
use gobelins_supervisor::{SupervisorConfig, SupervisorError};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn options(
    dir: &Path,
    id: u64,
    listen: &str,
    start: Start,
    secret: Option<PathBuf>,
) -> AgentOptions {
    AgentOptions {
        data_dir: dir.to_path_buf(),
        listen: listen.to_string(),
        advertise: None,
        start,
        secret_file: secret,
        labels: Labels::new(),
        node_id: Some(id),
        config: SupervisorConfig::loopback(),
        durable: true,
        host: HostConfig::default(),
    }
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").to_string()
}

/// A join refused at the handshake (the secret file of another cluster) returns an error
/// once raft, the transport and the store are open: they stop with it. Before, they ran on,
/// holding the port and the store's lock, and the same join with the right secret, in the
/// same process, was refused for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_at_the_handshake_leaves_its_port_and_store_free_for_the_next_try() {
    let root = tempfile::tempdir().expect("temporary directory");
    let seed = free_addr();
    let first = Agent::start(
        TokioNet,
        &options(&root.path().join("n1"), 1, &seed, Start::Bootstrap, None),
        Registry::new,
    )
    .await
    .expect("bootstrap");
    let wrong = root.path().join("other.secret");
    ClusterSecret::generate().save(&wrong).expect("another cluster's secret");

    let (dir, listen) = (root.path().join("n2"), free_addr());
    let join = |secret: PathBuf| options(&dir, 2, &listen, Start::Join(seed.clone()), Some(secret));
    let refused = Agent::start(TokioNet, &join(wrong), Registry::new).await;
    assert!(
        matches!(refused, Err(SupervisorError::Handshake { .. })),
        "the wrong secret is refused at the handshake: {:?}",
        refused.as_ref().err()
    );

    // The store is free once raft's tasks have let it go, a moment after the error: asked
    // again until it is. Left running, they held it for as long as the process lived.
    let right = first.dir.secret_path();
    let again = async {
        loop {
            match Agent::start(TokioNet, &join(right.clone()), Registry::new).await {
                Ok(agent) => return agent,
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(other) => panic!("the same join, with the right secret: {other}"),
            }
        }
    };
    let second = tokio::time::timeout(Duration::from_secs(20), again)
        .await
        .expect("the store and the port free again");
    assert!(first.supervisor.state().nodes.contains_key(&2), "node 2 is a member");
    second.stop().await;
    first.stop().await;
}
