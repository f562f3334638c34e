//! A node's lives: a new one begun when the cluster ended the last, and the services registered
//! once it is admitted.

use crate::entering::Entering;
use crate::state::{check_declaration, Command, NodeStatus, Refusal};
use crate::supervisor::{Lifecycle, Supervisor};
use gobelins_locator::NodeId;
use std::sync::Arc;
use std::time::Duration;

/// How long one proposal of a restarted node's last life's failure waits for a leader before
/// it is made again.
const FAIL_WINDOW: Duration = Duration::from_secs(5);

/// After a restart the services' memory of the last life is gone, so that life must end the
/// way a crash does: the cluster commits its failure (and rebuilds its entries from the
/// survivors' replicas), and this process joins as a new life. Until then its host serves
/// nothing.
///
/// Its failure is proposed again and again while this node's own state counts it live: a
/// restart while the cluster has no quorum (a whole rack powered back up one machine at a
/// time) must not give up, for this process answers pings, so no detector will end that life
/// for it, and every change that waits on it would wait for ever.
pub(super) async fn start_new_life(supervisor: Arc<Supervisor>) {
    let (me, incarnation) = (supervisor.id(), supervisor.incarnation());
    let pause = supervisor.config().failure_timeout;
    let mut ended = false;
    // Rounds in a row in which every member proved another secret than this node's.
    let mut refused = 0;
    while !supervisor.life_admitted() {
        let live = supervisor
            .state()
            .nodes
            .get(&me)
            .is_some_and(|r| r.incarnation == incarnation && r.status.is_live());
        if live && !ended {
            let fail = Command::Fail { node: me, incarnation };
            match supervisor.propose_until(fail, FAIL_WINDOW).await {
                Ok(Ok(_)) => {
                    ended = true;
                    tracing::warn!(
                        node = me,
                        incarnation,
                        "restarted: the cluster recovers this node's last life from the replicas that survive (none, if every node stopped: what the services held is then reported lost); rejoining as a new one"
                    );
                }
                // The cluster's only node ever, or the others all left: ended, its life's
                // recovery would wait for another node to join (its entries need somewhere to
                // go), and none is expected. It carries on alone, its services empty.
                Ok(Err(Refusal::LastNode(_))) if others_left(&supervisor) => {
                    tracing::warn!(
                        node = me,
                        "restarted as the only node of the cluster: its services start empty, and report what its last life held as lost"
                    );
                    supervisor.host().restarted_alone().await;
                    supervisor.admit_life();
                    return;
                }
                // The last life counted live, but others failed and may come back (the whole
                // cluster stopped, say): carried on, its empty services would answer for the
                // entries of its last life as never written. Ended, their loss is reported, and
                // it rejoins as a new life. Should it be the locator's last node, its recovery
                // waits for another node's join (a failed one back as a new life, or a new one),
                // and its own rejoin with it.
                Ok(Err(Refusal::LastNode(_))) => {
                    match supervisor
                        .propose_until(Command::Dead { node: me, incarnation }, FAIL_WINDOW)
                        .await
                    {
                        Ok(Ok(_)) => {
                            ended = true;
                            tracing::warn!(node = me, incarnation, "restarted as the last member counted live, others having failed: this node's last life ends, its entries are reported lost where no copy survives, and it rejoins as a new one");
                            if alone_in_tree(&supervisor) {
                                tracing::warn!(node = me, "this node's last life was the last the locator held: its recovery, and this node's rejoin, wait for another node to join (start a failed node again, or a new one with --join)");
                            }
                        }
                        Ok(Err(refusal)) => tracing::debug!(%refusal, "last life already ended"),
                        Err(error) => {
                            tracing::warn!(%error, "could not end this node's last life yet; asking again")
                        }
                    }
                }
                Ok(Err(refusal)) => {
                    ended = true;
                    tracing::debug!(%refusal, "last life already ended");
                }
                Err(error) => match supervisor.refused_by_members() {
                    Some(reason) => tracing::warn!(
                        node = me,
                        %error,
                        "could not end this node's last life yet: the cluster's members refuse \
                         this node's connections, saying: {reason}. This process asks again, \
                         and rejoins by itself as a new life once the cluster allows it (once \
                         it declares a life of this node that runs elsewhere failed, say): \
                         should that life go on, stop this process"
                    ),
                    None => tracing::warn!(
                        %error,
                        "could not end this node's last life yet: no leader answered; asking again. If a majority of the cluster is up, `gobelins status` on a member says whether its leader holds this node out after repeated failures (`gobelins unhold` lifts it)"
                    ),
                },
            }
        }
        Arc::clone(&supervisor).check_fenced().await;
        if *supervisor.lifecycle().borrow() == Lifecycle::Left {
            return;
        }
        // Asking again changes nothing: the secret file does not change under a running node.
        // A few rounds, not one: a member dialed as it restarts with its own file unchanged
        // proves the same secret as ever. Only several members that agree with one another
        // show this node's file to be the odd one: a single one (or whatever answers at its
        // address: another cluster's agent on a reused port) may be the wrong one itself.
        let (members, differ) = supervisor.members_with_another_secret();
        refused = if differ > 0 && differ == members { refused + 1 } else { 0 };
        if refused >= SECRET_ROUNDS && members >= 2 {
            supervisor.stop_refused(format!("every member of the cluster ({members}) proves another secret than this node's: this data directory's cluster.secret differs from the cluster's (replaced, or copied from another cluster). Copy cluster.secret unchanged from a member's data directory, then start this node again"));
            return;
        }
        if refused == SECRET_ROUNDS {
            tracing::error!(node = me, "the only other member proves another secret than this node's, and this node keeps asking: one of the two cluster.secret files differs (replaced, or copied from another cluster), or another program answers at that member's address. Compare the two files; copy the right one unchanged, then start the wrong node again");
        }
        tokio::time::sleep(pause).await;
    }
}

