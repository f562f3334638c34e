//! What a service offers the CLI on the node itself, beside requests to a key's manager: a DSM
//! client reading and writing a segment through this node's page cache, say. The agent serves
//! each registered [`Console`] on its control socket (`ControlRequest::Local`).

use async_trait::async_trait;
use gobelins_adaptation::Host;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One service's commands on this node.
#[async_trait]
pub trait Console: Send + Sync {
    /// Runs one command, encoded as the service's console expects, on this node and returns
    /// its encoded answer, or a message saying why it failed (shown to the operator as is).
    /// The future may be dropped while it waits for a configuration (the node learned it is
    /// held out of the cluster): it must leave nothing behind.
    async fn run(&self, host: &Host, command: Vec<u8>) -> Result<Vec<u8>, String>;
}

/// The consoles of an agent, by service id.
pub type Consoles = BTreeMap<u16, Arc<dyn Console>>;
