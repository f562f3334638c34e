use super::*;

fn members(ids: &[u64]) -> BTreeSet<u64> {
    ids.iter().copied().collect()
}

fn confirms(actions: &[Action]) -> Vec<&Action> {
    actions.iter().filter(|a| !matches!(a, Action::Ping(_))).collect()
}

#[test]
fn silence_is_shown_from_late_on_and_suspects_are_marked() {
    let start = Instant::now();
    let late = Duration::from_millis(500);
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3]);
    d.handle_tick(start, &m);
    let at = |ms| start + Duration::from_millis(ms);
    d.handle_pong(3, at(400));
    assert!(d.silent(at(450), late).is_empty(), "nobody late yet");
    let silent = d.silent(at(600), late);
    assert_eq!(silent, BTreeMap::from([(2, (Duration::from_millis(600), false))]));
    d.handle_pong(3, at(1000));
    assert_eq!(confirms(&d.handle_tick(at(1000), &m)).len(), 1, "node 2 is suspected");
    assert_eq!(d.silent(at(1000), late)[&2], (Duration::from_secs(1), true));
    assert!(!d.silent(at(1000), late).contains_key(&3), "node 3 answered");
    d.handle_probes(2, &[true], at(1100));
    assert!(d.silent(at(1100), late).is_empty(), "a witness reached node 2");
}

#[test]
fn a_node_that_answers_is_never_suspected() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3]);
    for tick in 0..50u64 {
        let now = start + Duration::from_millis(tick * 100);
        let actions = d.handle_tick(now, &m);
        assert_eq!(actions, vec![Action::Ping(2), Action::Ping(3)]);
        d.handle_pong(2, now);
        d.handle_pong(3, now);
    }
}

#[test]
fn a_silent_node_is_confirmed_by_witnesses_then_declared_failed() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3, 4]);
    d.handle_tick(start, &m);
    let later = start + Duration::from_millis(999);
    d.handle_pong(3, later);
    d.handle_pong(4, later);
    assert!(confirms(&d.handle_tick(later, &m)).is_empty(), "not yet: 999 ms");
    let at = start + Duration::from_secs(1);
    let actions = d.handle_tick(at, &m);
    assert_eq!(confirms(&actions), vec![&Action::Confirm { suspect: 2, witnesses: vec![3, 4] }]);
    // While confirming, the suspect is not confirmed twice.
    assert!(confirms(&d.handle_tick(at + Duration::from_millis(100), &m)).is_empty());
    assert_eq!(d.handle_probes(2, &[false, false], at), Some(Action::DeclareFailed(2)));
}

/// After the whole cluster stopped, the leader's life and another voter's have ended, and
/// node 3 is the last member: it is judged by that voter's probe, not by the leader's
/// silence alone.
#[test]
fn the_last_member_is_confirmed_by_a_voter_that_is_no_member() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let (m, also) = (members(&[3]), members(&[2]));
    d.handle_tick_asking(start, &m, &also);
    let at = start + Duration::from_secs(1);
    assert_eq!(
        confirms(&d.handle_tick_asking(at, &m, &also)),
        vec![&Action::Confirm { suspect: 3, witnesses: vec![2] }]
    );
    // With other members, all suspects at once, the verdicts wait: no voter outside them
    // decides.
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m2 = members(&[1, 2, 3]);
    d.handle_tick_asking(start, &m2, &members(&[4]));
    let actions = d.handle_tick_asking(at, &m2, &members(&[4]));
    assert_eq!(
        confirms(&actions),
        vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }],
        "node 3, a suspect too, waits for node 2's verdict"
    );
    // Asked nobody, the leader declares it at once.
    let mut alone = Detector::new(1, Duration::from_secs(1), 2);
    alone.handle_tick(start, &m);
    assert_eq!(confirms(&alone.handle_tick(at, &m)), vec![&Action::DeclareFailed(3)]);
}

#[test]
fn a_suspect_a_witness_reaches_gets_another_full_timeout() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3]);
    d.handle_tick(start, &m);
    let at = start + Duration::from_secs(1);
    d.handle_pong(3, at);
    assert_eq!(
        confirms(&d.handle_tick(at, &m)),
        vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }]
    );
    assert_eq!(d.handle_probes(2, &[true], at), None);
    d.handle_pong(3, at + Duration::from_millis(900));
    assert!(confirms(&d.handle_tick(at + Duration::from_millis(900), &m)).is_empty());
}

