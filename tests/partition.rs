//! Black-box tests of a network partition: real `gobelins agent` processes, each in a network
//! namespace of its own, joined by a bridge; moving two nodes' links to a second bridge cuts
//! them off from the other three, and moving them back heals the cut (DESIGN.md, "Testing":
//! partitions are made with `ip netns` and veth links, since this machine has no iptables and
//! `tc netem` does not work).
//!
//! Making namespaces takes root (`CAP_NET_ADMIN`) and `ip` from iproute2. Without them the tests
//! say so and pass, unless `GOBELINS_REQUIRE_NETNS` is set: `.ci/run` sets it where it can
//! make a namespace, a bridge and a veth link itself, so that a run that could test the
//! partition does.

mod common;

use common::*;
use gobelins::kvdir;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The namespaces, links and bridges of one test, removed when it ends, however it ends.
struct Net {
    /// Names this test's links and namespaces apart from those of tests running beside it.
    tag: String,
    nodes: u64,
}

impl Net {
    /// `nodes` namespaces for the test named `test` (one letter), node `i` at 10.88.0.`i`
    /// on bridge A. `None` if this machine does not let the test make them (and the run does
    /// not require it).
    fn new(test: char, nodes: u64) -> Option<Net> {
        let tag = format!("{:x}{test}", std::process::id() & 0xff_ffff);
        let net = Net { tag, nodes };
        // What a killed run of the same process id left behind would refuse the names.
        net.clear();
        match net.build() {
            Ok(()) => Some(net),
            Err(why) => {
                let required = std::env::var_os("GOBELINS_REQUIRE_NETNS").is_some();
                assert!(!required, "GOBELINS_REQUIRE_NETNS is set, and no namespace: {why}");
                // Straight to the standard error: the harness keeps what `eprintln!` says
                // of a test that passes to itself.
                let said = format!("skipped: cannot make network namespaces, a bridge and veth links (root and iproute2 needed): {why}\n");
                let _ = std::io::stderr().write_all(said.as_bytes());
                None
            }
        }
    }

