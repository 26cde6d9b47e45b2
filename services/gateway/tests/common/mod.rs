//! A real gateway on loopback with real workers and a real ledger database (a throw-away
//! Postgres database, or a SQLite file), shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fhe_linear::{ClientKey, LayerShape, LayerSpec, HFHE_GLWE_2048_V1};
use gateway::{Application, GatewayConfig};
use ledger::Ledger;
use license::{KeySet, LicenseClaims, QuotaPeriod, SigningKey};

pub const AUD: &str = "hybrid-gateway";
pub const LAYER: &str = "layers.1.mixer.Wqkv";

pub fn compile_tiny(dir: &Path) -> (PathBuf, PathBuf) {
    test_support::compile_tiny(dir, &[LAYER])
}

/// An embedded ledger file in `dir`.
pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}?mode=rwc", dir.path().join("l.db").display())
}

pub async fn postgres_url() -> String {
    test_support::fresh_postgres_database("gateway_test").await
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn claims(id: &str, quota: u64) -> LicenseClaims {
    LicenseClaims {
        jti: id.into(),
        sub: "acme".into(),
        iss: "vendor".into(),
        aud: AUD.into(),
        model: "tiny".into(),
        layers: vec![LAYER.into()],
        quota_tokens: quota,
        quota_period: QuotaPeriod::Month,
        rate_limit_per_minute: 100_000,
        max_in_flight: 64,
        iat: now(),
        nbf: now() - 5,
        exp: now() + 3600,
    }
}

pub struct Stack {
    pub url: String,
    pub metrics_url: String,
    pub worker_metrics: Vec<String>,
    pub ledger: Arc<Ledger>,
    pub key: SigningKey,
    pub _dir: tempfile::TempDir,
    pub client_dir: PathBuf,
    pub _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

pub async fn wait_ready(url: &str) {
    for _ in 0..300 {
        if reqwest::get(format!("{url}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url} never became ready");
}

/// A worker with one compute slot that the test can hold ("the worker paused": requests wait
/// in its queue for up to `queue_timeout`): its URL and its slots.
pub async fn paused_worker(
    server: PathBuf,
    queue_timeout: Duration,
) -> (String, Arc<tokio::sync::Semaphore>) {
    let mut config = worker::WorkerConfig::local(vec![server]);
    config.max_concurrency = 1;
    config.queue_timeout = queue_timeout;
    let worker = worker::Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", worker.port());
    let slots = worker.compute_slots();
    tokio::spawn(worker.run_until_stopped(std::future::pending()));
    wait_ready(&url).await;
    (url, slots)
}

/// A license's own usage from the gateway at `url` (`GET /v1/usage`).
pub async fn customer_usage(url: &str, license: &str) -> protocol::admin::CustomerUsage {
    let body = reqwest::Client::new()
        .get(format!("{url}/v1/usage"))
        .bearer_auth(license)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// Workers (plus `dead` unreachable addresses listed first) and a gateway over `database_url`.
pub async fn stack(database_url: String, workers: usize, dead: usize) -> Stack {
    let mut front = Vec::new();
    for _ in 0..dead {
        // A port that was bound and released: nothing listens there.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        front.push(format!("http://{}", l.local_addr().unwrap()));
    }
    stack_with(database_url, workers, front).await
}

/// A worker that dies mid-request: it accepts an apply, reads the start of the request and
/// closes the connection without answering.
pub async fn dying_worker() -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = socket.read(&mut buf).await.unwrap_or(0);
            // It looks healthy to the health checks, so that the gateway does pick it.
            if buf[..n].starts_with(b"GET /readyz") {
                use tokio::io::AsyncWriteExt;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nready",
                    )
                    .await;
            }
            drop(socket);
        }
    });
    url
}

/// Workers listed after the `front` worker URLs, and a gateway over `database_url`.
pub async fn stack_with(database_url: String, workers: usize, front: Vec<String>) -> Stack {
    stack_named(database_url, workers, front, |url| url).await
}

/// As [`stack_with`], the gateway knowing each worker by `name(url)`.
pub async fn stack_named(
    database_url: String,
    workers: usize,
    front: Vec<String>,
    name: impl Fn(String) -> String,
) -> Stack {
    stack_configured(database_url, workers, front, name, |_, _| {}).await
}

