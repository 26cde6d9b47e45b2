//! `hybrid usage report | export | retention`: usage reports and the CSV export from a gateway's
//! admin API (admin token), and dropping usage partitions older than the retention period.

use std::time::{SystemTime, UNIX_EPOCH};

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use protocol::admin::{ExportQuery, UsageQuery};
use serde_json::json;

/// The gateway and the admin token to ask it with.
#[derive(Args)]
pub struct AdminApi {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin token with the compliance or admin role (`hybrid license admin-token`).
    #[arg(long, env = "HYBRID_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    #[command(flatten)]
    ca: crate::client::CaArgs,
}

/// Which usage: a window and optional filters.
#[derive(Args)]
pub struct Window {
    /// Start, epoch ms, inclusive [default: start of the current month].
    #[arg(long)]
    from_ms: Option<i64>,
    /// End, epoch ms, exclusive [default: now].
    #[arg(long)]
    to_ms: Option<i64>,
    #[arg(long)]
    customer: Option<String>,
    #[arg(long)]
    license: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    layer: Option<String>,
}

impl Window {
    fn export_query(self) -> ExportQuery {
        ExportQuery {
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            customer: self.customer,
            license: self.license,
            model: self.model,
            layer: self.layer,
        }
    }
}

#[derive(Subcommand)]
pub enum UsageCommand {
    /// Usage grouped by hour, day or month and by customer, license, model or layer (JSON).
    Report {
        #[command(flatten)]
        api: AdminApi,
        #[command(flatten)]
        window: Window,
        /// hour | day | month
        #[arg(long, default_value = "day")]
        group: String,
        /// Comma-separated: customer, license, model, layer.
        #[arg(long)]
        by: Option<String>,
    },
    /// Every billed query as CSV, streamed from the gateway (the export is audited).
    Export {
        #[command(flatten)]
        api: AdminApi,
        #[command(flatten)]
        window: Window,
        /// Output file [default: standard output].
        #[arg(long)]
        out: Option<PathBuf>,
    },
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// GETs `path` with `query`, failing with the gateway's error code on a non-2xx answer.
async fn get(
    api: &AdminApi,
    path: &str,
    query: &impl serde::Serialize,
) -> Result<reqwest::Response> {
    let query = query_pairs(query)?;
    let response = api
        .ca
        .http_client()?
        .get(format!("{}{path}", api.url.trim_end_matches('/')))
        .query(&query)
        .bearer_auth(&api.token)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", api.url))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("{status}: {body}");
    }
    Ok(response)
}

/// The set fields of a flat query struct as (name, value) pairs.
fn query_pairs(query: &impl serde::Serialize) -> Result<Vec<(String, String)>> {
    let value = serde_json::to_value(query)?;
    let mut pairs = Vec::new();
    for (k, v) in value.as_object().into_iter().flatten() {
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => pairs.push((k.clone(), s.clone())),
            other => pairs.push((k.clone(), other.to_string())),
        }
    }
    Ok(pairs)
}

pub fn run(cmd: UsageCommand) -> Result<()> {
    match cmd {
        UsageCommand::Report {
            api,
            window,
            group,
            by,
        } => {
            let mut query = UsageQuery::from(window.export_query());
            query.group =
                Some(serde_json::from_value(json!(group)).context("--group: hour, day or month")?);
            query.by = by;
            let report = runtime()?.block_on(async {
                anyhow::Ok(get(&api, "/v1/admin/usage", &query).await?.text().await?)
            })?;
            let value: serde_json::Value = serde_json::from_str(&report)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        UsageCommand::Export { api, window, out } => {
            let query = window.export_query();
            let mut sink: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).with_context(|| path.display().to_string())?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let bytes = runtime()?.block_on(async {
                let mut response = get(&api, "/v1/admin/usage/export.csv", &query).await?;
                let mut bytes = 0usize;
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .context("the export was interrupted: the file is incomplete")?
                {
                    bytes += chunk.len();
                    sink.write_all(&chunk)?;
                }
                sink.flush()?;
                anyhow::Ok(bytes)
            })?;
            if let Some(path) = out {
                eprintln!("{bytes} bytes written to {}", path.display());
            }
        }
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
