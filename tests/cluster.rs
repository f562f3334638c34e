//! Black-box tests of the real `gobelins` binary: agents as separate processes on 127.0.0.x,
//! real TCP, kill -9 and a restart from the data directory.

use gobelins::kvdir;
use serde_json::Value;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn five_agents_join_leave_die_and_come_back_with_one_configuration() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let addrs: Vec<String> = (1..=5).map(|i| free_addr(&format!("127.0.0.{i}"))).collect();

    let first = start(root.path(), 1, &addrs[0], &["--bootstrap"]);
    wait_until("the bootstrap node", limit, || stable_with(&first.dir, &[(1, "active", 1)]));

    // A second bootstrap of the same data directory, while its agent runs, is refused with
    // that (a stopped one's directory is refused as holding a cluster: `agent_start.rs`).
    let again = Command::new(BIN)
        .args(["agent", "--listen", "127.0.0.1:1", "--bootstrap", "--data-dir"])
        .arg(&first.dir)
        .output()
        .expect("run");
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("an agent is already running"), "{said}");

    let secret = first.secret();
    let secret = secret.as_str();
    let mut agents = vec![first];
    for i in 2..=5u64 {
        let seed = addrs[0].clone();
        agents.push(start(
            root.path(),
            i,
            &addrs[i as usize - 1],
            &["--join", &seed, "--secret-file", secret],
        ));
    }
    let all_active: Vec<(u64, &str, u64)> = (1..=5).map(|i| (i, "active", 1)).collect();
    wait_until("five active nodes", limit, || stable_with(&agents[0].dir, &all_active));
    wait_until("five voters", limit, || {
        status(&agents[0].dir, false)
            .is_some_and(|s| s["voters"].as_array().map_or(0, Vec::len) == 5)
    });

    // Before it does, `plan` shows what its leave would move: only node 5 sends, and nothing
    // is carried out.
    let planned = cli(&agents[4].dir, &["plan", "leave", "--json"]);
    assert!(planned.status.success(), "plan: {}", String::from_utf8_lossy(&planned.stderr));
    let planned: Value = serde_json::from_slice(&planned.stdout).expect("one JSON object");
    assert_eq!(planned["own_view"], false, "{planned}");
    let planned = &planned["preview"];
    assert_eq!(planned["outcome"], "begins", "{planned}");
    assert_eq!(planned["change"], serde_json::json!({ "Evict": 5 }), "{planned}");
    let epoch_now = planned["epoch_now"].as_u64().expect("an epoch");
    assert_eq!(planned["epoch"].as_u64(), Some(epoch_now + 1), "{planned}");
    let moves = planned["plan"]["services"].as_array().expect("services").iter();
    let moves: Vec<&Value> = moves.flat_map(|s| s["moves"].as_array().expect("moves")).collect();
    assert!(!moves.is_empty(), "{planned}");
    assert!(moves.iter().all(|m| m["from"] == 5 && m["to"] != 5), "{planned}");
    let shown = cli(&agents[0].dir, &["plan", "evict", "4"]);
    assert!(shown.status.success(), "plan: {}", String::from_utf8_lossy(&shown.stderr));
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.starts_with("evict n4: ") && shown.contains("n4 -> n"), "{shown}");
    assert!(shown.ends_with("nothing was carried out\n"), "{shown}");
    let refused = cli(&agents[0].dir, &["plan", "evict", "9"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("node 9 is not a member"), "{said}");
    // What `evict` would refuse, `plan` refuses too.
    let own = cli(&agents[0].dir, &["plan", "evict", "1"]);
    assert!(!own.status.success());
    let said = String::from_utf8_lossy(&own.stderr);
    assert!(said.contains("node 1 is this agent's own node: `gobelins leave`"), "{said}");
    let after = status(&agents[0].dir, false).expect("status");
    assert_eq!(after["epoch"].as_u64(), Some(epoch_now), "a plan carries nothing out: {after}");
    assert!(stable_with(&agents[0].dir, &all_active), "a plan carries nothing out");

    // Node 5 leaves gracefully: the command returns once it has left.
    let leave = cli(&agents[4].dir, &["leave"]);
    let said = String::from_utf8_lossy(&leave.stderr);
    assert!(leave.status.success(), "leave: {said}");
    // Shown as the leave it is, not as the eviction the cluster records (when a progress
    // line caught the change under way, as it does but on a very quick leave).
    assert!(!said.contains("evict n5"), "{said}");
    // Left already; stable once what the cluster queued after it (a rebalance) is done.
    wait_until("node 5 left", limit, || stable_with(&agents[0].dir, &[(5, "left", 1)]));
    let exited = agents[4].child.as_mut().expect("child").wait().expect("wait");
    assert!(exited.success(), "a node that left exits cleanly");
    agents[4].child = None;
    // Told apart from an eviction: in the record, and in the leaver's last line.
    let view = status(&agents[0].dir, false).expect("status");
    let nodes = view["nodes"].as_array().expect("nodes");
    let five = nodes.iter().find(|n| n["id"] == 5).expect("node 5");
    assert_eq!(five["removed_by"], "leave", "{five}");
    let last = log_of(&agents[4]);
    assert!(last.contains("this node left the cluster (`gobelins leave`)"), "{last}");

    // Node 3 dies without a word.
    agents[2].child.as_mut().expect("child").kill().expect("kill -9");
    agents[2].child.as_mut().expect("child").wait().expect("reap");
    agents[2].child = None;
    wait_until("node 3 declared failed", limit, || {
        stable_with(&agents[0].dir, &[(3, "failed", 1)])
    });

    // Restarted from its data directory, it fences itself and rejoins as a new incarnation.
    agents[2].child = Some(spawn(&agents[2], &[]));
    wait_until("node 3 back", limit, || stable_with(&agents[0].dir, &[(3, "active", 2)]));

    // A peer with the wrong secret is refused, and both sides say so.
    let wrong = root.path().join("wrong.secret");
    let text = std::fs::read_to_string(secret).expect("secret");
    let cluster = text.split_whitespace().nth(1).expect("cluster id");
    std::fs::write(&wrong, format!("gobelins-cluster-v1 {cluster} {}\n", "ab".repeat(32)))
        .expect("write");
    let intruder = Command::new(BIN)
        .args(["agent", "--listen", &free_addr("127.0.0.6"), "--join", &addrs[0], "--secret-file"])
        .arg(&wrong)
        .arg("--data-dir")
        .arg(root.path().join("n6"))
        .output()
        .expect("run intruder");
    assert!(!intruder.status.success());
    assert!(String::from_utf8_lossy(&intruder.stderr).contains("the secret files differ"));
    assert!(!root.path().join("n6/cluster.secret").exists(), "a refused join keeps no secret");

    // A peer sending garbage, and one announcing a 2 GiB frame, are refused.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: gobelins\r\n\r\n".to_vec(),
        vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3],
    ] {
        let mut stream = TcpStream::connect(&addrs[0]).expect("connect");
        stream.write_all(&junk).expect("write junk");
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    wait_until("the garbage refusals in the log", limit, || {
        log_of(&agents[0]).matches("refused an incoming connection").count() >= 3
    });

    // The node that left comes back when started again with --join: a new life of itself.
    agents[4].child = Some(spawn(&agents[4], &["--join", &addrs[0]]));
    wait_until("node 5 back", limit, || stable_with(&agents[0].dir, &[(5, "active", 2)]));

    // Another process claiming node 2's id from another address is refused, and leaves.
    let impostor = Command::new(BIN)
        .args(["agent", "--listen", &free_addr("127.0.0.7"), "--node-id", "2", "--join", &addrs[0]])
        .args(["--secret-file", secret, "--data-dir"])
        .arg(root.path().join("n7"))
        .output()
        .expect("run impostor");
    assert!(!impostor.status.success());
    let said = String::from_utf8_lossy(&impostor.stderr);
    assert!(said.contains("node id 2 is in use by the member at"), "{said}");

    // Every live node holds the same configuration, and the agents are all still running.
    let expected: Vec<(u64, &str, u64)> = vec![
        (1, "active", 1),
        (2, "active", 1),
        (3, "active", 2),
        (4, "active", 1),
        (5, "active", 2),
    ];
    for agent in agents.iter().filter(|a| a.child.is_some()) {
        wait_showing(&agents, &format!("node {} to catch up", agent.id), limit, || {
            status(&agent.dir, true).is_some_and(|s| {
                s["stable"] == true
                    && expected
                        .iter()
                        .all(|(id, st, inc)| node_status(&s, *id) == Some((st.to_string(), *inc)))
            })
        });
    }
    let epochs: Vec<u64> = agents
        .iter()
        .filter(|a| a.child.is_some())
        .map(|a| status(&a.dir, true).expect("status")["epoch"].as_u64().expect("epoch"))
        .collect();
    assert!(epochs.windows(2).all(|w| w[0] == w[1]), "epochs differ: {epochs:?}");
    for agent in agents.iter_mut().filter(|a| a.child.is_some()) {
        assert!(
            agent.child.as_mut().expect("child").try_wait().expect("poll").is_none(),
            "node {} died",
            agent.id
        );
    }
}

