//! `hybrid-gateway`: the licensed, metered entry point.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use gateway::{Application, GatewayConfig};

/// Settings come from flags or the environment (`GATEWAY_*`).
#[derive(Parser)]
#[command(name = "hybrid-gateway", version)]
struct Args {
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[arg(long, env = "GATEWAY_METRICS_LISTEN", default_value = "127.0.0.1:9180")]
    metrics_listen: SocketAddr,
    /// Ledger database: postgres://... or sqlite:PATH?mode=rwc (embedded).
    #[arg(
        long,
        env = "GATEWAY_DATABASE_URL",
        default_value = "sqlite:hybrid-ledger.db?mode=rwc",
        hide_env_values = true
    )]
    database_url: String,
    /// Key set file (public keys that sign licenses), from `hybrid license keygen`.
    #[arg(long, env = "GATEWAY_KEYSET")]
    keyset: PathBuf,
    #[arg(long, env = "GATEWAY_AUDIENCE", default_value = "hybrid-gateway")]
    audience: String,
    /// Worker base URLs (comma-separated in the environment).
    #[arg(
        long = "worker",
        env = "GATEWAY_WORKERS",
        value_delimiter = ',',
        required = true
    )]
    workers: Vec<String>,
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Rows per request at most (the model's context length).
    #[arg(long, env = "GATEWAY_MAX_ROWS", default_value_t = 2048)]
    max_rows_per_request: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::init_tracing();
    let args = Args::parse();
    let keyset = license::KeySet::from_json(&std::fs::read_to_string(&args.keyset)?)?;
    let mut config = GatewayConfig::local(&args.database_url, keyset, &args.audience, args.workers);
    config.listen = args.listen;
    config.metrics_listen = args.metrics_listen;
    config.max_body_bytes = args.max_body_bytes;
    config.max_rows_per_request = args.max_rows_per_request;
    let app = Application::build(config).await?;
    tracing::info!(
        port = app.port(),
        metrics_port = app.metrics_port(),
        "gateway listening"
    );
    app.run_until_stopped(service_kit::shutdown_signal())
        .await?;
    Ok(())
}
