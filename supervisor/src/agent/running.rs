//! The agent as a process: started, entered, and stopped on a signal, saying what becomes of
//! the node.

use super::lives::entered_once_admitted;
use super::{Agent, AgentOptions, Start};
use crate::console::Consoles;
use crate::control;
use crate::entering::Entering;
use crate::error::{Result, SupervisorError};
use crate::net::TokioNet;
use crate::supervisor::{Lifecycle, Supervisor};
use gobelins_adaptation::Registry;
use std::sync::Arc;
use std::time::Duration;

/// How long a node that left waits, before it stops, to be out of raft's voters.
const VOTER_WAIT: Duration = Duration::from_secs(5);

/// What a stop by signal leaves to the cluster, said as the agent stops.
const STOPPED: &str = "The cluster's other members declare this node failed and rebuild its \
     entries from replicas; started again with the same --data-dir, it rejoins as a new life. \
     `gobelins leave` takes a node out without a failure";

/// What stopping now leaves to the cluster, by this node's own state: a node that left has
/// nothing to hand over, and the last member takes the cluster down with it.
pub(super) fn stopped(supervisor: &Supervisor) -> String {
    let state = supervisor.state();
    let me = supervisor.id();
    let live = state.nodes.get(&me).is_some_and(|r| r.status.is_live());
    if !live {
        return "This node is no member any more (it left, or the cluster declared it failed \
                and rebuilt its entries): its stop changes nothing for the cluster. To take \
                part again, start it with --join ADDR (a member's address)"
            .to_string();
    }
    if state.live().len() == 1 {
        return "This node is the cluster's only member: the cluster and its services are down \
                until it is started again with the same --data-dir"
            .to_string();
    }
    STOPPED.to_string()
}

/// How long a stopping agent waits for the members to hear that it stops on purpose.
const STOPPING_WAIT: Duration = Duration::from_millis(500);

/// Tells the other members that this live member stops on purpose, so that its failure is not
/// counted against it as a short life (`crate::flaps`).
async fn announce_stopping(supervisor: &Supervisor) {
    // A life this process made: a restarted process replays a crashed life as live, and must
    // not excuse it. Whether the cluster admitted it is for each member to judge, from its
    // own record of the life: this node hears of its admission a moment after the cluster's
    // state shows it, and an operator may stop it in between.
    if !supervisor.life_made_here() {
        return;
    }
    let (heard, others) = supervisor.announce_stopping(STOPPING_WAIT).await;
    if heard < others {
        tracing::info!(heard, of = others, "not every member took this stop as one on purpose: if the cluster had admitted this life, those count it as a short life");
    }
}

/// What a stop by signal before the node entered its cluster leaves behind.
const STOPPED_ENTERING: &str = "If the cluster had admitted this node already, it declares it \
     failed and rebuilds its entries from replicas; started again with the same command line, \
     the agent asks again (a first join stopped so, without --node-id, may come back under \
     another id)";