/// Three agents on 127.0.0.1-3, nodes 1 (bootstrap), 2 and 3, active and stable.
fn three_agents(root: &Path, limit: Duration) -> Vec<Agent> {
    three_agents_with(root, limit, &[])
}

/// [`three_agents`], each agent started with `extra` too.
fn three_agents_with(root: &Path, limit: Duration, extra: &[&str]) -> Vec<Agent> {
    agents_with(root, 3, limit, extra)
}

/// `count` agents on 127.0.0.1 and up, nodes 1 (bootstrap) to `count`, each started with
/// `extra`, active, stable and voting.
fn agents_with(root: &Path, count: u64, limit: Duration, extra: &[&str]) -> Vec<Agent> {
    let places = (1..=count).map(|i| (free_addr(&format!("127.0.0.{i}")), None)).collect();
    agents_at(root, places, limit, extra)
}

#[test]
fn a_node_refused_for_its_id_is_admitted_when_started_again_with_another() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let first = start(root.path(), 1, &free_addr("127.0.0.1"), &["--bootstrap"]);
    wait_until("the bootstrap node", limit, || stable_with(&first.dir, &[(1, "active", 1)]));
    let secret = first.secret();
    let secret = secret.as_str();
    let join = ["--join", first.addr.as_str(), "--secret-file", secret];
    // Node 1's id, from another address: refused, with advice to pick another id.
    let mut second = unstarted(root.path(), 2, free_addr("127.0.0.2"));
    second.id = 1;
    let refused = spawn(&second, &join).wait_with_output().expect("run the agent");
    assert!(!refused.status.success(), "node id 1 is taken");
    assert!(log_of(&second).contains("another --node-id"), "{}", log_of(&second));
    // The advice, followed with the same directory, works.
    second.id = 2;
    second.child = Some(spawn(&second, &join));
    wait_until("node 2 admitted", limit, || {
        stable_with(&first.dir, &[(1, "active", 1), (2, "active", 1)])
    });
}

#[test]
fn a_bootstrap_that_failed_on_a_taken_port_can_be_run_again_on_another() {
    let root = tempfile::tempdir().expect("temporary directory");
    let taken = TcpListener::bind(("127.0.0.1", 0)).expect("bind a port");
    let taken_addr = taken.local_addr().expect("address").to_string();
    let mut agent = unstarted(root.path(), 1, taken_addr);
    let failed = spawn(&agent, &["--bootstrap"]).wait_with_output().expect("run the agent");
    assert!(!failed.status.success(), "the port was taken");
    agent.addr = free_addr("127.0.0.1");
    agent.child = Some(spawn(&agent, &["--bootstrap"]));
    wait_until("the second bootstrap", Duration::from_secs(30), || {
        stable_with(&agent.dir, &[(1, "active", 1)])
    });
    drop(taken);
    // A second agent on the running one's directory is told so, whatever it was asked.
    let mut twin = agent.clone_paths();
    twin.addr = free_addr("127.0.0.1");
    let refused = spawn(&twin, &["--bootstrap"]).wait_with_output().expect("run the agent");
    assert!(!refused.status.success(), "the directory is in use");
    assert!(log_of(&twin).contains("an agent is already running"), "{}", log_of(&twin));
}

/// Labels place nodes in the cell tree only under levels the bootstrap gave. A bootstrap whose
/// own label is no level said it had bootstrapped, and left a cluster without a member.
#[test]
fn a_bootstrap_gives_the_tree_its_label_levels_and_a_label_outside_them_is_refused() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let mut first = unstarted(root.path(), 1, free_addr("127.0.0.1"));
    let refused = spawn(&first, &["--bootstrap", "--label", "zone=a"])
        .wait_with_output()
        .expect("run the agent");
    let said = log_of(&first);
    assert!(!refused.status.success(), "zone is no level: {said}");
    assert!(said.contains("--levels") && said.contains("Nothing was written"), "{said}");
    // Refused before it wrote anything: it left no half-bootstrapped directory behind.
    assert!(!first.dir.join("cluster.secret").exists() && !first.dir.join("node.id").exists());
    let twice = spawn(&first, &["--bootstrap", "--levels", "zone,zone"]).wait().expect("runs");
    assert!(!twice.success() && log_of(&first).contains("named twice"), "{}", log_of(&first));
    let own = spawn(&first, &["--join", &first.addr.clone()]).wait().expect("runs");
    let said = log_of(&first);
    assert!(!own.success() && said.contains("this agent's own address"), "{said}");
    first.child = Some(spawn(&first, &["--bootstrap", "--label", "zone=a", "--levels", "zone"]));
    wait_showing(std::slice::from_ref(&first), "the bootstrap finished", limit, || {
        stable_with(&first.dir, &[(1, "active", 1)])
    });
    let secret = first.secret();
    let join = |label: &str| {
        ["--join", first.addr.as_str(), "--secret-file", &secret, "--label", label]
            .map(str::to_string)
    };
    let mut second = unstarted(root.path(), 2, free_addr("127.0.0.2"));
    let refused = spawn(&second, &join("rack=3").each_ref().map(String::as_str))
        .wait_with_output()
        .expect("run the agent");
    assert!(!refused.status.success(), "rack is no level");
    assert!(
        log_of(&second).contains("not a level of this tree (levels: [zone])"),
        "{}",
        log_of(&second)
    );
    second.child = Some(spawn(&second, &join("zone=b").each_ref().map(String::as_str)));
    wait_until("node 2 admitted", limit, || {
        stable_with(&first.dir, &[(1, "active", 1), (2, "active", 1)])
    });
    let shown = status(&first.dir, false).expect("status");
    assert_eq!(shown["levels"], serde_json::json!(["zone"]));
    let tree = shown["tree"].as_str().unwrap_or("");
    assert!(tree.contains("zone=a") && tree.contains("zone=b"), "{tree}");

    // Restarted with a key that is no level, node 2 cannot rejoin: it stops and says why,
    // where it asked again for ever and said it waited for a quorum.
    second.kill();
    let mut child = spawn(&second, &["--label", "rack=3"]);
    let status = exit_within(&mut child, limit);
    assert!(!status.success(), "{}", log_of(&second));
    assert!(log_of(&second).contains("refused this node's rejoin"), "{}", log_of(&second));
}

/// One node of two leaves: the other must keep a raft quorum of its own. The leaver stopped on
/// a timer once it had left, while it was still one of two voters, and the survivor could
/// commit nothing again: not the change of voters, not a join. Two nodes now have one voter,
/// the bootstrap node here, and it is the one that leaves: the vote must pass to the other.
#[test]
fn the_survivor_of_a_two_node_cluster_one_leaves_still_admits_a_node() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let (mut agents, secret) = two_agents(root.path(), limit);

    // The bootstrap node leaves: the leader, most likely, which must hand over to the other.
    let leave = cli(&agents[0].dir, &["leave"]);
    assert!(leave.status.success(), "leave: {}", String::from_utf8_lossy(&leave.stderr));
    let exited = exit_within(agents[0].child.as_mut().expect("child"), limit);
    assert!(exited.success(), "a node that left exits cleanly");
    agents[0].child = None;

    let join = ["--join", agents[1].addr.as_str(), "--secret-file", secret.as_str()];
    agents.push(start(root.path(), 3, &free_addr("127.0.0.3"), &join));
    wait_showing(&agents, "node 3 admitted by the survivor alone", limit, || {
        stable_with(&agents[1].dir, &[(1, "left", 1), (2, "active", 1), (3, "active", 1)])
    });
}

/// A node evicted while it answers nothing (stopped) cannot hand its entries over; the cluster
/// declares it failed and rebuilds them from replicas. The eviction then ends, and says why,
/// instead of waiting out its minute for a "left" that never comes and reporting a failure.
#[test]
fn evicting_a_node_that_fails_on_its_way_out_ends_once_it_is_declared_failed() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    // Node 3 is declared failed only after the second `evict` was asked, on a slow machine too.
    let agents = three_agents_with(root.path(), limit, &["--failure-timeout-ms", "3000"]);
    // The node the operator is on is not evicted by a slip of the id: `leave` is its way out.
    let own = cli(&agents[0].dir, &["evict", "1"]);
    let said = String::from_utf8_lossy(&own.stderr);
    assert!(!own.status.success() && said.contains("`gobelins leave`"), "{said}");
    signal(&agents[2], "-STOP");
    let started = Instant::now();
    let first = agents[0].dir.clone();
    let evict = std::thread::spawn(move || cli(&first, &["evict", "3"]));
    // Asked again through another member meanwhile: followed, not refused.
    wait_until("node 3 leaving", limit, || {
        status(&agents[0].dir, false)
            .is_some_and(|s| node_status(&s, 3).is_some_and(|(st, _)| st == "leaving"))
    });
    let again = cli(&agents[1].dir, &["evict", "3"]);
    let evict = evict.join().expect("the first evict returns");
    let took = started.elapsed();
    signal(&agents[2], "-CONT");
    let said = String::from_utf8_lossy(&evict.stderr);
    assert!(evict.status.success(), "evict: {said}{}", evidence(&agents));
    assert!(said.contains("failed before it was out"), "{said}");
    assert!(took < Duration::from_secs(50), "ended once declared failed: {took:?}");
    let said_again = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "asked again: {said_again}");
    assert!(said_again.contains("already on its way out"), "{said_again}");
    assert!(said.contains("keeps it out"), "{said}");
    // Running again, it learns that its life ended while it was asked out, and stops as left,
    // as does a start of its data directory: it came back as a member, against the eviction.
    let mut agents = agents;
    let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
    assert!(exited.success(), "a node evicted while stopped stops once it runs: {exited}");
    agents[2].child = Some(spawn(&agents[2], &[]));
    let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
    assert!(exited.success(), "and started again, stops: {exited}{}", log_of(&agents[2]));
    agents[2].child = None;
    wait_until("node 3 failed, the cluster stable", limit, || {
        stable_with(&agents[0].dir, &[(3, "failed", 1)])
    });
}

