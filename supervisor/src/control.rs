//! The control socket: how `gobelins status|join|leave|evict` talk to the local agent.
//!
//! One JSON request per connection, answered by JSON lines: `{"progress": …}` lines while a
//! change goes on, then one final `{"ok": …}` or `{"error": …}`. The socket is mode 0600 inside a
//! 0700 data directory: only the agent's user can drive it.
//!
//! Its parts: `session` (one connection's request and answer), `membership` (a join, leave
//! or evict followed to its end), `client` (the CLI's side).

mod client;
mod membership;
mod session;

pub use client::request;
pub use session::status_json;

use session::{answer, flush};

use crate::console::Consoles;
use crate::entering::Entering;
use crate::error::{Result, SupervisorError};
use crate::supervisor::Supervisor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
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
    Leave {
        /// Proposed at once, not after every other member answers or is declared failed (see
        /// the control session's roll call): a member killed a moment before then has its DSM
        /// slots tainted. Sent only when set: an agent of an earlier build knows no such field.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        now: bool,
    },
    /// Remove another node; answered when the cluster is stable without it.
    Evict {
        /// The node.
        node: u64,
        /// Proposed at once, not after every other member answers or is declared failed (see
        /// the control session's roll call): a member killed a moment before then has its DSM
        /// slots tainted. Sent only when set: an agent of an earlier build knows no such field.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        now: bool,
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
    /// What a change would move if it were asked for now, as the leader's state says (this
    /// node's own if no leader answers: `own_view` says so); nothing is carried out. Answered
    /// with `preview`, a [`Previewed`](crate::preview::Previewed), and `own_view`.
    Plan {
        /// The change.
        change: PlanAsk,
    },
}

/// The change [`ControlRequest::Plan`] asks about.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum PlanAsk {
    /// A new node joins with these labels.
    Join {
        /// Its labels.
        labels: gobelins_locator::Labels,
        /// Its id, if known: which node keeps a node's replicas follows the order of ids.
        #[serde(default)]
        node: Option<u64>,
    },
    /// The node the agent runs on leaves.
    Leave,
    /// Another node is evicted.
    Evict {
        /// The node.
        node: u64,
    },
    /// A node fails: what the others would rebuild.
    Fail {
        /// The node.
        node: u64,
    },
}

