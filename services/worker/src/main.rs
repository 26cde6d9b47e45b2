//! `hybrid-worker`: serves protected layers from server bundles.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use worker::config::Settings;
use worker::Application;

/// Settings come from flags, else the environment (`WORKER_*`), else the config file (TOML,
/// same keys as the flags with `_`), else built-in defaults.
#[derive(Parser)]
#[command(name = "hybrid-worker", version)]
struct Args {
    /// Logs on stderr: `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long, env = "WORKER_LOG_FORMAT", default_value = "text")]
    log_format: service_kit::LogFormat,
    /// Config file (TOML).
    #[arg(long, env = "WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Print the config file's keys (with their types, flags and environment variables) as
    /// JSON and exit.
    #[arg(long)]
    print_config_keys: bool,
    /// Print the Prometheus metrics this service exports (names, help, labels) as JSON and exit.
    #[arg(long)]
    print_metrics: bool,
    /// [default: 127.0.0.1:8081]
    #[arg(long, env = "WORKER_LISTEN")]
    listen: Option<SocketAddr>,
    /// [default: 127.0.0.1:9181]
    #[arg(long, env = "WORKER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Server bundles (comma-separated in the environment).
    #[arg(long = "bundle", env = "WORKER_BUNDLES", value_delimiter = ',')]
    bundles: Vec<PathBuf>,
    /// [default: 67108864]
    #[arg(long, env = "WORKER_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Requests computed at once [default: the number of cores].
    #[arg(long, env = "WORKER_MAX_CONCURRENCY")]
    max_concurrency: Option<usize>,
    /// How long a request waits for a compute slot before 503 [default: 2000].
    #[arg(long, env = "WORKER_QUEUE_TIMEOUT_MS")]
    queue_timeout_ms: Option<u64>,
    /// Also serve packed results [default: true].
    #[arg(long, env = "WORKER_PACKED_RESULTS")]
    packed_results: Option<bool>,
    /// Prepared packing keys kept in memory [default: 64].
    #[arg(long, env = "WORKER_KEY_CACHE_ENTRIES")]
    key_cache_entries: Option<usize>,
    /// The planner's unit costs for packed layouts: `measure` (on this machine, at start),
    /// `builtin`, or `INPUT,MAC,OUTPUT,KEYSWITCH` in ns [default: measure].
    #[arg(long, env = "WORKER_PLANNER_COSTS")]
    planner_costs: Option<String>,
    /// Serve over TLS with this certificate chain (PEM) [default: plain HTTP].
    #[arg(long, env = "WORKER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "WORKER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS with the gateways.
    #[arg(long, env = "WORKER_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_config_keys {
        println!("{}", service_kit::config_contract::<Settings, Args>());
        return Ok(());
    }
    if args.print_metrics {
        println!(
            "{}",
            service_kit::metrics_contract(&worker::Metrics::new().described)
        );
        return Ok(());
    }
    service_kit::init_tracing(args.log_format);
    let file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let flags = Settings {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        bundles: (!args.bundles.is_empty()).then_some(args.bundles),
        max_body_bytes: args.max_body_bytes,
        max_concurrency: args.max_concurrency,
        queue_timeout_ms: args.queue_timeout_ms,
        packed_results: args.packed_results,
        key_cache_entries: args.key_cache_entries,
        planner_costs: args.planner_costs,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
    };
    let app = Application::build(flags.over(file).resolve()?).await?;
    tracing::info!(
        port = app.port(),
        metrics_port = app.metrics_port(),
        "worker listening"
    );
    app.run_until_stopped(service_kit::shutdown_signal())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_key_has_a_type_a_flag_and_an_environment_variable() {
        let contract: serde_json::Value =
            serde_json::from_str(&service_kit::config_contract::<Settings, Args>()).unwrap();
        let keys = contract["keys"].as_array().unwrap();
        assert!(keys.len() > 5, "{contract}");
        for k in keys {
            assert!(k["flag"].is_string() && k["env"].is_string(), "{k}");
            assert_ne!(k["type"], "unknown", "{k}");
        }
    }
}