/// A node killed, declared failed, then evicted (its operator tidying up, or the unit about to
/// start it again): the eviction keeps it out. Started again from its data directory by a unit,
/// it stops as left, saying why and how to bring it back; it came back as a member, though
/// the eviction had ended (a helper's black-box test). `--join` brings it back.
#[test]
fn a_node_evicted_once_it_failed_stays_out_when_started_again_until_asked_back() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let mut agents = three_agents_with(root.path(), limit, &["--failure-timeout-ms", "1500"]);
    agents[2].child.as_mut().expect("child").kill().expect("kill -9");
    agents[2].child.as_mut().expect("child").wait().expect("reap");
    agents[2].child = None;
    wait_until("node 3 failed, the cluster stable", limit, || {
        stable_with(&agents[0].dir, &[(3, "failed", 1)])
    });
    let evict = cli(&agents[0].dir, &["evict", "3"]);
    let said = String::from_utf8_lossy(&evict.stderr);
    assert!(evict.status.success(), "evict: {said}");
    assert!(said.contains("failed already") && said.contains("keeps it out"), "{said}");
    let shown = cli(&agents[1].dir, &["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("node 3 is kept out"), "{shown}");
    for start in 1..=2 {
        agents[2].child = Some(spawn(&agents[2], &["--failure-timeout-ms", "1500"]));
        let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
        let log = log_of(&agents[2]);
        assert!(exited.success(), "start {start}: an evicted node stops: {exited}{log}");
        agents[2].child = None;
        let said = log.matches("this node's last life was asked out of the cluster").count();
        assert_eq!(said, start, "start {start}: {log}");
    }
    let now = status(&agents[0].dir, false).expect("status");
    assert_eq!(node_status(&now, 3), Some(("failed".to_string(), 1)), "{now}");

    // An older copy of its directory (a backup taken before it was asked back), started once
    // it was evicted again, stays out too: it came back (a helper's black-box test).
    let backup = root.path().join("backup");
    copy_files(&agents[2].dir, &backup);
    let secret = agents[0].secret();
    let join = ["--join", agents[0].addr.as_str(), "--secret-file", secret.as_str()];
    agents[2].child = Some(spawn(&agents[2], &join));
    wait_showing(&agents, "node 3 back as a new life", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && node_status(&s, 3).is_some_and(|(st, inc)| st == "active" && inc >= 2)
        })
    });
    agents[2].kill();
    wait_until("node 3 failed again", limit, || {
        status(&agents[0].dir, false)
            .is_some_and(|s| node_status(&s, 3).is_some_and(|(st, inc)| st == "failed" && inc >= 2))
    });
    let evict = cli(&agents[0].dir, &["evict", "3"]);
    assert!(evict.status.success(), "{}", String::from_utf8_lossy(&evict.stderr));
    std::fs::remove_dir_all(&agents[2].dir).expect("remove the directory");
    copy_files(&backup, &agents[2].dir);
    agents[2].child = Some(spawn(&agents[2], &["--failure-timeout-ms", "1500"]));
    let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
    assert!(exited.success(), "an older copy stops: {exited}{}", log_of(&agents[2]));
    agents[2].child = None;
    let now = status(&agents[0].dir, false).expect("status");
    assert!(node_status(&now, 3).is_some_and(|(st, _)| st == "failed"), "{now}");
}

#[test]
fn a_node_restarted_before_anyone_noticed_comes_back_as_a_new_life_and_loses_nothing() {
    restarted_before_anyone_noticed(Restart::Plain);
}

/// The same restart by a unit that always passes `--join`: the same life asking to join again
/// used to be answered as still a member, and served its keys from empty services.
#[test]
fn a_node_restarted_with_join_before_anyone_noticed_comes_back_as_a_new_life_too() {
    restarted_before_anyone_noticed(Restart::Join);
}

/// The same restart of a node that died after its first join was accepted but before it kept
/// the secret: its data directory looked new, so its join was sent as a first one, and the
/// cluster, which counted that life a member, let it back in as the same life.
#[test]
fn a_node_that_died_before_it_kept_the_secret_comes_back_as_a_new_life_too() {
    restarted_before_anyone_noticed(Restart::JoinWithoutTheSecretKept);
}

/// The same with a seed that says nothing for its first seconds: a silent seed was taken to
/// mean "not a member", and the join it answered a moment later admitted the same life again.
#[test]
fn a_node_restarted_with_join_through_a_seed_slow_to_answer_comes_back_as_a_new_life() {
    restarted_before_anyone_noticed(Restart::JoinThroughSilentSeed);
}

/// The same while the rest of the cluster is stopped for longer than one proposal of the last
/// life's failure waits: the node gave up after one, and the cluster waited on it for ever.
#[test]
fn a_node_restarted_while_the_cluster_has_no_quorum_comes_back_once_it_has() {
    restarted_before_anyone_noticed(Restart::WithoutQuorum);
}

/// A node killed, its data directory wiped, and started again with its old id before the
/// cluster noticed: refused rather than served as the life it had, with empty services. Started
/// once more (as a unit that restarts it would), it recovers that life from the replicas and
/// rejoins as a new one, and nothing written is lost.
#[test]
fn a_node_whose_data_directory_was_wiped_is_refused_then_comes_back_as_a_new_life() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    // Slow to declare a failure: the wiped node's first start must find its old life active.
    let timers = ["--failure-timeout-ms", "20000"];
    let mut agents = three_agents_with(root.path(), limit, &timers);
    let keys = 300u64;
    let socket = registered_with_keys(&agents[0].dir, limit, keys);

    let wiped = &mut agents[2];
    wiped.child.as_mut().expect("child").kill().expect("kill -9");
    wiped.child.take().expect("child").wait().expect("reap");
    std::fs::remove_dir_all(&wiped.dir).expect("wipe the data directory");
    let secret = agents[0].secret();
    let join = ["--join", agents[0].addr.as_str(), "--secret-file", secret.as_str()];
    let args = [&join[..], &timers].concat();
    let mut refused = spawn(&agents[2], &args);
    assert!(!exit_within(&mut refused, limit).success(), "the wiped node is refused");
    assert!(log_of(&agents[2]).contains("never served it"), "{}", log_of(&agents[2]));

    agents[2].child = Some(spawn(&agents[2], &args));
    wait_showing(&agents, "node 3 back as a new life", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && node_status(&s, 3).is_some_and(|(st, inc)| st == "active" && inc >= 2)
                && [1, 2].iter().all(|&n| node_status(&s, n).is_some_and(|(st, _)| st == "active"))
        })
    });
    for socket in [socket.clone(), agents[2].dir.join("control.sock")] {
        assert_keys_read_back(&agents, &socket, keys);
    }

    // The same directory from the command line, through another node.
    let dir = &agents[1].dir;
    let put = cli(dir, &["kv", "put", "7", "from the command line"]);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let got = cli(dir, &["kv", "get", "7"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "from the command line");
    // Exit status 1 says "no value", as `grep` says "nothing found"; an error says 2.
    let absent = cli(dir, &["kv", "get", "1000000"]);
    assert_eq!(absent.status.code(), Some(1), "a key never written has no value");
    assert!(String::from_utf8_lossy(&absent.stderr).contains("has no value"));
    let forgiven = cli(dir, &["kv", "forgive", "7"]);
    assert!(forgiven.status.success(), "{}", String::from_utf8_lossy(&forgiven.stderr));
    let reserved = cli(dir, &["kv", "get", &(1u64 << 63).to_string()]);
    assert_eq!(reserved.status.code(), Some(2), "an error is no answer about the key");
    assert!(String::from_utf8_lossy(&reserved.stderr).contains("kvdir's own"));
}

