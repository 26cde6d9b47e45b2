//! `hybrid usage retention`: drop the usage partitions older than the retention period.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum UsageCommand {
    /// Drop monthly usage partitions (Postgres) that end before the last `keep_months` months.
    /// Rollups, quotas and the audit log are kept; the drop is audited.
    Retention {
        /// The ledger (postgres://...; SQLite keeps one table and drops nothing).
        #[arg(long, env = "GATEWAY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Whole months kept before the current one.
        #[arg(long, default_value_t = 12)]
        keep_months: u32,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
}

pub fn run(cmd: UsageCommand) -> Result<()> {
    match cmd {
        UsageCommand::Retention {
            database_url,
            keep_months,
            actor,
        } => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
            // The start of the oldest month kept: step back from the current month.
            let mut cutoff = ledger::month_start(now);
            for _ in 0..keep_months {
                cutoff = ledger::month_start(cutoff - 1);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let dropped = runtime.block_on(async {
                let ledger = ledger::Ledger::connect(&database_url).await?;
                anyhow::Ok(ledger.drop_partitions_before(cutoff, &actor, now).await?)
            })?;
            println!("{}", json!({"cutoff_ms": cutoff, "dropped": dropped}));
        }
    }
    Ok(())
}
