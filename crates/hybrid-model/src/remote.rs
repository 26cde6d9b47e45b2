//! Remote mode: protected layers computed by the vendor's service. The client encrypts with its
//! own key, posts the ciphertext with its license, and decrypts the answer.
//!
//! Over a real network: HTTPS with the system's roots and an optional private CA
//! ([`tls::ClientTls`]); connect and answer timeouts; a `User-Agent`; answers 429 and 503 (and
//! lost connections) retried after the service's `Retry-After`, or a jittered backoff, inside
//! one deadline per query, always under the query's own id (so a retry is billed once); batches
//! larger than a layer's `max_rows` (the gateway's row cap, or the license's rate) sent as
//! several queries. Packing keys persist in a [`KeyStore`] by default.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhe_linear::{
    ClientKey, EncryptedResult, LayerSpec, Limits, PackingKey, Planner, Preference, ResultEncoding,
};
use protocol::{ErrorBody, KeyRegistered, ModelLayers, Name};

use crate::backend::ProtectedBackend;
use crate::bundle::LayerGroup;
use crate::keystore::{KeyEntry, KeyStore};
use crate::linear::ClientLayer;
use crate::ModelError;

/// The `User-Agent` of the SDK's requests.
pub const USER_AGENT: &str = concat!("hybrid-sdk/", env!("CARGO_PKG_VERSION"));

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
    /// Where the keys for packed results come from (see [`KeySource`]).
    pub keys: KeySource,
    /// What HTTPS trusts beside the system's roots (a private CA).
    pub tls: tls::ClientTls,
    /// Timeouts and retries.
    pub retry: RetryPolicy,
}

impl RemoteConfig {
    /// The service at `url` serving `model`: no license, keyless or packed results as the
    /// planner prefers for bandwidth, packing keys in the user's key store, default timeouts.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into(),
            model: model.into(),
            license: None,
            stats: None,
            results: ResultsMode::Auto(Preference::Bandwidth),
            keys: KeySource::UserStore,
            tls: tls::ClientTls::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// Where the keys of packed results come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// The user's [`KeyStore`] ([`KeyStore::user`]): one set per gateway and license, made
    /// and registered once, reused by every later run.
    UserStore,
    /// That key store.
    Store(KeyStore),
    /// These keys (`hybrid keys gen`, `--keys DIR`).
    Fixed(Arc<PackedKeys>),
    /// Fresh keys for this process only: each run registers a new key, using one of the
    /// license's few key slots.
    Session,
}

/// Timeouts and retries of the remote calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// How long one query may take in all, retries and waits included.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// How long one attempt may wait for its answer (the service's computation included).
    pub attempt_timeout: Duration,
    /// The first wait without a `Retry-After`; doubled per attempt, jittered, capped.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`: the service's `Retry-After` when it gave one,
    /// else the backoff; jittered by up to +-25% so that clients refused together do not
    /// return together.
    fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let base = retry_after.unwrap_or_else(|| {
            self.initial_backoff
                .saturating_mul(1u32 << attempt.min(16))
                .min(self.max_backoff)
        });
        let unit = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0; // [0, 1)
        let factor = match retry_after {
            // Never earlier than the service asked.
            Some(_) => 1.0 + 0.25 * unit,
            None => 0.75 + 0.5 * unit,
        };
        base.mul_f64(factor)
    }
}

