//! `hybrid keys ...`: the client's keys for packed results, and the result flags shared by the
//! commands that talk to the service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hybrid_model::remote::{PackedKeys, ResultsMode};
use serde_json::json;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Generate a secret key and its packing key (public, about 1.3 MB) into a directory. The
    /// packing key is registered with the service on first use (`--keys DIR`).
    Gen(GenArgs),
}

#[derive(Args)]
pub struct GenArgs {
    /// Directory to write `packed-secret.key` (owner-only) and `packing.key` into.
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// How results come back from the service.
#[derive(Args, Clone)]
pub struct ResultsArgs {
    /// keyless (no key, larger downloads), packed (a one-time packing key upload, about a
    /// tenth of the download), or auto (the planner's choice per request among what the
    /// service offers).
    #[arg(long, default_value = "auto")]
    pub results: String,
    /// What --results auto optimises for: latency or bandwidth.
    #[arg(long, default_value = "bandwidth")]
    pub preference: String,
    /// Packing keys from `hybrid keys gen` [default: fresh keys for this session].
    #[arg(long)]
    pub keys: Option<PathBuf>,
}

impl ResultsArgs {
    pub fn mode(&self) -> Result<ResultsMode> {
        Ok(ResultsMode::parse(&self.results, &self.preference)?)
    }

    pub fn keys(&self) -> Result<Option<Arc<PackedKeys>>> {
        self.keys
            .as_ref()
            .map(|dir| {
                PackedKeys::load(dir)
                    .map(Arc::new)
                    .with_context(|| format!("reading keys from {}", dir.display()))
            })
            .transpose()
    }
}

pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Gen(args) => {
            let started = Instant::now();
            let keys = PackedKeys::generate()?;
            let keygen_ms = started.elapsed().as_secs_f64() * 1e3;
            keys.save(&args.out)?;
            let packing_key_bytes = keys.packing.to_bytes().len();
            let report = json!({
                "dir": args.out.display().to_string(),
                "parameter_set": keys.secret.params().name,
                "packing_key_bytes": packing_key_bytes,
                "keygen_ms": keygen_ms,
            });
            if args.json {
                println!("{report}");
            } else {
                println!(
                    "wrote {} ({} parameters): packing key {:.2} MB, generated in {keygen_ms:.0} ms",
                    args.out.display(),
                    keys.secret.params().name,
                    packing_key_bytes as f64 / 1e6
                );
            }
            Ok(())
        }
    }
}
