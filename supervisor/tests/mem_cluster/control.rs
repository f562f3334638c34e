//! The control socket: a client that hangs up, and `gobelins join` asked of a member or leaver.

use crate::harness::{control_socket, replay, three_voters, Node};
use gobelins_supervisor::mem::MemNetwork;
use gobelins_supervisor::state::NodeStatus;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

type Answer = tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>;

/// Sends `request`, one line, to the control socket at `path`: the answer's lines to read, and
/// the sending half (dropped with the lines, it hangs up).
async fn sent(path: &Path, request: &str) -> (Answer, tokio::net::unix::OwnedWriteHalf) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let client = tokio::net::UnixStream::connect(path).await.expect("connects");
    let (client, mut sending) = client.into_split();
    sending.write_all(format!("{request}\n").as_bytes()).await.expect("request sent");
    (tokio::io::BufReader::new(client).lines(), sending)
}

/// Every line of an answer, to its end.
async fn all_of(mut lines: Answer) -> Vec<String> {
    let mut said = Vec::new();
    while let Some(line) = lines.next_line().await.expect("reads") {
        said.push(line);
    }
    said
}

/// The leader of three voters, and its two followers.
fn leader_and_followers(nodes: &[Node]) -> (u64, u64, u64) {
    let leader = nodes[0].supervisor.leader().expect("a leader");
    let mut others = (1..=3).filter(|&id| id != leader);
    (leader, others.next().expect("a follower"), others.next().expect("another"))
}

/// A control client that hangs up while its change is under way (an operator's Ctrl-C) is not
/// followed any more: its agent asked the leader for the whole state every 10 ms, for up to a
/// minute, to tell nobody.
#[test]
fn a_control_client_that_hangs_up_is_not_followed_for_the_rest_of_the_minute() {
    use tokio::io::AsyncWriteExt;
    replay(async {
        let net = MemNetwork::new(14);
        let nodes = three_voters(&net).await;
        let (leader, asker, evicted) = leader_and_followers(&nodes);
        // The evicted node never hears of its eviction, which therefore never ends.
        net.stall_log(leader, evicted);
        net.lose_begun(leader, evicted);
        let (_dir, path, _socket) = control_socket(&nodes[asker as usize - 1].supervisor).await;
        let asked = || net.calls(asker, leader);
        let before = asked();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = asked() - before;

        let request = format!("{{\"cmd\":\"evict\",\"node\":{evicted}}}");
        let (mut lines, mut sending) = sent(&path, &request).await;
        // Done sending, as `socat` is once its input ends: it still reads what comes.
        sending.shutdown().await.expect("half-closed");
        let asking = lines.next_line().await.expect("reads").expect("a line");
        assert!(asking.contains("asking the cluster's leader"), "said at once: {asking}");
        let first = lines.next_line().await.expect("reads").expect("a line");
        assert!(first.contains("accepted"), "{first}");
        let second = lines.next_line().await.expect("reads").expect("a line");
        assert!(second.contains("progress"), "the change is under way: {second}");
        let before = asked();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let followed = asked() - before;
        assert!(
            followed > idle + 50,
            "a client that only stopped sending is still followed: {followed} asks, {idle} when idle"
        );
        drop((lines, sending));

        let before = asked();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after_hang_up = asked() - before;
        assert!(
            after_hang_up <= idle + 5,
            "node {asker} asked the leader {after_hang_up} times in a second for a client gone, {idle} when idle"
        );
    });
}

/// An `evict` asked of a follower just after the leader died waits for the next leader, rather
/// than failing at once on the dead one it still takes for the leader (a helper's run: exit 1
/// in 17 ms, three runs of three, while a majority was up).
#[test]
fn an_evict_asked_as_the_leader_dies_waits_for_the_next_leader() {
    replay(async {
        let net = MemNetwork::new(21);
        let nodes = three_voters(&net).await;
        let (leader, asker, evicted) = leader_and_followers(&nodes);
        let (_dir, path, _socket) = control_socket(&nodes[asker as usize - 1].supervisor).await;
        net.crash(leader);
        assert_eq!(nodes[asker as usize - 1].supervisor.leader(), Some(leader), "not noticed yet");

        // `now`: not after a roll call, which would wait for the leader's failure, for the
        // proposal's own retries are what is tested.
        let request = format!("{{\"cmd\":\"evict\",\"node\":{evicted},\"now\":true}}");
        let (mut lines, _sending) = sent(&path, &request).await;
        let asking = lines.next_line().await.expect("reads").expect("a line");
        assert!(asking.contains("asking the cluster's leader"), "{asking}");
        let answer = lines.next_line().await.expect("reads").expect("a line");
        assert!(answer.contains("accepted"), "the next leader took it: {answer}");
        assert_ne!(nodes[asker as usize - 1].supervisor.leader(), Some(leader));
    });
}

