//! `hybrid`: the command line of the hybrid FHE deployment.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;

#[derive(Parser)]
#[command(
    name = "hybrid",
    version,
    about = "Metered, licensed hybrid deployment of LLMs with encrypted linear layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks (with --json, the last line of output is one JSON object).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Bench { what } => bench::run(what),
    }
}