/// Runs the agent process, hosting `services` and serving their `consoles` on the control
/// socket, until it is stopped (SIGINT/SIGTERM) or leaves the cluster.
pub async fn run(
    options: AgentOptions,
    services: impl Fn() -> Registry + Send + Sync + 'static,
    consoles: Consoles,
) -> Result<()> {
    let launched = Agent::launch(TokioNet, &options, services).await?;
    // Served while the node enters the cluster, which can take a minute (a seed slow to
    // answer, a restart that waits for the cluster to end its last life): an operator asking
    // meanwhile is told what the agent is doing, not that it is not running.
    let entering = Entering::new(match &options.start {
        Start::Bootstrap => "bootstrapping a new cluster".to_string(),
        Start::Join(seed) => format!("joining the cluster through {seed}"),
        Start::Resume => "resuming its place in the cluster".to_string(),
    });
    let path = launched.dir().socket_path();
    // Removed as `run` returns, whichever way.
    let _socket =
        control::serve(&path, Arc::clone(launched.supervisor()), consoles, entering.clone())
            .await?;
    // Before entering: a join can take a minute, and a stop asked for meanwhile killed the
    // process at once, saying nothing, with its control socket left behind.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| SupervisorError::io("installing the SIGTERM handler", e))?;
    let entered = tokio::select! {
        entered = launched.enter(&options) => entered,
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("interrupted while {}; stopping. {STOPPED_ENTERING}", entering.now().unwrap_or_default());
            return Ok(());
        }
        _ = terminate.recv() => {
            tracing::warn!("terminated (SIGTERM) while {}; stopping. {STOPPED_ENTERING}", entering.now().unwrap_or_default());
            return Ok(());
        }
    };
    let agent = entered?;
    if agent.supervisor.life_admitted() {
        entering.done();
    } else {
        // A restart: the cluster must end the last life before it admits this one, which
        // needs a majority of the voters. Until then this node serves nothing, and an operator
        // asking is told so, not that the cluster is stable or that the node never joined.
        entering.now_doing(
            "restarted: waiting for the cluster to end this node's last life and admit it as a \
             new one: a few seconds, for as long as a majority of the voters is down"
                .to_string(),
        );
        tokio::spawn(entered_once_admitted(Arc::clone(&agent.supervisor), entering.clone()));
    }
    if options.start == Start::Bootstrap {
        let secret =
            agent.dir.secret()?.ok_or_else(|| SupervisorError::Config("secret vanished".into()))?;
        let (node, addr) =
            (agent.supervisor.id(), options.advertise.as_ref().unwrap_or(&options.listen));
        let levels = agent.supervisor.state().tree.config().label_levels.clone();
        let secret_path = agent.dir.secret_path();
        println!("{}", join_hint(&secret.cluster.to_string(), node, addr, &secret_path, &levels));
    }
    let mut lifecycle = agent.supervisor.lifecycle();
    let mut fatal = None;
    let mut refused = None;
    // A node that had left before this start has nothing to wait for on its way out.
    let left_before = *lifecycle.borrow() == Lifecycle::Left;
    tokio::select! {
        // At the default level: otherwise the log just ended, and an operator could not tell a
        // stop asked for from a crash.
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("interrupted; stopping. {}", stopped(&agent.supervisor));
            announce_stopping(&agent.supervisor).await;
        }
        _ = terminate.recv() => {
            tracing::warn!("terminated (SIGTERM); stopping. {}", stopped(&agent.supervisor));
            announce_stopping(&agent.supervisor).await;
        }
        ended = lifecycle.wait_for(|l| *l != Lifecycle::Member) => {
            match ended.map(|l| l.clone()) {
                Ok(Lifecycle::Fatal(why)) => fatal = Some(why),
                Ok(Lifecycle::Refused(why)) => refused = Some(why),
                _ => {
                    gone_line(&agent.supervisor, left_before);
                    // Still a voter, it waits for the change of voters that leaves it out, which
                    // needs its vote: of two voters, the other would have no quorum for good.
                    // The change began with the leave, and is usually done by now.
                    let until = tokio::time::Instant::now() + VOTER_WAIT;
                    let out = || left_before || agent.supervisor.out_of_voters();
                    while !out() && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if !out() {
                        tracing::warn!("stopping before this node saw raft commit a membership without its vote. Most often the others committed it without this node hearing (it was cut off, or frozen, as it was removed): nothing to do. Only if the cluster had two voters, check with `gobelins status` on the other that it still has a quorum");
                    }
                    // Let the CLI that asked for the leave read its final answer.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
    agent.stop().await;
    if let Some(why) = refused {
        return Err(SupervisorError::Refused(why));
    }
    match fatal {
        Some(why) => Err(SupervisorError::Storage(format!(
            "{why}; this node stopped and the cluster will declare it failed. Check the disk \
             under {} (full? failing?), then start the agent again: it rejoins as a new life",
            options.data_dir.display()
        ))),
        None => Ok(()),
    }
}

/// What a bootstrap prints: how to add a node. Each level the cluster was given wants a value
/// from every node: a joiner without one has no failure domain there (its agent warns of it).
fn join_hint(
    cluster: &str,
    node: u64,
    addr: &str,
    secret: &std::path::Path,
    levels: &[String],
) -> String {
    let labels: String = levels.iter().map(|l| format!(" --label {l}=<value>")).collect();
    format!(
        "gobelins: cluster {cluster} bootstrapped; node {node} listens on {addr}.\n\
         To add a node, copy {} to it and run:\n  \
         gobelins agent --data-dir <dir> --listen <addr:port> --join {addr} --secret-file cluster.secret{labels}",
        secret.display()
    )
}

/// Says why this node is out of the cluster: its own leave, another node's eviction, or one
/// of them before this start. At the default level, as for a signal: otherwise the log just
/// ends. A helper's soak could not tell a leave from an eviction by any line or view.
fn gone_line(supervisor: &crate::supervisor::Supervisor, left_before: bool) {
    const AGAIN: &str = "To take part again, start it with --join ADDR (the address of a \
                         member), as a new life of this node";
    let state = supervisor.state();
    let by = state.nodes.get(&supervisor.id()).and_then(|r| r.removed_by);
    match (by, left_before) {
        (Some(crate::state::RemovedBy::Leave), false) => {
            tracing::warn!("this node left the cluster (`gobelins leave`); stopping. {AGAIN}")
        }
        (Some(crate::state::RemovedBy::Evict), false) => tracing::warn!(
            "this node was evicted from the cluster (`gobelins evict` on another node); \
             stopping. {AGAIN}"
        ),
        _ => tracing::warn!(
            "this node is not a member of the cluster any more (it left, was evicted, or had \
             left before this start); stopping. {AGAIN}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_hint_asks_a_joiner_for_every_label_level() {
        let secret = std::path::Path::new("/var/lib/gobelins/cluster.secret");
        let plain = join_hint("c0ffee", 1, "10.0.0.1:7400", secret, &[]);
        assert!(plain.contains("--join 10.0.0.1:7400 --secret-file cluster.secret"), "{plain}");
        assert!(!plain.contains("--label"), "{plain}");
        let levels = ["zone".to_string(), "rack".to_string()];
        let zoned = join_hint("c0ffee", 1, "10.0.0.1:7400", secret, &levels);
        assert!(zoned.ends_with("--label zone=<value> --label rack=<value>"), "{zoned}");
    }
}
