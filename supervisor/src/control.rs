//! The control socket: how `gobelins status|join|leave|evict` talk to the local agent.
//!
//! One JSON request per connection, answered by JSON lines: `{"progress": …}` lines while a
//! change goes on, then one final `{"ok": …}` or `{"error": …}`. The socket is mode 0600 inside a
//! 0700 data directory: only the agent's user can drive it.

use crate::console::Consoles;
use crate::entering::Entering;
use crate::error::{Result, SupervisorError};
use crate::rpc::{ProposeError, View};
use crate::state::{Command, NodeStatus, Refusal};
use crate::supervisor::{Lifecycle, Supervisor};
use gobelins_locator::{Key, ServiceId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// A request from the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The cluster as the leader sees it, or as this node does with `local`.
    Status {
        /// This node's own applied state instead of the leader's.
        #[serde(default)]
        local: bool,
    },
    /// This node leaves gracefully; answered when the cluster is stable without it.
    Leave,
    /// Remove another node; answered when the cluster is stable without it.
    Evict {
        /// The node.
        node: u64,
    },
    /// (Re)join through `seed`; answered when this node is active.
    Join {
        /// Address of any member.
        seed: String,
    },
    /// A request for the manager of `key` of `service`, wherever it is; `body` is the request
    /// encoded as the service's codec expects. Answered with the encoded response.
    Call {
        /// The service.
        service: u16,
        /// The key.
        key: u64,
        /// The encoded request.
        #[serde(with = "hex_body")]
        body: Vec<u8>,
    },
    /// This node's adaptation counters and the changes it took part in.
    Stats,
    /// A command for this node's own part of `service` (its DSM client, say), run by the
    /// console the agent registered for it; answered with the encoded result.
    Local {
        /// The service.
        service: u16,
        /// The command, encoded as the service's console expects.
        #[serde(with = "hex_body")]
        body: Vec<u8>,
    },
    /// Lift the hold on a node that kept failing, at every live member.
    Unhold {
        /// The node.
        node: u64,
    },
}

impl ControlRequest {
    /// What it asks, in a word, for a log line.
    fn kind(&self) -> &'static str {
        match self {
            ControlRequest::Status { .. } => "status",
            ControlRequest::Leave => "leave",
            ControlRequest::Evict { .. } => "evict",
            ControlRequest::Join { .. } => "join",
            ControlRequest::Call { .. } => "call",
            ControlRequest::Stats => "stats",
            ControlRequest::Local { .. } => "local",
            ControlRequest::Unhold { .. } => "unhold",
        }
    }

    /// Whether it is the cluster's to carry out, whatever this node's own state: answered
    /// while this node enters the cluster or is held out of it.
    fn for_the_cluster(&self) -> bool {
        matches!(
            self,
            ControlRequest::Stats | ControlRequest::Evict { .. } | ControlRequest::Unhold { .. }
        )
    }
}

/// A body rides the control socket as a hex string: as JSON numbers, one a byte, a 4 MiB
/// value took the agent's runtime worker about 200 ms to parse, long enough for its peers to
/// hear nothing from it.
mod hex_body {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(body: &[u8], to: S) -> Result<S::Ok, S::Error> {
        to.serialize_str(&hex::encode(body))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(from: D) -> Result<Vec<u8>, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(from)?;
        hex::decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// The body of an agent's answer to [`ControlRequest::Call`] or [`ControlRequest::Local`].
pub fn answer_body(answer: &Value) -> Result<Vec<u8>> {
    let text = answer["body"]
        .as_str()
        .ok_or_else(|| SupervisorError::Codec("the agent's answer has no body".into()))?;
    hex::decode(text).map_err(|e| SupervisorError::Codec(format!("the agent's answer: {e}")))
}

/// The longest request line the control socket reads. A call's body rides in it as hex, two
/// characters a byte: this carries kvdir's largest value (4 MiB) with room to spare. The
/// socket is its user's alone, so the limit guards against mistakes, not peers.
pub const MAX_REQUEST_LINE: usize = 20 << 20;

/// How long a leave, evict or join may take before the CLI is told to look again.
const CHANGE_DEADLINE: Duration = Duration::from_secs(60);

/// How long the CLI waits for the agent's first answer line: for `status` and `stats`, which
/// ask the leader at most, and for the others, whose requests answer within the adaptation
/// layer's request deadline (10 s by default) or say at once that a change is being asked
/// for. Silence this long is an agent stopped (`SIGSTOP`), hung or overloaded, and a command
/// that hangs without a word helps no operator.
const FIRST_LINE_PATIENCE: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(60));

/// How long the CLI waits between two later lines: a change's progress comes as it moves,
/// and the agent gives up on the change itself after [`CHANGE_DEADLINE`].
const NEXT_LINE_PATIENCE: Duration = Duration::from_secs(90);

/// How long a leave or evict is proposed again while no leader answers.
const PROPOSE_WINDOW: Duration = Duration::from_secs(10);

/// Binds a socket at `path` that only this user may use. It is bound under another name, made
/// private, then renamed into place: bound at `path` directly, it would have the umask's mode
/// until made private, and a client could connect meanwhile.
fn bind_private(path: &Path) -> Result<UnixListener> {
    let binding = binding_path(path);
    // Sockets left by a previous run of this agent; the data directory is ours alone.
    let _ = std::fs::remove_file(&binding);
    let listener = UnixListener::bind(&binding).map_err(|e| {
        SupervisorError::io(format!("binding control socket {}", binding.display()), e)
    })?;
    std::fs::set_permissions(&binding, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&binding, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&binding);
            SupervisorError::io(format!("securing control socket {}", path.display()), e)
        })?;
    Ok(listener)
}