/// Answers worth another attempt: briefly unavailable, or refused for now with a time to come
/// back (rate limited, too many in flight; not a used-up quota, which says no time).
fn retryable(status: u16, retry_after: Option<Duration>) -> bool {
    match status {
        429 => retry_after.is_some(),
        502..=504 => true,
        _ => false,
    }
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

    /// Like [`PackedKeys::load`], except that a packing key of an earlier format version (its
    /// masks drawn by an earlier generator) is generated anew from the stored secret key and
    /// saved in its place. Returns the keys and whether the packing key was renewed (it then has
    /// to be registered again).
    pub fn load_renewing(dir: &std::path::Path) -> Result<(Self, bool), ModelError> {
        let secret = ClientKey::import_secret(&std::fs::read(dir.join(SECRET_FILE))?)?;
        match PackingKey::from_bytes(&std::fs::read(dir.join(PACKING_FILE))?) {
            Err(fhe_linear::WireError::UnsupportedVersion { found, reads }) if found < reads => {
                let packing = PackingKey::generate(&secret)?;
                let partial = dir.join(format!("{PACKING_FILE}.partial"));
                std::fs::write(&partial, packing.to_bytes())?;
                std::fs::rename(&partial, dir.join(PACKING_FILE))?;
                Ok((PackedKeys { secret, packing }, true))
            }
            packing => Ok((Self::pair(secret, packing?)?, false)),
        }
    }

    /// Reads keys written by [`PackedKeys::save`], checking that they belong together is left to
    /// the service's answers (a mismatched pair decrypts nothing).
    pub fn load(dir: &std::path::Path) -> Result<Self, ModelError> {
        let secret = ClientKey::import_secret(&std::fs::read(dir.join(SECRET_FILE))?)?;
        let packing = PackingKey::from_bytes(&std::fs::read(dir.join(PACKING_FILE))?)?;
        Self::pair(secret, packing)
    }

    /// The two keys read from one directory, if they are of one parameter set.
    fn pair(secret: ClientKey, packing: PackingKey) -> Result<Self, ModelError> {
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
    /// Rows one query may carry (the gateway's row cap and the license's rate), if bounded.
    max_rows: Option<usize>,
}

/// Packed results in use: the keys and the id the service registered them under.
struct Registered {
    keys: Arc<PackedKeys>,
    key_id: String,
    /// The key store's entry, when the keys persist there.
    entry: Option<(KeyStore, KeyEntry)>,
}

/// Registers `keys`' packing key under the configuration's license (idempotent).
fn register_key(
    agent: &ureq::Agent,
    config: &RemoteConfig,
    keys: &PackedKeys,
) -> Result<KeyRegistered, ModelError> {
    let bytes = keys.packing.to_bytes();
    let url = format!(
        "{}{}",
        config.url.trim_end_matches('/'),
        protocol::keys_path()
    );
    let request = agent
        .put(&url)
        .header("content-type", protocol::PACKING_KEY_CONTENT_TYPE);
    let mut answer = with_license(request, &config.license)
        .send(&bytes[..])
        .map_err(call_error)?;
    let (status, body) = read_answer(&mut answer, 1 << 20)?;
    if !(200..300).contains(&status) {
        return Err(answer_error(status, &body));
    }
    serde_json::from_slice(&body).map_err(transport)
}

/// Deletes a packing key of the license at the service; false when it has no such key.
fn delete_key(
    agent: &ureq::Agent,
    config: &RemoteConfig,
    key_id: &str,
) -> Result<bool, ModelError> {
    let url = format!(
        "{}{}",
        config.url.trim_end_matches('/'),
        protocol::key_path(key_id)
    );
    let mut answer = with_license(agent.delete(&url), &config.license)
        .call()
        .map_err(call_error)?;
    let (status, body) = read_answer(&mut answer, 1 << 20)?;
    match status {
        204 | 200 => Ok(true),
        404 => Ok(false),
        _ => Err(answer_error(status, &body)),
    }
}

/// The packing keys of a license at the service: list, register, delete (what `hybrid keys`
/// does).
pub struct KeyService {
    agent: ureq::Agent,
    config: RemoteConfig,
}

impl KeyService {
    pub fn new(config: RemoteConfig) -> Result<Self, ModelError> {
        Ok(KeyService {
            agent: agent(&config)?,
            config,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.url.trim_end_matches('/'))
    }

    /// The keys the license registered.
    pub fn list(&self) -> Result<protocol::KeyList, ModelError> {
        let request = self.agent.get(&self.url(&protocol::keys_path()));
        let mut answer = with_license(request, &self.config.license)
            .call()
            .map_err(call_error)?;
        let (status, body) = read_answer(&mut answer, 1 << 20)?;
        if status != 200 {
            return Err(answer_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(transport)
    }

    pub fn register(&self, keys: &PackedKeys) -> Result<KeyRegistered, ModelError> {
        register_key(&self.agent, &self.config, keys)
    }

    /// Deletes a key of the license; false when the service has no such key for it.
    pub fn delete(&self, key_id: &str) -> Result<bool, ModelError> {
        delete_key(&self.agent, &self.config, key_id)
    }
}

/// An answer of the service.
struct Answer {
    status: u16,
    body: Vec<u8>,
    compute_ms: f64,
    retry_after: Option<Duration>,
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

/// A failed call, with its causes and, for a certificate the client does not trust, what to do.
fn call_error(e: ureq::Error) -> ModelError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if text.contains("certificate") || text.contains("UnknownIssuer") {
        return ModelError::Certificate(text);
    }
    ModelError::Transport(text)
}

/// The HTTP agent of a configuration: its roots, timeouts and `User-Agent`.
fn agent(config: &RemoteConfig) -> Result<ureq::Agent, ModelError> {
    let roots: Vec<ureq::tls::Certificate<'static>> = config
        .tls
        .roots()?
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::from(roots))
        .build();
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls)
        .user_agent(USER_AGENT)
        .timeout_connect(Some(config.retry.connect_timeout))
        .timeout_global(Some(config.retry.attempt_timeout))
        .build()
        .into())
}

/// The `Retry-After` of an answer, in seconds (the only form the services send).
fn retry_after(answer: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
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
        let agent = agent(&config)?;
        let model = Name::parse(&config.model).map_err(|e| ModelError::Bundle(e.to_string()))?;
        let url = format!(
            "{}{}",
            config.url.trim_end_matches('/'),
            protocol::layers_path(&model)
        );
        let mut answer = with_license(agent.get(&url), &config.license)
            .call()
            .map_err(call_error)?;
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
                    members[0].product_width(),
                    d_out,
                    group.layers.clone(),
                ));
                in_groups.extend(group.layers.iter().cloned());
            }
        }
        for layer in layers.iter().filter(|l| !in_groups.contains(&l.name)) {
            wanted.push((
                layer.name.clone(),
                layer.product_width(),
                layer.d_out,
                vec![],
            ));
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
                    max_rows: info.max_rows,
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

    /// Takes the configured packing keys (stored, given or fresh) and registers them with the
    /// service, unless the key store says they already are.
    fn register_keys(&self) -> Result<Registered, ModelError> {
        let stats = self.config.stats.as_deref();
        let started = Instant::now();
        let store = match &self.config.keys {
            KeySource::UserStore => KeyStore::user()?,
            KeySource::Store(store) => store.clone(),
            KeySource::Fixed(keys) => return self.upload_keys(keys.clone(), None),
            KeySource::Session => {
                let keys = Arc::new(PackedKeys::generate()?);
                if let Some(st) = stats {
                    add_time(&st.keygen_ns, started);
                }
                return self.upload_keys(keys, None);
            }
        };
        let license = crate::keystore::license_id(self.config.license.as_deref());
        let (keys, entry) = store.load_or_create(&self.config.url, &license)?;
        let keys = Arc::new(keys);
        if let Some(st) = stats {
            add_time(&st.keygen_ns, started);
        }
        match entry.key_id.clone() {
            // Registered by an earlier run: nothing to upload.
            Some(key_id) => Ok(Registered {
                keys,
                key_id,
                entry: Some((store, entry)),
            }),
            None => self.upload_keys(keys, Some((store, entry))),
        }
    }

    /// Registers `keys` (idempotent on the service), recording the id in the key store.
    fn upload_keys(
        &self,
        keys: Arc<PackedKeys>,
        entry: Option<(KeyStore, KeyEntry)>,
    ) -> Result<Registered, ModelError> {
        let stats = self.config.stats.as_deref();
        let started = Instant::now();
        let registered = register_key(&self.agent, &self.config, &keys)?;
        if let Some(st) = stats {
            add_time(&st.key_upload_ns, started);
            st.key_upload_bytes
                .fetch_add(registered.bytes as u64, Ordering::Relaxed);
        }
        let entry = match entry {
            Some((store, entry)) => {
                if let Some(old) = entry.replaces.as_deref() {
                    // The key this one renewed holds one of the license's key slots until it is
                    // deleted. Best effort: a failure leaves it to `hybrid keys delete`.
                    if old != registered.key_id {
                        let _ = delete_key(&self.agent, &self.config, old);
                    }
                }
                let entry = store.set_key_id(&entry, &registered.key_id)?;
                Some((store, entry))
            }
            None => None,
        };
        Ok(Registered {
            keys,
            key_id: registered.key_id,
            entry,
        })
    }

    /// After the service said it does not know the stored key (deleted, or a new ledger):
    /// registers it again, once, and returns the new registration.
    fn reregister(&self, stale: &Registered) -> Result<Arc<Registered>, ModelError> {
        let mut slot = self.packed.lock().expect("packing key slot");
        if let Some(r) = &*slot {
            if r.key_id != stale.key_id {
                return Ok(r.clone());
            }
        }
        let r = Arc::new(self.upload_keys(stale.keys.clone(), stale.entry.clone())?);
        *slot = Some(r.clone());
        Ok(r)
    }

    /// The id of the registered packing key, once packed results were used.
    pub fn packing_key_id(&self) -> Option<String> {
        self.packed
            .lock()
            .expect("packing key slot")
            .as_ref()
            .map(|r| r.key_id.clone())
    }

    /// Status, body, the service's reported compute time in ms and its `Retry-After`.
    fn post(
        &self,
        url: &str,
        query_id: &str,
        key_id: Option<&str>,
        parts: &[String],
        body: &[u8],
    ) -> Result<Answer, ModelError> {
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
            .map_err(call_error)?;
        let retry_after = retry_after(&answer);
        let compute_ms = answer
            .headers()
            .get(protocol::COMPUTE_MS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let (status, body) = read_answer(&mut answer, self.max_answer_bytes)?;
        Ok(Answer {
            status,
            body,
            compute_ms,
            retry_after,
        })
    }

    /// Posts one query until it is answered, retrying what is worth retrying (see
    /// [`RetryPolicy`]) under the same query id, so that the service bills it once.
    fn post_with_retries(
        &self,
        url: &str,
        key_id: Option<&str>,
        parts: &[String],
        body: &[u8],
    ) -> Result<Answer, ModelError> {
        let policy = &self.config.retry;
        let deadline = Instant::now() + policy.deadline;
        let query_id = uuid::Uuid::new_v4().to_string();
        let mut attempt = 0;
        loop {
            let (outcome, hint) = match self.post(url, &query_id, key_id, parts, body) {
                Ok(a) if retryable(a.status, a.retry_after) => {
                    let hint = a.retry_after;
                    (Err(answer_error(a.status, &a.body)), hint)
                }
                Ok(a) => return Ok(a),
                Err(e @ ModelError::Transport(_)) => (Err(e), None),
                Err(e) => return Err(e),
            };
            let wait = policy.wait(attempt, hint);
            if Instant::now() + wait > deadline {
                return outcome;
            }
            std::thread::sleep(wait);
            attempt += 1;
        }
    }
}

impl ProtectedBackend for RemoteBackend {
    fn apply(&self, layer: &str, x: &[i16], tokens: usize) -> Result<Vec<i64>, ModelError> {
        let served = self
            .specs
            .get(layer)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        self.query(served, layer, x, tokens)
    }

    fn apply_group(
        &self,
        group: &LayerGroup,
        x: &[i16],
        tokens: usize,
    ) -> Result<Vec<i64>, ModelError> {
        match self.specs.get(&group.name) {
            Some(served) => self.query(served, &group.name, x, tokens),
            None => crate::backend::apply_each(self, group, x, tokens),
        }
    }
}

impl RemoteBackend {
    /// One batch: in queries of at most the layer's `max_rows` rows (rows are independent, so
    /// the result is the same).
    fn query(
        &self,
        served: &Served,
        layer: &str,
        x: &[i16],
        tokens: usize,
    ) -> Result<Vec<i64>, ModelError> {
        let max_rows = served.max_rows.unwrap_or(usize::MAX);
        if max_rows == 0 {
            return Err(ModelError::Remote {
                status: 422,
                code: protocol::codes::EXCEEDS_RATE_LIMIT.into(),
                message: format!(
                    "layer `{layer}`: the license's rate does not admit a single row per request"
                ),
            });
        }
        if tokens <= max_rows {
            return self.query_rows(served, layer, x, tokens);
        }
        let d_in = x.len() / tokens.max(1);
        let mut y = Vec::new();
        for (i, chunk) in x.chunks(max_rows * d_in).enumerate() {
            let rows = chunk.len() / d_in;
            let part = self.query_rows(served, layer, chunk, rows)?;
            if i == 0 {
                y.reserve(part.len() * tokens.div_ceil(rows));
            }
            y.extend(part);
        }
        Ok(y)
    }

    /// One query: encrypt, post (with retries), decrypt.
    fn query_rows(
        &self,
        served: &Served,
        layer: &str,
        x: &[i16],
        tokens: usize,
    ) -> Result<Vec<i64>, ModelError> {
        let spec = &self
            .choose(served, tokens)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        let mut registered = match spec.encoding {
            ResultEncoding::Packed => Some(self.registered()?),
            ResultEncoding::Keyless => None,
        };
        let name = &served.name;
        let stats = self.config.stats.as_deref();
        let url = format!(
            "{}{}",
            self.config.url.trim_end_matches('/'),
            protocol::apply_path(&self.model, name)
        );
        let parts = &served.parts;
        let mut reregistered = false;
        loop {
            let (key, key_id) = match &registered {
                Some(r) => (&r.keys.secret, Some(r.key_id.as_str())),
                None => (&self.key, None),
            };
            let started = Instant::now();
            let upload = key.encrypt(spec, x, tokens)?.to_bytes();
            if let Some(st) = stats {
                add_time(&st.encrypt_ns, started);
            }
            let sent = Instant::now();
            let answer = self.post_with_retries(&url, key_id, parts, &upload)?;
            if let Some(st) = stats {
                add_time(&st.network_ns, sent);
                st.server_ns
                    .fetch_add((answer.compute_ms * 1e6) as u64, Ordering::Relaxed);
            }
            if answer.status != 200 {
                let error = answer_error(answer.status, &answer.body);
                // A stored key the service no longer knows: register it again, once.
                if let (Some(r), ModelError::Remote { code, .. }) = (&registered, &error) {
                    if code == protocol::codes::UNKNOWN_KEY && r.entry.is_some() && !reregistered {
                        registered = Some(self.reregister(r)?);
                        reregistered = true;
                        continue;
                    }
                }
                return Err(error);
            }
            let received = Instant::now();
            let result = EncryptedResult::from_bytes(&answer.body, &Limits::default())?;
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
                    .fetch_add(answer.body.len() as u64, Ordering::Relaxed);
            }
            return Ok(y);
        }
    }
}
