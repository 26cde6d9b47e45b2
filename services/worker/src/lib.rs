//! The worker: loads server bundles, precomputes each protected layer once, and applies layers
//! to encrypted batches over HTTP (see the `protocol` crate for the routes).
//!
//! `Application::build` binds its ports (0 picks free ones), then loads the bundles in the
//! background: `/readyz` answers 503 until every layer is compiled.

pub mod config;
pub mod keys;
mod metrics;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fhe_linear::{CompiledLayer, LayerSpec};
use protocol::{LayerInfo, ModelLayers, Name};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use metrics::Metrics;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// API address (port 0: any free port).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` address.
    pub metrics_listen: SocketAddr,
    /// Server bundles to serve (`server.safetensors` files written by `hybrid compile`).
    pub bundles: Vec<PathBuf>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Requests computed at once; more wait up to `queue_timeout`, then get 503.
    pub max_concurrency: usize,
    pub queue_timeout: Duration,
    /// Also compile each layer for packed results (a second set of weight transforms).
    pub packed_results: bool,
    /// Prepared packing keys kept (least recently used out first).
    pub key_cache_entries: usize,
    /// Where the planner's unit costs come from when choosing the packed layout of each layer.
    pub planner_costs: PlannerCosts,
    /// TLS of the API (none: plain HTTP); with a client CA, gateways must present a
    /// certificate it signed.
    pub tls: Option<tls::ServerTls>,
}

impl WorkerConfig {
    /// Loopback, free ports, one request per core, 64 MiB bodies.
    pub fn local(bundles: Vec<PathBuf>) -> Self {
        WorkerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            bundles,
            max_body_bytes: 64 << 20,
            max_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_timeout: Duration::from_secs(2),
            packed_results: true,
            key_cache_entries: 64,
            planner_costs: PlannerCosts::Builtin,
            tls: None,
        }
    }
}

/// The unit costs with which a worker plans its packed layouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlannerCosts {
    /// Measured on this machine before the bundles are compiled (`fhe_linear::calibrate`,
    /// under a second of one core): the default of a deployed worker.
    Measure,
    /// The planner's built-in constants (one machine's measurement).
    Builtin,
    /// Given nanoseconds per input coefficient, multiply-accumulate, output coefficient and
    /// key-switched coefficient (e.g. the `unit_costs` of one `hybrid bench planner` run): every
    /// worker of a fleet given the same numbers offers the same layouts.
    Given([f64; 4]),
}