/// Where the socket at `path` is bound before it is renamed into place: beside it, under a
/// name no longer than its own, so that a path the agent checked at its start binds too (a
/// longer name, as the pid once made it, failed past the point of no return: admitted, then
/// stopped, at every start). Only one agent gets this far in a data directory: a second one
/// stops on the store's lock.
fn binding_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("bind")
}

/// The control socket an agent bound, removed when this is dropped (the agent's way out,
/// whichever way it takes), and only if it is still this one: once the agent let its store
/// go, another agent started on the same data directory may have bound its own there, which
/// removing by name would take away.
pub struct ControlSocket {
    path: std::path::PathBuf,
    inode: u64,
}

impl ControlSocket {
    /// The socket now at `path`.
    fn at(path: &Path) -> Result<ControlSocket> {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::symlink_metadata(path)
            .map_err(|e| {
                SupervisorError::io(format!("reading control socket {}", path.display()), e)
            })?
            .ino();
        Ok(ControlSocket { path: path.to_path_buf(), inode })
    }
}

impl Drop for ControlSocket {
    /// Removes the socket, unless another took its place.
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves the control socket at `path` until the process ends. While the node is `entering`
/// the cluster, `status` answers with this node's own view and what it is doing, `stats` as
/// ever, and every other command is refused with that.
pub async fn serve(
    path: &Path,
    node: Arc<Supervisor>,
    consoles: Consoles,
    entering: Entering,
) -> Result<ControlSocket> {
    let consoles = Arc::new(consoles);
    let listener = bind_private(path)?;
    let socket = ControlSocket::at(path)?;
    // The agent bound the socket: its owner is the agent's user.
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path)?);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) if !may_drive(&stream, owner) => {
                    tokio::spawn(refuse_stranger(stream, owner));
                }
                Ok((stream, _)) => {
                    let node = Arc::clone(&node);
                    let consoles = Arc::clone(&consoles);
                    let entering = entering.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, node, &consoles, &entering).await {
                            tracing::debug!(%error, "control connection ended");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(socket)
}

/// Whether the process at the other end of `stream` runs as `owner`, the agent's user, or as
/// root. The socket's mode says the same, but a mode can be loosened by mistake.
fn may_drive(stream: &UnixStream, owner: u32) -> bool {
    stream.peer_cred().is_ok_and(|cred| allowed(cred.uid(), owner))
}

fn allowed(uid: u32, owner: u32) -> bool {
    uid == owner || uid == 0
}

async fn refuse_stranger(stream: UnixStream, owner: u32) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    tracing::warn!(?uid, owner, "refused a control connection from another user: the control socket serves the agent's own user (and root) only; check who can reach the data directory");
    let (_, mut write) = stream.into_split();
    let why = format!("this agent's control socket serves its own user (uid {owner}) and root only: run the command as that user");
    let _ = flush(&mut write, &[json!({ "error": why })]).await;
}

