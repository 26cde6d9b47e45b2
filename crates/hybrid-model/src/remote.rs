//! Remote mode: protected layers computed by the vendor's service. The client encrypts with its
//! own key, posts the ciphertext with its license, and decrypts the answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fhe_linear::{
    ClientKey, EncryptedResult, LayerSpec, Limits, PackingKey, Planner, Preference, ResultEncoding,
};
use protocol::{ErrorBody, KeyRegistered, ModelLayers, Name};

use crate::backend::ProtectedBackend;
use crate::bundle::LayerGroup;
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
    /// How results come back (see [`ResultsMode`]).
    pub results: ResultsMode,
    /// The keys for packed results, if the caller keeps them (`hybrid keys gen`); otherwise
    /// fresh ones are generated and registered when packed results are used.
    pub keys: Option<Arc<PackedKeys>>,
}

/// Which result encoding the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsMode {
    /// One ciphertext per output block: no key, more bytes down.
    Keyless,
    /// Packed with the client's registered packing key: a one-time upload, fewer bytes.
    Packed,
    /// The planner's choice per request, for what the client cares about.
    Auto(Preference),
}

impl ResultsMode {
    /// `keyless`, `packed` or `auto` (with `preference`: `latency` or `bandwidth`).
    pub fn parse(results: &str, preference: &str) -> Result<Self, ModelError> {
        let preference = Preference::parse(preference).ok_or_else(|| {
            ModelError::Bundle(format!(
                "unknown preference `{preference}`: latency or bandwidth"
            ))
        })?;
        match results {
            "keyless" => Ok(ResultsMode::Keyless),
            "packed" => Ok(ResultsMode::Packed),
            "auto" => Ok(ResultsMode::Auto(preference)),
            other => Err(ModelError::Bundle(format!(
                "unknown results `{other}`: keyless, packed or auto"
            ))),
        }
    }
}

/// A client's keys for packed results: its secret key of the packed parameter set and the
/// public packing key derived from it. `Debug` prints neither.
#[derive(Debug)]
pub struct PackedKeys {
    pub secret: ClientKey,
    pub packing: PackingKey,
}

const SECRET_FILE: &str = "packed-secret.key";
const PACKING_FILE: &str = "packing.key";

impl PackedKeys {
    /// Fresh keys for the packed parameter set.
    pub fn generate() -> Result<Self, ModelError> {
        let secret = ClientKey::generate(&fhe_linear::HFHE_GLWE_4096_V1);
        let packing = PackingKey::generate(&secret)?;
        Ok(PackedKeys { secret, packing })
    }

    /// Writes the secret key (owner-only permissions) and the packing key into `dir`.
    pub fn save(&self, dir: &std::path::Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir)?;
        let secret = dir.join(SECRET_FILE);
        std::fs::write(&secret, self.secret.export_secret())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::write(dir.join(PACKING_FILE), self.packing.to_bytes())?;
        Ok(())
    }

    /// Reads keys written by [`PackedKeys::save`], checking that they belong together is left to
    /// the service's answers (a mismatched pair decrypts nothing).
    pub fn load(dir: &std::path::Path) -> Result<Self, ModelError> {
        let secret = ClientKey::import_secret(&std::fs::read(dir.join(SECRET_FILE))?)?;
        let packing = PackingKey::from_bytes(&std::fs::read(dir.join(PACKING_FILE))?)?;
        if secret.params().id != packing.params().id {
            return Err(ModelError::Bundle(
                "secret and packing keys of different parameter sets".into(),
            ));
        }
        Ok(PackedKeys { secret, packing })
    }
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
    packed_queries: AtomicU64,
    keygen_ns: AtomicU64,
    key_upload_ns: AtomicU64,
    key_upload_bytes: AtomicU64,
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
    /// Queries answered with packed results.
    pub packed_queries: u64,
    /// One-time costs of packed results: key generation, key registration and its size.
    pub keygen_s: f64,
    pub key_upload_s: f64,
    pub key_upload_bytes: u64,
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
            packed_queries: self.packed_queries - o.packed_queries,
            keygen_s: self.keygen_s - o.keygen_s,
            key_upload_s: self.key_upload_s - o.key_upload_s,
            key_upload_bytes: self.key_upload_bytes - o.key_upload_bytes,
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
            packed_queries: self.packed_queries + o.packed_queries,
            keygen_s: self.keygen_s + o.keygen_s,
            key_upload_s: self.key_upload_s + o.key_upload_s,
            key_upload_bytes: self.key_upload_bytes + o.key_upload_bytes,
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
            packed_queries: self.packed_queries.load(Ordering::Relaxed),
            keygen_s: s(&self.keygen_ns),
            key_upload_s: s(&self.key_upload_ns),
            key_upload_bytes: self.key_upload_bytes.load(Ordering::Relaxed),
        }
    }
}