#[test]
fn a_suspect_only_witnesses_reach_is_declared_cut_off_after_a_few_rounds() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3]);
    d.handle_tick(start, &m);
    let mut at = start;
    for round in 1..=CUT_OFF_ROUNDS {
        at += Duration::from_secs(1);
        d.handle_pong(3, at);
        assert_eq!(
            confirms(&d.handle_tick(at, &m)),
            vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }],
            "round {round}"
        );
        let verdict = d.handle_probes(2, &[true], at);
        if round < CUT_OFF_ROUNDS {
            assert_eq!(verdict, None, "round {round}");
        } else {
            assert_eq!(verdict, Some(Action::DeclareCutOff(2)));
        }
    }
}

#[test]
fn a_suspect_the_leader_hears_again_starts_its_count_afresh() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3]);
    d.handle_tick(start, &m);
    let mut at = start;
    for round in 0..CUT_OFF_ROUNDS * 3 {
        at += Duration::from_secs(1);
        d.handle_pong(3, at);
        assert!(!confirms(&d.handle_tick(at, &m)).is_empty(), "suspected in round {round}");
        assert_eq!(d.handle_probes(2, &[true], at), None, "round {round}");
        // Every other round, one ping gets through.
        if round % 2 == 1 {
            d.handle_pong(2, at);
        }
    }
}

#[test]
fn several_nodes_only_the_leader_misses_are_not_declared() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3, 4, 5]);
    d.handle_tick(start, &m);
    let mut at = start;
    let mut withheld = 0;
    for round in 1..=CUT_OFF_ROUNDS * 2 {
        at += Duration::from_secs(1);
        d.handle_pong(4, at);
        d.handle_pong(5, at);
        let suspects: Vec<u64> = confirms(&d.handle_tick(at, &m))
            .iter()
            .filter_map(|a| match a {
                Action::Confirm { suspect, .. } => Some(*suspect),
                _ => None,
            })
            .collect();
        assert_eq!(suspects, vec![2, 3], "round {round}");
        let verdicts = [d.handle_probes(2, &[true], at), d.handle_probes(3, &[true], at)];
        for verdict in verdicts.into_iter().flatten() {
            assert_eq!(verdict, Action::Withheld(vec![2, 3]), "round {round}");
            withheld += 1;
        }
    }
    assert!(withheld > 0, "the two were never found cut off together, so nothing was withheld");
    // Node 3 leaves the members: node 2 is declared only after as many rounds alone.
    let m = members(&[1, 2, 4, 5]);
    for round in 1..=CUT_OFF_ROUNDS {
        at += Duration::from_secs(1);
        d.handle_pong(4, at);
        d.handle_pong(5, at);
        assert!(!confirms(&d.handle_tick(at, &m)).is_empty(), "suspected in round {round}");
        let verdict = d.handle_probes(2, &[true], at);
        let expected = (round == CUT_OFF_ROUNDS).then_some(Action::DeclareCutOff(2));
        assert_eq!(verdict, expected, "alone, round {round}");
    }
}

#[test]
fn in_a_cluster_of_two_the_leader_decides_alone() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2]);
    d.handle_tick(start, &m);
    let actions = d.handle_tick(start + Duration::from_secs(2), &m);
    assert_eq!(confirms(&actions), vec![&Action::DeclareFailed(2)]);
}

/// Both other nodes of three silent: the first is confirmed through the second, and the
/// second is not declared for want of a witness. Declared at once, as it was, a node
/// resumed a moment after the leader lost its life with the one that had really died.
#[test]
fn a_node_is_not_declared_for_want_of_witnesses_while_the_others_are_suspects_too() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    let m = members(&[1, 2, 3]);
    let mut at = start;
    while at < start + Duration::from_secs(1) {
        assert!(confirms(&d.handle_tick(at, &m)).is_empty(), "not yet");
        at += Duration::from_millis(100);
    }
    assert_eq!(
        confirms(&d.handle_tick(at, &m)),
        vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }]
    );
    // Node 3 answers; node 2 is dead.
    d.handle_pong(3, at);
    assert_eq!(d.handle_probes(2, &[false], at), Some(Action::DeclareFailed(2)));
    at += Duration::from_millis(100);
    // Node 2 is asked about again until its failure commits; node 3 was heard.
    assert_eq!(
        confirms(&d.handle_tick(at, &m)),
        vec![&Action::Confirm { suspect: 2, witnesses: vec![3] }]
    );
}

#[test]
fn nodes_that_left_are_forgotten() {
    let start = Instant::now();
    let mut d = Detector::new(1, Duration::from_secs(1), 2);
    d.handle_tick(start, &members(&[1, 2, 3]));
    let actions = d.handle_tick(start + Duration::from_secs(5), &members(&[1, 3]));
    assert_eq!(confirms(&actions), vec![&Action::DeclareFailed(3)]);
    assert_eq!(d.handle_probes(2, &[false], start), None, "no longer a member");
}