/// A node killed while it leaves (a host rebooted under `gobelins leave`, say) and started again
/// from its data directory (by a unit that restarts it): the cluster recovers its last life
/// from replicas, and the restarted process, whose own log has the leave, ends as left and
/// stops, saying so. The leave was committed, and its operator told it was under way; before,
/// the node came back as a new life and stayed a member (found by an audit). Nothing it held
/// is lost, and the others keep their first lives.
#[test]
fn a_node_killed_while_it_leaves_and_started_again_ends_as_left_and_loses_nothing() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    // Node 2 is stopped below for longer than the default failure timeout may allow on a
    // slow machine; declared failed, it would lose its first life and the test its point.
    let timers = ["--failure-timeout-ms", "10000"];
    let mut agents = three_agents_with(root.path(), limit, &timers);
    let keys = 600u64;
    let socket = registered_with_keys(&agents[0].dir, limit, keys);

    // Node 2 stopped, the leave cannot end: node 2 takes part in it, receiving some of node
    // 3's entries. Node 3 stays leaving until it is killed. `--now`: otherwise the leave
    // waits for node 2 to answer or be declared failed before it is asked for.
    signal(&agents[1], "-STOP");
    let mut leave = Command::new(BIN)
        .arg("leave")
        .arg("--now")
        .arg("--data-dir")
        .arg(&agents[2].dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run gobelins leave");
    // Not `wait_showing`: its evidence asks every agent, and the stopped one never answers.
    // In node 3's own view: its log must hold the leave it is killed in the middle of.
    wait_until("node 3 leaving, in its own view", limit, || {
        status(&agents[2].dir, true)
            .is_some_and(|s| node_status(&s, 3).is_some_and(|(st, _)| st == "leaving"))
    });
    agents[2].child.as_mut().expect("child").kill().expect("kill -9");
    agents[2].child.as_mut().expect("child").wait().expect("reap");
    signal(&agents[1], "-CONT");
    // The CLI's agent died under it: it ends, and not as a leave done.
    let ended = exit_within(&mut leave, limit);
    assert!(!ended.success(), "a leave whose agent was killed is not reported done");

    // Started again twice: the second start's own log shows the life's end, not the leave,
    // and the data directory's record of it keeps the node out.
    for start in 1..=2 {
        agents[2].child = Some(spawn(&agents[2], &timers));
        let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
        assert!(exited.success(), "start {start}: a node whose leave ended stops: {exited}");
        agents[2].child = None;
        let log = log_of(&agents[2]);
        let said = log.matches("this node's last life was asked out of the cluster").count();
        assert_eq!(said, start, "start {start}: {log}");
        // Fence checks run side by side; two writes of the record once raced.
        assert!(!log.contains("cannot record in the data directory"), "{log}");
    }
    wait_showing(&agents, "node 3 failed, not back, the cluster stable", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && node_status(&s, 3).is_some_and(|(st, inc)| st == "failed" && inc == 1)
        })
    });
    let now = status(&agents[0].dir, false).expect("status");
    for node in [1, 2] {
        assert_eq!(
            node_status(&now, node),
            Some(("active".to_string(), 1)),
            "node {node} kept its first life{}",
            evidence(&agents)
        );
    }
    for socket in [socket.clone(), agents[1].dir.join("control.sock")] {
        assert_keys_read_back(&agents, &socket, keys);
    }

    // Asked back with --join, it comes back as a new life: what its last one ended as, and
    // the data directory's record of it, do not keep it out.
    let secret = agents[0].secret();
    let join = ["--join", agents[0].addr.as_str(), "--secret-file", secret.as_str()];
    agents[2].child = Some(spawn(&agents[2], &[&join[..], &timers].concat()));
    wait_showing(&agents, "node 3 back as a new life", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && node_status(&s, 3).is_some_and(|(st, inc)| st == "active" && inc >= 2)
        })
    });
}

/// A node's data directory restored from an older copy (a backup taken in an earlier life) and
/// started before the cluster noticed that the later life died: this process answers at that
/// life's address, so no detector would end it, and the cluster waited on it for ever, a change
/// queued behind (a helper's black-box test: more than ten minutes). The restarted process ends
/// that life, and the node comes back as a new one, losing nothing.
#[test]
fn a_node_started_on_an_older_copy_of_its_directory_ends_its_later_life_and_comes_back() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    // Silence declares no life failed before its restart ends it. The lives are short: the
    // second, ended by the older copy, holds the node out a while, in which the older copy is
    // stopped and started again before it is admitted.
    let timers = ["--failure-timeout-ms", "10000", "--rejoin-hold-ms", "15000"];
    let mut agents = three_agents_with(root.path(), limit, &timers);
    let keys = 600u64;
    let socket = registered_with_keys(&agents[0].dir, limit, keys);
    let backup = root.path().join("backup");
    agents[2].kill();
    copy_files(&agents[2].dir, &backup);
    agents[2].child = Some(spawn(&agents[2], &timers));
    wait_showing(&agents, "node 3 back as its second life", limit, || {
        stable_with(&agents[0].dir, &[(3, "active", 2)])
    });
    agents[2].kill();
    std::fs::remove_dir_all(&agents[2].dir).expect("remove the directory");
    copy_files(&backup, &agents[2].dir);
    agents[2].child = Some(spawn(&agents[2], &timers));
    // Until the older copy is admitted, its raft store is behind what the node voted in its
    // later life, and it must grant no vote, in this process or the next: a restart in that
    // window voted again on the older store.
    let mark = agents[2].dir.join("older-copy");
    wait_showing(&agents, "the later life ended", limit, || {
        log_of(&agents[2]).contains("the cluster had life 2 of it")
    });
    assert!(mark.exists(), "the older copy is marked before it ends the later life");
    agents[2].kill();
    agents[2].child = Some(spawn(&agents[2], &timers));
    wait_showing(&agents, "the restart refusing votes", limit, || {
        log_of(&agents[2]).contains("it grants no raft vote and stands for no election")
    });
    wait_showing(&agents, "node 3 back as a life after its second", limit * 2, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && node_status(&s, 3).is_some_and(|(st, inc)| st == "active" && inc >= 3)
        })
    });
    wait_showing(&agents, "the mark cleared once admitted", limit, || !mark.exists());
    let now = status(&agents[0].dir, false).expect("status");
    for node in [1, 2] {
        assert_eq!(node_status(&now, node), Some(("active".to_string(), 1)), "node {node}");
    }
    let log = log_of(&agents[2]);
    assert!(log.contains("is an older copy of this node's"), "{log}");
    for socket in [socket.clone(), agents[2].dir.join("control.sock")] {
        assert_keys_read_back(&agents, &socket, keys);
    }

    // Left since, the node stays out when the older copy is started again: it waited for
    // ever for the cluster to end a life that had ended (a helper's black-box test).
    let leave = cli(&agents[2].dir, &["leave"]);
    assert!(leave.status.success(), "{}", String::from_utf8_lossy(&leave.stderr));
    let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
    assert!(exited.success(), "the leaver stops: {exited}");
    std::fs::remove_dir_all(&agents[2].dir).expect("remove the directory");
    copy_files(&backup, &agents[2].dir);
    agents[2].child = Some(spawn(&agents[2], &timers));
    let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
    let log = log_of(&agents[2]);
    assert!(exited.success(), "an older copy of a node that left stops: {exited}{log}");
    agents[2].child = None;
    assert!(log.contains("the node left the cluster in a later life"), "{log}");
}

/// A data directory restored from an older copy on another machine (another address) while
/// the node's later life still runs: the members refuse it, and it says why, where it said only
/// that no leader answered. Once that life is gone, the copy comes back as a new life, and
/// grants no raft vote until it is admitted, for its raft store is behind what that life voted.
#[test]
fn an_older_copy_on_another_address_says_its_id_is_in_use_and_comes_back_once_that_life_is_gone() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    // The node's lives are short: the second one's failure holds it out a while, in which the
    // older copy waits to be admitted.
    let timers = ["--failure-timeout-ms", "3000", "--rejoin-hold-ms", "15000"];
    let mut agents = three_agents_with(root.path(), limit, &timers);
    let keys = 200u64;
    let socket = registered_with_keys(&agents[0].dir, limit, keys);
    agents[2].kill();
    let mut twin = unstarted(&root.path().join("elsewhere"), 3, free_addr("127.0.0.4"));
    copy_files(&agents[2].dir, &twin.dir);
    agents[2].child = Some(spawn(&agents[2], &timers));
    wait_showing(&agents, "node 3 back as its second life", limit, || {
        stable_with(&agents[0].dir, &[(3, "active", 2)])
    });
    twin.child = Some(spawn(&twin, &timers));
    wait_showing(&agents, "the older copy told why it is refused", limit, || {
        log_of(&twin).contains("the cluster's members refuse this node's connections, saying")
    });
    assert!(log_of(&twin).contains("node id 3 is in use by the member at"), "{}", log_of(&twin));
    // Nor is it told to mend a network that works.
    assert!(!log_of(&twin).contains("mend the network"), "{}", log_of(&twin));
    let mark = twin.dir.join("older-copy");
    assert!(!mark.exists(), "nothing learned yet of a later life");
    agents[2].kill();
    wait_showing(&agents, "the older copy marked once it learns of the later life", limit, || {
        mark.exists()
    });
    wait_showing(&agents, "node 3 back at its new address", limit * 2, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            let at = s["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == 3).cloned());
            s["stable"] == true
                && node_status(&s, 3).is_some_and(|(st, inc)| st == "active" && inc >= 3)
                && at.is_some_and(|n| n["addr"] == twin.addr.as_str())
        })
    });
    wait_showing(&agents, "the mark cleared once admitted", limit, || !mark.exists());
    assert_keys_read_back(&agents, &socket, keys);
}

