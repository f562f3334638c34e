//! Tests of [`Period`] that assert the exact commands emitted.

use super::*;
use Command::*;

const A: ServiceId = ServiceId(1);
const B: ServiceId = ServiceId(2);

fn n(id: u64) -> NodeId {
    NodeId(id)
}

fn nodes(ids: &[u64]) -> BTreeSet<NodeId> {
    ids.iter().map(|&i| n(i)).collect()
}

fn begin(epoch: u64, participants: &[u64], role: Role) -> Event {
    Event::Begin { epoch, participants: nodes(participants), services: vec![A, B], role }
}

fn ack(from: u64, epoch: u64) -> Event {
    Event::Ack { from: n(from), epoch }
}

fn acks_to(ids: &[u64], epoch: u64) -> Vec<Command> {
    ids.iter().map(|&i| SendAck { to: n(i), epoch }).collect()
}

/// Feeds events and checks the commands each one produces.
fn script(period: &mut Period, steps: Vec<(Event, Vec<Command>)>) {
    for (i, (event, expected)) in steps.into_iter().enumerate() {
        let got =
            period.handle(event.clone()).unwrap_or_else(|e| panic!("step {i}: {event:?}: {e}"));
        assert_eq!(got, expected, "step {i}: {event:?}");
    }
}

#[test]
fn a_member_of_the_affected_cell_goes_through_the_four_phases() {
    let mut p = Period::new(n(1));
    script(
        &mut p,
        vec![
            (
                begin(5, &[1, 2, 3], Role::Both),
                vec![HoldMovingKeys { epoch: 5 }, BeforeMigration(A), BeforeMigration(B)],
            ),
            (Event::BeforeDone(A), vec![]),
            (Event::BeforeDone(B), vec![InstallSnapshot { epoch: 5 }, SendOut(A), SendOut(B)]),
            (Event::SentOut(A), vec![]),
            (Event::SentOut(B), acks_to(&[1, 2, 3], 5)),
            (ack(1, 5), vec![]),
            (ack(3, 5), vec![]),
        ],
    );
    assert_eq!(p.phase(), Phase::Receiving);
    assert_eq!(p.awaiting(), nodes(&[2]));
    script(
        &mut p,
        vec![
            (ack(2, 5), vec![AfterMigration(A), AfterMigration(B)]),
            (Event::AfterDone(A), vec![]),
            (Event::AfterDone(B), released(5)),
        ],
    );
    assert_eq!(p.phase(), Phase::Released, "requests go on; the change is not reported done");
    script(
        &mut p,
        vec![
            (Event::ReleasedDone(A), vec![]),
            (Event::ReleasedDone(B), vec![ReportDone { epoch: 5 }]),
        ],
    );
    assert_eq!(p.phase(), Phase::Done, "keeps what it sent until the epoch is stable");
    script(&mut p, vec![(Event::Stable(5), vec![DropSent { epoch: 5 }])]);
    assert_eq!(p.phase(), Phase::Idle);
}

/// What the last `AfterDone` of `epoch` produces: the requests released, then each service's
/// `after_release`.
fn released(epoch: u64) -> Vec<Command> {
    vec![ReleaseHeld { epoch }, AfterRelease(A), AfterRelease(B)]
}

/// Begins `epoch` and lets both services finish `before_migration`, checking that common
/// prefix; returns what the last `BeforeDone` produced.
fn prepare(p: &mut Period, epoch: u64, participants: &[u64], role: Role) -> Vec<Command> {
    let begun = p.handle(begin(epoch, participants, role));
    assert_eq!(begun, Ok(vec![HoldMovingKeys { epoch }, BeforeMigration(A), BeforeMigration(B)]));
    assert_eq!(p.handle(Event::BeforeDone(A)), Ok(vec![]));
    p.handle(Event::BeforeDone(B)).expect("asked for")
}

/// What a node that only receives does once its services are prepared.
fn snapshot_and_acks(epoch: u64, to: &[u64]) -> Vec<Command> {
    [vec![InstallSnapshot { epoch }], acks_to(to, epoch)].concat()
}