/// As [`stack_named`], worker `i`'s configuration first changed by `configure(i, ..)`.
pub async fn stack_configured(
    database_url: String,
    workers: usize,
    front: Vec<String>,
    name: impl Fn(String) -> String,
    configure: impl Fn(usize, &mut worker::WorkerConfig),
) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server) = compile_tiny(dir.path());
    let mut urls = front;
    let mut stops = Vec::new();
    let mut worker_metrics = Vec::new();
    for i in 0..workers {
        let mut config = worker::WorkerConfig::local(vec![server.clone()]);
        configure(i, &mut config);
        let app = worker::Application::build(config).await.unwrap();
        let url = format!("http://127.0.0.1:{}", app.port());
        worker_metrics.push(format!("http://127.0.0.1:{}/metrics", app.metrics_port()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        wait_ready(&url).await;
        urls.push(name(url));
        stops.push(tx);
    }
    let key = SigningKey::generate("k1");
    let keyset = KeySet::new(&[key.public().unwrap()]).unwrap();
    let mut config = GatewayConfig::local(&database_url, keyset, AUD, urls);
    config.signing_key = Some(Arc::new(
        SigningKey::from_pem("k1", &key.to_pem().unwrap()).unwrap(),
    ));
    config.revocation_refresh = Duration::ZERO;
    config.max_body_bytes = 1 << 20;
    config.max_rows_per_request = 8;
    let app = Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let metrics_url = format!("http://127.0.0.1:{}/metrics", app.metrics_port());
    let ledger = app.ledger();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    stops.push(tx);
    Stack {
        url,
        metrics_url,
        worker_metrics,
        ledger,
        key,
        _dir: dir,
        client_dir,
        _stops: stops,
    }
}

/// The `code` of an error body (empty for anything else).
pub fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(String::from))
        .unwrap_or_default()
}

/// The tiny stack's client bundle, and what the simulation of its bundles generates for `prompt`
/// (the reference a remote generation must equal).
pub fn simulated_generation(
    client_dir: &Path,
    prompt: &[u32],
    options: &hybrid_model::GenerateOptions,
) -> (hybrid_model::bundle::ClientBundle, Vec<u32>) {
    let client = hybrid_model::bundle::load_client_bundle(client_dir).unwrap();
    let server = hybrid_model::bundle::load_server_bundle(
        &client_dir.parent().unwrap().join("server.safetensors"),
    )
    .unwrap();
    let mut simulate =
        hybrid_model::build_from_bundles(&client, Some(&server), hybrid_model::Mode::Simulate)
            .unwrap();
    let want = hybrid_model::generate(&mut simulate, prompt, options, |_| {}).unwrap();
    (client, want)
}

pub fn batch(tokens: usize) -> Vec<u8> {
    let spec = LayerSpec::choose(&HFHE_GLWE_2048_V1, LayerShape::new(64, 192), 1).unwrap();
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    key.encrypt(&spec, &vec![3i16; 64 * tokens], tokens)
        .unwrap()
        .to_bytes()
}

impl Stack {
    pub fn apply_url(&self, layer: &str) -> String {
        format!("{}/v1/models/tiny/layers/{layer}/apply", self.url)
    }

    pub async fn post(
        &self,
        token: Option<&str>,
        query_id: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let mut request = reqwest::Client::new()
            .post(self.apply_url(LAYER))
            .body(body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some(q) = query_id {
            request = request.header(protocol::QUERY_ID_HEADER, q);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.unwrap();
        (status, error_code(&bytes))
    }

    /// The gateway's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn billable(&self, license: &str) -> i64 {
        self.ledger
            .billable_tokens(license, ledger::month_start(now() as i64 * 1000))
            .await
            .unwrap()
    }

    pub async fn worker_applies(&self) -> u64 {
        self.worker_metric_sum(|l| l.starts_with("worker_apply_seconds_count"))
            .await
    }

    /// The sum, over every worker, of the integer samples on the `/metrics` lines that `matches`.
    pub async fn worker_metric_sum(&self, matches: impl Fn(&str) -> bool) -> u64 {
        let mut total = 0;
        for url in &self.worker_metrics {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            total += text
                .lines()
                .filter(|l| matches(l))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        total
    }
}
