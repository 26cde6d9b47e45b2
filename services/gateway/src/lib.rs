//! The gateway: the licensed, metered entry point of the service.
//!
//! Per apply request: verify the license (signature once per license and key set; audience,
//! time and revocation every time) -> admission (model and layer licensed, rows per request,
//! in-flight cap per license on this replica) -> the license's rate and quota reserved in the
//! ledger in one statement, shared by every replica, under a lease -> forward the ciphertext
//! bytes to a healthy worker (one retry on another worker if the connection fails before an
//! answer) -> settle (usage row, rollups, quota; settlements that wait together go in one
//! statement) -> answer. It fails closed: when the ledger cannot record usage, nothing is
//! forwarded and the client gets 503. It reads only the header of a ciphertext (to meter it).
//!
//! It serves its API over TLS when given a certificate (`tls_cert`, `tls_key`) and reaches its
//! workers over `https` with the system's roots, a private CA and, for mutual TLS, a client
//! certificate (`worker_ca_cert`, `worker_client_cert`, `worker_client_key`).

mod admin;
mod admission;
mod auth;
pub mod config;
mod error;
mod keys;
mod keysets;
mod metrics;
mod openapi;
mod router;
mod routes;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ledger::Ledger;
use license::{KeySet, SigningKey};
use tokio::net::TcpListener;

pub use metrics::Metrics;
pub use openapi::openapi_json;

/// Most settlements one ledger statement carries (group commit).
const SETTLEMENT_GROUP: usize = 64;
/// The most admissions of one license x layer x period admitted in one statement.
const ADMISSION_GROUP: usize = 64;

/// Gateway settings.
#[derive(Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// `postgres://...` or `sqlite:PATH?mode=rwc`.
    pub database_url: String,
    /// Public keys that sign licenses.
    pub keyset: KeySet,
    /// Public keys that sign admin tokens.
    pub admin_keyset: KeySet,
    /// The files the key sets were read from, read again when they change (none: fixed).
    pub keyset_file: Option<std::path::PathBuf>,
    pub admin_keyset_file: Option<std::path::PathBuf>,
    /// How often the key set files are checked for changes.
    pub keyset_reload: Duration,
    /// The key with which the admin API issues licenses (none: issuing over HTTP is off).
    pub signing_key: Option<Arc<SigningKey>>,
    /// The audience licenses must name.
    pub audience: String,
    /// Worker base URLs; `dns+http://NAME:PORT` stands for every address NAME resolves to.
    pub workers: Vec<String>,
    pub max_body_bytes: usize,
    /// Rows (tokens) per request at most: the model's context length.
    pub max_rows_per_request: usize,
    /// How long a revocation may take to reach this replica.
    pub revocation_refresh: Duration,
    pub worker_timeout: Duration,
    pub health_interval: Duration,
    /// How long a reservation holds quota if its request is never settled or released.
    pub reservation_lease: Duration,
    /// TLS of the API (none: plain HTTP, for a TLS-terminating load balancer in front).
    pub tls: Option<tls::ServerTls>,
    /// How the workers are reached over `https`: a private CA, a client certificate (mutual
    /// TLS).
    pub worker_tls: tls::ClientTls,
}

impl GatewayConfig {
    /// The lease of a reservation when none is set: the longest forward (a packed request,
    /// its key pushed, the request again: three worker timeouts) and 10 s.
    pub fn default_lease(worker_timeout: Duration) -> Duration {
        worker_timeout * 3 + Duration::from_secs(10)
    }

    pub fn local(database_url: &str, keyset: KeySet, audience: &str, workers: Vec<String>) -> Self {
        GatewayConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            database_url: database_url.to_string(),
            admin_keyset: keyset.clone(),
            keyset_file: None,
            admin_keyset_file: None,
            keyset_reload: Duration::from_secs(5),
            signing_key: None,
            keyset,
            audience: audience.to_string(),
            workers,
            max_body_bytes: 64 << 20,
            max_rows_per_request: 2048,
            revocation_refresh: Duration::from_secs(2),
            worker_timeout: Duration::from_secs(60),
            health_interval: Duration::from_secs(2),
            reservation_lease: Self::default_lease(Duration::from_secs(60)),
            tls: None,
            worker_tls: tls::ClientTls::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("http client: {0}")]
    Client(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Shared state of the handlers.
pub struct AppState {
    pub config: GatewayConfig,
    pub ledger: Arc<Ledger>,
    pub workers: workers::WorkerPool,
    pub admission: admission::Admission,
    pub metrics: Metrics,
    pub key_owners: keys::KeyOwners,
    /// What verifies licenses and admin tokens now (reloaded from their files).
    pub keysets: keysets::Reloadable,
    pub admin_keysets: keysets::Reloadable,
}

/// A gateway bound to its ports.
pub struct Application {
    api: TcpListener,
    metrics: TcpListener,
    tls: Option<Arc<tls::rustls::ServerConfig>>,
    state: Arc<AppState>,
}

impl Application {
    /// Connects the ledger (running its migrations) and binds the ports.
    pub async fn build(config: GatewayConfig) -> Result<Self, GatewayError> {
        if config.workers.is_empty() {
            return Err(GatewayError::Config(config::ConfigError::Missing(
                "workers",
            )));
        }
        // Certificate files are checked before anything starts: a bad file stops the start.
        let tls = config.tls.as_ref().map(|t| t.config()).transpose()?;
        let ledger = Arc::new(Ledger::connect(&config.database_url).await?);
        // Admissions and settlements that wait together go in one statement each (Postgres).
        ledger.start_group_admission(ADMISSION_GROUP);
        ledger.start_group_commit(SETTLEMENT_GROUP);
        let api = TcpListener::bind(config.listen).await?;
        let metrics_listener = TcpListener::bind(config.metrics_listen).await?;
        let workers =
            workers::WorkerPool::new(&config.workers, config.worker_timeout, &config.worker_tls)
                .await?;
        let metrics = Metrics::new();
        metrics.workers_configured.set(workers.count() as i64);
        let keysets = keysets::Reloadable::new(config.keyset.clone(), config.keyset_file.clone());
        let admin_keysets = keysets::Reloadable::new(
            config.admin_keyset.clone(),
            config.admin_keyset_file.clone(),
        );
        let state = Arc::new(AppState {
            admission: admission::Admission::new(config.revocation_refresh),
            metrics,
            workers,
            ledger,
            config,
            key_owners: keys::KeyOwners::default(),
            keysets,
            admin_keysets,
        });
        Ok(Application {
            api,
            metrics: metrics_listener,
            tls,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.api.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn ledger(&self) -> Arc<Ledger> {
        self.state.ledger.clone()
    }

    /// Serves until `shutdown` resolves; requests in flight finish first.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let health = tokio::spawn(workers::health_loop(self.state.clone()));
        let reload = tokio::spawn(keysets::reload_loop(
            self.state.clone(),
            self.state.config.keyset_reload,
        ));
        let metrics = service_kit::metrics_router(self.state.metrics.registry.clone());
        let served = service_kit::serve(
            self.api,
            self.tls,
            router::router(self.state),
            self.metrics,
            metrics,
            shutdown,
        )
        .await;
        health.abort();
        reload.abort();
        served
    }
}