async fn answer(
    stream: UnixStream,
    node: Arc<Supervisor>,
    consoles: &Consoles,
    entering: &Entering,
) -> Result<()> {
    let client = stream.peer_cred().ok().and_then(|c| Some((c.pid()?, c.uid())));
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read.take(MAX_REQUEST_LINE as u64 + 1));
    let request = match read_request(&mut read).await? {
        Ok(request) => request,
        Err(why) => return flush(&mut write, &[json!({ "error": why })]).await,
    };
    // A CLI that gave up waiting (this agent was stopped, say) told its operator so: what it
    // asked for is not carried out now, long after, behind the operator's back.
    if let Some((pid, _)) = client.filter(|&(pid, uid)| client_exited(pid, uid)) {
        tracing::warn!(request = request.kind(), pid, "a control request whose client exited before this agent read it is not carried out (the agent was stopped or too slow to answer, and the command gave up)");
        return Ok(());
    }
    // A join or a leave gets the cluster's own answer, which says the same.
    let its_own = matches!(
        request,
        ControlRequest::Status { .. } | ControlRequest::Join { .. } | ControlRequest::Leave
    );
    // A client's request for a service, refused before it reached the host: counted failed
    // all the same, or `stats` says nothing failed while the node turned every client away.
    let a_request = matches!(request, ControlRequest::Call { .. } | ControlRequest::Local { .. });
    // Held out, it serves nothing until the hold ends: a request would wait out its whole
    // deadline for a configuration that is not coming, and then blame the cluster. Before
    // the entering check: a node restarted while held is entering too, and that text would
    // blame a missing majority.
    if let Some((failures, left)) =
        node.held_back().filter(|_| !request.for_the_cluster() && !its_own)
    {
        if a_request {
            node.host().count_refused();
        }
        let why = held_out(node.id(), failures, left);
        return flush(&mut write, &[json!({ "error": why })]).await;
    }
    if let Some(what) = entering.now() {
        match request {
            _ if request.for_the_cluster() => {}
            ControlRequest::Status { .. } => {
                let mut status = status_json(&node.view());
                status["entering"] = json!(what);
                // Its own view, which can be stale: one polling for a stable cluster must not
                // take it for the cluster's.
                status["stable"] = json!(false);
                return flush(&mut write, &[json!({ "ok": status })]).await;
            }
            _ => {
                if a_request {
                    node.host().count_refused();
                }
                let why = format!("the agent is still entering the cluster: {what}. Try again once `gobelins status` no longer says so; the agent's log tells what it waits for");
                return flush(&mut write, &[json!({ "error": why })]).await;
            }
        }
    }
    match request {
        ControlRequest::Call { service, key, body } => {
            let asked = node.host().request(ServiceId(service), Key(key), body);
            let line = match unless_held(&node, asked).await {
                Ok(Ok(response)) => json!({ "ok": { "body": hex::encode(response) } }),
                Ok(Err(e)) => json!({ "error": e.to_string() }),
                Err(why) => json!({ "error": why }),
            };
            flush(&mut write, &[line]).await
        }
        ControlRequest::Local { service, body } => {
            let line = match consoles.get(&service) {
                Some(console) => match unless_held(&node, console.run(node.host(), body)).await {
                    Ok(Ok(answer)) => json!({ "ok": { "body": hex::encode(answer) } }),
                    Ok(Err(why)) | Err(why) => json!({ "error": why }),
                },
                None => json!({
                    "error": format!("this agent offers no console for service {service}")
                }),
            };
            flush(&mut write, &[line]).await
        }
        ControlRequest::Stats => {
            let host = node.host();
            let line = json!({ "ok": { "stats": host.stats(), "changes": host.history() } });
            flush(&mut write, &[line]).await
        }
        ControlRequest::Status { local } => {
            let view = if local { node.view() } else { node.cluster_view().await };
            let mut status = status_json(&view);
            // No leader answered: this node's own view, as it last knew the cluster. A node
            // cut off from the others sees them all active, and a poll for a stable cluster
            // must not take that for the cluster's.
            let me = node.id();
            if !local && view.node == me && view.leader != Some(me) {
                status["own_view"] = json!(true);
                status["stable"] = json!(false);
                // A voter's elections have won no majority for longer than a few may take.
                let after = crate::quorum::leaderless_after(node.config().raft_election);
                let lost = node.leaderless_for(tokio::time::Instant::now());
                if let Some(lost) = lost.filter(|&lost| lost >= after) {
                    status["leaderless_ms"] = json!(lost.as_millis() as u64);
                }
            }
            // A leader cut off from a majority still calls itself leader: what it shows is
            // what it last committed, and may be stale too.
            if view.quorum_lost_ms.is_some() {
                status["stable"] = json!(false);
            }
            flush(&mut write, &[json!({ "ok": status })]).await
        }
        ControlRequest::Leave => {
            let id = node.id();
            let leave = Command::Leave { node: id };
            change((&mut read, &mut write), &node, leave, id, NodeStatus::Left).await
        }
        ControlRequest::Unhold { node: target } if !node.state().nodes.contains_key(&target) => {
            let why = format!("node {target} was never a member of this cluster, as this node knows it: `gobelins status` lists them");
            flush(&mut write, &[json!({ "error": why })]).await
        }
        ControlRequest::Unhold { node: target } => {
            let unheld = node.unhold(target).await;
            let line = json!({ "ok": {
                "node": target,
                "held": unheld.held,
                "counted": unheld.counted,
                "answered": unheld.answered,
                "silent": unheld.silent,
            } });
            flush(&mut write, &[line]).await
        }
        // Not this node: `leave` is the way out for it, and an evict typed with the wrong id
        // should not take down the node the operator is on.
        ControlRequest::Evict { node: target } if target == node.id() => {
            let why = format!("node {target} is this agent's own node: `gobelins leave` takes it out gracefully; `evict` removes other nodes");
            flush(&mut write, &[json!({ "error": why })]).await
        }
        ControlRequest::Evict { node: target } => {
            // Neither a node in its state nor a leader to ask: this agent has not joined yet,
            // and its raft knows nobody.
            let view = node.view();
            if view.leader.is_none() && view.state.nodes.is_empty() {
                let why = "this agent has not joined a cluster yet: ask a member's agent (`--data-dir` of a running member)";
                return flush(&mut write, &[json!({ "error": why })]).await;
            }
            let evict = Command::Evict { node: target };
            change((&mut read, &mut write), &node, evict, target, NodeStatus::Left).await
        }
        ControlRequest::Join { seed } => {
            // On its way out after a leave: joined now, the node was active for the moment
            // before the agent stopped, and the cluster then declared it failed.
            if *node.lifecycle().borrow() != Lifecycle::Member {
                let why = "this agent is stopping: its node left the cluster, or stopped on an error (its log says which). Start the agent again with --join ADDR (a member's address) to take part as a new life of this node";
                return flush(&mut write, &[json!({ "error": why })]).await;
            }
            let view = node.cluster_view().await;
            let me = node.id();
            let active = view.state.nodes.get(&me).is_some_and(|r| {
                r.status == NodeStatus::Active && r.incarnation == node.incarnation()
            });
            // By the word of a leader, not this node's own view, which may be stale.
            if active && view.leader == Some(view.node) {
                let already = format!("node {me} is already an active member: nothing to do");
                return flush(
                    &mut write,
                    &[json!({ "progress": already }), json!({ "ok": status_json(&view) })],
                )
                .await;
            }
            let asking = format!("asking the cluster through {seed}");
            flush(&mut write, &[json!({ "progress": asking })]).await?;
            let line = match node.join_cluster(&seed, Duration::from_secs(10), false).await {
                Ok(Ok(applied)) => json!({ "progress": format!("accepted: {applied}") }),
                Ok(Err(refusal)) => {
                    json!({ "error": format!("the cluster refused this node: {refusal}") })
                }
                Err(e) => json!({ "error": e.to_string() }),
            };
            let failed = line.get("error").is_some();
            flush(&mut write, &[line]).await?;
            if failed {
                return Ok(());
            }
            wait_for((&mut read, &mut write), &node, node.id(), NodeStatus::Active, None).await
        }
    }
}

