//! `hybrid-gateway`: the licensed, metered entry point.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use gateway::config::Settings;
use gateway::Application;

/// Settings come from flags, else the environment (`GATEWAY_*`), else the config file (TOML,
/// same keys as the flags with `_`), else built-in defaults.
#[derive(Parser)]
#[command(name = "hybrid-gateway", version)]
struct Args {
    /// Logs on stderr: `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long, env = "GATEWAY_LOG_FORMAT", default_value = "text")]
    log_format: service_kit::LogFormat,
    /// Config file (TOML).
    #[arg(long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the OpenAPI document of the API and exit.
    #[arg(long)]
    print_openapi: bool,
    /// Print the config file's keys (with their types, flags and environment variables) as
    /// JSON and exit.
    #[arg(long)]
    print_config_keys: bool,
    /// Print the Prometheus metrics this service exports (names, help, labels) as JSON and exit.
    #[arg(long)]
    print_metrics: bool,
    /// [default: 127.0.0.1:8080]
    #[arg(long, env = "GATEWAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// [default: 127.0.0.1:9180]
    #[arg(long, env = "GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Ledger database: postgres://... or sqlite:PATH?mode=rwc (embedded)
    /// [default: sqlite:hybrid-ledger.db?mode=rwc]
    #[arg(long, env = "GATEWAY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Key set file (public keys that sign licenses), from `hybrid license keygen`.
    #[arg(long, env = "GATEWAY_KEYSET")]
    keyset: Option<PathBuf>,
    /// Key set verifying admin tokens [default: --keyset].
    #[arg(long, env = "GATEWAY_ADMIN_KEYSET")]
    admin_keyset: Option<PathBuf>,
    /// Signing key (PEM) for issuing licenses over the admin API [default: issuing off].
    #[arg(long, env = "GATEWAY_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Key id of --signing-key [default: its file name without .key.pem].
    #[arg(long, env = "GATEWAY_SIGNING_KID")]
    signing_kid: Option<String>,
    /// The audience licenses must name [default: hybrid-gateway].
    #[arg(long, env = "GATEWAY_AUDIENCE")]
    audience: Option<String>,
    /// Worker base URLs (comma-separated in the environment).
    #[arg(long = "worker", env = "GATEWAY_WORKERS", value_delimiter = ',')]
    workers: Vec<String>,
    /// [default: 67108864]
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Rows per request at most (the model's context length) [default: 2048].
    #[arg(long, env = "GATEWAY_MAX_ROWS")]
    max_rows_per_request: Option<usize>,
    /// How long a revocation may take to reach this replica [default: 2000].
    #[arg(long, env = "GATEWAY_REVOCATION_REFRESH_MS")]
    revocation_refresh_ms: Option<u64>,
    /// [default: 60000]
    #[arg(long, env = "GATEWAY_WORKER_TIMEOUT_MS")]
    worker_timeout_ms: Option<u64>,
    /// [default: 2000]
    #[arg(long, env = "GATEWAY_HEALTH_INTERVAL_MS")]
    health_interval_ms: Option<u64>,
    /// How long a reservation holds quota when its request is never settled (its gateway
    /// was killed) [default: 3 x the worker timeout + 10 s].
    #[arg(long, env = "GATEWAY_RESERVATION_LEASE_SECONDS")]
    reservation_lease_seconds: Option<u64>,
    /// How often the key set files are checked for changes [default: 5000].
    #[arg(long, env = "GATEWAY_KEYSET_RELOAD_MS")]
    keyset_reload_ms: Option<u64>,
    /// Serve over TLS with this certificate chain (PEM) [default: plain HTTP].
    #[arg(long, env = "GATEWAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A CA (PEM) trusted for https workers, beside the system's roots.
    #[arg(long, env = "GATEWAY_WORKER_CA_CERT")]
    worker_ca_cert: Option<PathBuf>,
    /// Certificate (PEM) presented to workers that require one (mutual TLS).
    #[arg(
        long,
        env = "GATEWAY_WORKER_CLIENT_CERT",
        requires = "worker_client_key"
    )]
    worker_client_cert: Option<PathBuf>,
    /// The private key (PEM) of --worker-client-cert.
    #[arg(
        long,
        env = "GATEWAY_WORKER_CLIENT_KEY",
        requires = "worker_client_cert"
    )]
    worker_client_key: Option<PathBuf>,
}

impl Args {
    fn settings(self) -> Settings {
        Settings {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            database_url: self.database_url,
            keyset: self.keyset,
            admin_keyset: self.admin_keyset,
            signing_key: self.signing_key,
            signing_kid: self.signing_kid,
            audience: self.audience,
            workers: (!self.workers.is_empty()).then_some(self.workers),
            max_body_bytes: self.max_body_bytes,
            max_rows_per_request: self.max_rows_per_request,
            revocation_refresh_ms: self.revocation_refresh_ms,
            worker_timeout_ms: self.worker_timeout_ms,
            health_interval_ms: self.health_interval_ms,
            reservation_lease_seconds: self.reservation_lease_seconds,
            keyset_reload_ms: self.keyset_reload_ms,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            worker_ca_cert: self.worker_ca_cert,
            worker_client_cert: self.worker_client_cert,
            worker_client_key: self.worker_client_key,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_openapi {
        println!("{}", gateway::openapi_json());
        return Ok(());
    }
    if args.print_config_keys {
        println!("{}", service_kit::config_contract::<Settings, Args>());
        return Ok(());
    }
    if args.print_metrics {
        println!(
            "{}",
            service_kit::metrics_contract(&gateway::Metrics::new().described)
        );
        return Ok(());
    }
    service_kit::init_tracing(args.log_format);
    let file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let config = args.settings().over(file).resolve()?;
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