impl PlannerCosts {
    /// `measure`, `builtin`, or four positive numbers separated by commas.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "measure" => Some(PlannerCosts::Measure),
            "builtin" => Some(PlannerCosts::Builtin),
            given => {
                let v: Vec<f64> = given
                    .split(',')
                    .map(|p| p.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .ok()?;
                let costs: [f64; 4] = v.try_into().ok()?;
                costs
                    .iter()
                    .all(|c| c.is_finite() && *c > 0.0)
                    .then_some(PlannerCosts::Given(costs))
            }
        }
    }

    /// The planner to use: measured (falling back to the built-in constants, logged, when the
    /// measurement fails), built in, or with the given costs.
    pub fn planner(self) -> fhe_linear::Planner {
        let builtin = fhe_linear::Planner::default();
        match self {
            PlannerCosts::Builtin => builtin,
            PlannerCosts::Given([input, mac, output, keyswitch]) => fhe_linear::Planner {
                ns_per_input_coefficient: input,
                ns_per_mac: mac,
                ns_per_output_coefficient: output,
                ns_per_keyswitch_coefficient: keyswitch,
                ..builtin
            },
            PlannerCosts::Measure => match fhe_linear::calibrate(builtin) {
                Ok(c) => {
                    let p = c.planner;
                    tracing::info!(
                        ns_per_input_coefficient = p.ns_per_input_coefficient,
                        ns_per_mac = p.ns_per_mac,
                        ns_per_output_coefficient = p.ns_per_output_coefficient,
                        ns_per_keyswitch_coefficient = p.ns_per_keyswitch_coefficient,
                        took_ms = c.took_ms,
                        "planner unit costs measured"
                    );
                    p
                }
                Err(e) => {
                    tracing::warn!(error = %e, "measuring the planner's unit costs failed; using the built-in ones");
                    builtin
                }
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        source: server_bundle::BundleError,
    },
    #[error("bundle {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// One layer (or group of layers computed as one product) ready to serve: keyless, and packed
/// when configured.
pub struct ServedLayer {
    pub spec: LayerSpec,
    pub compiled: CompiledLayer,
    pub packed: Option<CompiledLayer>,
    /// A group's layers, in order (empty for a single layer).
    pub parts: Vec<Name>,
}

/// Everything loaded from the bundles.
#[derive(Default)]
pub struct Loaded {
    pub layers: HashMap<(Name, Name), Arc<ServedLayer>>,
    pub models: HashMap<Name, ModelLayers>,
}

/// Shared state of the handlers.
pub struct AppState {
    pub loaded: OnceLock<Loaded>,
    pub permits: Arc<Semaphore>,
    pub config: WorkerConfig,
    pub metrics: Metrics,
    pub keys: keys::KeyCache,
}

/// The packed-result spec a worker offers for a layer: `planner`'s offer for one token per
/// request (the fewest bytes within reach of the keyless server time).
pub fn packed_spec(
    planner: &fhe_linear::Planner,
    shape: fhe_linear::LayerShape,
    activation_bits: u32,
) -> Result<LayerSpec, fhe_linear::FheError> {
    let planner = fhe_linear::Planner {
        max_t_b: 1,
        activation_bits,
        ..*planner
    };
    Ok(planner
        .offer(shape, 1, fhe_linear::ResultEncoding::Packed)?
        .spec)
}

/// Loads and compiles every layer of every bundle (twice with `packed`: keyless, and packed in
/// the layout `packed` plans).
pub fn load_bundles(
    paths: &[PathBuf],
    packed: Option<&fhe_linear::Planner>,
) -> Result<Loaded, WorkerError> {
    let mut loaded = Loaded::default();
    for path in paths {
        let bundle =
            server_bundle::load_server_bundle(path).map_err(|source| WorkerError::Bundle {
                path: path.clone(),
                source,
            })?;
        let invalid = |reason: String| WorkerError::Invalid {
            path: path.clone(),
            reason,
        };
        let model = Name::parse(&bundle.manifest.model).map_err(|e| invalid(e.to_string()))?;
        let mut infos = Vec::new();
        let served = bundle.served().map_err(|e| invalid(e.to_string()))?;
        for (layer, parts) in served {
            let name = Name::parse(&layer.name).map_err(|e| invalid(e.to_string()))?;
            let parts = parts
                .iter()
                .map(|p| Name::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.to_string()))?;
            let spec = LayerSpec::choose_for(
                &fhe_linear::HFHE_GLWE_2048_V1,
                layer.shape(),
                1,
                layer.activation_bits,
            )
            .map_err(|e| invalid(e.to_string()))?;
            let compiled = CompiledLayer::compile(spec, &layer.weights.values, &layer.bias)
                .map_err(|e| invalid(e.to_string()))?;
            let mut info = LayerInfo::from_spec(name.clone(), &spec);
            info.parts = parts.clone();
            let packed = if let Some(planner) = packed {
                let spec = packed_spec(planner, layer.shape(), layer.activation_bits)
                    .map_err(|e| invalid(e.to_string()))?;
                info = info.with_packed(&spec);
                Some(
                    CompiledLayer::compile(spec, &layer.weights.values, &layer.bias)
                        .map_err(|e| invalid(e.to_string()))?,
                )
            } else {
                None
            };
            infos.push(info);
            loaded.layers.insert(
                (model.clone(), name),
                Arc::new(ServedLayer {
                    spec,
                    compiled,
                    packed,
                    parts,
                }),
            );
        }
        loaded.models.insert(
            model.clone(),
            ModelLayers {
                model,
                layers: infos,
            },
        );
    }
    Ok(loaded)
}

/// A worker bound to its ports.
pub struct Application {
    api: TcpListener,
    metrics: TcpListener,
    tls: Option<Arc<tls::rustls::ServerConfig>>,
    state: Arc<AppState>,
}

impl Application {
    /// Binds the API and metrics ports and starts loading the bundles in the background.
    pub async fn build(config: WorkerConfig) -> Result<Self, WorkerError> {
        // Certificate files are checked before binding: a bad file stops the start.
        let tls = config.tls.as_ref().map(|t| t.config()).transpose()?;
        let api = TcpListener::bind(config.listen).await?;
        let metrics = TcpListener::bind(config.metrics_listen).await?;
        let state = Arc::new(AppState {
            loaded: OnceLock::new(),
            permits: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            metrics: Metrics::new(),
            keys: keys::KeyCache::new(config.key_cache_entries),
            config,
        });
        let loader = state.clone();
        tokio::task::spawn_blocking(move || {
            // Measured before the bundles compile, so that nothing else shares the core.
            let planner = loader
                .config
                .packed_results
                .then(|| loader.config.planner_costs.planner());
            if let Some(p) = &planner {
                loader.metrics.record_planner(p);
            }
            match load_bundles(&loader.config.bundles, planner.as_ref()) {
                Ok(loaded) => {
                    let n = loaded.layers.len();
                    loader.metrics.layers_loaded.set(n as i64);
                    let _ = loader.loaded.set(loaded);
                    tracing::info!(layers = n, "bundles loaded, ready");
                }
                Err(e) => tracing::error!(error = %e, "loading bundles failed; not ready"),
            }
        });
        Ok(Application {
            api,
            metrics,
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

    /// The compute slots (`max_concurrency` permits). Holding them all saturates the worker:
    /// operators' load tests and the overload test use this to make saturation deterministic.
    pub fn compute_slots(&self) -> Arc<Semaphore> {
        self.state.permits.clone()
    }

    /// Serves until `shutdown` resolves; requests in flight then finish before it returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let metrics = service_kit::metrics_router(self.state.metrics.registry.clone());
        service_kit::serve(
            self.api,
            self.tls,
            routes::router(self.state),
            self.metrics,
            metrics,
            shutdown,
        )
        .await
    }
}