/// A copy of the leader's data directory, taken while it led and restored after its later
/// life wrote more: openraft started it as the leader of the term it had led, with no
/// election, and its entries parted from the followers' (a helper's black-box run: its state
/// stayed epochs behind theirs, and it waited for ever to be let back in). It stands for
/// election like any restarted node now, and comes back as a new life.
#[test]
fn a_copy_of_the_leader_s_directory_restored_does_not_lead_its_old_term_again() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let timers = ["--failure-timeout-ms", "10000", "--rejoin-hold-ms", "100"];
    let mut agents = three_agents_with(root.path(), limit, &timers);
    let keys = 200u64;
    registered_with_keys(&agents[1].dir, limit, keys);
    assert_eq!(status(&agents[0].dir, false).expect("status")["leader"], 1, "node 1 leads");
    agents[0].kill();
    let backup = root.path().join("backup");
    copy_files(&agents[0].dir, &backup);
    agents[0].child = Some(spawn(&agents[0], &timers));
    wait_showing(&agents, "node 1 back as its second life", limit, || {
        stable_with(&agents[1].dir, &[(1, "active", 2)])
    });
    // More entries, in whatever term node 1's second life saw.
    agents[2].kill();
    agents[2].child = Some(spawn(&agents[2], &timers));
    wait_showing(&agents, "node 3 back as its second life", limit, || {
        stable_with(&agents[1].dir, &[(1, "active", 2), (3, "active", 2)])
    });
    agents[0].kill();
    std::fs::remove_dir_all(&agents[0].dir).expect("remove the directory");
    copy_files(&backup, &agents[0].dir);
    agents[0].child = Some(spawn(&agents[0], &timers));
    // Every node's own state agrees: node 1 back as a life after its second.
    wait_showing(&agents, "the three states agree, node 1 back", limit * 2, || {
        let views: Vec<Value> = agents.iter().filter_map(|a| status(&a.dir, true)).collect();
        views.len() == 3
            && views.iter().all(|v| v["epoch"] == views[0]["epoch"] && v["stable"] == true)
            && views
                .iter()
                .all(|v| node_status(v, 1).is_some_and(|(st, inc)| st == "active" && inc >= 3))
    });
    for agent in &agents {
        assert_keys_read_back(&agents, &agent.dir.join("control.sock"), keys);
    }
}

/// Copies the regular files of directory `from` into `to`, made if missing (an operator's
/// backup of a data directory; its control socket is no file to copy).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("make the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("an entry");
        let kind = entry.file_type().expect("its type");
        if kind.is_dir() {
            copy_files(&entry.path(), &to.join(entry.file_name()));
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a file");
        }
    }
}

/// Waits until kvdir answers through the agent whose data directory is `dir`, then writes keys
/// `0..keys` through it ([`put_keys`]); its control socket.
fn registered_with_keys(dir: &Path, limit: Duration, keys: u64) -> PathBuf {
    let socket = dir.join("control.sock");
    wait_until("kvdir registered", limit, || call(&socket, 0, &kvdir::Request::Get).is_some());
    put_keys(&socket, keys);
    socket
}

/// Writes keys `0..keys` through the agent at `socket`, each key's value its own bytes.
fn put_keys(socket: &Path, keys: u64) {
    for key in 0..keys {
        let put = kvdir::Request::Put(key.to_le_bytes().to_vec());
        assert!(
            matches!(call(socket, key, &put), Some(kvdir::Response::Stored { .. })),
            "write {key}"
        );
    }
}