    /// Makes the namespaces, bridges and links.
    fn build(&self) -> Result<(), String> {
        for bridge in [self.bridge('a'), self.bridge('b')] {
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&["link", "set", &bridge, "up"])?;
        }
        for i in 1..=self.nodes {
            let (ns, outer, inner) = (self.ns(i), self.outer(i), self.inner(i));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &self.bridge('a'), "up"])?;
            let address = format!("{}/24", self.ip(i));
            ip(&["-n", &ns, "addr", "add", &address, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn ns(&self, i: u64) -> String {
        format!("g{}n{i}", self.tag)
    }

    fn bridge(&self, side: char) -> String {
        format!("g{}b{side}", self.tag)
    }

    /// The end of node `i`'s link on the bridges.
    fn outer(&self, i: u64) -> String {
        format!("g{}v{i}", self.tag)
    }

    /// The end of node `i`'s link in its namespace.
    fn inner(&self, i: u64) -> String {
        format!("g{}e{i}", self.tag)
    }

    fn ip(&self, i: u64) -> String {
        format!("10.88.0.{i}")
    }

    /// Node `i`'s agent address and namespace.
    fn place(&self, i: u64) -> (String, Option<String>) {
        (format!("{}:7400", self.ip(i)), Some(self.ns(i)))
    }

    /// Moves `nodes` to bridge `side`: on B they reach each other and nobody on A.
    fn attach(&self, nodes: &[u64], side: char) {
        for &i in nodes {
            self.must(&["link", "set", &self.outer(i), "master", &self.bridge(side)]);
        }
    }

    /// Removes this test's namespaces and bridges, those that exist.
    fn clear(&self) {
        // A namespace's end of a link goes with it, and takes the other end along.
        for i in 1..=self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            // A link made whose end never reached its namespace stays behind without this.
            let _ = ip(&["link", "del", &self.outer(i)]);
        }
        for bridge in [self.bridge('a'), self.bridge('b')] {
            let _ = ip(&["link", "del", &bridge]);
        }
    }

    fn must(&self, args: &[&str]) {
        if let Err(why) = ip(args) {
            panic!("ip {}: {why}", args.join(" "));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.clear();
    }
}

/// One test at a time: ten agents at once on two cores, with failures declared in about half
/// a second, could declare one of the three failed too.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How long a test waits for the cluster to settle, or a call of the three to succeed.
const LIMIT: Duration = Duration::from_secs(60);

/// Five agents in namespaces of their own, active and voting, this test's turn held until it
/// ends. The fields drop in order: the agents stop before their namespaces go.
struct Five {
    agents: Vec<Agent>,
    net: Net,
    _root: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

impl Five {
    /// For the test named `test` (one letter); `None` where this machine cannot make the
    /// namespaces (and the run does not require them).
    fn start(test: char) -> Option<Five> {
        Five::start_each(test, |_| Vec::new())
    }

    /// As [`Five::start`], in two zones: nodes 1 and 2 in `zone=a`, 3 to 5 in `zone=b`.
    fn start_zoned(test: char) -> Option<Five> {
        Five::start_each(test, |i| match i {
            1 => vec!["--levels", "zone", "--label", "zone=a"],
            2 => vec!["--label", "zone=a"],
            _ => vec!["--label", "zone=b"],
        })
    }

    /// Node `i` started with `each(i)` too.
    fn start_each(test: char, each: impl Fn(u64) -> Vec<&'static str>) -> Option<Five> {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let net = Net::new(test, 5)?;
        let root = tempfile::tempdir().expect("temporary directory");
        let places = (1..=5).map(|i| net.place(i)).collect();
        let agents = agents_each(root.path(), places, LIMIT, &["--loopback-timers"], each);
        Some(Five { agents, net, _root: root, _turn: turn })
    }
}

impl Five {
    /// Cuts `cut` off from the other nodes, and waits until node 3 sees them failed and the
    /// others active, the cluster stable.
    fn cut_off(&self, cut: &[u64]) {
        self.move_and_wait(cut, 'b', "the others to declare those cut off failed", |i, st, _| {
            st == if cut.contains(&i) { "failed" } else { "active" }
        });
    }

    /// Heals the cut, and waits until node 3 sees every node active, those cut off as new
    /// lives, the cluster stable.
    fn heal(&self, cut: &[u64]) {
        self.move_and_wait(cut, 'a', "those cut off back as new lives", |i, st, life| {
            st == "active" && (life > 1 || !cut.contains(&i))
        });
    }

    /// Moves `cut` to bridge `side`, and waits until node 3 sees the cluster stable and every
    /// node `i` with a status and incarnation `each` accepts.
    fn move_and_wait(
        &self,
        cut: &[u64],
        side: char,
        what: &str,
        each: impl Fn(u64, &str, u64) -> bool,
    ) {
        self.net.attach(cut, side);
        let agents = &self.agents;
        wait_showing(agents, what, LIMIT, || {
            status(&agents[2].dir, false).is_some_and(|s| {
                s["stable"] == true
                    && (1..=5)
                        .all(|i| node_status(&s, i).is_some_and(|(st, life)| each(i, &st, life)))
            })
        });
    }
}

/// Runs `ip` with `args`; what it said if it failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `attempt` until it succeeds or `limit` has passed, then its last error: on two loaded cores,
/// a call of the three may meet a manager that is moving.
fn again_until<T, E>(limit: Duration, mut attempt: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let start = std::time::Instant::now();
    loop {
        match attempt() {
            Err(_) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(100)),
            done => return done,
        }
    }
}

fn socket(agent: &Agent) -> PathBuf {
    agent.dir.join("control.sock")
}

fn value(tag: u8, key: u64) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&key.to_le_bytes());
    v
}

