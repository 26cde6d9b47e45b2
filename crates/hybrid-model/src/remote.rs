//! Remote mode: protected layers computed by the vendor's service. The client encrypts with its
//! own key, posts the ciphertext with its license, and decrypts the answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fhe_linear::{ClientKey, EncryptedResult, LayerSpec, Limits};
use protocol::{ErrorBody, ModelLayers, Name};

use crate::backend::ProtectedBackend;
use crate::linear::ClientLayer;
use crate::ModelError;

/// Where and as whom to reach the service.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Base URL of the gateway (or of a worker), e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// The model id the service knows the layers under.
    pub model: String,
    /// The license token (JWT), sent as `Authorization: Bearer ...`.
    pub license: Option<String>,
    /// Where to count time and bytes, if the caller wants them (see [`RemoteStats`]).
    pub stats: Option<Arc<RemoteStats>>,
}

/// Running totals of the remote calls of a model: where the time of a protected layer goes
/// (encryption, the round trip to the service including its computation, decryption) and the
/// bytes that travel. Take a [`RemoteStats::snapshot`] before and after a step and subtract.
#[derive(Debug, Default)]
pub struct RemoteStats {
    queries: AtomicU64,
    rows: AtomicU64,
    encrypt_ns: AtomicU64,
    network_ns: AtomicU64,
    server_ns: AtomicU64,
    decrypt_ns: AtomicU64,
    upload_bytes: AtomicU64,
    download_bytes: AtomicU64,
}

/// The totals of [`RemoteStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Protected-layer queries sent.
    pub queries: u64,
    /// Activation rows sent (the billing unit).
    pub rows: u64,
    pub encrypt_s: f64,
    /// Round trips to the service, its computation included.
    pub network_s: f64,
    /// The service's computation, as it reports it (`x-compute-ms`).
    pub server_s: f64,
    pub decrypt_s: f64,
    pub upload_bytes: u64,
    pub download_bytes: u64,
}

impl std::ops::Sub for StatsSnapshot {
    type Output = StatsSnapshot;
    fn sub(self, o: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            queries: self.queries - o.queries,
            rows: self.rows - o.rows,
            encrypt_s: self.encrypt_s - o.encrypt_s,
            network_s: self.network_s - o.network_s,
            server_s: self.server_s - o.server_s,
            decrypt_s: self.decrypt_s - o.decrypt_s,
            upload_bytes: self.upload_bytes - o.upload_bytes,
            download_bytes: self.download_bytes - o.download_bytes,
        }
    }
}

impl std::ops::Add for StatsSnapshot {
    type Output = StatsSnapshot;
    fn add(self, o: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            queries: self.queries + o.queries,
            rows: self.rows + o.rows,
            encrypt_s: self.encrypt_s + o.encrypt_s,
            network_s: self.network_s + o.network_s,
            server_s: self.server_s + o.server_s,
            decrypt_s: self.decrypt_s + o.decrypt_s,
            upload_bytes: self.upload_bytes + o.upload_bytes,
            download_bytes: self.download_bytes + o.download_bytes,
        }
    }
}

impl RemoteStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        StatsSnapshot {
            queries: self.queries.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            encrypt_s: s(&self.encrypt_ns),
            network_s: s(&self.network_ns),
            server_s: s(&self.server_ns),
            decrypt_s: s(&self.decrypt_ns),
            upload_bytes: self.upload_bytes.load(Ordering::Relaxed),
            download_bytes: self.download_bytes.load(Ordering::Relaxed),
        }
    }
}

