//! How an agent enters the cluster: its bootstrap, or its join through a seed, and what it keeps
//! of them in its data directory.

use super::lives::start_new_life;
use super::{AgentOptions, Start};
use crate::datadir::DataDir;
use crate::error::{Result, SupervisorError};
use crate::secret::ClusterSecret;
use crate::state::check_declaration;
use crate::supervisor::Supervisor;
use gobelins_locator::Labels;
use std::sync::Arc;
use std::time::Duration;

/// How long a join keeps asking its seed, and how long a restarted node asks the seed whether
/// its last life is still a member.
const JOIN_WINDOW: Duration = Duration::from_secs(30);

/// Enters the cluster as `options.start` says, once the supervisor of node `node` runs:
/// bootstraps, joins (`restarted`: from a data directory admitted before), or resumes.
pub(super) async fn enter(
    supervisor: &Arc<Supervisor>,
    dir: &DataDir,
    options: &AgentOptions,
    secret: &ClusterSecret,
    node: u64,
    restarted: bool,
) -> Result<()> {
    // A restart rejoins with the labels given now: a unit that lost them moves the node
    // elsewhere in the tree, which must not go unsaid.
    if let Some(last) = supervisor.state().nodes.get(&node).filter(|_| restarted) {
        if last.labels != options.labels {
            tracing::warn!(before = ?last.labels, now = ?options.labels, "this node's labels differ from its last life's: it rejoins in another place of the cell tree");
        }
    }
    // A service this build declares otherwise than the cluster this node belonged to: the
    // node is refused here, before it enters again, rather than admitted, stopped and
    // recovered at every restart (a unit restarting it on failure, say).
    for spec in supervisor.host().specs() {
        if let Err(refusal) = check_declaration(&supervisor.state(), &spec) {
            return Err(SupervisorError::Refused(refusal.to_string()));
        }
    }

    // Restarted with --join, as by a unit that always passes it, while the cluster still
    // counts this node's last life as a member: the services lost their memory with the
    // process, so that life is recovered like a crash, as a restart without --join does,
    // rather than answered as the same life and served from empty services. A node that
    // left, or was declared failed, joins as a new life.
    let start = match &options.start {
        Start::Join(seed) if restarted => {
            // Restarted only by the incarnation an earlier start wrote, never admitted: the
            // secret is the --secret-file's, not one a cluster gave this directory (a join
            // retried after a wrong file, say).
            let never_admitted = dir.unadmitted()? && dir.secret()?.is_none();
            let asked = supervisor.last_life_is_member(seed, JOIN_WINDOW).await;
            let asked = asked.map_err(|refused| {
                SupervisorError::Config(if never_admitted {
                    format!(
                        "{refused}. This data directory was never admitted to a cluster, and \
                         its --secret-file (cluster {}) is not the seed's: another cluster's, or \
                         its key changed. Copy cluster.secret unchanged from a member of the \
                         cluster this node joins",
                        secret.cluster
                    )
                } else {
                    format!(
                        "{refused}. The seed holds another secret than this data directory's \
                         cluster ({}): to move this node to the seed's cluster, start it with an \
                         empty --data-dir and that cluster's --secret-file; to bring it back to \
                         its own, give --join a member of cluster {}",
                        secret.cluster, secret.cluster
                    )
                })
            })?;
            match asked {
                Some(true) => {
                    tracing::info!(%seed, "this node's last life is still a member: resuming as a new life (--join is not needed)");
                    // The seed answered through the secret given: it is the cluster's, and
                    // a node that died before it kept it keeps it now.
                    keep_identity(dir, secret, node)?;
                    Start::Resume
                }
                Some(false) => options.start.clone(),
                // The seed may be down: this node's own state decides, and the other
                // members it knows end its last life.
                None if supervisor.last_life_is_member_here() => {
                    tracing::warn!(%seed, "the seed did not answer; this node's own state counts its last life as a member: resuming as a new life through the other members");
                    // Its id, which its own state counts as a member; not the secret, which
                    // no peer has vouched for in this run.
                    if dir.node_id()?.is_none() {
                        dir.save_node_id(node)?;
                    }
                    Start::Resume
                }
                None => options.start.clone(),
            }
        }
        start => start.clone(),
    };
    match &start {
        Start::Bootstrap => {
            // Marked before the secret is kept: a bootstrap stopped from here on is finished
            // by the next start, which needs no --bootstrap since the secret is there.
            dir.mark_bootstrapping()?;
            dir.save_secret(secret)?;
            let outcome = supervisor.bootstrap().await?;
            tracing::info!(?outcome, "cluster bootstrapped");
            bootstrap_done(dir).await;
        }
        Start::Join(seed) => {
            // The cluster decides, not our own state, which may be stale: a node removed
            // from raft right after it left never applies the entry that says so. A join
            // repeated by the same life is answered with where it stands.
            {
                let outcome = supervisor.join_cluster(seed, JOIN_WINDOW, true).await?;
                if let Err(refusal) = outcome {
                    return Err(SupervisorError::Refused(format!(
                        "the cluster refused this node: {refusal}"
                    )));
                }
                tracing::info!(?outcome, %seed, "join accepted");
            }
            // Off the runtime's workers: the join has begun, and the other nodes are sending
            // this one its entries, which these workers receive while the disk syncs.
            let (dir, secret) = (dir.clone(), secret.clone());
            on_data_dir(move || {
                if dir.node_id()?.is_none() {
                    dir.save_node_id(node)?;
                }
                if dir.secret()?.is_none() {
                    dir.save_secret(&secret)?;
                }
                Ok(())
            })
            .await?;
        }
        Start::Resume => {}
    }
    if start == Start::Resume {
        let begun = dir.bootstrapping()?;
        let finished = if begun {
            supervisor.finish_begun_bootstrap().await?
        } else {
            supervisor.finish_bootstrap().await?
        };
        if let Some(outcome) = finished {
            tracing::warn!(?outcome, "this node's bootstrap had stopped before the node joined its own cluster; finished it");
        } else {
            let (asked, held) = (&supervisor.config().label_levels, supervisor.state());
            let held = &held.tree.config().label_levels;
            if !asked.is_empty() && asked != held {
                tracing::warn!(asked = ?asked, held = ?held, "--levels ignored: the cluster's label levels were set at its bootstrap and do not change");
            }
            tokio::spawn(start_new_life(Arc::clone(supervisor)));
        }
        if begun {
            bootstrap_done(dir).await;
        }
    }
    // Once this node's state holds it: a joiner's may not have the cluster's levels yet.
    let (mut states, labels) = (supervisor.watch_state(), options.labels.clone());
    tokio::spawn(async move {
        let admitted = states.wait_for(|s| s.nodes.contains_key(&node));
        let Ok(Ok(state)) = tokio::time::timeout(JOIN_WINDOW, admitted).await else { return };
        let warning = unlabelled(&state.tree.config().label_levels, &labels);
        drop(state);
        if let Some(warning) = warning {
            tracing::warn!("{warning}");
        }
    });
    Ok(())
}

