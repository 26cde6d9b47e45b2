//! `hybrid`: the command line of the hybrid FHE deployment.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod alert_watch;
mod bench;
mod bench_accuracy;
mod bench_chaos;
mod bench_e2e;
mod bench_gateway;
mod bench_planner;
mod client;
mod demo;
mod keys_cmd;
mod license_cmd;
mod local;
mod model_cmd;
mod serve;
mod split;
mod usage_cmd;

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
    /// The whole product on this machine: compile, license, worker + gateway on loopback,
    /// encrypted generation, per-token costs and the billed usage read back.
    Demo(demo::DemoArgs),
    /// Compile a model with protected layers into a client bundle and a server bundle.
    Compile(model_cmd::CompileArgs),
    /// Generate text with protected layers (disable | simulate | execute | remote).
    Generate(model_cmd::GenerateArgs),
    /// Serve a model on an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models), streamed or not, in any mode: what applications that talk to a local LLM
    /// connect to.
    Serve(serve::ServeArgs),
    /// Licenses: signing keys, issuing, inspecting.
    License {
        #[command(subcommand)]
        what: license_cmd::LicenseCommand,
    },
    /// The client's keys for packed results.
    Keys {
        #[command(subcommand)]
        what: keys_cmd::KeysCommand,
    },
    /// Usage ledger maintenance.
    Usage {
        #[command(subcommand)]
        what: usage_cmd::UsageCommand,
    },
    /// Write a checkpoint with a real architecture's configuration and random weights.
    Synth(bench_e2e::SynthArgs),
    /// Benchmarks (with --json, the last line of output is one JSON object).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

/// Exits 0, or on failure prints the error with its causes and exits 75 when the command may
/// succeed later (overloaded, rate limited, unreachable), 77 when it was refused (license,
/// quota, input), else 1.
fn main() {
    // The libraries' warnings (and the in-process services' logs) on stderr; `RUST_LOG` for more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(client::exit_code(&e));
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args),
        Command::Compile(args) => model_cmd::compile_cmd(args),
        Command::Generate(args) => model_cmd::generate_cmd(args),
        Command::Serve(args) => serve::run(args),
        Command::License { what } => license_cmd::run(what),
        Command::Keys { what } => keys_cmd::run(what),
        Command::Usage { what } => usage_cmd::run(what),
        Command::Synth(args) => bench_e2e::synth(args),
        Command::Bench { what } => bench::run(what),
    }
}