impl ControlRequest {
    /// What it asks, in a word, for a log line.
    fn kind(&self) -> &'static str {
        match self {
            ControlRequest::Status { .. } => "status",
            ControlRequest::Leave { .. } => "leave",
            ControlRequest::Evict { .. } => "evict",
            ControlRequest::Join { .. } => "join",
            ControlRequest::Call { .. } => "call",
            ControlRequest::Stats => "stats",
            ControlRequest::Local { .. } => "local",
            ControlRequest::Unhold { .. } => "unhold",
            ControlRequest::Plan { .. } => "plan",
        }
    }

    /// Whether it is the cluster's to carry out, whatever this node's own state: answered
    /// while this node enters the cluster or is held out of it.
    fn for_the_cluster(&self) -> bool {
        matches!(
            self,
            ControlRequest::Stats
                | ControlRequest::Evict { .. }
                | ControlRequest::Unhold { .. }
                | ControlRequest::Plan { .. }
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
    tokio::spawn(accept_loop(listener, owner, CONNECTIONS, move |stream| {
        let node = Arc::clone(&node);
        let consoles = Arc::clone(&consoles);
        let entering = entering.clone();
        async move {
            if let Err(error) = answer(stream, node, &consoles, &entering).await {
                tracing::debug!(%error, "control connection ended");
            }
        }
    }));
    Ok(socket)
}

/// The control connections served at once. Each holds a descriptor: a program that opened
/// connections and left them open took every descriptor the agent had, and then neither the
/// CLI nor the agent's peers could connect (a helper's test, 150 connections under `ulimit -n
/// 128`). Past this many, new connections wait in the socket's backlog for one to end.
pub(crate) const CONNECTIONS: usize = 64;

/// What the lines the control socket's budget leaves out are about.
const CONTROL_LINES: &str =
    "control socket trouble (connections refused, waiting, or not accepted)";

/// Accepts connections at `listener` and serves each with `serve`, at most `connections` at
/// once; refuses those of other users than `owner` and root. Every line it logs is budgeted:
/// a local program looping on the socket logged thousands a minute.
async fn accept_loop<F>(
    listener: UnixListener,
    owner: u32,
    connections: usize,
    serve: impl Fn(UnixStream) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(connections));
    let budget = gobelins_adaptation::log_budget::noisy();
    let log =
        |line: &dyn Fn()| gobelins_adaptation::log_budget::budgeted(&budget, CONTROL_LINES, line);
    loop {
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                log(&|| {
                    tracing::warn!(connections, "every control connection this agent serves at once is taken: new ones wait until one ends (a program that opens connections and leaves them open? `ss -xp` names who holds this agent's control.sock)")
                });
                Arc::clone(&slots).acquire_owned().await.expect("the slots are never closed")
            }
        };
        match listener.accept().await {
            Ok((stream, _)) if !may_drive(&stream, owner) => {
                let uid = stream.peer_cred().map(|c| c.uid()).ok();
                log(&|| {
                    tracing::warn!(?uid, owner, "refused a control connection from another user: the control socket serves the agent's own user (and root) only; check who can reach the data directory")
                });
                tokio::spawn(async move {
                    refuse_stranger(stream, owner).await;
                    drop(slot);
                });
            }
            Ok((stream, _)) => {
                let served = serve(stream);
                tokio::spawn(async move {
                    served.await;
                    drop(slot);
                });
            }
            Err(error) => {
                drop(slot);
                log(
                    &|| tracing::warn!(%error, "control socket accept failed; if it says too many open files, raise the agent's limit (LimitNOFILE= in its unit, or ulimit -n), or find what holds descriptors open (ls /proc/<agent's pid>/fd)"),
                );
                // Out of descriptors, usually: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
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
    let (_, mut write) = stream.into_split();
    let why = format!("this agent's control socket serves its own user (uid {owner}) and root only: run the command as that user");
    let _ = flush(&mut write, &[json!({ "error": why })]).await;
}

#[cfg(test)]
mod tests {
    use super::client::{read_answer, FIRST_LINE_PATIENCE, NEXT_LINE_PATIENCE, SLOW_NOTICE};
    use super::session::{
        client_exited, line_is_long, read_request, read_request_within, REQUEST_PATIENCE,
    };
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};

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

    /// Past the connections it serves at once, the next waits for one to end, where each
    /// held a descriptor until there were none left for the CLI or the agent's peers.
    #[tokio::test(start_paused = true)]
    async fn past_the_connections_served_at_once_the_next_waits_for_one_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = bind_private(&path).unwrap();
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&path).unwrap());
        let (served, mut serving) = tokio::sync::mpsc::unbounded_channel();
        // Each connection is served until its client closes it.
        tokio::spawn(accept_loop(listener, owner, 2, move |mut stream| {
            let served = served.clone();
            async move {
                served.send(()).unwrap();
                let _ = stream.read_to_end(&mut Vec::new()).await;
            }
        }));
        let first = UnixStream::connect(&path).await.unwrap();
        let _second = UnixStream::connect(&path).await.unwrap();
        for _ in 0..2 {
            serving.recv().await.unwrap();
        }
        let _third = UnixStream::connect(&path).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(60), serving.recv()).await;
        assert!(waited.is_err(), "the third is not served while two are");
        drop(first);
        serving.recv().await.expect("served once the first ended");
    }

    /// A connection that never ends its request line is answered and closed: held open, it
    /// kept its descriptor for as long as its program lived.
    #[tokio::test(start_paused = true)]
    async fn a_request_never_ended_is_refused_after_a_while() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"{\"cmd\":").await.unwrap();
        let mut read = BufReader::new(server);
        let patience = Duration::from_secs(30);
        let start = tokio::time::Instant::now();
        let why = read_request_within(&mut read, patience).await.unwrap().unwrap_err();
        assert!(why.contains("no whole request line came within 30 s"), "{why}");
        assert_eq!(start.elapsed(), patience);
        // A whole line within it is read as ever.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"{\"cmd\":\"stats\"}\n").await.unwrap();
        let mut read = BufReader::new(server);
        let read = read_request_within(&mut read, patience).await.unwrap();
        assert!(read.is_ok(), "{read:?}");
        // A command waiting for a slot behind connections that send nothing gets one when they
        // are closed, well before it gives up on its first line (a helper's `status` waited
        // 28 s of its 30 behind them).
        assert!(REQUEST_PATIENCE * 2 <= FIRST_LINE_PATIENCE.0);
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
    /// than waited for without end; so is one that falls silent after a first line. Before
    /// the first line, the CLI says once that it still waits.
    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_is_given_up_on() {
        let patience = (FIRST_LINE_PATIENCE.0, NEXT_LINE_PATIENCE);
        let (ours, _agent) = tokio::io::duplex(64);
        let mut said = Vec::new();
        let start = tokio::time::Instant::now();
        let silent = read_answer(BufReader::new(ours), patience, |l| said.push(l.to_string()));
        assert!(matches!(silent.await, Err(SupervisorError::AgentSilent { after_s: 30, .. })));
        assert_eq!(start.elapsed(), FIRST_LINE_PATIENCE.0, "the notice took none of the wait");
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("not answered in 5 s") && said[0].contains("30 s"), "{said:?}");
        // An answer after the notice is read whole.
        let (ours, mut agent) = tokio::io::duplex(64);
        // Half of it before the notice, half after: what was read of a line before the wait
        // was cut short for the notice is kept (`next_line` is cancel safe).
        let late = tokio::spawn(async move {
            tokio::time::sleep(SLOW_NOTICE / 2).await;
            agent.write_all(b"{\"ok\":").await.unwrap();
            tokio::time::sleep(SLOW_NOTICE).await;
            agent.write_all(b"7}\n").await.unwrap();
            agent
        });
        let mut said = Vec::new();
        let answer = read_answer(BufReader::new(ours), patience, |l| said.push(l.to_string()));
        assert_eq!(answer.await.unwrap(), json!(7));
        assert_eq!(said.len(), 1, "{said:?}");
        drop(late.await.unwrap());
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