/// What a request through a node held out of the cluster is told.
fn held_out(id: u64, failures: u32, left: Duration) -> String {
    format!(
        "node {id} is held out of the cluster for {:.1} s more: it keeps failing ({failures} \
         short lives in a row), and serves nothing until it rejoins, by itself, once the hold \
         ends. Send requests through another member meanwhile. {}",
        left.as_secs_f64(),
        crate::flaps::advice(id)
    )
}

/// Runs `asked` unless `node` learns first that it is held out of the cluster. A request that
/// reached a life not yet admitted (one that asked to rejoin, not yet told of its hold) waits
/// for a configuration the hold keeps away: it would wait until the hold ends, or out its
/// whole deadline, to be served late or to blame the cluster. It is refused as the node
/// learns, as a request that comes then would be, so that its client sends it through another
/// member now. Such a life has no configuration, so the request was never sent; one begun on
/// an earlier, admitted life may have reached a manager, and the client is told so. Counted
/// failed, as the host does not see it end.
async fn unless_held<T>(
    node: &Supervisor,
    asked: impl std::future::Future<Output = T>,
) -> std::result::Result<T, String> {
    let (life, admitted) = (node.incarnation(), node.life_admitted());
    tokio::select! {
        // An answer in hand is given, whatever else is ready.
        biased;
        answer = asked => Ok(answer),
        (failures, left) = node.until_held() => {
            node.host().count_refused();
            tracing::info!(node = node.id(), "a request that waited here was refused: this node is held out of the cluster");
            let what = if !admitted && life == node.incarnation() {
                "This request was not sent: this node had no configuration yet. Send it \
                 through another member"
            } else {
                "This request waited here and did not complete; it may or may not have taken \
                 effect: read what it changes through another member before sending it again"
            };
            Err(format!("{what}. {}", held_out(node.id(), failures, left)))
        }
    }
}

/// The client's side of a control connection, past its request.
type Reader = BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>;

/// Returns once the client has hung up. The end of what it sends is not enough: a client
/// may shut its side down after its request and read on (`socat`, `nc -N`), so only a socket
/// closed both ways counts. Anything the client sends after its request is read and ignored.
async fn hung_up(read: &mut Reader, write: &tokio::net::unix::OwnedWriteHalf) {
    let mut byte = [0u8; 1];
    while let Ok(1..) = read.read(&mut byte).await {}
    loop {
        match write.ready(tokio::io::Interest::WRITABLE).await {
            Ok(ready) if !ready.is_write_closed() => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            _ => return,
        }
    }
}

