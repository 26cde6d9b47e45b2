//! HTTP plumbing shared by the gateway and the workers: the error answer (a JSON
//! `protocol::ErrorBody` with a stable code), the Prometheus `/metrics` port, and serving an API
//! (over TLS when configured) and its metrics until a shutdown signal, letting requests in flight
//! finish; log set-up.

mod tls_listener;

pub use tls_listener::TlsListener;

use std::future::Future;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use protocol::{codes, ErrorBody};
use tokio::net::TcpListener;

/// A config file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {reason}")]
pub struct ConfigFileError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// Reads a TOML config file into `T` (whose unknown keys should be refused with
/// `#[serde(deny_unknown_fields)]`, so that a typo never passes silently).
pub fn read_config_file<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, ConfigFileError> {
    let fail = |reason: String| ConfigFileError {
        path: path.into(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    toml::from_str(&text).map_err(|e| fail(e.to_string()))
}

/// A metric a service registers: what `--print-metrics` lists.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetricInfo {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    #[serde(rename = "type")]
    pub kind: String,
    pub help: String,
    /// Its label names (empty for a plain counter or gauge).
    pub labels: Vec<String>,
}

/// Registers `collectors` in `registry`; returns the metrics they declare (so that tests and
/// deploy checks can tell that dashboards and alerts only use metrics that exist, even before
/// any is observed).
pub fn register_metrics(
    registry: &Registry,
    collectors: Vec<Box<dyn prometheus::core::Collector>>,
) -> Vec<MetricInfo> {
    let mut described = Vec::new();
    for c in collectors {
        // A collector's families carry the type even before any observation.
        let kinds: Vec<(String, String)> = c
            .collect()
            .iter()
            .map(|f| {
                (
                    f.name().to_string(),
                    format!("{:?}", f.get_field_type()).to_lowercase(),
                )
            })
            .collect();
        described.extend(c.desc().iter().map(|d| {
            MetricInfo {
                name: d.fq_name.clone(),
                kind: kinds
                    .iter()
                    .find(|(n, _)| n == &d.fq_name)
                    .map_or_else(|| "untyped".into(), |(_, k)| k.clone()),
                help: d.help.clone(),
                labels: d.variable_labels.clone(),
            }
        }));
        registry.register(c).expect("unique metric names");
    }
    described
}

/// What `--print-metrics` prints: every metric of a service (observed or not), with its help
/// text and label names, as JSON (`{"metrics": [{"name", "help", "labels"}]}`).
pub fn metrics_contract(metrics: &[MetricInfo]) -> String {
    serde_json::to_string_pretty(&serde_json::json!({ "metrics": metrics })).expect("JSON")
}

/// What `--print-config-keys` prints: every key of a service's config file (the fields of its
/// settings type `T`, which refuses others), the TOML type each accepts, and the flag and
/// environment variable that set it (from the service's command line `C`), as JSON:
/// `{"keys": [{"key", "type", "flag", "env"}]}`. Deploy checks compare config files with it.
pub fn config_contract<T, C>() -> String
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
    C: clap::CommandFactory,
{
    let fields = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    // The type of a key: the first sample value its field accepts.
    let samples = [
        ("string", "\"127.0.0.1:1\""),
        ("integer", "1"),
        ("boolean", "true"),
        ("array", "[\"127.0.0.1:1\"]"),
    ];
    let command = C::command();
    let keys: Vec<serde_json::Value> = fields
        .iter()
        .map(|key| {
            let kind = samples
                .iter()
                .find(|(_, v)| toml::from_str::<T>(&format!("{key} = {v}")).is_ok())
                .map_or("unknown", |(k, _)| *k);
            let arg = command.get_arguments().find(|a| a.get_id() == key.as_str());
            serde_json::json!({
                "key": key,
                "type": kind,
                "flag": arg.and_then(|a| a.get_long()).map(|l| format!("--{l}")),
                "env": arg.and_then(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()),
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({ "keys": keys })).expect("JSON")
}

/// Header carrying an error answer's code, read back by the metrics middleware of a service.
pub const ERROR_CODE_HEADER: &str = "x-error-code";

/// An error answer: status, stable code, message, and optionally seconds to wait.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header.
    pub fn retry(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400 for an invalid model or layer name.
    pub fn invalid_name(e: protocol::InvalidName) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, codes::INVALID_NAME, e.to_string())
    }

    /// The body could not be read: 413 past `limit` bytes, else 400.
    pub fn body(rejection: BytesRejection, limit: usize) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::BODY_TOO_LARGE,
                format!("body over {limit} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                codes::BAD_BODY,
                rejection.body_text(),
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                code: self.code.to_string(),
                message: self.message,
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(ERROR_CODE_HEADER, HeaderValue::from_static(self.code));
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// The outcome label of an answer: `ok`, or its error code (a bounded set of constants).
pub fn outcome(response: &Response) -> String {
    if response.status().is_success() {
        return "ok".into();
    }
    response
        .headers()
        .get(ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("error")
        .to_string()
}

/// An answer carrying ciphertext bytes and the server compute time.
pub fn ciphertext_answer(bytes: Bytes, compute_ms: f64) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                protocol::CIPHERTEXT_CONTENT_TYPE.to_string(),
            ),
            (
                header::HeaderName::from_static(protocol::COMPUTE_MS_HEADER),
                format!("{compute_ms:.3}"),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// A router serving `registry` at `/metrics` in the Prometheus text format.
pub fn metrics_router(registry: Registry) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut out = Vec::new();
                let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
                String::from_utf8(out).unwrap_or_default()
            }
        }),
    )
}

/// Serves `api` (over TLS with `tls`) and `metrics` (plain HTTP, for the scraper inside the
/// cluster) until `shutdown` resolves; requests in flight finish first.
pub async fn serve(
    api_listener: TcpListener,
    tls: Option<std::sync::Arc<tls::rustls::ServerConfig>>,
    api: Router,
    metrics_listener: TcpListener,
    metrics: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(());
    let mut metrics_rx = rx.clone();
    let metrics_server = tokio::spawn(async move {
        axum::serve(metrics_listener, metrics)
            .with_graceful_shutdown(async move {
                let _ = metrics_rx.changed().await;
            })
            .await
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let mut api_rx = rx;
    let stopped = async move {
        let _ = api_rx.changed().await;
    };
    match tls {
        Some(config) => {
            axum::serve(TlsListener::new(api_listener, config), api)
                .with_graceful_shutdown(stopped)
                .await?
        }
        None => {
            axum::serve(api_listener, api)
                .with_graceful_shutdown(stopped)
                .await?
        }
    }
    metrics_server.await.map_err(std::io::Error::other)?
}

/// How the services write their logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format `{other}`: text or json")),
        }
    }
}

/// Structured logs on stderr in `format`, filtered by `RUST_LOG` (default `info`). Logs that go
/// to a file or a pipe carry no colour codes.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes and systemd send to stop a service).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down after requests in flight");
}