fn put(socket: &Path, key: u64, tag: u8) -> Option<kvdir::Response> {
    call(socket, key, &kvdir::Request::Put(value(tag, key)))
}

fn get(socket: &Path, key: u64) -> Option<kvdir::Response> {
    call(socket, key, &kvdir::Request::Get)
}

/// Whether `response` is a read of `key` written with `tag`.
fn reads(response: &Option<kvdir::Response>, key: u64, tag: u8) -> bool {
    matches!(response, Some(kvdir::Response::Value(Some(v))) if v.value[..] == value(tag, key))
}

/// `f` of every key in `keys`, each in a thread of its own: calls to a cut-off node each wait
/// for their deadline.
fn each_at_once<T: Send>(keys: &[u64], f: impl Fn(u64) -> T + Sync) -> Vec<(u64, T)> {
    std::thread::scope(|s| {
        let f = &f;
        let threads: Vec<_> = keys.iter().map(|&k| (k, s.spawn(move || f(k)))).collect();
        threads.into_iter().map(|(k, t)| (k, t.join().expect("a call's thread"))).collect()
    })
}

/// Five nodes; {1, 2} cut off from {3, 4, 5}, then the cut healed. The three go on: they
/// declare the two failed, rebuild their entries from replicas (or report them lost, never
/// invent them), take every write, and no read through the cut-off side returns a value the
/// other side has overwritten. Healed, the two come back as new lives, and every write that
/// was acknowledged, on either side, reads back.
#[test]
fn two_nodes_cut_off_from_three_then_healed_lose_no_acknowledged_write() {
    let Some(five) = Five::start('k') else { return };
    let (agents, limit) = (&five.agents, LIMIT);
    let (cut, rest) = ([1u64, 2], [3u64, 4, 5]);
    let keys: Vec<u64> = (0..300).collect();
    // Written by the cut-off side while cut: whether each was acknowledged decides what it
    // may read as after the heal.
    let theirs: Vec<u64> = (0..300).step_by(15).collect();
    let ours: Vec<u64> = keys.iter().copied().filter(|k| !theirs.contains(k)).collect();
    let (one, three, four) = (socket(&agents[0]), socket(&agents[2]), socket(&agents[3]));
    wait_until("kvdir registered", limit, || get(&one, 0).is_some());
    for &key in &keys {
        let stored = put(&one, key, b'a');
        assert!(matches!(stored, Some(kvdir::Response::Stored { .. })), "write {key}: {stored:?}");
    }

    // Node 1 bootstrapped the cluster: the leader is most often on the side cut off.
    let leader = status(&agents[0].dir, false).map(|s| s["leader"].clone());
    five.cut_off(&cut);

    // The cut-off side, writing, may be refused or may time out; anything it acknowledges
    // must outlive the cut.
    let theirs_written = each_at_once(&theirs, |key| {
        let through = socket(&agents[(key % 2) as usize]);
        matches!(put(&through, key, b'm'), Some(kvdir::Response::Stored { .. }))
    });
    // The three hold every key as written before the cut, or say its slot lost entries.
    let mut lost = 0;
    for &key in &ours {
        match get(&three, key) {
            answer if reads(&answer, key, b'a') => {}
            Some(kvdir::Response::Lost) => lost += 1,
            other => panic!("key {key} through node 3 during the cut: {other:?}"),
        }
    }
    // Whoever reads a key as lost, a survivor said its slot was: it never invents a value.
    let reported: u64 = rest
        .iter()
        .map(|&i| stats_of(&agents[i as usize - 1].dir)["stats"]["reported_lost"]["kvdir"].as_u64())
        .map(Option::unwrap_or_default)
        .sum();
    assert_eq!(reported > 0, lost > 0, "{lost} keys read as lost, {reported} slots reported");
    for &key in &ours {
        // A call that failed on the way is asked again; any other answer is final.
        let stored = again_until(limit, || put(&four, key, b'b').ok_or("the call failed"));
        assert!(matches!(stored, Ok(kvdir::Response::Stored { .. })), "write {key}: {stored:?}");
    }
    // What the three overwrote is not read through the cut-off side as it was.
    let sample: Vec<u64> = ours.iter().copied().step_by(10).collect();
    let stale: Vec<(u64, Option<kvdir::Response>)> =
        each_at_once(&sample, |key| get(&socket(&agents[(key % 2) as usize]), key))
            .into_iter()
            .filter(|(key, answer)| reads(answer, *key, b'a'))
            .collect();
    assert!(stale.is_empty(), "stale reads through the cut-off side: {stale:?}");

    five.heal(&cut);
    for &key in &ours {
        let answer = get(&one, key);
        assert!(reads(&answer, key, b'b'), "key {key} through node 1 after the heal: {answer:?}");
    }
    let acknowledged = theirs_written.iter().filter(|(_, acknowledged)| *acknowledged).count();
    for (key, acknowledged) in theirs_written {
        let answer = get(&one, key);
        let fine = reads(&answer, key, b'm')
            || !acknowledged
                && (reads(&answer, key, b'a') || matches!(answer, Some(kvdir::Response::Lost)));
        assert!(fine, "key {key} (acknowledged: {acknowledged}) after the heal: {answer:?}");
    }
    eprintln!(
        "leader before the cut: {leader:?}; {lost} of {} keys read as lost during the cut, \
         {reported} slots reported lost; {acknowledged} of {} writes through the cut-off side \
         acknowledged",
        ours.len(),
        theirs.len()
    );
}