/// Every key [`put_keys`] wrote reads back as written through the agent at `socket`. On a
/// failure, says how many keys were wrong, not just the first, and what the agents logged:
/// a run that loses keys is rare, and the first sight of it must be enough to start from.
fn assert_keys_read_back(agents: &[Agent], socket: &Path, keys: u64) {
    let wrong: Vec<(u64, Option<kvdir::Response>)> = (0..keys)
        .filter_map(|key| match call(socket, key, &kvdir::Request::Get) {
            Some(kvdir::Response::Value(Some(v))) if v.value[..] == key.to_le_bytes() => None,
            other => Some((key, other)),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {keys} keys through {} did not read back as written; the first: {:?}{}",
        wrong.len(),
        socket.display(),
        &wrong[..wrong.len().min(5)],
        evidence(agents)
    );
}

/// The child's exit status, failing if it has not exited within `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(start.elapsed() < limit, "the agent did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An operator stops a node with SIGTERM and starts it again, twice, each stop seen by the
/// cluster as a failure before the start: the agent told the members each stop was on
/// purpose, so no short life is counted and the node is never held out. Unannounced, the
/// first stop showed in `status` as a failure counted, and the second held the node out.
#[test]
fn a_node_stopped_with_sigterm_and_started_again_twice_is_not_held() {
    stopped_with_sigterm_and_started_again_twice(true);
}

/// The same, each restart at once: the new process, not the leader, ends the life that
/// stopped (it proposes its failure as it starts), and the members judge that failure as one
/// announced all the same.
#[test]
fn a_node_stopped_with_sigterm_and_started_again_at_once_twice_is_not_held() {
    stopped_with_sigterm_and_started_again_twice(false);
}

/// Stops node 3 of three agents with SIGTERM and starts it again, twice, once the others have
/// declared it failed if `seen_failed`, at once otherwise; no failure of it is counted.
fn stopped_with_sigterm_and_started_again_twice(seen_failed: bool) {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let mut agents = three_agents(root.path(), limit);
    for life in 2..=3u64 {
        signal(&agents[2], "-TERM");
        let exited = exit_within(agents[2].child.as_mut().expect("running"), limit);
        assert!(exited.success(), "a stop asked for is a clean exit: {exited}");
        if seen_failed {
            wait_showing(&agents, "node 3 declared failed", limit, || {
                status(&agents[0].dir, false).is_some_and(|s| {
                    s["stable"] == true && node_status(&s, 3).is_some_and(|(st, _)| st == "failed")
                })
            });
        }
        agents[2].child = Some(spawn(&agents[2], &[]));
        wait_showing(&agents, "node 3 back as a new life", limit, || {
            status(&agents[0].dir, false).is_some_and(|s| {
                s["stable"] == true
                    && node_status(&s, 3).is_some_and(|(st, inc)| st == "active" && inc == life)
            })
        });
        let now = status(&agents[0].dir, false).expect("status");
        let three = now["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == 3));
        let three = three.expect("node 3 in the status");
        assert!(three["failures"].is_null(), "life {life}: a failure counted: {three}");
    }
    let log = log_of(&agents[2]);
    assert!(!log.contains("not every member heard"), "{log}");
    // The leader says the failure it declared was a stop asked for, not a crash to look into.
    let leaders = format!("{}{}", log_of(&agents[0]), log_of(&agents[1]));
    if seen_failed {
        assert!(leaders.contains("it said it was stopping on purpose"), "{leaders}");
    }
    assert!(!leaders.contains("silent and unreachable from witnesses"), "{leaders}");
}

/// How node 2 is restarted after its kill -9.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    Plain,
    Join,
    JoinThroughSilentSeed,
    /// With `--join`, from a data directory without the secret or the node's id: as if the
    /// node had died after its first join was accepted, before it kept them.
    JoinWithoutTheSecretKept,
    WithoutQuorum,
}

/// An address that accepts connections and says nothing on them until `opens`, then passes
/// the bytes of each new one both ways to `to`.
fn seed_silent_until(opens: Instant, to: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = listener.local_addr().expect("address").to_string();
    let to = to.to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for client in listener.incoming().flatten() {
            if Instant::now() < opens {
                held.push(client);
                continue;
            }
            let Ok(server) = TcpStream::connect(&to) else { continue };
            let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else { continue };
            for (mut from, mut into) in [(c, s), (server, client)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// Sends `signal` (`-STOP`, `-CONT`) to the agent's process.
fn signal(agent: &Agent, signal: &str) {
    let pid = agent.child.as_ref().expect("running").id().to_string();
    let sent = Command::new("kill").args([signal, &pid]).status().expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

fn restarted_before_anyone_noticed(restart: Restart) {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let mut agents = three_agents(root.path(), limit);
    let socket = agents[0].dir.join("control.sock");
    wait_until("kvdir registered", limit, || call(&socket, 0, &kvdir::Request::Get).is_some());
    // Asking before kvdir was registered counted as failed requests: count from here.
    let failed_before = stats_of(&agents[0].dir)["stats"]["requests_failed"].as_u64();
    assert!(failed_before.is_some(), "stats count failed requests");

    let keys = 600u64;
    put_keys(&socket, keys);

    // Killed and restarted at once, before the failure detector could notice: the process
    // lost its services' memory, so its last life must be recovered like a crash.
    if restart == Restart::WithoutQuorum {
        signal(&agents[0], "-STOP");
        signal(&agents[2], "-STOP");
    }
    agents[1].child.as_mut().expect("child").kill().expect("kill -9");
    agents[1].child.as_mut().expect("child").wait().expect("reap");
    let secret = agents[0].secret();
    let seed = match restart {
        // Silent for longer than the restarted node used to ask before it gave up (3 s).
        Restart::JoinThroughSilentSeed => {
            seed_silent_until(Instant::now() + Duration::from_secs(5), &agents[0].addr)
        }
        _ => agents[0].addr.clone(),
    };
    let join = ["--join", seed.as_str(), "--secret-file", secret.as_str()];
    if restart == Restart::JoinWithoutTheSecretKept {
        std::fs::remove_file(agents[1].dir.join("cluster.secret")).expect("remove the secret");
        std::fs::remove_file(agents[1].dir.join("node.id")).expect("remove the id");
    }
    let with_join = matches!(
        restart,
        Restart::Join | Restart::JoinThroughSilentSeed | Restart::JoinWithoutTheSecretKept
    );
    agents[1].child = Some(spawn(&agents[1], if with_join { &join } else { &[] }));
    if restart == Restart::WithoutQuorum {
        // Its new life cannot be admitted while no majority answers: it says so, rather than
        // that the cluster is stable, and refuses requests for that reason at once.
        wait_until("node 2 says it waits to be admitted", limit, || {
            status(&agents[1].dir, true).is_some_and(|s| {
                s["stable"] == false
                    && s["entering"].as_str().is_some_and(|e| e.contains("admit it as a new one"))
            })
        });
        let refused = cli(&agents[1].dir, &["kv", "get", "1"]);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && said.contains("still entering the cluster"), "{said}");
        // Longer than two proposals of the last life's failure wait for a leader (5 s each).
        std::thread::sleep(Duration::from_secs(13));
        signal(&agents[0], "-CONT");
        signal(&agents[2], "-CONT");
    }
    wait_showing(&agents, "node 2 back as a new life", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && node_status(&s, 2).is_some_and(|(st, inc)| st == "active" && inc >= 2)
                && [1, 3].iter().all(|&n| node_status(&s, n).is_some_and(|(st, _)| st == "active"))
        })
    });
    // Nodes 1 and 3 were never killed: each keeps its first life. Stopped and resumed, a
    // leader once declared the other failed on silence it measured across its own pause, and
    // the entries that node held with node 2 were lost with both.
    let now = status(&agents[0].dir, false).expect("status");
    for node in [1, 3] {
        assert_eq!(
            node_status(&now, node),
            Some(("active".to_string(), 1)),
            "node {node} kept its first life{}",
            evidence(&agents)
        );
    }
    if restart == Restart::JoinWithoutTheSecretKept {
        assert!(agents[1].dir.join("cluster.secret").exists(), "the secret is kept now");
        // Without it, a start without --node-id would have drawn another id at random.
        assert!(agents[1].dir.join("node.id").exists(), "the node's id is kept now");
    }
    for socket in [socket.clone(), agents[1].dir.join("control.sock")] {
        assert_keys_read_back(&agents, &socket, keys);
    }

    // What an operator reads off node 1: every request it sent completed, and it took part in
    // the recovery of node 2's last life.
    let stats = stats_of(&agents[0].dir);
    assert!(stats["stats"]["requests_ok"].as_u64() >= Some(2 * keys), "{stats}");
    assert_eq!(stats["stats"]["requests_failed"].as_u64(), failed_before, "{stats}");
    assert!(stats["changes"].as_array().is_some_and(|c| !c.is_empty()), "{stats}");
    let table = cli(&agents[0].dir, &["stats"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("requests from here:") && table.contains("changes this node took part in"),
        "{table}"
    );
}

fn dsm(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("dsm")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run gobelins")
}

#[test]
fn shared_memory_written_through_one_agent_reads_back_through_the_others_and_survives_a_kill() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let mut agents = three_agents(root.path(), limit);

    // Page 0 of segment 7 and a range across pages 1 and 2, each written by another node.
    let text = "written by node three";
    let across = "x".repeat(5000);
    let writes = [(2usize, "0", text), (1, "4090", across.as_str())];
    wait_until("the DSM registered", limit, || {
        dsm(&agents[1].dir, &["write", "7", "0", text]).status.success()
    });
    for (agent, offset, data) in writes {
        let out = dsm(&agents[agent].dir, &["write", "7", offset, data]);
        assert!(out.status.success(), "write: {}", String::from_utf8_lossy(&out.stderr));
    }
    let read = |agent: &Agent, offset: &str, len: usize| {
        let out = dsm(&agent.dir, &["read", "7", offset, &len.to_string()]);
        assert!(out.status.success(), "read: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("the bytes written")
    };
    for agent in &agents {
        assert_eq!(read(agent, "0", text.len()), text, "through node {}", agent.id);
        assert_eq!(read(agent, "4090", across.len()), across, "through node {}", agent.id);
    }

    // Node 2 rewrites the range, which takes the other nodes' copies away, and dies at once:
    // the pages' only copies were its own, and the backups the agents keep must bring them back.
    let rewritten = "y".repeat(5000);
    let out = dsm(&agents[1].dir, &["write", "7", "4090", &rewritten]);
    assert!(out.status.success(), "rewrite: {}", String::from_utf8_lossy(&out.stderr));
    agents[1].child.as_mut().expect("child").kill().expect("kill -9");
    agents[1].child.as_mut().expect("child").wait().expect("reap");
    wait_showing(&agents, "node 2 declared failed", limit, || {
        stable_with(&agents[0].dir, &[(1, "active", 1), (2, "failed", 1), (3, "active", 1)])
    });
    for agent in [&agents[0], &agents[2]] {
        assert_eq!(read(agent, "0", text.len()), text, "through node {}", agent.id);
        assert_eq!(read(agent, "4090", rewritten.len()), rewritten, "through node {}", agent.id);
    }

    // One failure with backups on: the survivors, asked by `dsm lost`, hold no page lost.
    let out = dsm(&agents[2].dir, &["lost", "--json"]);
    assert!(out.status.success(), "lost: {}", String::from_utf8_lossy(&out.stderr));
    let losses: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(losses["pages"], serde_json::json!([]), "{losses}");
    assert_eq!(losses["nodes"].as_array().map(Vec::len), Some(2), "the survivors: {losses}");
    assert_eq!(losses["settled"], true, "{losses}");

    // A page that is not lost is left as it is by a discard, which only starts lost pages
    // afresh: an operator who discards the wrong page loses nothing.
    let out = dsm(&agents[2].dir, &["discard", "7", "0"]);
    assert!(out.status.success(), "discard: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(&agents[0], "0", text.len()), text, "a discard of a page not lost");

    // Bad input gets a clear refusal: more than the console moves at once.
    let out = dsm(&agents[0].dir, &["read", "7", "0", &(2u64 << 20).to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most"), "{out:?}");

    // Past what a segment holds, the refusal names the limit; a free of any length frees
    // every page, as its help says.
    let out = dsm(&agents[0].dir, &["read", "7", &u64::MAX.to_string(), "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 TiB"), "{out:?}");
    let out = dsm(&agents[0].dir, &["free", "8", &u64::MAX.to_string()]);
    assert!(out.status.success(), "free: {}", String::from_utf8_lossy(&out.stderr));

    // Given back through one node, the segment reads as zeros through the other.
    // Node 2's death tainted the slots it managed: there a page with no entry reads as lost,
    // unless the free gave it a fresh one.
    let out = dsm(&agents[0].dir, &["free", "7", "9090"]);
    assert!(out.status.success(), "free: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(&agents[2], "4090", 5000), "\0".repeat(5000), "freed, read through node 3");
}

/// Node 4 of five leaves as node 5 is killed (`kill -9`). Before, the leave waited 10 s per
/// page whose manager was node 5, 40 to 50 s in all, and about six written pages were lost:
/// those node 4 owned whose manager and backup were both node 5. Now every written page reads
/// back, and the leave ends within about one request deadline.
#[test]
fn a_node_leaving_as_another_is_killed_loses_no_written_page() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let mut agents = agents_with(root.path(), 5, limit, &["--loopback-timers"]);
    wait_until("the DSM registered", limit, || {
        dsm(&agents[0].dir, &["write", "11", "0", "first"]).status.success()
    });
    // Even pages of a segment, each written through another node: some owned by node 4,
    // managed by node 5 and backed up there too.
    let text = |page: u64| format!("segment 11 page {page}");
    let pages: Vec<u64> = (0..96).step_by(2).collect();
    for &page in &pages {
        let through = &agents[(page / 2 % 5) as usize];
        let out = dsm(&through.dir, &["write", "11", &(page * 4096).to_string(), &text(page)]);
        assert!(out.status.success(), "write: {}", String::from_utf8_lossy(&out.stderr));
    }
    let started = Instant::now();
    let leaver = agents[3].dir.clone();
    // `--now`: the kill lands in the leave, not before it, where the leave would wait for it.
    let leave = std::thread::spawn(move || cli(&leaver, &["leave", "--now"]));
    agents[4].kill();
    let leave = leave.join().expect("the leave returns");
    let took = started.elapsed();
    assert!(leave.status.success(), "leave: {}", String::from_utf8_lossy(&leave.stderr));
    wait_showing(&agents, "node 4 left, node 5 failed", limit, || {
        stable_with(&agents[0].dir, &[(4, "left", 1), (5, "failed", 1)])
    });
    let mut wrong = Vec::new();
    for &page in &pages {
        let want = text(page);
        let offset = (page * 4096).to_string();
        let out = dsm(&agents[0].dir, &["read", "11", &offset, &want.len().to_string()]);
        if !out.status.success() || out.stdout != want.as_bytes() {
            wrong.push(format!("page {page}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    assert!(wrong.is_empty(), "{} of {} pages: {wrong:?}", wrong.len(), pages.len());
    assert!(took < Duration::from_secs(25), "the leave took {took:?}");
}

/// A join that takes long (its seed says nothing for 8 s) still answers `status` on the
/// control socket, saying what the agent is doing, and refuses the commands that need a
/// member with that; once admitted, it says nothing of entering. Before, the socket was served
/// only once the agent had entered, and `status` said the agent was not running.
#[test]
fn an_agent_entering_the_cluster_answers_status_and_says_what_it_waits_for() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let first = start(root.path(), 1, &free_addr("127.0.0.1"), &["--bootstrap"]);
    wait_until("the bootstrap node", limit, || stable_with(&first.dir, &[(1, "active", 1)]));
    // Silent long enough for the checks below, on a slow machine too.
    let seed = seed_silent_until(Instant::now() + Duration::from_secs(8), &first.addr);
    let secret = first.secret();
    let secret = secret.as_str();
    let joining = ["--join", seed.as_str(), "--secret-file", secret];
    let second = start(root.path(), 2, &free_addr("127.0.0.2"), &joining);
    let mut entering = String::new();
    wait_until("node 2 answering as it enters", limit, || {
        let said = status(&second.dir, true).and_then(|s| s["entering"].as_str().map(String::from));
        entering = said.unwrap_or_default();
        !entering.is_empty()
    });
    assert!(entering.starts_with(&format!("joining the cluster through {seed}")), "{entering}");
    let shown = cli(&second.dir, &["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("this agent is entering the cluster: joining"), "{shown}");
    assert!(shown.contains("not known to be stable"), "its own view is not the cluster's: {shown}");
    let out = cli(&second.dir, &["leave"]);
    assert!(!out.status.success(), "a leave before the node is a member");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("still entering the cluster"), "{said}");
    wait_until("node 2 admitted", limit, || {
        stable_with(&first.dir, &[(1, "active", 1), (2, "active", 1)])
    });
    wait_until("node 2 no longer entering", limit, || {
        status(&second.dir, true).is_some_and(|s| s["entering"].is_null())
    });
}

/// An agent stopped (SIGTERM) while it enters the cluster says so in its log and takes its
/// control socket with it: it died at once, saying nothing, the socket left behind.
#[test]
fn an_agent_stopped_while_it_enters_the_cluster_says_so_and_removes_its_socket() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let first = start(root.path(), 1, &free_addr("127.0.0.1"), &["--bootstrap"]);
    wait_until("the bootstrap node", limit, || stable_with(&first.dir, &[(1, "active", 1)]));
    let seed = seed_silent_until(Instant::now() + Duration::from_secs(60), &first.addr);
    let secret = first.secret();
    let secret = secret.as_str();
    let joining = ["--join", seed.as_str(), "--secret-file", secret];
    let mut second = start(root.path(), 2, &free_addr("127.0.0.2"), &joining);
    wait_until("node 2 answering as it enters", limit, || {
        status(&second.dir, true).is_some_and(|s| s["entering"].is_string())
    });
    signal(&second, "-TERM");
    let exited = exit_within(second.child.as_mut().expect("running"), limit);
    assert!(exited.success(), "a stop asked for: {exited:?}");
    let log = log_of(&second);
    assert!(log.contains("terminated (SIGTERM) while joining the cluster through"), "{log}");
    assert!(!second.dir.join("control.sock").exists(), "the control socket is removed");
    // The last member stopped takes the cluster down: its log says so, not that the others
    // rebuild its entries.
    let mut first = first;
    signal(&first, "-TERM");
    let exited = exit_within(first.child.as_mut().expect("running"), limit);
    assert!(exited.success(), "a stop asked for: {exited:?}");
    let log = log_of(&first);
    assert!(
        log.contains("terminated (SIGTERM); stopping. This node is the cluster's only member"),
        "{log}"
    );
}

/// A node cut off from the others (here they are stopped) says its status is its own view,
/// which may be stale, and not that the cluster is stable with every node active.
#[test]
fn a_node_that_cannot_reach_a_leader_says_its_status_is_its_own_view() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(30);
    let agents = three_agents(root.path(), limit);
    let leader = status(&agents[0].dir, false).and_then(|s| s["leader"].as_u64()).expect("leader");
    // A node that is not the leader watches; the two others stop.
    let watcher = agents.iter().position(|a| a.id != leader).expect("a follower");
    let others: Vec<&Agent> = agents.iter().filter(|a| a.id != agents[watcher].id).collect();
    let dir = &agents[watcher].dir;
    assert!(status(dir, false).is_some_and(|s| s["own_view"].is_null() && s["stable"] == true));
    for agent in &others {
        signal(agent, "-STOP");
    }
    let mut seen = Value::Null;
    wait_showing(&agents, "the watcher showing its own view", limit, || {
        seen = status(dir, false).unwrap_or_default();
        seen["own_view"] == true
    });
    assert_eq!(seen["stable"], false, "{seen}");
    let shown = cli(dir, &["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    let said = format!("node {} cannot reach the cluster's leader", agents[watcher].id);
    assert!(shown.contains(&said), "{shown}");
    assert!(shown.contains("not known to be stable"), "{shown}");
    // Its log says what its lack of a leader means, and not raft's every unanswered vote.
    wait_showing(&agents, "the watcher saying it hears from no leader", limit, || {
        log_of(&agents[watcher]).contains("this voter has heard from no leader")
    });
    let log = log_of(&agents[watcher]);
    let default_log = std::env::var("GOBELINS_TEST_AGENT_LOG").is_err();
    assert!(!default_log || !log.contains("while requesting vote"), "{log}");
    // So does its status: for how long its elections have won no majority.
    let seen = status(dir, false).unwrap_or_default();
    assert!(seen["leaderless_ms"].as_u64().is_some_and(|ms| ms >= 5_000), "{seen}");
    let shown = cli(dir, &["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("has known no leader for"), "{shown}");
    for agent in &others {
        signal(agent, "-CONT");
    }
    wait_showing(&agents, "a leader again", limit, || {
        status(dir, false).is_some_and(|s| s["own_view"].is_null())
    });
    wait_showing(&agents, "the watcher saying it knows a leader again", limit, || {
        log_of(&agents[watcher]).contains("this node knows a leader again")
    });
}

/// A cluster of two agents: node 1 bootstrapped it, node 2 joined, and node 1 is the one
/// voter. With the path of the cluster's secret.
fn two_agents(root: &Path, limit: Duration) -> (Vec<Agent>, String) {
    let addrs: Vec<String> = (1..=2).map(|i| free_addr(&format!("127.0.0.{i}"))).collect();
    let first = start(root, 1, &addrs[0], &["--bootstrap"]);
    wait_until("the bootstrap node", limit, || stable_with(&first.dir, &[(1, "active", 1)]));
    let secret = first.secret();
    let join = ["--join", addrs[0].as_str(), "--secret-file", secret.as_str()];
    let mut agents = vec![first];
    agents.push(start(root, 2, &addrs[1], &join));
    wait_showing(&agents, "node 2 active, node 1 the one voter", limit, || {
        stable_with(&agents[0].dir, &[(1, "active", 1), (2, "active", 1)])
            && status(&agents[0].dir, false).is_some_and(|s| s["voters"] == serde_json::json!([1]))
    });
    (agents, secret)
}

/// Every one of `agents` comes back as a new life, and every key [`put_keys`] wrote reads as
/// lost through the agent at `socket` once it answers (it stops saying it enters the cluster a
/// moment after its life is admitted).
fn back_as_new_lives_with_keys_lost(agents: &[Agent], socket: &Path, keys: u64) {
    let limit = Duration::from_secs(60);
    wait_showing(agents, "every node back as a new life", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| {
            s["stable"] == true
                && agents
                    .iter()
                    .all(|a| node_status(&s, a.id).is_some_and(|(st, i)| st == "active" && i >= 2))
        })
    });
    // Each agent hears of its own admission a moment after the cluster's state shows it:
    // until then it answers that it is still entering.
    wait_showing(agents, "every agent done entering", limit, || {
        agents.iter().all(|a| status(&a.dir, true).is_some_and(|s| s.get("entering").is_none()))
    });
    wait_showing(agents, "the agent answering", limit, || {
        call(socket, 0, &kvdir::Request::Get).is_some()
    });
    for key in 0..keys {
        let got = call(socket, key, &kvdir::Request::Get);
        assert_eq!(got, Some(kvdir::Response::Lost), "key {key}{}", evidence(agents));
    }
}

/// Every agent killed with `kill -9`, as by a power cut, and reaped.
fn kill_all(agents: &mut [Agent]) {
    agents.iter_mut().for_each(Agent::kill);
}

/// The whole cluster killed, then a majority of its voters started again, and the last voter
/// later; a fourth node, no voter, never comes back. The voters that came back carry on without
/// it. Before, each restarted voter's end of its last life handed its vote to that fourth node,
/// still counted active, and the cluster waited for it for good.
#[test]
fn a_cluster_killed_whole_comes_back_without_the_node_that_does_not() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(60);
    let mut agents = three_agents(root.path(), limit);
    let secret = agents[0].secret();
    let join = ["--join", agents[0].addr.as_str(), "--secret-file", secret.as_str()];
    agents.push(start(root.path(), 4, &free_addr("127.0.0.4"), &join));
    let four: Vec<(u64, &str, u64)> = (1..=4).map(|i| (i, "active", 1)).collect();
    wait_until("four active nodes", limit, || stable_with(&agents[0].dir, &four));
    let voters = |s: &Value| -> Vec<u64> {
        s["voters"].as_array().map_or(vec![], |v| v.iter().filter_map(Value::as_u64).collect())
    };
    let now = status(&agents[0].dir, false).expect("status");
    assert_eq!(voters(&now), [1, 2, 3], "three voters of four nodes: {now}");

    kill_all(&mut agents);
    for i in [1, 0] {
        agents[i].child = Some(spawn(&agents[i], &[]));
    }
    // Nodes 3 and 4 are declared failed; 1 and 2 are admitted again as new lives.
    let back = |s: &Value, up: &[u64], down: &[u64]| {
        s["stable"] == true
            && up.iter().all(|&n| node_status(s, n).is_some_and(|(st, i)| st == "active" && i >= 2))
            && down.iter().all(|&n| node_status(s, n).is_some_and(|(st, _)| st == "failed"))
    };
    wait_showing(&agents, "nodes 1 and 2 back, 3 and 4 failed", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| back(&s, &[1, 2], &[3, 4]))
    });
    agents[2].child = Some(spawn(&agents[2], &[]));
    wait_showing(&agents, "node 3 back too", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| back(&s, &[1, 2, 3], &[4]))
    });
    // Every node that came back votes: the cluster survives another failure.
    wait_showing(&agents, "nodes 1 to 3 voting", limit, || {
        status(&agents[0].dir, false).is_some_and(|s| voters(&s) == [1, 2, 3])
    });
    // Evicting node 4 now has nothing to do, and says why; what it asks for holds already,
    // so it succeeds (a script's `evict 4 || page-someone` pages nobody).
    let evict = cli(&agents[0].dir, &["evict", "4"]);
    let said = String::from_utf8_lossy(&evict.stderr);
    assert!(evict.status.success() && said.contains("node 4 failed already"), "{said}");
    assert!(said.contains("node 4 is out of the cluster"), "{said}");
}

/// Every node of a cluster killed and started again. They come back as new lives, and what
/// the services held is reported lost, not answered as never written: before, the node whose
/// end of its last life came last was refused as the last member, carried on with empty
/// services, and its keys read as absent.
#[test]
fn a_cluster_killed_whole_and_started_again_reports_what_it_lost() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(60);
    let mut agents = three_agents(root.path(), limit);
    let keys = 60u64;
    let socket = registered_with_keys(&agents[0].dir, limit, keys);
    kill_all(&mut agents);
    for agent in &mut agents {
        agent.child = Some(spawn(agent, &[]));
    }
    back_as_new_lives_with_keys_lost(&agents, &socket, keys);
    // The operator has restored what mattered, and forgives every slot at once, not 4,096
    // slots one key at a time: the keys read as absent again.
    let forgiven = cli(&agents[1].dir, &["kv", "forgive", "--all"]);
    assert!(forgiven.status.success(), "{}", String::from_utf8_lossy(&forgiven.stderr));
    for key in 0..keys {
        let got = call(&socket, key, &kvdir::Request::Get);
        assert_eq!(got, Some(kvdir::Response::Value(None)), "key {key}{}", evidence(&agents));
    }
    let neither = cli(&agents[1].dir, &["kv", "forgive"]);
    assert!(!neither.status.success(), "a key or --all");
    // No agent there: one plain error, as for a key, not one for each of 4,096 slots.
    let nowhere = cli(&root.path().join("nowhere"), &["kv", "forgive", "--all"]);
    let said = String::from_utf8_lossy(&nowhere.stderr);
    assert!(!nowhere.status.success() && said.contains("`gobelins agent` running"), "{said}");
    assert!(!said.contains("slots were not forgiven"), "{said}");
}

/// A cluster of one node killed and started again: its keys and pages read as lost, not as
/// never written. Before, the only node the cluster ever had carried on alone with empty
/// services, and every key read as absent, every page as zeros.
#[test]
fn a_lone_node_killed_and_started_again_reports_what_it_lost() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(60);
    let mut agents = vec![start(root.path(), 1, &free_addr("127.0.0.1"), &["--bootstrap"])];
    wait_until("the bootstrap node", limit, || stable_with(&agents[0].dir, &[(1, "active", 1)]));
    let keys = 20u64;
    let socket = registered_with_keys(&agents[0].dir, limit, keys);
    assert!(dsm(&agents[0].dir, &["write", "7", "0", "hello"]).status.success());
    kill_all(&mut agents);

    agents[0].child = Some(spawn(&agents[0], &[]));
    wait_showing(&agents, "the agent answering", limit, || {
        call(&socket, 0, &kvdir::Request::Get).is_some()
    });
    for key in 0..keys {
        let got = call(&socket, key, &kvdir::Request::Get);
        assert_eq!(got, Some(kvdir::Response::Lost), "key {key}{}", evidence(&agents));
    }
    let read = dsm(&agents[0].dir, &["read", "7", "0", "5"]);
    let said = String::from_utf8_lossy(&read.stderr);
    assert!(!read.status.success() && said.contains("lost"), "dsm read: {said}");
    // Once what mattered is restored, the operator accepts the loss in one step: every page
    // reads as zeros again, the one asked for meanwhile too.
    let forgiven = dsm(&agents[0].dir, &["forgive", "--all"]);
    let said = String::from_utf8_lossy(&forgiven.stderr);
    assert!(forgiven.status.success(), "dsm forgive --all: {said}");
    assert!(
        said.contains(&format!("{} tainted slots forgiven", gobelins::dsm::DSM_SLOTS)),
        "{said}"
    );
    assert!(said.contains("(1 reported lost meanwhile"), "{said}");
    let read = dsm(&agents[0].dir, &["read", "7", "0", "5"]);
    assert_eq!(read.stdout, [0; 5], "{}", String::from_utf8_lossy(&read.stderr));
    let again = dsm(&agents[0].dir, &["forgive", "7", "0"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("not tainted"));
}

/// A member restarted with another secret than the cluster's (its file replaced, or copied
/// from another cluster) stops and says why, once the other members agree it is the odd one.
/// Before, it asked every member again for ever, logging each refusal several times a second.
#[test]
fn a_member_restarted_with_another_secret_stops_and_says_so() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(60);
    let mut agents = three_agents(root.path(), limit);
    agents[2].kill();
    // The same cluster, another key: one hex digit of it changed.
    let file = agents[2].dir.join("cluster.secret");
    let text = std::fs::read_to_string(&file).expect("the secret file");
    let mut words: Vec<String> = text.split_whitespace().map(String::from).collect();
    let key = words.last_mut().expect("a key");
    let digit = if key.starts_with('0') { "1" } else { "0" };
    key.replace_range(0..1, digit);
    std::fs::write(&file, words.join(" ") + "\n").expect("secret replaced");

    agents[2].child = Some(spawn(&agents[2], &[]));
    let exited = exit_within(agents[2].child.as_mut().expect("child"), limit);
    agents[2].child = None;
    let log = log_of(&agents[2]);
    assert!(!exited.success(), "{log}");
    assert!(log.contains("every member of the cluster (2) proves another secret"), "{log}");
}

/// The survivor of a two-node cluster, killed and started again after the other node failed,
/// waits for a join (its last life's entries need a node to go to), and says so. It said that
/// a majority of the voters must be up, though its only voter was.
#[test]
fn a_survivor_restarted_after_the_other_node_failed_says_it_waits_for_a_join() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(60);
    let (mut agents, _) = two_agents(root.path(), limit);
    agents[1].kill();
    wait_showing(&agents, "node 2 declared failed", limit, || {
        stable_with(&agents[0].dir, &[(1, "active", 1), (2, "failed", 1)])
    });
    agents[0].kill();
    agents[0].child = Some(spawn(&agents[0], &[]));
    let mut entering = String::new();
    wait_showing(&agents, "node 1 saying it waits for a join", limit, || {
        let said =
            status(&agents[0].dir, true).and_then(|s| s["entering"].as_str().map(String::from));
        entering = said.unwrap_or_default();
        entering.contains("waits for another node to join")
    });
    assert!(!entering.contains("majority"), "{entering}");
}

/// A cluster of two killed whole, its voter started first, then the other node. The two come
/// back as new lives, and their keys read as lost, not as never written.
#[test]
fn a_two_node_cluster_killed_whole_comes_back_and_reports_what_it_lost() {
    let root = tempfile::tempdir().expect("temporary directory");
    let limit = Duration::from_secs(60);
    let (mut agents, _) = two_agents(root.path(), limit);
    let keys = 40u64;
    let socket = registered_with_keys(&agents[1].dir, limit, keys);
    kill_all(&mut agents);

    agents[0].child = Some(spawn(&agents[0], &[]));
    wait_showing(&agents, "node 1's last life ended", limit, || {
        status(&agents[0].dir, true)
            .is_some_and(|s| node_status(&s, 1).is_some_and(|(st, i)| i > 1 || st == "failed"))
    });
    agents[1].child = Some(spawn(&agents[1], &[]));
    back_as_new_lives_with_keys_lost(&agents, &socket, keys);
}