/// Whether the client process `pid`, of user `uid`, has exited: a CLI that gave up waiting.
/// Judged only where `/proc` can tell: it must be this process's own (not another pid
/// namespace's, whose numbers differ from the peer's), and the client must run as this
/// agent's user (`hidepid` hides other users' processes, root's included). Otherwise the
/// request is carried out, as before.
fn client_exited(pid: i32, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let proc = Path::new("/proc");
    // The client's entry first: it is there for every request but one given up on, and the
    // two checks after it are then not made.
    if pid <= 0 || proc.join(pid.to_string()).exists() {
        return false;
    }
    let me = std::process::id().to_string();
    let ours = std::fs::read_link(proc.join("self")).is_ok_and(|own| own == Path::new(&me));
    ours && std::fs::metadata(proc.join("self")).is_ok_and(|m| m.uid() == uid)
}

/// Reads a request line from `read`, which yields at most one byte over
/// [`MAX_REQUEST_LINE`]: the request, or what to answer instead.
async fn read_request(
    read: &mut (impl AsyncBufRead + Unpin),
) -> Result<std::result::Result<ControlRequest, String>> {
    // Bytes, not a string: a line cut at the limit may end inside a character, and must still
    // be answered.
    let mut line = Vec::new();
    read.read_until(b'\n', &mut line).await?;
    if line.len() > MAX_REQUEST_LINE {
        return Ok(Err(too_long(line.len())));
    }
    let long = line_is_long(line.len());
    let parse = move || serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"));
    if long {
        // Megabytes of hex take milliseconds to decode: not on a worker that answers peers.
        return tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| SupervisorError::Agent(format!("parsing the request: {e}")));
    }
    Ok(parse())
}

/// Whether a request line is long enough to parse off the runtime's workers.
fn line_is_long(len: usize) -> bool {
    len > 256 << 10
}

/// Why a request line of `len` bytes is refused.
fn too_long(len: usize) -> String {
    format!(
        "the request is {:.1} MiB as the control socket carries it (JSON), over its limit of {} \
         MiB; nothing was done",
        len as f64 / (1 << 20) as f64,
        MAX_REQUEST_LINE >> 20
    )
}

async fn flush(write: &mut tokio::net::unix::OwnedWriteHalf, lines: &[Value]) -> Result<()> {
    for line in lines {
        write.write_all(format!("{line}\n").as_bytes()).await?;
    }
    write.flush().await?;
    Ok(())
}

async fn change(
    (read, write): (&mut Reader, &mut tokio::net::unix::OwnedWriteHalf),
    node: &Supervisor,
    command: Command,
    target: u64,
    until: NodeStatus,
) -> Result<()> {
    // At once: proposing may take a while (through an election, or a leader waiting for its
    // voters), and the CLI takes silence for an agent that stopped.
    flush(write, &[json!({ "progress": "asking the cluster's leader" })]).await?;
    // Through an election, whose leader is not known for a moment, rather than refused. Only
    // then: a proposal a leader received may have committed, and sent again it is refused.
    let give_up = tokio::time::Instant::now() + PROPOSE_WINDOW;
    let proposed = loop {
        match node.propose(command.clone()).await {
            Err(ProposeError::NoLeader) if tokio::time::Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => break other,
        }
    };
    match proposed {
        Ok(Ok(applied)) => {
            flush(write, &[json!({ "progress": format!("accepted: {applied}") })]).await?;
            wait_for((read, write), node, target, until, renamed(&command, target)).await
        }
        // Told apart only now, from the state of the leader that refused: a node that failed
        // or left is no member, and had been said to be "not a member of this cluster".
        Ok(Err(Refusal::UnknownNode(node_id))) => {
            let view = node.cluster_view().await;
            let why = match view.state.nodes.get(&node_id).map(|r| r.status) {
                Some(NodeStatus::Failed) => format!("node {node_id} failed already: nothing to do (its entries were rebuilt from their replicas; `gobelins status` lists it)"),
                Some(NodeStatus::Left) => format!("node {node_id} left already: nothing to do"),
                _ => Refusal::UnknownNode(node_id).to_string(),
            };
            flush(write, &[json!({ "error": why })]).await
        }
        // Asked twice (an `evict` through two members, a `leave` typed again after a Ctrl-C, an
        // `evict` of a node that runs `leave`): the node is on its way out already, which is
        // what was asked. Followed like the first ask, not refused: a script's `evict 4 ||
        // page-someone` paged someone for a removal that went through.
        Ok(Err(Refusal::AlreadyLeaving(id))) if id == target => {
            let said = format!("node {id} is already on its way out (a leave or an eviction under way): following it");
            flush(write, &[json!({ "progress": said })]).await?;
            wait_for((read, write), node, target, until, renamed(&command, target)).await
        }
        Ok(Err(refusal)) => flush(write, &[json!({ "error": refusal.to_string() })]).await,
        // A proposal that reached a leader but was not answered in time may still commit.
        Err(e) => {
            let why = format!(
                "{e}; is a majority of the cluster up? The change may still happen: see \
                 `gobelins status` before asking again"
            );
            flush(write, &[json!({ "error": why })]).await
        }
    }
}