fn add_time(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// How the service computes one layer: keyless, and packed when it offers it.
struct Served {
    name: Name,
    keyless: LayerSpec,
    packed: Option<LayerSpec>,
    /// A group's layers (sent in the parts header); empty for a single layer.
    parts: Vec<String>,
}

/// Packed results in use: the keys and the id the service registered them under.
struct Registered {
    keys: Arc<PackedKeys>,
    key_id: String,
}

/// Protected layers over HTTP.
pub struct RemoteBackend {
    agent: ureq::Agent,
    config: RemoteConfig,
    model: Name,
    key: ClientKey,
    specs: HashMap<String, Served>,
    /// Registered on the first request that uses packed results.
    packed: std::sync::Mutex<Option<Arc<Registered>>>,
    planner: Planner,
    max_answer_bytes: u64,
}

fn transport(e: impl std::fmt::Display) -> ModelError {
    ModelError::Transport(e.to_string())
}

/// Adds the license, when there is one, as a bearer token.
fn with_license<B>(
    request: ureq::RequestBuilder<B>,
    license: &Option<String>,
) -> ureq::RequestBuilder<B> {
    match license {
        Some(license) => request.header("authorization", &format!("Bearer {license}")),
        None => request,
    }
}

/// Status and body (at most `limit` bytes) of an answer.
fn read_answer(
    answer: &mut ureq::http::Response<ureq::Body>,
    limit: u64,
) -> Result<(u16, Vec<u8>), ModelError> {
    let status = answer.status().as_u16();
    let body = answer
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(transport)?;
    Ok((status, body))
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
    /// client bundle's: every layer is served, alone or in one of `groups` (one request for the
    /// group's layers) when the service serves that group.
    pub fn connect(
        config: RemoteConfig,
        layers: &[ClientLayer],
        groups: &[LayerGroup],
    ) -> Result<Self, ModelError> {
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
        let mut answer = with_license(agent.get(&url), &config.license)
            .call()
            .map_err(transport)?;
        let (status, body) = read_answer(&mut answer, 16 << 20)?;
        if status != 200 {
            return Err(answer_error(status, &body));
        }
        let served: ModelLayers = serde_json::from_slice(&body).map_err(transport)?;
        let mut specs = HashMap::new();
        // Groups the service serves as one product, with the shape of their concatenation.
        let mut wanted: Vec<(String, usize, usize, Vec<String>)> = Vec::new();
        let mut in_groups = std::collections::HashSet::new();
        for group in groups {
            let offered = served.layers.iter().any(|i| {
                i.name.as_str() == group.name
                    && i.parts
                        .iter()
                        .map(Name::as_str)
                        .eq(group.layers.iter().map(String::as_str))
            });
            let members: Vec<&ClientLayer> = group
                .layers
                .iter()
                .filter_map(|n| layers.iter().find(|l| &l.name == n))
                .collect();
            if offered && members.len() == group.layers.len() {
                let d_out = members.iter().map(|l| l.d_out).sum();
                wanted.push((
                    group.name.clone(),
                    members[0].d_in,
                    d_out,
                    group.layers.clone(),
                ));
                in_groups.extend(group.layers.iter().cloned());
            }
        }
        for layer in layers.iter().filter(|l| !in_groups.contains(&l.name)) {
            wanted.push((layer.name.clone(), layer.d_in, layer.d_out, vec![]));
        }
        for (name, d_in, d_out, parts) in wanted {
            let info = served
                .layers
                .iter()
                .find(|i| i.name.as_str() == name)
                .ok_or_else(|| {
                    ModelError::Bundle(format!(
                        "the service does not serve layer `{name}` of model `{model}`"
                    ))
                })?;
            if (info.d_in, info.d_out) != (d_in, d_out) {
                return Err(ModelError::Bundle(format!(
                    "layer `{name}`: the service computes {}x{}, the client bundle expects {d_in}x{d_out}",
                    info.d_in, info.d_out
                )));
            }
            let keyless = info
                .to_spec()
                .map_err(|e| ModelError::Bundle(e.to_string()))?;
            let packed = info
                .packed_spec()
                .transpose()
                .map_err(|e| ModelError::Bundle(e.to_string()))?;
            if config.results == ResultsMode::Packed && packed.is_none() {
                return Err(ModelError::Bundle(format!(
                    "the service offers no packed results for layer `{name}`"
                )));
            }
            specs.insert(
                name,
                Served {
                    name: info.name.clone(),
                    keyless,
                    packed,
                    parts,
                },
            );
        }
        let key = ClientKey::generate(&fhe_linear::HFHE_GLWE_2048_V1);
        let backend = RemoteBackend {
            agent,
            config,
            model,
            key,
            specs,
            packed: std::sync::Mutex::new(None),
            planner: Planner::default(),
            max_answer_bytes: 256 << 20,
        };
        // With packed results asked for, register the key now: its cost is paid up front.
        if backend.config.results == ResultsMode::Packed {
            backend.registered()?;
        }
        Ok(backend)
    }

    /// The registered packing key, registering it on first use.
    fn registered(&self) -> Result<Arc<Registered>, ModelError> {
        let mut slot = self.packed.lock().expect("packing key slot");
        if let Some(r) = &*slot {
            return Ok(r.clone());
        }
        let r = Arc::new(self.register_keys()?);
        *slot = Some(r.clone());
        Ok(r)
    }

    /// The spec a request of `tokens` rows uses.
    fn choose(&self, served: &Served, tokens: usize) -> Option<LayerSpec> {
        match self.config.results {
            ResultsMode::Keyless => Some(served.keyless),
            ResultsMode::Packed => served.packed,
            ResultsMode::Auto(preference) => {
                let plans: Vec<_> = std::iter::once(served.keyless)
                    .chain(served.packed)
                    .map(|spec| self.planner.cost_of(spec, tokens))
                    .collect();
                self.planner.pick(&plans, preference).map(|p| p.spec)
            }
        }
    }

    /// Generates (or takes the configured) packing keys and registers them with the service.
    fn register_keys(&self) -> Result<Registered, ModelError> {
        let stats = self.config.stats.as_deref();
        let keys = match &self.config.keys {
            Some(keys) => keys.clone(),
            None => {
                let started = Instant::now();
                let keys = Arc::new(PackedKeys::generate()?);
                if let Some(st) = stats {
                    add_time(&st.keygen_ns, started);
                }
                keys
            }
        };
        let bytes = keys.packing.to_bytes();
        let started = Instant::now();
        let url = format!(
            "{}{}",
            self.config.url.trim_end_matches('/'),
            protocol::keys_path()
        );
        let request = self
            .agent
            .put(&url)
            .header("content-type", protocol::PACKING_KEY_CONTENT_TYPE);
        let mut answer = with_license(request, &self.config.license)
            .send(&bytes[..])
            .map_err(transport)?;
        let (status, body) = read_answer(&mut answer, 1 << 20)?;
        if !(200..300).contains(&status) {
            return Err(answer_error(status, &body));
        }
        let registered: KeyRegistered = serde_json::from_slice(&body).map_err(transport)?;
        if let Some(st) = stats {
            add_time(&st.key_upload_ns, started);
            st.key_upload_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(Registered {
            keys,
            key_id: registered.key_id,
        })
    }

    /// The id of the registered packing key, once packed results were used.
    pub fn packing_key_id(&self) -> Option<String> {
        self.packed
            .lock()
            .expect("packing key slot")
            .as_ref()
            .map(|r| r.key_id.clone())
    }

    /// Status, body and the service's reported compute time in ms.
    fn post(
        &self,
        url: &str,
        query_id: &str,
        key_id: Option<&str>,
        parts: &[String],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>, f64), ModelError> {
        let mut request = self
            .agent
            .post(url)
            .header("content-type", protocol::CIPHERTEXT_CONTENT_TYPE)
            .header(protocol::QUERY_ID_HEADER, query_id);
        if let Some(key_id) = key_id {
            request = request.header(protocol::KEY_ID_HEADER, key_id);
        }
        if !parts.is_empty() {
            request = request.header(protocol::LAYER_PARTS_HEADER, &parts.join(","));
        }
        let mut answer = with_license(request, &self.config.license)
            .send(body)
            .map_err(transport)?;
        let compute_ms = answer
            .headers()
            .get(protocol::COMPUTE_MS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let (status, bytes) = read_answer(&mut answer, self.max_answer_bytes)?;
        Ok((status, bytes, compute_ms))
    }
}

impl ProtectedBackend for RemoteBackend {
    fn apply(&self, layer: &str, x: &[i8], tokens: usize) -> Result<Vec<i64>, ModelError> {
        let served = self
            .specs
            .get(layer)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        self.query(served, layer, x, tokens)
    }

    fn apply_group(
        &self,
        group: &LayerGroup,
        x: &[i8],
        tokens: usize,
    ) -> Result<Vec<i64>, ModelError> {
        match self.specs.get(&group.name) {
            Some(served) => self.query(served, &group.name, x, tokens),
            None => crate::backend::apply_each(self, group, x, tokens),
        }
    }
}

impl RemoteBackend {
    /// One query: encrypt, post, decrypt.
    fn query(
        &self,
        served: &Served,
        layer: &str,
        x: &[i8],
        tokens: usize,
    ) -> Result<Vec<i64>, ModelError> {
        let spec = &self
            .choose(served, tokens)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        let registered = match spec.encoding {
            ResultEncoding::Packed => Some(self.registered()?),
            ResultEncoding::Keyless => None,
        };
        let (key, key_id) = match &registered {
            Some(r) => (&r.keys.secret, Some(r.key_id.as_str())),
            None => (&self.key, None),
        };
        let name = &served.name;
        let stats = self.config.stats.as_deref();
        let started = Instant::now();
        let upload = key.encrypt(spec, x, tokens)?.to_bytes();
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
        let parts = &served.parts;
        let (status, body, compute_ms) = match self.post(&url, &query_id, key_id, parts, &upload) {
            Ok(answer) => answer,
            Err(_) => self.post(&url, &query_id, key_id, parts, &upload)?,
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
        let y = key.decrypt(spec, &result)?;
        if let Some(st) = stats {
            add_time(&st.decrypt_ns, received);
            st.queries.fetch_add(1, Ordering::Relaxed);
            if key_id.is_some() {
                st.packed_queries.fetch_add(1, Ordering::Relaxed);
            }
            // Rows metered: each layer of a group counts its own.
            let layers = served.parts.len().max(1) as u64;
            st.rows.fetch_add(tokens as u64 * layers, Ordering::Relaxed);
            st.upload_bytes
                .fetch_add(upload.len() as u64, Ordering::Relaxed);
            st.download_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        Ok(y)
    }
}