#[test]
fn an_added_node_only_receives() {
    let mut p = Period::new(n(4));
    assert_eq!(prepare(&mut p, 2, &[1, 2, 4], Role::Receiver), snapshot_and_acks(2, &[1, 2, 4]));
    script(
        &mut p,
        vec![
            (ack(4, 2), vec![]),
            (ack(1, 2), vec![]),
            (ack(2, 2), vec![AfterMigration(A), AfterMigration(B)]),
        ],
    );
}

#[test]
fn an_evicted_node_only_sends_and_waits_for_nobody() {
    let mut p = Period::new(n(3));
    let sending = prepare(&mut p, 7, &[1, 2, 3], Role::Sender);
    assert_eq!(sending, vec![InstallSnapshot { epoch: 7 }, SendOut(A), SendOut(B)]);
    let after = [acks_to(&[1, 2, 3], 7), vec![AfterMigration(A), AfterMigration(B)]].concat();
    script(&mut p, vec![(Event::SentOut(A), vec![]), (Event::SentOut(B), after)]);
}

#[test]
fn acks_that_arrive_before_the_change_begins_are_kept() {
    let mut p = Period::new(n(1));
    script(&mut p, vec![(ack(2, 5), vec![]), (ack(3, 5), vec![])]);
    assert_eq!(prepare(&mut p, 5, &[1, 2, 3], Role::Receiver), snapshot_and_acks(5, &[1, 2, 3]));
    // Only our own ack was missing.
    script(&mut p, vec![(ack(1, 5), vec![AfterMigration(A), AfterMigration(B)])]);
}

#[test]
fn a_dead_participant_is_not_waited_for() {
    let mut p = Period::new(n(1));
    assert_eq!(prepare(&mut p, 5, &[1, 2, 3], Role::Receiver), snapshot_and_acks(5, &[1, 2, 3]));
    let dead = Event::ParticipantFailed { node: n(3), epoch: 5 };
    script(
        &mut p,
        vec![
            (ack(1, 5), vec![]),
            (ack(2, 5), vec![]),
            (dead, vec![AfterMigration(A), AfterMigration(B)]),
        ],
    );
}

/// Node 1, the change to `epoch`'s only participant, once it has merged and released: both
/// services are in `after_release`.
fn released_alone(epoch: u64) -> Period {
    let mut p = Period::new(n(1));
    let prepared = prepare(&mut p, epoch, &[1], Role::Bystander);
    assert_eq!(
        prepared,
        [snapshot_and_acks(epoch, &[1]), vec![AfterMigration(A), AfterMigration(B)]].concat()
    );
    script(&mut p, vec![(Event::AfterDone(A), vec![]), (Event::AfterDone(B), released(epoch))]);
    p
}

#[test]
fn late_and_foreign_acks_change_nothing() {
    let mut p = released_alone(5);
    script(
        &mut p,
        vec![
            (ack(2, 5), vec![]),
            (Event::ReleasedDone(A), vec![]),
            (ack(2, 3), vec![]),
            (Event::ReleasedDone(B), vec![ReportDone { epoch: 5 }]),
            (Event::Stable(4), vec![]),
        ],
    );
    assert_eq!(p.phase(), Phase::Done);
}

#[test]
fn a_change_cannot_begin_during_another_and_stray_callbacks_are_refused() {
    let mut p = Period::new(n(1));
    assert_eq!(
        p.handle(Event::BeforeDone(A)),
        Err(AdaptationError::Unexpected { service: 1, phase: "before_migration" })
    );
    p.handle(begin(5, &[1, 2], Role::Both)).expect("begins");
    assert_eq!(
        p.handle(begin(6, &[1, 2], Role::Both)),
        Err(AdaptationError::Overlap { current: 5, new: 6 })
    );
    assert_eq!(
        p.handle(Event::SentOut(A)),
        Err(AdaptationError::Unexpected { service: 1, phase: "send_out" })
    );
    p.handle(Event::BeforeDone(A)).expect("asked for");
    assert_eq!(
        p.handle(Event::BeforeDone(A)),
        Err(AdaptationError::Unexpected { service: 1, phase: "before_migration" }),
        "twice"
    );
    assert_eq!(p.phase(), Phase::Before);
}