/// The cluster records a leave as the eviction of the leaver, which the operator who typed
/// `leave` would not recognise: the change as recorded, and as shown.
fn renamed(command: &Command, target: u64) -> Option<(String, String)> {
    let leaving = matches!(command, Command::Leave { .. });
    leaving.then(|| (format!("evict n{target}"), format!("leave n{target}")))
}

/// Streams progress until `target` reaches `until`, which the cluster records as the change
/// that takes it there ends. Not until the cluster is stable too: the changes queued after
/// it (a rebalance, another node's leave) may take longer than a leaver's agent stays up, and
/// its CLI then read "connection closed" for a leave that had succeeded.
async fn wait_for(
    (read, write): (&mut Reader, &mut tokio::net::unix::OwnedWriteHalf),
    node: &Supervisor,
    target: u64,
    until: NodeStatus,
    renamed: Option<(String, String)>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let view = node.cluster_view().await;
        let status = view.state.nodes.get(&target).map(|r| r.status);
        if status == Some(until) {
            return flush(write, &[json!({ "ok": status_json(&view) })]).await;
        }
        // On its way out, a node that fails is out for good: its entries are rebuilt from
        // their replicas instead of handed over. Waiting for "left" would last the full minute.
        if until == NodeStatus::Left && status == Some(NodeStatus::Failed) {
            let why = format!(
                "node {target} failed before it was out (its leave or eviction had not ended): \
                 the cluster rebuilds its entries from their replicas (`gobelins stats` counts \
                 any it could not)"
            );
            return flush(
                write,
                &[json!({ "progress": why }), json!({ "ok": status_json(&view) })],
            )
            .await;
        }
        let progress = match &view.state.in_progress {
            Some(p) => {
                let change = p.change.to_string();
                let change = match &renamed {
                    Some((recorded, shown)) if *recorded == change => shown.clone(),
                    _ => change,
                };
                format!(
                    "epoch {}: {change} — {}/{} participants done",
                    p.epoch,
                    p.done.len(),
                    p.participants.len()
                )
            }
            None => {
                format!("node {target} is {}", status.map_or("unknown".into(), |s| s.to_string()))
            }
        };
        if progress != last {
            flush(write, &[json!({ "progress": progress })]).await?;
            last = progress;
        }
        // A client gone (an operator's Ctrl-C) is not asked about for the rest of the minute:
        // each pass asks the leader for the whole state.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = hung_up(read, write) => {
                tracing::info!(node = target, "the control client went away; the change goes on without it (`gobelins status` follows it)");
                return Ok(());
            }
        }
    }
    flush(
        write,
        &[json!({ "error": "the change did not finish within 60 s; see `gobelins status`" })],
    )
    .await
}

/// The JSON form of a view, as `gobelins status --json` prints it.
pub fn status_json(view: &View) -> Value {
    let state = &view.state;
    let nodes: Vec<Value> = state
        .nodes
        .iter()
        .map(|(id, r)| {
            let silent = view.silent.get(id);
            let held = view.held.get(id);
            json!({
                "id": id,
                "addr": r.addr,
                "status": r.status.to_string(),
                "incarnation": r.incarnation,
                "labels": r.labels,
                "voter": view.voters.contains(id),
                "silent_ms": silent.map(|&(ms, _)| ms),
                "suspected": silent.is_some_and(|&(_, suspected)| suspected),
                "failures": held.map(|&(failures, _)| failures),
                "held_ms": held.map(|&(_, ms)| ms).filter(|&ms| ms > 0),
            })
        })
        .collect();
    // A suspect is a failure not yet committed: the change that recovers it is on its way.
    let suspected = view.silent.values().any(|&(_, suspected)| suspected);
    let in_progress = state.in_progress.as_ref().map(|p| {
        json!({
            "epoch": p.epoch,
            "change": p.change.to_string(),
            "participants": p.participants,
            "done": p.done,
        })
    });
    json!({
        "node": view.node,
        "epoch": state.epoch,
        "stable": state.is_stable() && !suspected,
        "leader": view.leader,
        "quorum_lost_ms": view.quorum_lost_ms,
        "voters": view.voters,
        "nodes": nodes,
        "in_progress": in_progress,
        "queue": state.queue.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tree": state.tree.render(),
        "levels": state.tree.config().label_levels,
    })
}