fn add_time(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Protected layers over HTTP.
pub struct RemoteBackend {
    agent: ureq::Agent,
    config: RemoteConfig,
    model: Name,
    key: ClientKey,
    specs: HashMap<String, (Name, LayerSpec)>,
    max_answer_bytes: u64,
}

fn transport(e: impl std::fmt::Display) -> ModelError {
    ModelError::Transport(e.to_string())
}

/// Turns a non-success answer into an error with the service's code.
fn answer_error(status: u16, body: &[u8]) -> ModelError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ModelError::Remote {
            status,
            code: e.code,
            message: e.message,
        },
        Err(_) => ModelError::Remote {
            status,
            code: "unexpected_answer".into(),
            message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

impl RemoteBackend {
    /// Fetches the service's description of the model's layers and checks it against the
    /// client bundle's.
    pub fn connect(config: RemoteConfig, layers: &[ClientLayer]) -> Result<Self, ModelError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let model = Name::parse(&config.model).map_err(|e| ModelError::Bundle(e.to_string()))?;
        let url = format!(
            "{}{}",
            config.url.trim_end_matches('/'),
            protocol::layers_path(&model)
        );
        let mut request = agent.get(&url);
        if let Some(license) = &config.license {
            request = request.header("authorization", &format!("Bearer {license}"));
        }
        let mut answer = request.call().map_err(transport)?;
        let status = answer.status().as_u16();
        let body = answer
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_vec()
            .map_err(transport)?;
        if status != 200 {
            return Err(answer_error(status, &body));
        }
        let served: ModelLayers = serde_json::from_slice(&body).map_err(transport)?;
        let mut specs = HashMap::new();
        for layer in layers {
            let info = served
                .layers
                .iter()
                .find(|i| i.name.as_str() == layer.name)
                .ok_or_else(|| {
                    ModelError::Bundle(format!(
                        "the service does not serve layer `{}` of model `{model}`",
                        layer.name
                    ))
                })?;
            if (info.d_in, info.d_out) != (layer.d_in, layer.d_out) {
                return Err(ModelError::Bundle(format!(
                    "layer `{}`: the service computes {}x{}, the client bundle expects {}x{}",
                    layer.name, info.d_in, info.d_out, layer.d_in, layer.d_out
                )));
            }
            let spec = info
                .to_spec()
                .map_err(|e| ModelError::Bundle(e.to_string()))?;
            specs.insert(layer.name.clone(), (info.name.clone(), spec));
        }
        let key = ClientKey::generate(&fhe_linear::HFHE_GLWE_2048_V1);
        Ok(RemoteBackend {
            agent,
            config,
            model,
            key,
            specs,
            max_answer_bytes: 256 << 20,
        })
    }

    /// Status, body and the service's reported compute time in ms.
    fn post(
        &self,
        url: &str,
        query_id: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>, f64), ModelError> {
        let mut request = self
            .agent
            .post(url)
            .header("content-type", protocol::CIPHERTEXT_CONTENT_TYPE)
            .header(protocol::QUERY_ID_HEADER, query_id);
        if let Some(license) = &self.config.license {
            request = request.header("authorization", &format!("Bearer {license}"));
        }
        let mut answer = request.send(body).map_err(transport)?;
        let status = answer.status().as_u16();
        let compute_ms = answer
            .headers()
            .get(protocol::COMPUTE_MS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let bytes = answer
            .body_mut()
            .with_config()
            .limit(self.max_answer_bytes)
            .read_to_vec()
            .map_err(transport)?;
        Ok((status, bytes, compute_ms))
    }
}

impl ProtectedBackend for RemoteBackend {
    fn apply(&self, layer: &str, x: &[i8], tokens: usize) -> Result<Vec<i64>, ModelError> {
        let (name, spec) = self
            .specs
            .get(layer)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        let stats = self.config.stats.as_deref();
        let started = Instant::now();
        let upload = self.key.encrypt(spec, x, tokens)?.to_bytes();
        if let Some(st) = stats {
            add_time(&st.encrypt_ns, started);
        }
        let url = format!(
            "{}{}",
            self.config.url.trim_end_matches('/'),
            protocol::apply_path(&self.model, name)
        );
        // One query id per query: a retry after a lost connection is billed once.
        let query_id = uuid::Uuid::new_v4().to_string();
        let sent = Instant::now();
        let (status, body, compute_ms) = match self.post(&url, &query_id, &upload) {
            Ok(answer) => answer,
            Err(_) => self.post(&url, &query_id, &upload)?,
        };
        if let Some(st) = stats {
            add_time(&st.network_ns, sent);
            st.server_ns
                .fetch_add((compute_ms * 1e6) as u64, Ordering::Relaxed);
        }
        if status != 200 {
            return Err(answer_error(status, &body));
        }
        let received = Instant::now();
        let result = EncryptedResult::from_bytes(&body, &Limits::default())?;
        let y = self.key.decrypt(spec, &result)?;
        if let Some(st) = stats {
            add_time(&st.decrypt_ns, received);
            st.queries.fetch_add(1, Ordering::Relaxed);
            st.rows.fetch_add(tokens as u64, Ordering::Relaxed);
            st.upload_bytes
                .fetch_add(upload.len() as u64, Ordering::Relaxed);
            st.download_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        Ok(y)
    }
}