#[test]
fn the_next_change_means_the_last_one_is_stable() {
    let mut p = Period::new(n(1));
    p.handle(begin(5, &[1], Role::Bystander)).expect("begins");
    p.handle(Event::BeforeDone(A)).expect("ok");
    p.handle(Event::BeforeDone(B)).expect("ok");
    for event in
        [Event::AfterDone(A), Event::AfterDone(B), Event::ReleasedDone(A), Event::ReleasedDone(B)]
    {
        p.handle(event).expect("ok");
    }
    assert_eq!(p.phase(), Phase::Done);
    let commands = p.handle(begin(6, &[1, 2], Role::Both)).expect("begins");
    assert_eq!(&commands[..2], &[DropSent { epoch: 5 }, HoldMovingKeys { epoch: 6 }]);
}

#[test]
fn a_node_the_cluster_went_on_without_releases_what_it_holds() {
    let mut p = Period::new(n(1));
    p.handle(begin(5, &[1, 2], Role::Receiver)).expect("begins");
    assert_eq!(
        p.handle(Event::Stable(5)),
        Ok(vec![InstallSnapshot { epoch: 5 }, ReleaseHeld { epoch: 5 }, DropSent { epoch: 5 }]),
        "released requests route by the new epoch"
    );
    assert_eq!(p.phase(), Phase::Idle);
}

#[test]
fn a_redelivered_or_old_begin_does_not_restart_an_epoch() {
    let mut p = Period::new(n(1));
    p.handle(begin(5, &[1], Role::Bystander)).expect("begins");
    for event in [
        Event::BeforeDone(A),
        Event::BeforeDone(B),
        Event::AfterDone(A),
        Event::AfterDone(B),
        Event::ReleasedDone(A),
        Event::ReleasedDone(B),
        Event::Stable(5),
    ] {
        p.handle(event).expect("runs");
    }
    assert_eq!(
        p.handle(begin(5, &[1, 2], Role::Both)),
        Err(AdaptationError::Stale { last: 5, got: 5 })
    );
    assert_eq!(
        p.handle(begin(3, &[1, 2], Role::Both)),
        Err(AdaptationError::Stale { last: 5, got: 3 })
    );
    assert_eq!(p.phase(), Phase::Idle);
    assert!(p.handle(begin(6, &[1], Role::Bystander)).is_ok());
}

#[test]
fn a_death_reported_before_the_change_begins_is_remembered() {
    let mut p = Period::new(n(1));
    let dead = Event::ParticipantFailed { node: n(3), epoch: 5 };
    script(&mut p, vec![(dead, vec![]), (ack(2, 5), vec![])]);
    assert_eq!(prepare(&mut p, 5, &[1, 2, 3], Role::Receiver), snapshot_and_acks(5, &[1, 2]));
    script(&mut p, vec![(ack(1, 5), vec![AfterMigration(A), AfterMigration(B)])]);
}

#[test]
fn a_node_the_cluster_went_on_without_after_it_released_does_not_release_twice() {
    let mut p = released_alone(5);
    script(
        &mut p,
        vec![(Event::ReleasedDone(A), vec![]), (Event::Stable(5), vec![DropSent { epoch: 5 }])],
    );
    assert_eq!(p.phase(), Phase::Idle);
    assert_eq!(
        p.handle(Event::ReleasedDone(B)),
        Err(AdaptationError::Unexpected { service: 2, phase: "after_release" }),
        "the change ended without it"
    );
}

#[test]
fn a_node_without_services_releases_and_reports_at_once() {
    let mut p = Period::new(n(1));
    let begun = p.handle(Event::Begin {
        epoch: 3,
        participants: nodes(&[1]),
        services: Vec::new(),
        role: Role::Both,
    });
    assert_eq!(
        begun,
        Ok(vec![
            HoldMovingKeys { epoch: 3 },
            InstallSnapshot { epoch: 3 },
            SendAck { to: n(1), epoch: 3 },
        ])
    );
    script(&mut p, vec![(ack(1, 3), vec![ReleaseHeld { epoch: 3 }, ReportDone { epoch: 3 }])]);
    assert_eq!(p.phase(), Phase::Done);
}
