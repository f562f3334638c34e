//! Table tests of [`ClusterState::apply`]: each row is a command and the outcome it must give.

use super::*;
use Applied::*;
use Command::*;

fn join(node: u64) -> Command {
    Join { node, addr: format!("127.0.0.{node}:7000"), labels: Labels::new(), incarnation: 1 }
}

fn rejoin(node: u64, incarnation: u64) -> Command {
    Join { node, addr: format!("127.0.0.{node}:7000"), labels: Labels::new(), incarnation }
}

/// A service of `slots` slots under id `id`.
fn register(id: u16, slots: u32) -> Command {
    Register(ServiceSpec::new(gobelins_locator::ServiceId(id), "s").with_slots(slots))
}

fn done(node: u64, epoch: u64) -> Command {
    MigrationDone { node, epoch }
}

/// Runs the rows from an empty cluster, checking each outcome.
fn table(rows: &[(Command, Outcome)]) -> ClusterState {
    let mut state = ClusterState::default();
    for (i, (command, expected)) in rows.iter().enumerate() {
        let got = state.apply(command);
        assert_eq!(&got, expected, "row {i}: {command:?}\nstate: {state:#?}");
    }
    state
}

/// Drives every in-progress change to completion, as participants would.
fn settle(state: &mut ClusterState) {
    while let Some(progress) = state.in_progress.clone() {
        for node in progress.participants {
            state.apply(&done(node, progress.epoch)).expect("participant report");
        }
    }
}

fn status(state: &ClusterState, node: u64) -> NodeStatus {
    state.nodes[&node].status
}