/// A member silent for a moment (its answers lost), then heard again: the eviction waits for
/// it, says that it answered, and goes on; nobody is declared failed.
#[test]
fn an_eviction_waits_for_a_silent_member_and_goes_on_once_it_answers() {
    replay(async {
        let net = MemNetwork::new(25);
        let nodes = three_voters(&net).await;
        let (leader, asker, evicted) = leader_and_followers(&nodes);
        let silent = 6 - leader - evicted;
        assert_eq!(silent, asker);
        let at_leader = &nodes[leader as usize - 1].supervisor;
        let (_dir, path, _socket) = control_socket(at_leader).await;
        net.mute(silent, leader);
        let request = format!("{{\"cmd\":\"evict\",\"node\":{evicted}}}");
        let (lines, _sending) = sent(&path, &request).await;
        let answer = tokio::spawn(all_of(lines));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(at_leader.state().nodes[&evicted].status, NodeStatus::Active, "not yet");
        net.unmute(silent, leader);
        let said = answer.await.expect("the answer").join("\n");
        assert!(said.contains(&format!("node {silent} does not answer")), "{said}");
        assert!(said.contains(&format!("node {silent} answered")), "{said}");
        assert!(said.contains("\"ok\""), "{said}");
        let state = at_leader.state();
        assert_eq!(state.nodes[&silent].status, NodeStatus::Active, "{said}");
        assert_eq!(state.nodes[&evicted].status, NodeStatus::Left, "{said}");
    });
}