/// Sends `request` to the agent whose socket is `path` and calls `on_line` for each line of the
/// answer; returns the final `ok` value.
pub async fn request(
    path: &Path,
    request: &ControlRequest,
    on_line: impl FnMut(&str),
) -> Result<Value> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "the agent runs as another user: run this command as that user, or as root"
        } else {
            "is `gobelins agent` running with this --data-dir?"
        };
        SupervisorError::io(format!("connecting to the agent at {} ({hint})", path.display()), e)
    })?;
    let mut body =
        serde_json::to_string(request).map_err(|e| SupervisorError::Codec(e.to_string()))?;
    if body.len() > MAX_REQUEST_LINE {
        return Err(SupervisorError::Agent(too_long(body.len())));
    }
    body.push('\n');
    let written = stream.write_all(body.as_bytes()).await;
    let first = match request {
        ControlRequest::Status { .. } | ControlRequest::Stats => FIRST_LINE_PATIENCE.0,
        _ => FIRST_LINE_PATIENCE.1,
    };
    let answer = read_answer(BufReader::new(stream), (first, NEXT_LINE_PATIENCE), on_line).await;
    let path = path.display().to_string();
    let answer = answer.map_err(|e| match e {
        SupervisorError::AgentSilent { after_s, .. } => {
            SupervisorError::AgentSilent { path, after_s }
        }
        SupervisorError::Closed => SupervisorError::AgentGone { path, taken: written.is_ok() },
        // Reset: it went away with the request unread (a socket closed with bytes still to
        // read resets its peer), so nothing was done.
        SupervisorError::Io { cause, .. } if gone(&cause) => {
            SupervisorError::AgentGone { path, taken: false }
        }
        other => other,
    });
    match written {
        Ok(()) => answer,
        // An agent that refused the request may have closed the socket before it was all
        // written: its answer, if it gave one, says why better than the broken pipe does.
        Err(error) => match answer {
            Err(refused @ (SupervisorError::Agent(_) | SupervisorError::AgentGone { .. })) => {
                Err(refused)
            }
            _ => Err(error.into()),
        },
    }
}

/// Whether `error` on the control socket means the agent closed it: it stopped, or left.
fn gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(error.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
}

