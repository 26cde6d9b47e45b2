//! `hybrid-worker`: serves protected layers from server bundles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use worker::{Application, WorkerConfig};

/// Settings come from flags or the environment (`WORKER_*`).
#[derive(Parser)]
#[command(name = "hybrid-worker", version)]
struct Args {
    #[arg(long, env = "WORKER_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    #[arg(long, env = "WORKER_METRICS_LISTEN", default_value = "127.0.0.1:9181")]
    metrics_listen: SocketAddr,
    /// Server bundles (comma-separated in the environment).
    #[arg(
        long = "bundle",
        env = "WORKER_BUNDLES",
        value_delimiter = ',',
        required = true
    )]
    bundles: Vec<PathBuf>,
    #[arg(long, env = "WORKER_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Requests computed at once (default: the number of cores).
    #[arg(long, env = "WORKER_MAX_CONCURRENCY")]
    max_concurrency: Option<usize>,
    #[arg(long, env = "WORKER_QUEUE_TIMEOUT_MS", default_value_t = 2000)]
    queue_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::init_tracing();
    let args = Args::parse();
    let mut config = WorkerConfig::local(args.bundles);
    config.listen = args.listen;
    config.metrics_listen = args.metrics_listen;
    config.max_body_bytes = args.max_body_bytes;
    config.queue_timeout = Duration::from_millis(args.queue_timeout_ms);
    if let Some(n) = args.max_concurrency {
        config.max_concurrency = n;
    }
    let app = Application::build(config).await?;
    tracing::info!(
        port = app.port(),
        metrics_port = app.metrics_port(),
        "worker listening"
    );
    app.run_until_stopped(service_kit::shutdown_signal())
        .await?;
    Ok(())
}