/// Kills a follower of three voters, then at once asks the leader to evict the other one
/// (`now`: without waiting for the members first). The dead node's status when the eviction
/// is first recorded, and what the CLI was told.
async fn evict_just_after_a_kill(seed: u64, now: bool) -> (NodeStatus, String, u64, u64) {
    let net = MemNetwork::new(seed);
    let nodes = three_voters(&net).await;
    let (leader, killed, evicted) = leader_and_followers(&nodes);
    let at_leader = &nodes[leader as usize - 1].supervisor;
    let (_dir, path, _socket) = control_socket(at_leader).await;
    net.crash(killed);
    let request = format!("{{\"cmd\":\"evict\",\"node\":{evicted},\"now\":{now}}}");
    let (lines, _sending) = sent(&path, &request).await;
    let answer = tokio::spawn(all_of(lines));
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let state = at_leader.state();
            if state.nodes[&evicted].status != NodeStatus::Active {
                return state.nodes[&killed].status;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let killed_then = seen.await.expect("the eviction was recorded");
    let said = answer.await.expect("the answer").join("\n");
    assert!(said.contains("\"ok\""), "{said}");
    assert_eq!(at_leader.state().nodes[&evicted].status, NodeStatus::Left, "{said}");
    // Asked again: done already, told as `status` shows it.
    let (lines, _sending) = sent(&path, &request).await;
    let again = all_of(lines).await.join("\n");
    assert!(again.contains(&format!("node {evicted} was evicted already")), "{again}");
    (killed_then, said, killed, evicted)
}

/// An eviction asked a moment after another node was killed waits until the cluster declares
/// that node failed, so that its recovery begins first. Begun after the eviction, the recovery
/// could not count the dead node's DSM word (the eviction may have taken copies away: the
/// cluster records it against every other node's), and every page of its slots that no node
/// reported, never written ones too, read as lost: 1,024 of 4,096 slots in a helper's run.
#[test]
fn an_eviction_asked_just_after_a_kill_waits_for_the_dead_node_s_recovery() {
    replay(async {
        let (killed_then, said, killed, evicted) = evict_just_after_a_kill(24, false).await;
        assert_eq!(killed_then, NodeStatus::Failed, "node {killed}'s failure recorded first");
        let waited = format!("node {killed} does not answer: the eviction of node {evicted} waits");
        assert!(said.contains(&waited), "{said}");
        let ended = format!("node {killed} was declared failed: recovered first");
        assert!(said.contains(&ended), "how the wait ended: {said}");
    });
}

/// Asked for `now`, the eviction does not wait: the operator chose so.
#[test]
fn an_eviction_asked_now_does_not_wait_for_a_silent_member() {
    replay(async {
        let (killed_then, said, killed, _) = evict_just_after_a_kill(24, true).await;
        assert_eq!(killed_then, NodeStatus::Active, "node {killed} not declared failed yet");
        assert!(!said.contains("does not answer"), "{said}");
    });
}

/// A node killed and restarted at once (a unit that restarts it) answers as a process, but not
/// as the life the cluster counts live, which only the cluster's recovery ends: an eviction
/// asked meanwhile waits for that life, as for a node that does not answer. Counted answered
/// (a ping's answer), the eviction went first, and the dead life's DSM slots were tainted (a
/// helper's review).
#[test]
fn an_eviction_does_not_take_a_restarted_process_for_the_life_that_died() {
    replay(killed_restarted_then_evict(26, true));
}

/// The same, the restarted process's supervisor not up yet: it answers every request
/// "node is starting" (`Malformed`), which the roll call took for a build before its
/// question, up (a helper's black-box run: 1,024 slots tainted in 5 runs of 17).
#[test]
fn an_eviction_does_not_take_a_process_still_starting_for_the_life_that_died() {
    replay(killed_restarted_then_evict(27, false));
}

/// Node 4 of four killed and started again at once (`supervised`: its supervisor up, else
/// only its transport, still starting), then an eviction asked through the leader: its
/// second line must say it waits for node 4.
async fn killed_restarted_then_evict(seed: u64, supervised: bool) {
    use crate::harness::{supervisor_on, until_active};
    use gobelins_adaptation::{HostConfig, Registry};
    use gobelins_supervisor::{store, Dispatch, SupervisorConfig};
    let net = MemNetwork::new(seed);
    let mut nodes = three_voters(&net).await;
    let dir = tempfile::TempDir::new().expect("temporary directory");
    let path = dir.path().join("raft.redb");
    let run = |made| {
        let stores = store::open_with(&path, true).expect("store");
        let config = SupervisorConfig::loopback();
        supervisor_on(&net, 4, config, Registry::new, HostConfig::default(), stores, made)
    };
    let fourth = run(true).await;
    let joined = fourth.join_via("n1", Duration::from_secs(30)).await;
    assert!(matches!(joined, Ok(Ok(_))), "{joined:?}");
    let kept = tempfile::TempDir::new().expect("directory");
    nodes.push(Node { supervisor: Arc::clone(&fourth), _dir: kept });
    until_active(&nodes, 4).await;
    let (leader, _, evicted) = leader_and_followers(&nodes);
    let at_leader = Arc::clone(&nodes[leader as usize - 1].supervisor);
    let (_dir, path_socket, _socket) = control_socket(&at_leader).await;

    // Killed, and started again from its data directory at once.
    net.crash(4);
    fourth.shutdown().await;
    nodes.pop();
    drop(fourth);
    net.heal();
    let restarted = match supervised {
        true => {
            let restarted = run(false).await;
            assert!(!restarted.life_admitted(), "a restarted process, its last life not ended");
            Some(restarted)
        }
        false => {
            let _transport = net.attach(4, "n4", Arc::new(Dispatch::default()));
            None
        }
    };
    assert!(at_leader.state().nodes[&4].status.is_live(), "not declared failed yet");

    let request = format!("{{\"cmd\":\"evict\",\"node\":{evicted}}}");
    let (mut lines, _sending) = sent(&path_socket, &request).await;
    // Its first lines: the eviction under way would wait for the dead life for ever, as
    // nothing here ends it (an agent's restarted process proposes its failure).
    let mut said = Vec::new();
    for _ in 0..2 {
        said.push(lines.next_line().await.expect("reads").expect("a line"));
    }
    assert!(said[1].contains("node 4 does not answer"), "{said:?}");
    if let Some(restarted) = restarted {
        restarted.shutdown().await;
    }
}

/// An `evict` whose client hangs up (an operator's Ctrl-C) while no leader answers is not
/// asked for again: its agent went on proposing it for 10 s, and carried it out once the
/// leader answered, for nobody (the review of `e4fd2c1`).
#[test]
fn an_evict_whose_client_hangs_up_while_no_leader_answers_is_not_asked_again() {
    replay(async {
        let net = MemNetwork::new(23);
        let nodes = three_voters(&net).await;
        let (leader, asker, other) = leader_and_followers(&nodes);
        let (_dir, path, _socket) = control_socket(&nodes[asker as usize - 1].supervisor).await;
        net.isolate(asker, [leader, other]);
        // `now`: the proposal's tries are what the hang-up must end, not a roll call's wait.
        let request = format!("{{\"cmd\":\"evict\",\"node\":{other},\"now\":true}}");
        let (mut lines, sending) = sent(&path, &request).await;
        let asking = lines.next_line().await.expect("reads").expect("a line");
        assert!(asking.contains("asking the cluster's leader"), "{asking}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop((lines, sending));
        tokio::time::sleep(Duration::from_secs(2)).await;
        net.heal();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let at_leader = &nodes[leader as usize - 1].supervisor;
        assert_eq!(at_leader.state().nodes[&other].status, NodeStatus::Active, "not evicted");
    });
}

/// A `leave` of a node that left already got what it asked for: told so, not refused (a retry
/// of a leave through a leader that did not answer, whose first try went through, said
/// "left already" as an error, and a script's `leave || page-someone` paged someone).
#[test]
fn a_leave_of_a_node_that_left_already_is_told_so_and_not_refused() {
    use gobelins_supervisor::state::Command;
    replay(async {
        let net = MemNetwork::new(22);
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let leaver = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        let at_leader = &nodes[leader as usize - 1].supervisor;
        let leave = Command::Leave { node: leaver };
        assert!(matches!(at_leader.propose(leave).await, Ok(Ok(_))));
        let left = tokio::time::timeout(Duration::from_secs(30), async {
            while at_leader.state().nodes[&leaver].status != NodeStatus::Left {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(left.await.is_ok(), "the leave ended");

        let (_dir, path, _socket) = control_socket(&nodes[leaver as usize - 1].supervisor).await;
        let (lines, _sending) = sent(&path, "{\"cmd\":\"leave\"}").await;
        let said = all_of(lines).await;
        let last = said.last().expect("an answer");
        assert!(last.starts_with("{\"ok\""), "{said:?}");
        assert!(said.iter().any(|l| l.contains("left already")), "{said:?}");
    });
}

/// `gobelins join` asked of an active member says there is nothing to do; asked of an agent
/// whose node left, it is refused: joined in the moment before that agent stopped, the node
/// was active, then declared failed.
#[test]
fn a_join_asked_of_an_active_node_does_nothing_and_of_a_node_that_left_is_refused() {
    use gobelins_supervisor::state::Command;
    use gobelins_supervisor::Lifecycle;
    replay(async {
        let net = MemNetwork::new(16);
        let nodes = three_voters(&net).await;
        let leader = nodes[0].supervisor.leader().expect("a leader");
        let asker = (1..=3).find(|&id| id != leader).expect("a follower");
        let supervisor = Arc::clone(&nodes[asker as usize - 1].supervisor);
        let (_dir, path, _socket) = control_socket(&supervisor).await;
        let join = |seed: u64| {
            let path = path.clone();
            async move {
                let request = format!("{{\"cmd\":\"join\",\"seed\":\"n{seed}\"}}");
                let (lines, _sending) = sent(&path, &request).await;
                all_of(lines).await.join("\n")
            }
        };
        let said = join(leader).await;
        assert!(said.contains("already an active member: nothing to do"), "{said}");
        assert!(said.contains(&format!("(n{leader} was not asked)")), "{said}");
        assert!(said.contains("\"ok\""), "{said}");

        let leave = Command::Leave { node: asker };
        let at_leader = &nodes[leader as usize - 1].supervisor;
        assert!(matches!(at_leader.propose(leave).await, Ok(Ok(_))));
        let mut lifecycle = supervisor.lifecycle();
        let left = tokio::time::timeout(
            Duration::from_secs(30),
            lifecycle.wait_for(|l| *l == Lifecycle::Left),
        )
        .await
        .is_ok();
        assert!(left, "the node left");
        let said = join(leader).await;
        assert!(said.contains("this agent is stopping"), "{said}");
        let state = at_leader.state();
        assert_eq!(state.nodes[&asker].status, NodeStatus::Left, "no join was asked");
    });
}
