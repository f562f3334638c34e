//! Black-box test of the README's main command: `gobelins demo` starts real agent processes,
//! keeps clients writing, adds, evicts and kills nodes, and must fail nothing and lose nothing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gobelins");

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

#[test]
fn the_demo_fails_no_request_and_loses_no_entry() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut child = Command::new(BIN)
        .args(["demo", "--keys", "3000", "--clients", "4", "--dir"])
        .arg(dir.path().join("demo"))
        .env("RUST_LOG", "warn,openraft=error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gobelins demo");
    // A demo that hangs must fail the test, not the CI's time limit.
    let started = Instant::now();
    while child.try_wait().expect("poll the demo").is_none() {
        if started.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collect the demo's output");
            panic!(
                "the demo did not finish within 180 s:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("collect the demo's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let kept = std::fs::read_dir(dir.path().join("demo")).map(|entries| entries.count());
    assert!(matches!(kept, Ok(n) if n > 0), "the --dir given keeps the agents' data: {kept:?}");
    let last = stdout.lines().last().expect("the demo prints");
    assert!(last.starts_with("demo: requests_ok="), "{last}");
    assert_eq!(field(last, "requests_failed"), 0, "{stdout}");
    assert_eq!(field(last, "entries_lost"), 0, "{stdout}");
    assert_eq!(field(last, "changes"), 3, "{stdout}");
    assert!(
        stdout.contains("demo: the agents reported 0 kvdir slots lost"),
        "one failure at a time, a survivor vouched for every slot rebuilt:\n{stdout}"
    );
    assert!(
        field(last, "requests_ok") > 3000,
        "clients kept writing through the changes: {stdout}"
    );
    for change in ["add node 4", "evict node 3", "kill -9 node 4"] {
        assert!(stdout.contains(&format!("change: {change}: stable")), "{change}:\n{stdout}");
    }
    // Each change was planned first, as `gobelins plan` shows it: the joiner receives, the
    // evicted node sends, and the survivors rebuild what the killed one managed.
    let planned: Vec<&str> =
        stdout.lines().filter_map(|l| l.trim().strip_prefix("planned    ")).collect();
    assert_eq!(planned.len(), 3, "{stdout}");
    assert!(planned[0].contains(", receive n4: "), "{stdout}");
    assert!(planned[1].starts_with("send n3, receive "), "{stdout}");
    assert!(planned[2].starts_with("rebuild n") && !planned[2].contains("n4"), "{stdout}");
    let moved: u64 = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("entries    moved="))
        .map(|rest| rest.split_whitespace().next().unwrap_or("0").parse::<u64>().unwrap_or(0))
        .sum();
    assert!(moved > 0, "entries moved between processes:\n{stdout}");
}