/// A stable cluster under `rules` of nodes 1 to `nodes`, one service of `slots` slots.
fn stable_cluster(rules: u8, slots: u32, nodes: u64) -> ClusterState {
    let mut state = ClusterState::default();
    state.apply(&Rules { version: rules }).expect("rules");
    state.apply(&register(1, slots)).unwrap();
    settle(&mut state);
    for n in 1..=nodes {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    state
}

#[test]
fn the_first_node_joins_and_becomes_active_when_it_reports() {
    let state =
        table(&[(join(1), Ok(Began { epoch: 1 })), (done(1, 1), Ok(Recorded { stable: true }))]);
    assert_eq!(status(&state, 1), NodeStatus::Active);
    assert!(state.is_stable());
    assert!(state.tree.contains(NodeId(1)));
}

#[test]
fn a_join_repeated_by_the_same_life_is_answered_and_an_impostor_refused() {
    let impostor =
        Join { node: 1, addr: "10.0.0.9:7000".into(), labels: Labels::new(), incarnation: 1 };
    table(&[
        (join(1), Ok(Began { epoch: 1 })),
        (join(1), Ok(Began { epoch: 1 })),
        (impostor.clone(), Err(Refusal::AlreadyMember(1))),
        (done(1, 1), Ok(Recorded { stable: true })),
        (join(1), Ok(Recorded { stable: true })),
        (impostor, Err(Refusal::AlreadyMember(1))),
        (rejoin(1, 2), Err(Refusal::AlreadyMember(1))),
    ]);
}

#[test]
fn a_leaver_the_locator_cannot_remove_goes_back_to_work() {
    // A, B, C; B and C ask to leave; A dies meanwhile: once B is gone, C is the last node of
    // the tree and cannot be removed, so it must not stay "leaving" for ever.
    let mut state = ClusterState::default();
    state.apply(&Rules { version: RULES }).expect("this build's rules");
    for n in 1..=3 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    state.apply(&Leave { node: 2 }).unwrap();
    state.apply(&Leave { node: 3 }).unwrap();
    state.apply(&Fail { node: 1, incarnation: 1 }).unwrap();
    settle(&mut state);
    assert!(state.is_stable());
    let statuses: Vec<NodeStatus> = (1..=3).map(|n| status(&state, n)).collect();
    assert!(!statuses.contains(&NodeStatus::Leaving), "{statuses:?}");
    assert_eq!(state.with_status(NodeStatus::Active).count(), 1);
    // Back at work: not shown as on its way out.
    let active = (1..=3).find(|&n| status(&state, n) == NodeStatus::Active).expect("one");
    assert_eq!(state.nodes[&active].removed_by, None);
}

#[test]
fn a_change_requested_during_another_waits_its_turn() {
    let state = table(&[
        (join(1), Ok(Began { epoch: 1 })),
        (join(2), Ok(Queued { position: 0 })),
        (join(3), Ok(Queued { position: 1 })),
        (done(1, 1), Ok(Recorded { stable: true })),
    ]);
    // Epoch 1 is stable; node 2's addition began as epoch 2, with node 1 giving it slots.
    let progress = state.in_progress.as_ref().expect("node 2 is being added");
    assert_eq!(progress.epoch, 2);
    assert_eq!(progress.participants, BTreeSet::from([1, 2]));
    assert_eq!(state.queue.len(), 1);
}

#[test]
fn only_participants_of_the_current_epoch_may_report() {
    table(&[
        (join(1), Ok(Began { epoch: 1 })),
        (done(1, 1), Ok(Recorded { stable: true })),
        (done(1, 1), Err(Refusal::NotInProgress { got: 1, current: 1 })),
        (join(2), Ok(Began { epoch: 2 })),
        (done(1, 1), Err(Refusal::NotInProgress { got: 1, current: 2 })),
        (done(9, 2), Err(Refusal::NotParticipant { node: 9, epoch: 2 })),
        (done(1, 2), Ok(Recorded { stable: false })),
        (done(2, 2), Ok(Recorded { stable: true })),
    ]);
}

#[test]
fn leaving_needs_an_active_member_that_is_not_the_last() {
    let mut state = table(&[
        (Leave { node: 7 }, Err(Refusal::UnknownNode(7))),
        (join(1), Ok(Began { epoch: 1 })),
        (Leave { node: 1 }, Err(Refusal::StillJoining(1))),
        (done(1, 1), Ok(Recorded { stable: true })),
        (Leave { node: 1 }, Err(Refusal::LastNode(1))),
        (join(2), Ok(Began { epoch: 2 })),
    ]);
    settle(&mut state);
    assert_eq!(state.apply(&Leave { node: 2 }), Ok(Began { epoch: 3 }));
    assert_eq!(state.apply(&Evict { node: 2 }), Err(Refusal::AlreadyLeaving(2)));
    settle(&mut state);
    assert_eq!(status(&state, 2), NodeStatus::Left);
    assert!(!state.tree.contains(NodeId(2)));
    assert_eq!(state.apply(&Evict { node: 2 }), Err(Refusal::UnknownNode(2)));
}

#[test]
fn a_failure_during_a_change_stops_the_wait_for_the_dead_participant() {
    let mut state =
        table(&[(join(1), Ok(Began { epoch: 1 })), (done(1, 1), Ok(Recorded { stable: true }))]);
    for n in 2..=3 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    // Node 4 joins; it fails before reporting.
    assert!(matches!(state.apply(&join(4)), Ok(Began { .. })));
    let epoch = state.epoch;
    for n in state.in_progress.clone().unwrap().participants {
        if n != 4 {
            state.apply(&done(n, epoch)).unwrap();
        }
    }
    assert!(state.in_progress.as_ref().is_some_and(|p| p.epoch == epoch), "waiting for node 4");
    assert_eq!(state.apply(&Fail { node: 4, incarnation: 1 }), Ok(Began { epoch: epoch + 1 }));
    assert_eq!(status(&state, 4), NodeStatus::Failed, "the finished addition must not revive it");
    // Every survivor takes part in a failure.
    assert_eq!(state.in_progress.as_ref().unwrap().participants, BTreeSet::from([1, 2, 3]));
    settle(&mut state);
    assert!(!state.tree.contains(NodeId(4)));
}

#[test]
fn failure_reports_must_name_the_current_incarnation() {
    let mut state =
        table(&[(join(1), Ok(Began { epoch: 1 })), (done(1, 1), Ok(Recorded { stable: true }))]);
    state.apply(&join(2)).unwrap();
    settle(&mut state);
    assert_eq!(
        state.apply(&Fail { node: 2, incarnation: 5 }),
        Err(Refusal::WrongIncarnation { node: 2, got: 5, current: 1 })
    );
    assert_eq!(state.apply(&Fail { node: 9, incarnation: 1 }), Err(Refusal::UnknownNode(9)));
    assert!(matches!(state.apply(&Fail { node: 2, incarnation: 1 }), Ok(Began { .. })));
    assert_eq!(state.apply(&Fail { node: 2, incarnation: 1 }), Err(Refusal::UnknownNode(2)));
    assert_eq!(state.apply(&Fail { node: 1, incarnation: 1 }), Err(Refusal::LastNode(1)));
}

#[test]
fn a_failed_node_rejoins_only_with_a_newer_incarnation() {
    let mut state = ClusterState::default();
    for n in 1..=2 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    state.apply(&Fail { node: 2, incarnation: 1 }).unwrap();
    settle(&mut state);
    assert_eq!(state.apply(&rejoin(2, 1)), Err(Refusal::StaleIncarnation { node: 2, last: 1 }));
    assert!(matches!(state.apply(&rejoin(2, 2)), Ok(Began { .. })));
    settle(&mut state);
    assert_eq!(status(&state, 2), NodeStatus::Active);
    assert_eq!(state.nodes[&2].incarnation, 2);
}

#[test]
fn a_new_life_waits_until_the_cluster_is_done_with_the_old_one() {
    let mut state = ClusterState::default();
    for n in 1..=2 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    // Node 3 is cut off while it joins: its Add is in progress when it is declared failed,
    // and its Fail waits behind the Add.
    assert!(matches!(state.apply(&join(3)), Ok(Began { .. })));
    state.apply(&Fail { node: 3, incarnation: 1 }).unwrap();
    assert!(matches!(state.in_progress.as_ref().map(|p| &p.change), Some(Change::Add { .. })));
    assert_eq!(state.apply(&rejoin(3, 2)), Err(Refusal::Recovering(3)));
    // The Add completes without it; then its Fail is carried out and done.
    let progress = state.in_progress.clone().unwrap();
    for node in progress.participants.iter().filter(|&&n| n != 3) {
        state.apply(&done(*node, progress.epoch)).unwrap();
    }
    assert_eq!(state.apply(&rejoin(3, 2)), Err(Refusal::Recovering(3)));
    settle(&mut state);
    assert!(matches!(state.apply(&rejoin(3, 2)), Ok(Began { .. })));
    settle(&mut state);
    assert_eq!(status(&state, 3), NodeStatus::Active);
}

#[test]
fn a_node_that_fails_before_its_turn_loses_its_queued_join() {
    let mut state = table(&[
        (join(1), Ok(Began { epoch: 1 })),
        (join(2), Ok(Queued { position: 0 })),
        (join(3), Ok(Queued { position: 1 })),
    ]);
    assert_eq!(state.apply(&Fail { node: 2, incarnation: 1 }), Ok(Recorded { stable: false }));
    assert_eq!(state.queue.len(), 1);
    settle(&mut state);
    assert!(!state.tree.contains(NodeId(2)));
    assert!(state.tree.contains(NodeId(3)));
}

#[test]
fn a_node_the_locator_has_no_room_for_hears_why_and_its_last_life_stays_on_record() {
    let mut state = ClusterState::default();
    state.apply(&register(1, 2)).unwrap();
    for n in 1..=2 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    state.apply(&Leave { node: 2 }).unwrap();
    settle(&mut state);
    state.apply(&join(3)).unwrap();
    settle(&mut state);
    assert_eq!(status(&state, 2), NodeStatus::Left);

    // Two slots, two nodes: node 2's new life finds no room.
    match state.apply(&rejoin(2, 2)) {
        Err(Refusal::Locator(why)) => assert!(why.contains("room"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(status(&state, 2), NodeStatus::Left, "its last life's record is kept");
    assert_eq!(state.nodes[&2].incarnation, 1);
    assert!(state.is_stable(), "no change queued for it");
    assert_eq!(state.apply(&rejoin(2, 1)), Err(Refusal::StaleIncarnation { node: 2, last: 1 }));
}

#[test]
fn epochs_never_go_backwards_and_every_change_settles() {
    let mut state = ClusterState::default();
    let mut last = 0;
    for step in 0..400u64 {
        let roll = gobelins_locator::mix(step) % 10;
        let live: Vec<u64> = state.live().into_iter().collect();
        let pick =
            live.get((gobelins_locator::mix(step ^ 1) as usize) % live.len().max(1)).copied();
        let command = match (roll, pick) {
            (0..=3, _) | (_, None) => join(100 + step),
            (4..=5, Some(n)) => Leave { node: n },
            (6, Some(n)) => Fail { node: n, incarnation: 1 },
            (_, Some(_)) => match state.in_progress.clone() {
                Some(p) => done(*p.participants.iter().next().expect("non-empty"), p.epoch),
                None => join(100 + step),
            },
        };
        let _ = state.apply(&command);
        assert!(state.epoch >= last, "epoch went back at step {step}");
        last = state.epoch;
        if let Some(p) = &state.in_progress {
            assert!(!p.participants.is_empty());
            assert!(p.participants.iter().all(|n| state.nodes[n].status != NodeStatus::Failed));
        }
    }
    settle(&mut state);
    assert!(state.is_stable());
    // Once stable, the tree holds exactly the active nodes.
    let active: BTreeSet<u64> = state.with_status(NodeStatus::Active).collect();
    let in_tree: BTreeSet<u64> = state.tree.nodes().map(|n| n.0).collect();
    assert_eq!(active, in_tree);
    assert_eq!(state.live(), active);
}

#[test]
fn a_node_dying_during_its_own_eviction_is_recovered_with_the_moves_it_had_not_finished() {
    let mut state = ClusterState::default();
    state.apply(&Rules { version: RULES }).expect("this build's rules");
    state.apply(&Register(kv())).expect("reg");
    for n in 1..=3 {
        state.apply(&join(n)).expect("join");
        settle(&mut state);
    }
    state.apply(&Evict { node: 3 }).expect("evict");
    let eviction = state.in_progress.clone().expect("the eviction began");
    let leaving: u64 = eviction.plan.services.iter().map(|s| s.moved_slots()).sum();
    assert!(leaving > 0, "node 3 has slots to hand over");
    // Node 3 dies before it reports: nobody waits for it, and a recovery is queued.
    state.apply(&Fail { node: 3, incarnation: 1 }).expect("fail");
    assert_eq!(status(&state, 3), NodeStatus::Failed);
    let still = state.in_progress.clone().expect("the survivors finish the eviction");
    assert!(!still.participants.contains(&3));
    assert_eq!(state.queue.front(), Some(&Change::Recover(NodeId(3))));
    for node in still.participants {
        state.apply(&done(node, still.epoch)).expect("report");
    }
    let recovery = state.in_progress.clone().expect("the recovery begins next");
    assert_eq!(recovery.change, Change::Recover(NodeId(3)));
    assert_eq!(recovery.participants, BTreeSet::from([1, 2]));
    let rebuilt: u64 = recovery.plan.services.iter().map(|s| s.moved_slots()).sum();
    assert_eq!(rebuilt, leaving, "every slot node 3 was handing over is rebuilt");
    assert!(state.interrupted.is_empty());
    settle(&mut state);
    assert!(state.is_stable());
    assert_eq!(status(&state, 3), NodeStatus::Failed, "a dead leaver stays failed");
    assert!(state.nodes[&3].kept_out, "asked out, it is kept out");
}

/// An operator's eviction outlives the node's failure: a node that failed in the middle of
/// its eviction, or was evicted once failed, is kept out (its restart ends as left), and only
/// a new life clears it. One that failed as a member is not.
#[test]
fn a_node_asked_out_before_or_after_it_failed_is_kept_out_until_a_new_life() {
    let mut state = ClusterState::default();
    assert_eq!(state.apply(&Rules { version: RULES }), Ok(Ruled));
    for n in 1..=4 {
        state.apply(&join(n)).expect("join");
        settle(&mut state);
    }
    state.apply(&Fail { node: 4, incarnation: 1 }).expect("fail");
    settle(&mut state);
    assert!(!state.nodes[&4].kept_out, "a member that failed comes back by a restart");
    assert_eq!(state.apply(&Evict { node: 4 }), Ok(KeptOut));
    assert!(state.nodes[&4].kept_out);
    assert!(state.is_stable(), "keeping a failed node out moves nothing");
    assert_eq!(state.apply(&Evict { node: 4 }), Err(Refusal::UnknownNode(4)), "asked twice");
    // A leave, like an eviction, asks the node out.
    state.apply(&Leave { node: 3 }).expect("leave");
    state.apply(&Fail { node: 3, incarnation: 1 }).expect("fail");
    assert!(state.nodes[&3].kept_out);
    settle(&mut state);
    assert!(matches!(state.apply(&rejoin(4, 2)), Ok(Began { .. })));
    settle(&mut state);
    assert_eq!(status(&state, 4), NodeStatus::Active);
    assert!(!state.nodes[&4].kept_out, "a new life is a member like any other");
    assert_eq!(state.apply(&Evict { node: 1 }).map(|_| ()), Ok(()), "an active node is evicted");
    assert_eq!(status(&state, 1), NodeStatus::Leaving);
    assert!(!state.nodes[&1].kept_out, "only once it fails before it is out");
}

/// A log written under older rules applies again as it did then, on every replica, until the
/// entry that raises them: replayed after an upgrade, a protocol-27 eviction of a failed node
/// kept it out on one replica, and not on another whose snapshot already held it.
#[test]
fn commands_apply_by_the_rules_in_force_where_they_sit_in_the_log() {
    let mut state = ClusterState::default();
    for n in 1..=3 {
        state.apply(&join(n)).expect("join");
        settle(&mut state);
    }
    state.apply(&Evict { node: 3 }).expect("evict");
    state.apply(&Fail { node: 3, incarnation: 1 }).expect("fail");
    assert!(!state.nodes[&3].kept_out, "under 27's rules, a failure in an eviction keeps nothing");
    assert_eq!(state.apply(&Evict { node: 3 }), Err(Refusal::UnknownNode(3)), "as 27 refused it");
    assert_eq!(state.apply(&Rules { version: RULES }), Ok(Ruled));
    assert_eq!(state.apply(&Rules { version: 27 }), Ok(Ruled), "never lowered");
    assert_eq!(state.rules, RULES);
    assert_eq!(state.apply(&Evict { node: 3 }), Ok(KeptOut), "by this build's rules");
}

#[test]
fn a_leaver_whose_receiver_dies_before_reporting_stays_for_its_recovery() {
    let mut state = ClusterState::default();
    state.apply(&Register(kv())).expect("reg");
    for n in 1..=4 {
        state.apply(&join(n)).expect("join");
        settle(&mut state);
    }
    state.apply(&Evict { node: 4 }).expect("evict");
    let eviction = state.in_progress.clone().expect("the eviction began");
    let receiver = eviction.plan.outgoing(NodeId(4)).map(|(_, m)| m.to.0).next().expect("a move");
    // The receiver dies before it reports: what node 4 handed it may have no other copy.
    state.apply(&Fail { node: receiver, incarnation: 1 }).expect("fail");
    for node in eviction.participants.iter().filter(|&&n| n != receiver) {
        state.apply(&done(*node, eviction.epoch)).expect("report");
    }
    assert_eq!(status(&state, 4), NodeStatus::Leaving, "node 4 stays for the recovery");
    let recovery = state.in_progress.clone().expect("the recovery begins next");
    assert_eq!(recovery.change, Change::Fail(NodeId(receiver)));
    assert!(recovery.participants.contains(&4), "node 4 reports what it handed over");
    settle(&mut state);
    assert_eq!(status(&state, 4), NodeStatus::Left, "and leaves once it is rebuilt");
    assert!(state.lingering.is_empty());
    assert!(state.is_stable());

    // A receiver that reported the leave done had copied everything on: nobody stays.
    state.apply(&Evict { node: 3 }).expect("evict");
    let eviction = state.in_progress.clone().expect("the eviction began");
    let receiver = eviction.plan.outgoing(NodeId(3)).map(|(_, m)| m.to.0).next().expect("a move");
    state.apply(&done(receiver, eviction.epoch)).expect("report");
    state.apply(&Fail { node: receiver, incarnation: 1 }).expect("fail");
    assert!(state.lingering.is_empty());
}

/// The service `kv` on nodes 1 and 2; node 2 leaves, and node 1, its receiver and then the
/// last node in the tree, dies before node 2 reports. Returns the state and the leave's epoch.
fn leaving_while_its_receiver_the_last_node_dies() -> (ClusterState, u64) {
    let mut state = ClusterState::default();
    state.apply(&Register(kv())).expect("reg");
    for n in 1..=2 {
        state.apply(&join(n)).expect("join");
        settle(&mut state);
    }
    state.apply(&Evict { node: 2 }).expect("evict");
    let eviction = state.in_progress.clone().expect("the eviction began");
    state.apply(&Fail { node: 1, incarnation: 1 }).expect("fail");
    (state, eviction.epoch)
}

fn kv() -> ServiceSpec {
    ServiceSpec::new(gobelins_locator::ServiceId(1), "kv")
}

#[test]
fn slots_a_joiner_takes_from_a_dead_last_node_are_rebuilt_by_its_recovery() {
    let (mut state, eviction) = leaving_while_its_receiver_the_last_node_dies();
    state.apply(&done(2, eviction)).expect("report");
    assert!(state.in_progress.is_none(), "node 1's recovery waits for a joiner");
    assert_eq!(status(&state, 2), NodeStatus::Leaving, "node 2 stays for it");
    // Node 3 joins: it takes part of node 1's slots, which nobody sends.
    state.apply(&join(3)).expect("join");
    let addition = state.in_progress.clone().expect("the join began");
    let taken: u64 = addition.plan.moves_from(NodeId(1)).iter().map(|s| s.moved_slots()).sum();
    assert!(taken > 0, "node 3 takes slots of the dead node 1");
    state.apply(&done(3, addition.epoch)).expect("report");
    let recovery = state.in_progress.clone().expect("the recovery begins next");
    assert_eq!(recovery.change, Change::Fail(NodeId(1)));
    assert!(recovery.participants.contains(&2), "node 2's copies take part");
    let rebuilt: u64 = recovery.plan.services.iter().map(|s| s.moved_slots()).sum();
    let all = u64::from(kv().slots);
    assert_eq!(rebuilt, all, "every slot node 1 had, those node 3 took included");
    settle(&mut state);
    assert_eq!(status(&state, 2), NodeStatus::Left);
    assert!(state.interrupted.is_empty() && state.lingering.is_empty());
}

/// Two joins run while a dead last node's recovery waits: the second takes part of what the
/// first took from the dead node, which nobody sent. The recovery rebuilds each such slot at
/// its manager when the recovery runs, not where the first join had planned to send it.
#[test]
fn a_dead_last_node_s_slots_are_rebuilt_at_their_manager_of_the_recovery_s_epoch() {
    let (mut state, eviction) = leaving_while_its_receiver_the_last_node_dies();
    // Two nodes ask to join before the leave ends.
    state.apply(&join(3)).expect("join");
    state.apply(&join(4)).expect("join");
    state.apply(&done(2, eviction)).expect("report");
    let mut recovery = None;
    while let Some(progress) = state.in_progress.clone() {
        if progress.change == Change::Fail(NodeId(1)) {
            recovery = Some(progress);
            break;
        }
        for node in progress.participants {
            state.apply(&done(node, progress.epoch)).expect("participant report");
        }
    }
    let recovery = recovery.expect("node 1's recovery runs once a node joined");
    let managers = state.tree.snapshot(Epoch(recovery.epoch)).expect("nodes remain");
    let table = managers.table(gobelins_locator::ServiceId(1)).expect("the service");
    let mut rebuilt = 0;
    for service in &recovery.plan.services {
        for m in &service.moves {
            for slot in m.slots.clone() {
                assert_eq!(Some(m.to), table.owner(slot), "slot {slot} rebuilt at {:?}", m.to);
                rebuilt += 1;
            }
        }
    }
    let all = kv().slots;
    assert_eq!(rebuilt, all, "every slot node 1 had, each once");
    for (to, _) in recovery.plan.services.iter().flat_map(|s| s.moves.iter().map(|m| (m.to, m))) {
        assert!(recovery.plan.participants.contains(&to), "node {to:?} receives, so takes part");
    }
}

#[test]
fn a_join_whose_labels_the_locator_cannot_place_is_refused_to_the_joiner() {
    let config = TreeConfig::default().with_label_levels(["zone", "rack"]);
    let mut state = ClusterState::new(config).expect("a valid configuration");
    let labelled = |node: u64, pairs: &[(&str, &str)]| Join {
        node,
        addr: format!("127.0.0.{node}:7000"),
        labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        incarnation: 1,
    };
    for (command, why) in [
        (labelled(1, &[("rack", "3")]), "set but level `zone` above it is not"),
        (labelled(1, &[("room", "b")]), "not a level of this tree"),
    ] {
        match state.apply(&command) {
            Err(Refusal::Labels(text)) => assert!(text.contains(why), "{text}"),
            other => panic!("{command:?} gave {other:?}"),
        }
        assert!(state.nodes.is_empty(), "nothing recorded for a refused join");
        assert!(state.is_stable(), "no change queued for it");
    }
    assert_eq!(state.apply(&labelled(1, &[("zone", "a"), ("rack", "3")])), Ok(Began { epoch: 1 }));
}

#[test]
fn the_bootstrap_shapes_the_tree_once_and_its_levels_never_change() {
    let levels = |l: &[&str]| Shape { levels: l.iter().map(|s| s.to_string()).collect() };
    let zone = |node: u64, z: &str| Join {
        node,
        addr: format!("127.0.0.{node}:7000"),
        labels: Labels::from([("zone".to_string(), z.to_string())]),
        incarnation: 1,
    };
    let mut state = ClusterState::default();
    match state.apply(&zone(1, "a")) {
        Err(Refusal::Labels(text)) => assert!(text.contains("--levels"), "says how: {text}"),
        other => panic!("a label on a tree without levels gave {other:?}"),
    }
    // Given again, as a bootstrap finished by a restart asks, and then others while empty.
    state = table(&[
        (levels(&["zone"]), Ok(Shaped)),
        (levels(&["zone"]), Ok(Shaped)),
        (
            levels(&["zone", "zone"]),
            Err(Refusal::Locator(
                "label level `zone` is named twice (again at position 1); name each level once"
                    .into(),
            )),
        ),
        (levels(&["zone", "rack"]), Ok(Shaped)),
        (zone(1, "a"), Ok(Began { epoch: 1 })),
        (levels(&["zone", "rack"]), Ok(Shaped)),
        (levels(&["zone"]), Err(Refusal::Shaped { held: "zone,rack".into() })),
        (levels(&[]), Err(Refusal::Shaped { held: "zone,rack".into() })),
    ]);
    assert_eq!(state.tree.config().label_levels, ["zone", "rack"]);

    // A service registered before any node (by a build that took a refused bootstrap for
    // done) stays registered through the shaping.
    let mut state = table(&[(register(1, 64), Ok(Registered)), (levels(&["zone"]), Ok(Shaped))]);
    assert_eq!(state.tree.services().map(|s| s.id.0).collect::<Vec<_>>(), [1]);
    assert_eq!(state.apply(&zone(1, "a")), Ok(Began { epoch: 2 }));
}

#[test]
fn a_service_registered_again_must_be_declared_alike() {
    let mut state = ClusterState::default();
    state.apply(&join(1)).unwrap();
    settle(&mut state);
    assert_eq!(state.apply(&Register(kv())), Ok(Registered));
    settle(&mut state);

    let renamed = ServiceSpec { name: "kv, built elsewhere".into(), ..kv() };
    assert_eq!(state.apply(&Register(renamed)), Ok(Registered), "a name is only shown");
    let resized = kv().with_slots(kv().slots * 2);
    match state.apply(&Register(resized.clone())) {
        Err(Refusal::ServiceDeclaredOtherwise { id, .. }) => assert_eq!(id, kv().id.0),
        other => panic!("{other:?}"),
    }
    assert!(check_declaration(&state, &resized).is_err());
    assert_eq!(check_declaration(&state, &kv()), Ok(()));
    let unknown = ServiceSpec::new(gobelins_locator::ServiceId(99), "new");
    assert_eq!(check_declaration(&state, &unknown), Ok(()), "not registered yet");
    assert_eq!(state.tree.services().find(|s| s.id == kv().id).map(|s| s.slots), Some(kv().slots));
}

#[test]
fn services_may_not_hold_more_slots_together_than_the_state_can_carry() {
    let mut state = ClusterState::default();
    for n in 1..=2 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    let half = (MAX_CLUSTER_SLOTS / 2) as u32;
    assert_eq!(state.apply(&register(1, half)), Ok(Registered));
    settle(&mut state);
    // Queued behind a leave, not yet in the tree, and counted all the same.
    state.apply(&Leave { node: 2 }).unwrap();
    assert_eq!(state.apply(&register(2, half / 2)), Ok(Registered));
    assert!(state.queue.iter().any(|c| matches!(c, Change::Register(_))), "queued");
    match state.apply(&register(3, half)) {
        Err(Refusal::TooManySlots { id: 3, held, .. }) => {
            assert_eq!(held, u64::from(half + half / 2))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(state.apply(&register(4, half / 2)), Ok(Registered), "what still fits");
    let mut fresh = ClusterState::default();
    let alone = fresh.apply(&register(5, gobelins_locator::MAX_SLOTS));
    assert!(matches!(alone, Err(Refusal::TooManySlots { id: 5, held: 0, .. })), "{alone:?}");
}

#[test]
fn joins_and_registrations_are_judged_with_the_changes_queued_before_them() {
    let mut state = ClusterState::default();
    state.apply(&register(1, 4)).unwrap();
    state.apply(&join(1)).unwrap();
    settle(&mut state);
    // Node 2's join in progress, 3's and 5's queued behind it: four nodes for four slots.
    assert_eq!(state.apply(&join(2)), Ok(Began { epoch: 3 }));
    for n in [3, 5] {
        assert!(matches!(state.apply(&join(n)), Ok(Queued { .. })), "node {n}");
    }
    match state.apply(&join(6)) {
        Err(Refusal::Locator(why)) => assert!(why.contains("room"), "{why}"),
        other => panic!("the joins queued take the last room: {other:?}"),
    }
    assert!(!state.nodes.contains_key(&6));

    assert!(matches!(state.apply(&register(3, 8)), Ok(Registered)));
    assert!(
        matches!(
            state.apply(&register(3, 16)),
            Err(Refusal::ServiceDeclaredOtherwise { id: 3, .. })
        ),
        "queued, not yet registered, and declared otherwise"
    );
    assert_eq!(state.apply(&register(3, 8)), Ok(Registered));
    let queued = state.queue.iter().filter(|c| matches!(c, Change::Register(_))).count();
    assert_eq!(queued, 1, "registered once however many agents ask");
    settle(&mut state);
    for n in [2, 3, 5] {
        assert_eq!(status(&state, n), NodeStatus::Active, "node {n}");
    }
}

/// After the whole cluster stopped, the leader's detector may find the only life left counted
/// live to be a node that never comes back: its verdict ends that life too, where a node's own
/// `Fail` of its last life is refused, and the nodes that came back then rejoin.
#[test]
fn the_detectors_verdict_ends_even_the_last_live_life_and_the_others_rejoin() {
    let mut state = ClusterState::default();
    for node in [1, 2] {
        state.apply(&join(node)).expect("accepted");
        settle(&mut state);
    }
    state.apply(&Fail { node: 1, incarnation: 1 }).expect("node 1's life ends");
    settle(&mut state);
    assert_eq!(state.apply(&Fail { node: 2, incarnation: 1 }), Err(Refusal::LastNode(2)));
    state.apply(&Dead { node: 2, incarnation: 1 }).expect("node 2's life ends");
    assert_eq!(status(&state, 2), NodeStatus::Failed);
    assert!(state.live().is_empty());
    // Node 1 comes back as a new life, and the cluster is whole again with it alone.
    assert!(matches!(state.apply(&rejoin(1, 2)), Ok(Began { .. })), "{state:#?}");
    settle(&mut state);
    assert_eq!(status(&state, 1), NodeStatus::Active);
    assert!(state.is_stable(), "{state:#?}");
    assert!(state.tree.contains(NodeId(1)) && !state.tree.contains(NodeId(2)));
}

/// A failure carries the last two changes that moved something of the dead node's: its join
/// (slots came to it, and it has a holder at last), and nothing before, for a new life. A
/// later life starts afresh.
#[test]
fn a_failure_says_what_last_moved_of_the_dead_node_s() {
    let mut state = ClusterState::default();
    state.apply(&register(1, 64)).unwrap();
    settle(&mut state);
    let mut joined = BTreeMap::new();
    for n in 1..=4 {
        state.apply(&join(n)).unwrap();
        joined.insert(n, state.epoch);
        settle(&mut state);
    }
    assert_eq!(state.moved_in[&4], [Some(joined[&4]), None]);
    // Node 4's join took slots from the others: theirs moved too.
    assert_eq!(state.moved_in[&1][0], Some(joined[&4]));
    state.apply(&Fail { node: 4, incarnation: 1 }).unwrap();
    let recovery = state.in_progress.clone().expect("node 4's recovery");
    assert_eq!(recovery.failed_moved_in, [Some(joined[&4]), None]);
    settle(&mut state);
    assert_eq!(state.moved_in[&1][0], Some(recovery.epoch), "node 4's slots came to node 1");
    state.apply(&rejoin(4, 2)).unwrap();
    let again = state.epoch;
    settle(&mut state);
    assert_eq!(state.moved_in[&4], [Some(again), None], "a new life");
}

/// A node killed as another joins: the join began before its failure was declared, and its
/// recovery follows the join. Its word from before the join still holds (a join removes no
/// copy of anything: `KeptSince`), where a word from before another node's eviction does not.
#[test]
fn a_failure_says_since_when_the_dead_node_s_word_holds() {
    let mut state = ClusterState::default();
    state.apply(&Rules { version: RULES }).expect("this build's rules");
    state.apply(&register(1, 64)).unwrap();
    settle(&mut state);
    for n in 1..=4 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    let stable = state.epoch;
    assert_eq!(state.kept_since.of(NodeId(3)), Some(stable - 1), "the last join took from it");
    state.apply(&join(5)).unwrap();
    state.apply(&Fail { node: 3, incarnation: 1 }).unwrap();
    let join = state.in_progress.clone().expect("node 5's join");
    for node in join.participants {
        state.apply(&done(node, join.epoch)).expect("participant report");
    }
    let recovery = state.in_progress.clone().expect("node 3's recovery");
    assert_eq!(recovery.change, Change::Fail(NodeId(3)));
    assert_eq!(recovery.failed_kept_since, Some(stable - 1), "the join in between counts not");
    settle(&mut state);
    assert_eq!(state.kept_since.of(NodeId(3)), None, "recovered");
    assert_eq!(state.kept_since.of(NodeId(1)), Some(recovery.epoch), "a removal");

    state.apply(&Leave { node: 5 }).unwrap();
    let leave = state.epoch;
    settle(&mut state);
    state.apply(&Fail { node: 4, incarnation: 1 }).unwrap();
    let recovery = state.in_progress.clone().expect("node 4's recovery");
    assert_eq!(recovery.failed_kept_since, Some(leave), "a leave of another node counts");
    settle(&mut state);
    assert_eq!(state.kept_since.of(NodeId(5)), None, "left: nothing kept");
}

/// The record says who took a node out, itself or another node: `status` and `stats` tell a
/// leave from an eviction, which they showed alike (a helper's soak: every leave was shown as
/// `evict nN`). A new life starts with none; rules older than 30 record none.
#[test]
fn a_node_s_record_says_whether_it_left_or_was_evicted() {
    for rules in [29, RULES] {
        let mut state = stable_cluster(rules, 64, 4);
        state.apply(&Leave { node: 3 }).unwrap();
        settle(&mut state);
        state.apply(&Evict { node: 4 }).unwrap();
        settle(&mut state);
        let by = |n: u64| state.nodes[&n].removed_by;
        let want = |by: RemovedBy| (rules >= 30).then_some(by);
        assert_eq!((by(3), by(4)), (want(RemovedBy::Leave), want(RemovedBy::Evict)), "{rules}");
        assert_eq!((status(&state, 3), status(&state, 4)), (NodeStatus::Left, NodeStatus::Left));
        assert_eq!(by(1), None, "still in");
        state.apply(&rejoin(3, 2)).unwrap();
        assert_eq!(state.nodes[&3].removed_by, None, "a new life");
    }
}

/// An eviction counts against every other node's word as it begins, a node that takes none
/// of the leaver's slots included: what the leaver held (copies, the words it kept as a
/// replica holder) leaves with it. Counting only the evictions whose leaver said it took
/// something away was tried once, and taken back: reviews found seven ways it read a lost
/// page as zeros.
#[test]
fn an_eviction_counts_against_every_other_node_s_word_as_it_begins() {
    for rules in [29, RULES] {
        // Few slots, so that some node takes none of the leaver's.
        let mut state = stable_cluster(rules, 8, 6);
        state.apply(&Evict { node: 6 }).unwrap();
        let evict = state.in_progress.clone().expect("node 6's eviction");
        let receivers = evict.plan.receivers();
        let other =
            (1..=5).find(|&n| !receivers.contains(&NodeId(n))).expect("a node not receiving");
        assert_eq!(state.kept_since.of(NodeId(other)), Some(evict.epoch), "rules {rules}");
    }
}

/// Under rules older than 29 nothing is recorded; raising them starts the record of every
/// live node at the epoch they are raised in, not before: what happened earlier went
/// unrecorded.
#[test]
fn since_when_a_word_holds_is_recorded_from_the_rules_of_29_on() {
    let mut state = ClusterState::default();
    for n in 1..=3 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    assert_eq!(state.kept_since, KeptSince::default(), "older rules");
    state.apply(&Fail { node: 3, incarnation: 1 }).unwrap();
    assert_eq!(state.in_progress.as_ref().expect("recovery").failed_kept_since, None);
    settle(&mut state);
    let raised = state.epoch;
    state.apply(&Rules { version: RULES }).expect("raised");
    assert_eq!(state.kept_since.of(NodeId(1)), Some(raised));
    assert_eq!(state.kept_since.of(NodeId(3)), None, "failed already");
    state.apply(&Fail { node: 2, incarnation: 1 }).unwrap();
    assert_eq!(state.in_progress.as_ref().expect("recovery").failed_kept_since, Some(raised));
}

/// Two nodes declared failed during a change: the second declared is recovered first, and its
/// recovery hands slots to the first, declared failed but still in the tree, which takes no
/// part and never receives them. The record says they moved to it all the same: its holder
/// must not vouch, at its own recovery, for slots it never held.
#[test]
fn slots_handed_to_a_node_declared_failed_count_as_moved() {
    let mut state = ClusterState::default();
    state.apply(&register(1, 64)).unwrap();
    settle(&mut state);
    for n in 1..=4 {
        state.apply(&join(n)).unwrap();
        settle(&mut state);
    }
    state.apply(&join(5)).unwrap();
    state.apply(&Fail { node: 2, incarnation: 1 }).unwrap();
    state.apply(&Fail { node: 1, incarnation: 1 }).unwrap();
    let join = state.in_progress.clone().expect("node 5's join");
    for node in join.participants.into_iter().filter(|n| ![1, 2].contains(n)) {
        let _ = state.apply(&done(node, join.epoch));
    }
    let first = state.in_progress.clone().expect("a recovery");
    assert_eq!(first.change, Change::Fail(NodeId(1)), "the last declared goes first");
    assert!(first.plan.incoming(NodeId(2)).next().is_some(), "node 1's slots go to node 2 too");
    assert!(!first.participants.contains(&2));
    for node in first.participants {
        state.apply(&done(node, first.epoch)).expect("participant report");
    }
    let second = state.in_progress.clone().expect("node 2's recovery");
    assert_eq!(second.change, Change::Fail(NodeId(2)));
    assert_eq!(second.failed_moved_in[0], Some(first.epoch));
}

/// A node dies during the leave of the node that held its replicas as the leave began (in
/// another zone: the leaver hands it nothing), before it reported its part done: it may not
/// have copied them to its new holder yet, so the leaver stays for its recovery, as one it
/// sent entries to would have it stay.
#[test]
fn a_leaver_that_held_a_node_s_replicas_stays_for_its_recovery() {
    let config = TreeConfig::default().with_label_levels(["zone"]);
    let mut state = ClusterState::new(config).expect("a valid config");
    state.apply(&register(1, 64)).unwrap();
    settle(&mut state);
    for n in 1..=4 {
        let zone = if n % 2 == 1 { "a" } else { "b" };
        let labels = Labels::from([("zone".to_string(), zone.to_string())]);
        let addr = format!("127.0.0.{n}:7000");
        state.apply(&Join { node: n, addr, labels, incarnation: 1 }).unwrap();
        settle(&mut state);
    }
    let table = state.tree.snapshot(Epoch(state.epoch)).expect("a table");
    let held = 1;
    let leaver = table.replica_holder(NodeId(held)).expect("a holder").0;
    assert_eq!(leaver % 2, 0, "in zone b");
    state.apply(&Leave { node: leaver }).unwrap();
    let leave = state.in_progress.clone().expect("the leave");
    assert!(leave.held_by_leaver.contains(&held));
    assert!(leave.plan.outgoing(NodeId(leaver)).all(|(_, m)| m.to.0 != held), "sends it nothing");
    state.apply(&Fail { node: held, incarnation: 1 }).unwrap();
    assert_eq!(state.lingering.get(&leaver), Some(&BTreeSet::from([held])));
    settle(&mut state);
    assert_eq!(status(&state, leaver), NodeStatus::Left, "gone once the recovery ended");
}