/// Rounds of a restarted node's attempts to rejoin in which every member proves another secret
/// before it stops, rather than ask again for ever.
const SECRET_ROUNDS: u32 = 3;

/// Whether every other node the cluster has known has left it: none will come back as a
/// member without joining anew.
fn others_left(supervisor: &Supervisor) -> bool {
    let me = supervisor.id();
    supervisor.state().nodes.iter().all(|(&id, r)| id == me || r.status == NodeStatus::Left)
}

/// Whether this node is the only one the locator's tree holds.
fn alone_in_tree(supervisor: &Supervisor) -> bool {
    let me = NodeId(supervisor.id());
    supervisor.state().tree.nodes().all(|n| n == me)
}

/// What a restarted node whose last life was the last the locator held waits for.
const WAITS_FOR_A_JOIN: &str = "restarted as the last node the locator held: its last life has \
     ended, and its recovery, with this node's rejoin, waits for another node to join (start a \
     failed node again, or a new one with --join)";

/// Ends `entering` once this node's life is admitted, or is over (it left, or stopped).
pub(super) async fn entered_once_admitted(supervisor: Arc<Supervisor>, entering: Entering) {
    let lifecycle = supervisor.lifecycle();
    let me = supervisor.id();
    let mut told = false;
    let mut held = false;
    while !supervisor.life_admitted() && *lifecycle.borrow() == Lifecycle::Member {
        // Held out for failing again and again: not the majority it would otherwise seem to
        // wait for.
        match supervisor.held_back() {
            Some((failures, left)) => {
                entering.now_doing(format!(
                    "restarted, and held out of the cluster for {:.1} s more: it keeps failing \
                     ({failures} short lives in a row); it rejoins by itself then",
                    left.as_secs_f64()
                ));
                held = true;
            }
            None if held => {
                entering.now_doing("restarted; its hold is over: rejoining as a new life".into());
                held = false;
            }
            None => {}
        }
        // Its last life ended as the last node the locator held: a majority of the voters is
        // up (this one), and nothing happens until another node joins.
        let ended = supervisor.state().nodes.get(&me).is_some_and(|r| !r.status.is_live());
        if !told && ended && alone_in_tree(&supervisor) {
            entering.now_doing(WAITS_FOR_A_JOIN.to_string());
            told = true;
        }
        // Admission has no signal to wait on; this is what a status asked meanwhile may lag.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    entering.done();
}

/// Registers the services this node hosts that the cluster does not know yet. Every agent
/// does it; the first registration of an id wins and the others change nothing.
///
/// A service this node declares otherwise than the cluster holds it stops the node: hosting
/// it would map keys to other slots than every other node does.
pub(super) async fn register(supervisor: Arc<Supervisor>) {
    for spec in supervisor.host().specs() {
        let state = supervisor.state();
        if let Err(refusal) = check_declaration(&state, &spec) {
            supervisor.stop_refused(refusal.to_string());
            return;
        }
        if state.declared(spec.id).is_some() {
            continue;
        }
        let name = spec.name.clone();
        match supervisor.propose_until(Command::Register(spec), Duration::from_secs(60)).await {
            Ok(Ok(_)) => tracing::info!(service = %name, "service registered"),
            Ok(Err(refusal @ Refusal::ServiceDeclaredOtherwise { .. })) => {
                supervisor.stop_refused(refusal.to_string());
                return;
            }
            Ok(Err(refusal)) => {
                tracing::error!(service = %name, %refusal, "the cluster refused the service")
            }
            Err(error) => tracing::warn!(
                service = %name,
                %error,
                "service not registered yet; it will be on this agent's next start"
            ),
        }
    }
}
