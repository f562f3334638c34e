//! An agent restarted with a build that declares a service otherwise than its cluster holds it
//! is refused before it enters again: admitted, it would map that service's keys to other
//! slots than every other node does.

use gobelins_adaptation::{plugin, Context, HostConfig, Registry};
use gobelins_kvdir::{KvDir, KVDIR};
use gobelins_locator::{Key, Labels, NodeId, ServiceSpec};
use gobelins_supervisor::agent::{Agent, AgentOptions, Start};
use gobelins_supervisor::net::TokioNet;
use gobelins_supervisor::{SupervisorConfig, SupervisorError};
use std::path::Path;
use std::time::Duration;

/// kvdir's id, declared with twice kvdir's slots: another build of it.
struct Resized;

impl gobelins_adaptation::Service for Resized {
    type Request = ();
    type Response = ();
    type Entry = ();

    fn spec(&self) -> ServiceSpec {
        let kvdir = KvDir::declaration();
        kvdir.clone().with_slots(kvdir.slots * 2)
    }

    async fn handle(&self, _: &Context, _: Key, _: ()) {}

    async fn before_migration(&self, _: &Context, _: &gobelins_adaptation::ChangeInfo) {}

    async fn send_out(&self, _: &Context, _: &gobelins_adaptation::Moving) -> Vec<(Key, ())> {
        Vec::new()
    }

    async fn receive(&self, _: &Context, _: NodeId, _: Vec<(Key, ())>) {}

    async fn after_migration(&self, _: &Context, _: &gobelins_adaptation::ChangeInfo) {}

    async fn scan(
        &self,
        _: &Context,
        _: NodeId,
        _: &gobelins_adaptation::Moving,
    ) -> Vec<(Key, ())> {
        Vec::new()
    }
}

fn options(dir: &Path, listen: &str, start: Start) -> AgentOptions {
    AgentOptions {
        data_dir: dir.to_path_buf(),
        listen: listen.to_string(),
        advertise: None,
        start,
        secret_file: None,
        labels: Labels::new(),
        node_id: Some(1),
        config: SupervisorConfig::loopback(),
        durable: true,
        host: HostConfig::default(),
    }
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_build_declares_a_service_otherwise_is_refused_before_it_enters() {
    let root = tempfile::tempdir().expect("temporary directory");
    let dir = root.path().join("n1");
    let kvdir = || {
        let mut registry = Registry::new();
        registry.register(plugin(KvDir::new())).expect("kvdir");
        registry
    };
    let agent = Agent::start(TokioNet, &options(&dir, &free_addr(), Start::Bootstrap), kvdir)
        .await
        .expect("bootstrap");
    let registered = async {
        while !agent.supervisor.state().tree.services().any(|s| s.id == KVDIR) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), registered).await.expect("kvdir registered");
    agent.stop().await;
    drop(agent);

    let resized = || {
        let mut registry = Registry::new();
        registry.register(plugin(Resized)).expect("resized kvdir");
        registry
    };
    // The store is free once raft's tasks have let it go: asked again until it is.
    let refused = async {
        loop {
            match Agent::start(TokioNet, &options(&dir, &free_addr(), Start::Resume), resized).await
            {
                Err(SupervisorError::Refused(why)) => return why,
                Err(SupervisorError::Storage(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(_) => panic!("admitted with kvdir declared otherwise"),
                Err(other) => panic!("{other}"),
            }
        }
    };
    let why = tokio::time::timeout(Duration::from_secs(30), refused).await.expect("an answer");
    assert!(why.contains("declaration cannot change"), "{why}");
}
