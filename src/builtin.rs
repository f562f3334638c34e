//! The services every `gobelins agent` hosts, and the consoles through which the CLI reaches
//! this node's part of them (`gobelins dsm read|write`).

use crate::adaptation::{codec, plugin, Host, Registry};
use crate::dsm::{Dsm, DsmConfig, DsmNode, PageId, Segment, DSM};
use crate::kvdir::KvDir;
use crate::supervisor::console::{Console, Consoles};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest read or write `gobelins dsm` moves at once: the bytes ride in the control socket's
/// JSON line as numbers (up to 4 characters a byte), and that line is limited to 4 MiB.
pub const DSM_CONSOLE_MAX: u64 = 512 * 1024;

/// What `gobelins dsm` asks of the agent's DSM client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DsmCommand {
    /// Read `len` bytes of segment `segment` from `offset`.
    Read {
        /// The segment.
        segment: u32,
        /// Where to start, in bytes.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// Write `data` into segment `segment` at `offset`.
    Write {
        /// The segment.
        segment: u32,
        /// Where to start, in bytes.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Free segment `segment`, `len` bytes long, on every node ([`Dsm::free`]).
    Free {
        /// The segment.
        segment: u32,
        /// Its length in bytes.
        len: u64,
    },
    /// Start page `page` of segment `segment` afresh, zero-filled, after it was reported lost
    /// ([`Dsm::discard`]).
    Discard {
        /// The segment.
        segment: u32,
        /// The page within it.
        page: u32,
    },
    /// Every page the cluster's managers hold as lost, and their tainted slots
    /// ([`Dsm::losses`]); answered with the [`crate::dsm::Losses`], encoded.
    Losses,
    /// Lift the taint of the slot page `page` of segment `segment` falls in, or of every slot
    /// with `page` `None` ([`Dsm::forgive`], [`Dsm::forgive_all`]); answered with the slots
    /// forgiven and the pages made new again, encoded.
    Forgive {
        /// The segment.
        segment: u32,
        /// The page within it; `None`: every slot.
        page: Option<u32>,
    },
}

/// The built-in services of one agent. Each [`Builtins::registry`] builds them afresh (a new
/// life of the node starts with empty services); the consoles follow the newest.
#[derive(Clone)]
pub struct Builtins {
    dsm: Arc<ArcSwap<DsmNode>>,
    config: DsmConfig,
}

impl Default for Builtins {
    fn default() -> Self {
        Builtins::new()
    }
}

impl Builtins {
    /// The DSM keeps a backup of every page written on a second node, so that one failure
    /// loses no page.
    pub fn new() -> Self {
        let config = DsmConfig { backups: true, ..DsmConfig::default() };
        Builtins { dsm: Arc::new(ArcSwap::from_pointee(DsmNode::new(config.clone()))), config }
    }

    /// Fresh services, in registration order: the DSM, then kvdir.
    pub fn registry(&self) -> Registry {
        let node = DsmNode::new(self.config.clone());
        self.dsm.store(Arc::new(node.clone()));
        let mut registry = Registry::new();
        registry
            .register(plugin(node.service()))
            .and_then(|_| registry.register(plugin(KvDir::new())))
            .expect("the built-in services have valid, distinct declarations");
        registry
    }

    /// The consoles of the services that offer one: the DSM's.
    pub fn consoles(&self) -> Consoles {
        let dsm: Arc<dyn Console> = Arc::new(DsmConsole { node: Arc::clone(&self.dsm) });
        BTreeMap::from([(DSM.0, dsm)])
    }
}

/// Runs `gobelins dsm` commands with the DSM client of the agent's current life.
struct DsmConsole {
    node: Arc<ArcSwap<DsmNode>>,
}

#[async_trait]
impl Console for DsmConsole {
    async fn run(&self, host: &Host, command: Vec<u8>) -> Result<Vec<u8>, String> {
        let command: DsmCommand =
            codec::decode(&command).map_err(|e| format!("not a DSM command: {e}"))?;
        // The host's life first, then the node: a renewal stops the old life before it
        // registers a new node, so this node is of that life, or that life has stopped and
        // the command is refused. Never the old life's node with the new life.
        let life = host.this_life();
        let dsm = Dsm::new((**self.node.load()).clone(), life);
        // A segment is only a name and a length; the range asked for is all it needs to span.
        let segment = |id: u32, offset: u64, len: u64| {
            if len > DSM_CONSOLE_MAX {
                return Err(format!(
                    "{len} bytes asked for; the console moves at most {DSM_CONSOLE_MAX} at once"
                ));
            }
            let end = offset
                .checked_add(len)
                .ok_or("offset + length overflows: a segment holds at most 16 TiB (2^44 bytes)")?;
            Ok(Segment::new(id, end))
        };
        match command {
            DsmCommand::Read { segment: id, offset, len } => {
                let segment = segment(id, offset, len)?;
                let mut bytes = vec![0; len as usize];
                dsm.read_at(&segment, offset, &mut bytes).await.map_err(|e| e.to_string())?;
                Ok(bytes)
            }
            DsmCommand::Write { segment: id, offset, data } => {
                let segment = segment(id, offset, data.len() as u64)?;
                dsm.write_at(&segment, offset, &data).await.map_err(|e| e.to_string())?;
                Ok(Vec::new())
            }
            DsmCommand::Free { segment: id, len } => {
                // Every page goes whatever the length, as `dsm free --help` says: one past
                // what a segment holds frees it all too.
                let len = len.min(crate::dsm::MAX_SEGMENT_LEN);
                dsm.free(&Segment::new(id, len)).await.map_err(|e| e.to_string())?;
                Ok(Vec::new())
            }
            DsmCommand::Discard { segment, page } => {
                let discarded =
                    dsm.discard(PageId { segment, page }).await.map_err(|e| e.to_string())?;
                Ok(vec![u8::from(discarded)])
            }
            DsmCommand::Forgive { segment, page: Some(page) } => {
                let forgiven =
                    dsm.forgive(PageId { segment, page }).await.map_err(|e| e.to_string())?;
                let counts = forgiven.map_or((0u32, 0u64), |reset| (1, reset));
                codec::encode(&counts).map_err(|e| e.to_string())
            }
            DsmCommand::Forgive { page: None, .. } => {
                let counts = dsm.forgive_all().await.map_err(|e| e.to_string())?;
                codec::encode(&counts).map_err(|e| e.to_string())
            }
            DsmCommand::Losses => {
                let losses = dsm.losses().await.map_err(|e| e.to_string())?;
                codec::encode(&losses).map_err(|e| e.to_string())
            }
        }
    }
}