/// The same cut, the nodes labelled by zone: {1, 2} in `zone=a`, {3, 4, 5} in `zone=b`. Each
/// node keeps its replicas in the other zone, so zone a cut off whole takes no key's every
/// copy with it: the three rebuild every key as written before the cut, and report no slot
/// lost. (Unlabelled, node 1's backup was node 2, and a fifth of the keys read as lost.)
/// Healed, the two come back, and every key reads through them as the three wrote it.
#[test]
fn a_zone_cut_off_whole_loses_no_key() {
    let Some(five) = Five::start_zoned('z') else { return };
    let (agents, limit) = (&five.agents, LIMIT);
    let (cut, rest) = ([1u64, 2], [3u64, 4, 5]);
    let keys: Vec<u64> = (0..300).collect();
    let (one, three) = (socket(&agents[0]), socket(&agents[2]));
    wait_until("kvdir registered", limit, || get(&one, 0).is_some());
    for &key in &keys {
        let stored = put(&one, key, b'a');
        assert!(matches!(stored, Some(kvdir::Response::Stored { .. })), "write {key}: {stored:?}");
    }
    let shown = status(&agents[0].dir, false).expect("a status");
    assert!(shown["tree"].as_str().is_some_and(|t| t.contains("zone=a") && t.contains("zone=b")));

    five.cut_off(&cut);
    for &key in &keys {
        let answer = again_until(limit, || get(&three, key).ok_or("the call failed")).ok();
        assert!(reads(&answer, key, b'a'), "key {key} through node 3 without zone a: {answer:?}");
    }
    let reported: u64 = rest
        .iter()
        .map(|&i| stats_of(&agents[i as usize - 1].dir)["stats"]["reported_lost"]["kvdir"].as_u64())
        .map(Option::unwrap_or_default)
        .sum();
    assert_eq!(reported, 0, "slots reported lost with zone a cut off");
    for &key in &keys {
        let stored = again_until(limit, || put(&three, key, b'b').ok_or("the call failed"));
        assert!(matches!(stored, Ok(kvdir::Response::Stored { .. })), "write {key}: {stored:?}");
    }

    five.heal(&cut);
    for &key in &keys {
        let answer = get(&one, key);
        assert!(reads(&answer, key, b'b'), "key {key} through node 1 after the heal: {answer:?}");
    }
}

fn dsm(agent: &Agent, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.arg("dsm").args(args).arg("--data-dir").arg(&agent.dir);
    command.output().expect("run gobelins")
}