/// What a node that gives no value to some of the cluster's label levels should hear: it is
/// admitted, placed above the levels it lacks, and in no failure domain there.
fn unlabelled(levels: &[String], labels: &Labels) -> Option<String> {
    let missing: Vec<&str> =
        levels.iter().filter(|l| !labels.contains_key(*l)).map(String::as_str).collect();
    (!missing.is_empty()).then(|| {
        let example: Vec<String> = missing.iter().map(|l| format!("--label {l}=...")).collect();
        format!(
            "this node gives no value to the cluster's label level(s) {}: it is placed in no \
             failure domain at that level, and the cluster cannot keep the copies of what it \
             holds apart from it there (with no label at all, at no level: kvdir's replicas \
             and the DSM's page backups may then be kept in the zone it is really in). Start \
             it again with {} (one --label per level, top first), unless that is meant",
            missing.join(", "),
            example.join(" ")
        )
    })
}

/// Removes the bootstrapping mark. Only warns if it cannot: a mark left behind is harmless,
/// since the next start finds the bootstrap done and resumes as usual.
async fn bootstrap_done(dir: &DataDir) {
    let owned = dir.clone();
    if let Err(error) = on_data_dir(move || owned.clear_bootstrapping()).await {
        tracing::warn!(%error, dir = %dir.path().display(), "cannot remove the bootstrapping mark; harmless, the next start finds the bootstrap done");
    }
}

/// Keeps the node's id and the secret, if missing, for a node the cluster (through a seed that
/// proved the secret) counts as a member: one that died after its first join was accepted but
/// before it kept them. A later start without `--node-id` or `--join` then resumes as this
/// node, in this cluster.
fn keep_identity(dir: &DataDir, secret: &ClusterSecret, node: u64) -> Result<()> {
    if dir.node_id()?.is_none() {
        dir.save_node_id(node)?;
    }
    if dir.secret()?.is_none() {
        dir.save_secret(secret)?;
    }
    Ok(())
}

/// Runs `write`, which syncs files of the data directory, where waiting for the disk holds no
/// runtime worker (see `crate::disk`).
async fn on_data_dir(write: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    match crate::disk::on_disk(write).await {
        Ok(written) => written,
        Err(e) => Err(SupervisorError::Storage(format!(
            "a write to the data directory did not finish: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_lacks_a_label_level_is_told_which_and_how_to_give_it() {
        let levels = ["zone".to_string(), "rack".to_string()];
        let zone_only = Labels::from([("zone".to_string(), "a".to_string())]);
        let said = unlabelled(&levels, &zone_only).expect("rack is missing");
        assert!(said.contains("level(s) rack:") && said.contains("--label rack=..."), "{said}");
        let none = unlabelled(&levels, &Labels::new()).expect("both are missing");
        assert!(none.contains("--label zone=... --label rack=..."), "{none}");
        let both = Labels::from([("zone".into(), "a".into()), ("rack".into(), "r1".into())]);
        assert_eq!(unlabelled(&levels, &both), None);
        assert_eq!(unlabelled(&[], &Labels::new()), None, "a cluster without levels");
    }
}
