//! The `gobelins` command.
#![forbid(unsafe_code)]

mod cli;
mod demo;
mod quiet;

use clap::{Parser, Subcommand};

/// What `--version` says: the build, and the protocol its agents speak. Agents of two protocols
/// do not talk to each other, so an operator upgrades a whole cluster at once (README).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (protocol 30)");

/// gobelins keeps a cluster's distributed services running while nodes join, leave or fail.
#[derive(Parser)]
#[command(name = "gobelins", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor daemon of this node.
    Agent(cli::AgentArgs),
    /// Show the cluster: nodes, statuses, epoch, leader, voters and the cell tree.
    Status(cli::StatusArgs),
    /// Show this node's requests (ok, delayed, failed), what it served and moved, and the phases
    /// of the changes it took part in.
    Stats(cli::StatsArgs),
    /// Ask the running local agent to (re)join the cluster through a member; waits until it is active.
    ///
    /// For an agent that still runs: one the cluster declared failed, say. An agent that left
    /// stops: start it again with `gobelins agent --join ADDR`.
    Join(cli::JoinArgs),
    /// Take the local node out of the cluster gracefully; waits until it has handed over its entries and left.
    Leave(cli::LeaveArgs),
    /// Remove another node from the cluster; waits until it has handed over its entries and left (or failed on its way out).
    Evict(cli::EvictArgs),
    /// Lift the hold on a node that kept failing (its lives declared failed soon after they
    /// began), once its cause is mended: it rejoins at its next try, within seconds.
    Unhold(cli::UnholdArgs),
    /// Show what a join, leave, eviction or failure would move if it happened now, and which
    /// nodes would take part; nothing is carried out.
    Plan(cli::PlanArgs),
    /// Read or write distributed shared memory through the local agent.
    Dsm(cli::DsmArgs),
    /// Read or write the kvdir service (the example key-value directory) through the local
    /// agent, or accept a slot's reported loss.
    Kv(cli::KvArgs),
    /// Start a local cluster of real agents, keep clients writing to it, and walk it through an
    /// addition, an eviction and a kill -9, showing what each change cost.
    Demo(demo::DemoArgs),
}

/// The log filter without `RUST_LOG`. Quiet: our warnings say what to fix. Raft's own chatter
/// needs `RUST_LOG`, and so do its replication errors (one per follower it cannot reach,
/// several a second, for a node killed or evicted on purpose too) and its unanswered calls for
/// votes (`quiet`). The failure detector says which node went silent, the leader says when it
/// hears from no majority, a voter says when it hears from no leader, and raft's network names
/// a peer that answers its messages with something else for a while.
const DEFAULT_LOG: &str = "warn,openraft=error,openraft::replication=off";

fn main() -> std::process::ExitCode {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Raft's unanswered votes stay out unless `RUST_LOG` asks for raft's core by name or for
    // everything: set to the default's own text (as operators copy it from the README), it
    // gave a cut-off voter's log twenty of them a second.
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let quiet = (!quiet::asks_for_votes(&asked)).then_some(quiet::UnansweredVotes);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    // Colours only for a terminal: an agent's log is most often a file (the demo's, systemd's
    // journal), where the escapes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(filter).with(quiet).with(output).init();
    let command = Cli::parse().command;
    // `kv get` keeps 1 for "the key has no value", as `grep` does for "nothing found".
    let failed = match &command {
        Command::Kv(kv) if kv.is_get() => std::process::ExitCode::from(2),
        _ => std::process::ExitCode::FAILURE,
    };
    match run(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<cli::NoValue>().is_some() => {
            eprintln!("{error}");
            std::process::ExitCode::FAILURE
        }
        // Whoever read the output stopped early (`gobelins status | head -1`): as for any
        // command in a pipe, nothing to say about it.
        Err(error)
            if error.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            failed
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            failed
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent(args) => cli::agent(args),
        Command::Status(args) => cli::status(args),
        Command::Stats(args) => cli::stats(args),
        Command::Join(args) => cli::join(args),
        Command::Leave(args) => cli::leave(args),
        Command::Evict(args) => cli::evict(args),
        Command::Unhold(args) => cli::unhold(args),
        Command::Plan(args) => cli::plan(args),
        Command::Dsm(args) => cli::dsm(args),
        Command::Kv(args) => cli::kv(args),
        Command::Demo(args) => demo::run(&args),
    }
}

#[cfg(test)]
mod tests {
    /// `--version` names the protocol the agents speak, which decides whether two builds can
    /// run in one cluster: kept in step with the frames' version.
    #[test]
    fn the_version_names_the_protocol_the_agents_speak() {
        let protocol = format!("(protocol {})", gobelins_supervisor::frame::VERSION);
        assert!(super::VERSION.ends_with(&protocol), "{}", super::VERSION);
    }
}
