//! One connection to the control socket: its request read, answered, and its client watched
//! for hanging up.

use super::membership::{change, wait_for};
use super::{ControlRequest, PlanAsk, MAX_REQUEST_LINE};
use crate::console::Consoles;
use crate::entering::Entering;
use crate::error::{Result, SupervisorError};
use crate::preview::{preview, Previewed};
use crate::rpc::View;
use crate::state::{Command, NodeStatus, RemovedBy};
use crate::supervisor::{Lifecycle, Supervisor};
use gobelins_locator::{Key, ServiceId};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub(super) async fn answer(
    stream: UnixStream,
    node: Arc<Supervisor>,
    consoles: &Consoles,
    entering: &Entering,
) -> Result<()> {
    let client = stream.peer_cred().ok().and_then(|c| Some((c.pid()?, c.uid())));
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read.take(MAX_REQUEST_LINE as u64 + 1));
    let request = match read_request_within(&mut read, REQUEST_PATIENCE).await? {
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
        ControlRequest::Status { .. } | ControlRequest::Join { .. } | ControlRequest::Leave { .. }
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
        ControlRequest::Leave { now } => {
            let id = node.id();
            let leave = Command::Leave { node: id };
            change((&mut read, &mut write), &node, leave, id, NodeStatus::Left, now).await
        }
        ControlRequest::Unhold { node: target } if !node.state().nodes.contains_key(&target) => {
            let why = format!("node {target} was never a member of this cluster, as this node knows it: `gobelins status` lists them");
            flush(&mut write, &[json!({ "error": why })]).await
        }
        ControlRequest::Unhold { node: target } => {
            let unheld = node.unhold(target).await;
            let kept_out = node.state().nodes.get(&target).is_some_and(|r| r.kept_out);
            let line = json!({ "ok": {
                "node": target,
                "held": unheld.held,
                "counted": unheld.counted,
                "kept_out": kept_out,
                "answered": unheld.answered,
                "silent": unheld.silent,
            } });
            flush(&mut write, &[line]).await
        }
        ControlRequest::Plan { change } => {
            let view = node.cluster_view().await;
            // No leader answered, or the leader hears from no majority: what it shows is what
            // this node last knew or the leader last committed, which may be stale; the answer
            // says so.
            let me = node.id();
            let own_view =
                (view.node == me && view.leader != Some(me)) || view.quorum_lost_ms.is_some();
            // Playing out the changes ahead computes a plan over every slot for each.
            let planned = tokio::task::spawn_blocking(move || plan_of(&view, me, change)).await;
            let line = match planned {
                Ok(Ok(previewed)) => {
                    json!({ "ok": { "preview": previewed, "own_view": own_view } })
                }
                Ok(Err(why)) => json!({ "error": why }),
                Err(e) => json!({ "error": format!("the plan's computation failed: {e}") }),
            };
            flush(&mut write, &[line]).await
        }
        // Not this node: `leave` is the way out for it, and an evict typed with the wrong id
        // should not take down the node the operator is on.
        ControlRequest::Evict { node: target, .. } if target == node.id() => {
            flush(&mut write, &[json!({ "error": own_node_evicted(target) })]).await
        }
        ControlRequest::Evict { node: target, now } => {
            // Neither a node in its state nor a leader to ask: this agent has not joined yet,
            // and its raft knows nobody.
            let view = node.view();
            if view.leader.is_none() && view.state.nodes.is_empty() {
                let why = "this agent has not joined a cluster yet: ask a member's agent (`--data-dir` of a running member)";
                return flush(&mut write, &[json!({ "error": why })]).await;
            }
            let evict = Command::Evict { node: target };
            change((&mut read, &mut write), &node, evict, target, NodeStatus::Left, now).await
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
                // The seed is not asked: said, so that a typo in it is not taken for a seed
                // that answered.
                let already = format!(
                    "node {me} is already an active member: nothing to do ({seed} was not asked)"
                );
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
pub(super) type Reader = BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>;

/// Returns once the client has hung up. The end of what it sends is not enough: a client
/// may shut its side down after its request and read on (`socat`, `nc -N`), so only a socket
/// closed both ways counts. Anything the client sends after its request is read and ignored.
pub(super) async fn hung_up(read: &mut Reader, write: &tokio::net::unix::OwnedWriteHalf) {
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
pub(super) fn client_exited(pid: i32, uid: u32) -> bool {
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

/// How long a connection has to send its whole request: the CLI sends it as it connects. Kept
/// open without one, a connection held its descriptor and its slot for as long as its program
/// lived (one was still open after 90 s in a helper's test). Well under the CLI's own patience
/// for a first line (30 s for `status`): a command that waits for a slot behind connections
/// that send nothing gets it when they are closed, before it gives up.
pub(super) const REQUEST_PATIENCE: Duration = Duration::from_secs(10);

/// [`read_request`], refused with why if the line has not ended within `patience`.
pub(super) async fn read_request_within(
    read: &mut (impl AsyncBufRead + Unpin),
    patience: Duration,
) -> Result<std::result::Result<ControlRequest, String>> {
    match tokio::time::timeout(patience, read_request(read)).await {
        Ok(read) => read,
        Err(_) => Ok(Err(format!(
            "no whole request line came within {} s of connecting; closed",
            patience.as_secs()
        ))),
    }
}

/// Reads a request line from `read`, which yields at most one byte over
/// [`MAX_REQUEST_LINE`]: the request, or what to answer instead.
pub(super) async fn read_request(
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
pub(super) fn line_is_long(len: usize) -> bool {
    len > 256 << 10
}

/// Why a request line of `len` bytes is refused.
pub(super) fn too_long(len: usize) -> String {
    format!(
        "the request is {:.1} MiB as the control socket carries it (JSON), over its limit of {} \
         MiB; nothing was done",
        len as f64 / (1 << 20) as f64,
        MAX_REQUEST_LINE >> 20
    )
}

pub(super) async fn flush(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &[Value],
) -> Result<()> {
    for line in lines {
        write.write_all(format!("{line}\n").as_bytes()).await?;
    }
    write.flush().await?;
    Ok(())
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
                "kept_out": r.kept_out,
                // A node out of the cluster by its own leave, or by another node's evict.
                "removed_by": r.removed_by.map(|by| match by {
                    RemovedBy::Leave => "leave",
                    RemovedBy::Evict => "evict",
                }),
                "labels": r.labels,
                "voter": view.voters.contains(id),
                "silent_ms": silent.map(|&(ms, _)| ms),
                "suspected": silent.is_some_and(|&(_, suspected)| suspected),
                "failures": held.map(|&(failures, _)| failures),
                "held_ms": held.map(|&(_, ms)| ms).filter(|&ms| ms > 0),
                // A leaver that stays (once its leave ends) for these nodes' recoveries: it
                // holds copies they may be rebuilt from.
                "stays_for": state.lingering.get(id),
            })
        })
        .collect();
    // A suspect is a failure not yet committed: the change that recovers it is on its way.
    let suspected = view.silent.values().any(|&(_, suspected)| suspected);
    let in_progress = state.in_progress.as_ref().map(|p| {
        // A leave as the leave it is, as `stats` has it.
        let change = match p.change {
            gobelins_locator::Change::Evict(node)
                if state.nodes.get(&node.0).and_then(|r| r.removed_by)
                    == Some(RemovedBy::Leave) =>
            {
                format!("leave {node}")
            }
            ref change => change.to_string(),
        };
        json!({
            "epoch": p.epoch,
            "change": change,
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

/// Why `evict` refuses the node of the agent asked.
fn own_node_evicted(node: u64) -> String {
    format!("node {node} is this agent's own node: `gobelins leave` takes it out gracefully; `evict` removes other nodes")
}

/// What `change` would move in the cluster of `view`, asked through node `me`; why not, as the
/// cluster would refuse it.
fn plan_of(view: &View, me: u64, change: PlanAsk) -> std::result::Result<Previewed, String> {
    let state = &view.state;
    if state.nodes.is_empty() {
        return Err("this agent has not joined a cluster yet: ask a member's agent (`--data-dir` of a running member)".into());
    }
    let command = match change {
        PlanAsk::Leave => Command::Leave { node: me },
        // A plan `evict` would refuse is no plan: shown, it reads as a way out for this node.
        PlanAsk::Evict { node } if node == me => return Err(own_node_evicted(node)),
        PlanAsk::Evict { node } => Command::Evict { node },
        PlanAsk::Fail { node } => {
            let Some(record) = state.nodes.get(&node) else {
                return Err(format!(
                    "node {node} is not a member of this cluster: `gobelins status` lists them"
                ));
            };
            Command::Dead { node, incarnation: record.incarnation }
        }
        // The id a new node has is its own choice (drawn at random without --node-id); the
        // one after the highest stands in for it unless the operator names it. A node that
        // left or failed comes back as its next life.
        PlanAsk::Join { labels, node } => {
            let node = node.unwrap_or_else(|| state.nodes.keys().max().map_or(1, |n| n + 1));
            let incarnation = state.nodes.get(&node).map_or(1, |r| r.incarnation + 1);
            Command::Join { node, addr: String::new(), labels, incarnation }
        }
    };
    preview(state, &command).map_err(|refusal| refusal.to_string())
}
