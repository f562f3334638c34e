//! The `gobelins` command.

mod demo;

use clap::{Parser, Subcommand};

/// gobelins keeps a cluster's distributed services running while nodes join, leave or fail.
#[derive(Parser)]
#[command(name = "gobelins", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Walk a cluster through joins, evictions and a failure under a load of entries, showing
    /// what the locator moves and who takes part at each change.
    Demo(demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(&args),
    }
}