/// Reads the agent's answer: progress lines to `on_line`, then its result or its error.
/// Gives up after `(first, next)` of silence before the first line, or between two.
async fn read_answer(
    read: impl AsyncBufRead + Unpin,
    (first, next): (Duration, Duration),
    mut on_line: impl FnMut(&str),
) -> Result<Value> {
    let mut lines = read.lines();
    let mut patience = first;
    loop {
        let Ok(line) = tokio::time::timeout(patience, lines.next_line()).await else {
            let after_s = patience.as_secs();
            return Err(SupervisorError::AgentSilent { path: String::new(), after_s });
        };
        let Some(line) = line? else { break };
        patience = next;
        let value: Value =
            serde_json::from_str(&line).map_err(|e| SupervisorError::Codec(e.to_string()))?;
        if let Some(progress) = value.get("progress").and_then(Value::as_str) {
            on_line(progress);
        } else if let Some(error) = value.get("error").and_then(Value::as_str) {
            return Err(SupervisorError::Agent(error.to_string()));
        } else if let Some(ok) = value.get("ok") {
            return Ok(ok.clone());
        }
    }
    Err(SupervisorError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_on_its_way_out_removes_its_own_socket_not_one_that_took_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let _first = bind_private(&path).unwrap();
        let first = ControlSocket::at(&path).unwrap();
        // A second agent, started once the first let its store go, binds its own.
        let _second = bind_private(&path).unwrap();
        let second = ControlSocket::at(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the second agent's socket stays");
        drop(second);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn the_socket_is_private_replaces_a_stale_one_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, b"a stale socket").unwrap();
        let listener = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the socket is left");
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
    }

    /// The longest data directory the agent accepts at its start (its socket's path 107
    /// bytes, all `sun_path` holds) binds its socket too: the name it is bound under first
    /// is no longer. With the pid in that name, the bind failed once the node was admitted.
    #[tokio::test]
    async fn a_socket_path_the_start_accepts_binds() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().as_bytes().len() + "/control.sock".len();
        let long = dir.path().join("d".repeat(107 - base - 1));
        std::fs::create_dir(&long).unwrap();
        let path = long.join("control.sock");
        assert_eq!(path.as_os_str().as_bytes().len(), 107);
        let listener = bind_private(&path).unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
    }

    #[tokio::test]
    async fn a_request_line_over_the_limit_is_answered_why() {
        // Cut at the limit inside a character.
        let line = "é".repeat(MAX_REQUEST_LINE).into_bytes();
        let mut read = BufReader::new(line.as_slice().take(MAX_REQUEST_LINE as u64 + 1));
        let why = read_request(&mut read).await.unwrap().expect_err("refused");
        assert!(why.contains("over its limit of 20 MiB"), "{why}");
        let mut read = BufReader::new(&b"{\"cmd\":\"status\",\"local\":true}\n"[..]);
        assert!(matches!(
            read_request(&mut read).await.unwrap(),
            Ok(ControlRequest::Status { local: true })
        ));
    }

    #[tokio::test]
    async fn only_the_agents_user_and_root_may_drive_it() {
        assert!(allowed(1000, 1000) && allowed(0, 1000) && !allowed(1001, 1000));
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let me = ours.peer_cred().unwrap().uid();
        assert!(may_drive(&ours, me), "the agent's own user");
        if me != 0 {
            assert!(!may_drive(&ours, me + 1), "another user");
        }
    }

    #[tokio::test]
    async fn a_body_rides_as_hex_and_comes_back_whole() {
        for len in [3, 300 << 10] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let call = ControlRequest::Call { service: 10, key: 1, body: body.clone() };
            let line = serde_json::to_string(&call).unwrap() + "\n";
            assert!(line.len() < 2 * len + 64, "two characters a byte: {} for {len}", line.len());
            assert_eq!(line_is_long(line.len()), len > 1000);
            let mut read = BufReader::new(line.as_bytes());
            match read_request(&mut read).await.unwrap() {
                Ok(ControlRequest::Call { body: read, .. }) => assert!(read == body, "{len}"),
                other => panic!("{other:?}"),
            }
        }
        let answer = json!({ "body": hex::encode([0u8, 255, 16]) });
        assert_eq!(answer_body(&answer).unwrap(), [0, 255, 16]);
        assert!(answer_body(&json!({ "body": [0, 255] })).is_err(), "numbers are no longer read");
    }

    /// An agent that answers nothing (stopped, say) is given up on, with what to do, rather
    /// than waited for without end; so is one that falls silent after a first line.
    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_is_given_up_on() {
        let patience = (FIRST_LINE_PATIENCE.0, NEXT_LINE_PATIENCE);
        let (ours, _agent) = tokio::io::duplex(64);
        let silent = read_answer(BufReader::new(ours), patience, |_| {}).await;
        assert!(matches!(silent, Err(SupervisorError::AgentSilent { after_s: 30, .. })));
        let (ours, mut agent) = tokio::io::duplex(64);
        agent.write_all(b"{\"progress\":\"accepted\"}\n").await.unwrap();
        let mut lines = Vec::new();
        let silent = read_answer(BufReader::new(ours), patience, |l| lines.push(l.to_string()));
        assert!(matches!(silent.await, Err(SupervisorError::AgentSilent { after_s: 90, .. })));
        assert_eq!(lines, ["accepted"]);
        let error = SupervisorError::AgentSilent { path: "/d/control.sock".into(), after_s: 30 };
        let said = error.to_string();
        assert!(said.contains("/d/control.sock") && said.contains("kill -CONT"), "{said}");
    }

    /// An agent that goes away as a request comes (its node left, say) is said to have, with
    /// whether the request may have been carried out; not a bare "broken pipe".
    #[tokio::test]
    async fn an_agent_that_closes_without_answering_is_said_to_have_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let agent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).await.unwrap();
            line
        });
        let gone = super::request(&path, &ControlRequest::Stats, |_| {}).await;
        assert!(agent.await.unwrap().contains("stats"), "the request was read");
        match gone {
            Err(error @ SupervisorError::AgentGone { taken: true, .. }) => {
                let said = error.to_string();
                assert!(said.contains("may or may not have been carried out"), "{said}");
            }
            other => panic!("{other:?}"),
        }
        let unsent = SupervisorError::AgentGone { path: "/d/control.sock".into(), taken: false };
        assert!(unsent.to_string().contains("nothing was done"), "{unsent}");
    }

    /// A client process that exited before the agent read its request (it gave up on an
    /// agent that was stopped) is told apart from one waiting for its answer. A process of
    /// another user is not judged: `hidepid` may hide a live one.
    #[tokio::test]
    async fn a_request_whose_client_exited_is_told_apart() {
        use std::os::unix::fs::MetadataExt as _;
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let exited = child.id() as i32;
        child.wait().unwrap();
        assert!(client_exited(exited, uid), "pid {exited} exited");
        assert!(!client_exited(exited, uid + 1), "another user's: not judged");
        assert!(!client_exited(std::process::id() as i32, uid), "this process");
        assert!(!client_exited(0, uid), "a pid of another namespace");
    }

    /// An agent refuses a request it has not read to the end, and closes: the client's write
    /// then fails, but what the agent said is what the operator reads.
    #[tokio::test]
    async fn a_request_refused_before_it_was_all_written_reports_the_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = bind_private(&path).unwrap();
        let agent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut start = vec![0; 64 * 1024];
            stream.read_exact(&mut start).await.unwrap();
            stream.write_all(b"{\"error\":\"refused after 64 KiB\"}\n").await.unwrap();
        });
        // 12 MiB as JSON: far more than the socket buffers.
        let call = ControlRequest::Call { service: 10, key: 1, body: vec![0; 6 << 20] };
        let answer = request(&path, &call, |_| {}).await;
        agent.await.unwrap();
        assert!(
            matches!(&answer, Err(SupervisorError::Agent(why)) if why == "refused after 64 KiB"),
            "{answer:?}"
        );
    }
}