/// Page `page` of segment 9 through `agent`: its first bytes, or why not.
fn read_page(agent: &Agent, page: u64) -> Result<String, String> {
    let out = dsm(agent, &["read", "9", &(page * 4096).to_string(), "4"]);
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn write_page(agent: &Agent, page: u64, text: &str) -> Result<(), String> {
    let out = dsm(agent, &["write", "9", &(page * 4096).to_string(), text]);
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Shared memory across the same cut. The two cut off held read copies of every page; the
/// three rewrite the pages they did not lose, and neither of the two reads a page as it was
/// before. Healed, every page the three rewrote reads as they wrote it, through a node that
/// was cut off.
#[test]
fn pages_rewritten_by_three_are_not_read_as_they_were_through_two_cut_off() {
    let Some(five) = Five::start('d') else { return };
    let (agents, limit) = (&five.agents, LIMIT);
    let cut = [1u64, 2];
    let pages: Vec<u64> = (0..24).collect();
    let before = |page: u64| format!("a{page:03}");
    let after = |page: u64| format!("b{page:03}");
    wait_until("the DSM registered", limit, || write_page(&agents[2], 0, &before(0)).is_ok());
    for &page in &pages {
        write_page(&agents[2], page, &before(page)).expect("a write before the cut");
    }
    // Each of the two keeps a read copy of every page.
    for agent in &agents[..2] {
        for &page in &pages {
            assert_eq!(read_page(agent, page), Ok(before(page)), "node {}", agent.id);
        }
    }

    five.cut_off(&cut);
    // A page whose copies were all on the cut-off side is lost, and says so.
    let mut kept = Vec::new();
    for &page in &pages {
        match read_page(&agents[2], page) {
            Ok(text) if text == before(page) => kept.push(page),
            Err(why) if why.contains("is lost") => {}
            other => panic!("page {page} through node 3 during the cut: {other:?}"),
        }
    }
    for &page in &kept {
        again_until(limit, || write_page(&agents[3], page, &after(page)))
            .expect("a write by the three");
    }
    let stale: Vec<(u64, u64)> = each_at_once(&kept, |page| {
        agents[..2]
            .iter()
            .filter(|agent| read_page(agent, page) == Ok(before(page)))
            .map(|agent| agent.id)
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flat_map(|(page, nodes)| nodes.into_iter().map(move |node| (page, node)))
    .collect();
    assert!(
        stale.is_empty(),
        "pages read as they were through the cut-off side (page, node): {stale:?}"
    );

    five.heal(&cut);
    for &page in &kept {
        assert_eq!(read_page(&agents[0], page), Ok(after(page)), "page {page} after the heal");
    }
    eprintln!("{} of {} pages kept through the cut", kept.len(), pages.len());
}

/// Shared memory in two zones, {1, 2} in `zone=a` and {3, 4, 5} in `zone=b`: node 1 writes
/// every page, so owns it, and its backup copy goes to another zone. Zone a cut off whole, the
/// three read every page as node 1 wrote it. (Unlabelled, node 1's backups went to node 2,
/// the next node, and every page was lost with the two.)
#[test]
fn pages_written_in_a_zone_cut_off_whole_are_all_kept() {
    let Some(five) = Five::start_zoned('y') else { return };
    let (agents, limit) = (&five.agents, LIMIT);
    let cut = [1u64, 2];
    let pages: Vec<u64> = (0..24).collect();
    let text = |page: u64| format!("a{page:03}");
    wait_until("the DSM registered", limit, || write_page(&agents[0], 0, &text(0)).is_ok());
    for &page in &pages {
        write_page(&agents[0], page, &text(page)).expect("a write before the cut");
    }

    five.cut_off(&cut);
    for &page in &pages {
        let read = again_until(limit, || read_page(&agents[2], page));
        assert_eq!(read, Ok(text(page)), "page {page} through node 3 without zone a");
    }
}
