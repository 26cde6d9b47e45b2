//! The workers behind the gateway: round-robin over the healthy ones, health-checked through
//! their `/readyz`, one retry on another worker when a connection fails before any answer.
//!
//! A worker is configured by URL. `dns+http://NAME:PORT` stands for every address `NAME`
//! resolves to (e.g. a Kubernetes headless Service, one address per ready pod), resolved again at
//! every health check, so that workers added or removed by an autoscaler get their share. With
//! `https` (`dns+https://NAME:PORT`), each address is still reached under NAME, so the workers'
//! certificate names the Service, not every pod address. The TLS settings of the connections
//! (a private CA, a client certificate for mutual TLS) come from [`tls::ClientTls`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;

use crate::{AppState, GatewayError};

pub struct Worker {
    /// What logs, metrics and usage rows name it: its URL, or with `dns+` its address.
    pub url: String,
    /// The base URL requests go to (with `dns+https`, the Service name, connected to `url`'s
    /// address by `client`).
    base: String,
    client: reqwest::Client,
    pub healthy: AtomicBool,
}

pub struct WorkerPool {
    /// The configured URLs.
    targets: Vec<String>,
    /// The workers they stand for now.
    workers: RwLock<Vec<Arc<Worker>>>,
    next: AtomicUsize,
    /// Client of the workers named by URL; `dns+` workers get one each, pinned to their address.
    client: reqwest::Client,
    settings: ClientSettings,
}

/// How connections to the workers are made.
#[derive(Clone)]
struct ClientSettings {
    timeout: Duration,
    tls: tls::rustls::ClientConfig,
}

impl ClientSettings {
    /// A client, with `pin` connecting NAME to one address.
    fn client(&self, pin: Option<(&str, std::net::SocketAddr)>) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(Duration::from_secs(2))
            .use_preconfigured_tls(self.tls.clone())
            .user_agent(concat!("hybrid-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some((name, addr)) = pin {
            builder = builder.resolve(name, addr);
        }
        builder.build().map_err(|e| e.to_string())
    }
}

/// One worker of a configured target: where it is reached, and how.
struct Found {
    url: String,
    base: String,
    pin: Option<(String, std::net::SocketAddr)>,
}

const DNS_SCHEME: &str = "dns+";

/// The workers of the configured `targets` now: URLs as they are, `dns+` ones one per address.
async fn expand(targets: &[String]) -> Vec<Found> {
    let mut found = Vec::new();
    for t in targets {
        let Some(url) = t.strip_prefix(DNS_SCHEME) else {
            let url = t.trim_end_matches('/').to_string();
            found.push(Found {
                base: url.clone(),
                url,
                pin: None,
            });
            continue;
        };
        let url = url.trim_end_matches('/');
        let Some((scheme, authority)) = url.split_once("://") else {
            continue;
        };
        let authority = authority.split('/').next().unwrap_or(authority);
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        match tokio::net::lookup_host(authority).await {
            Ok(addrs) => {
                let mut addrs: Vec<_> = addrs.collect();
                addrs.sort();
                addrs.dedup();
                for addr in addrs {
                    found.push(match scheme {
                        // Reached under the name the certificate carries.
                        "https" => Found {
                            url: format!("{scheme}://{addr}"),
                            base: format!("{scheme}://{authority}"),
                            pin: Some((host.to_string(), addr)),
                        },
                        _ => Found {
                            url: format!("{scheme}://{addr}"),
                            base: format!("{scheme}://{addr}"),
                            pin: None,
                        },
                    });
                }
            }
            Err(e) => tracing::warn!(target = %t, error = %e, "worker name does not resolve"),
        }
    }
    found
}

/// A worker's answer.
pub struct Answer {
    pub worker: Arc<Worker>,
    pub status: u16,
    pub compute_ms: f64,
    pub body: Bytes,
}

pub enum ForwardError {
    /// No worker could be reached.
    Unreachable(String),
}

impl WorkerPool {
    pub async fn new(
        urls: &[String],
        timeout: Duration,
        tls: &tls::ClientTls,
    ) -> Result<Self, GatewayError> {
        let settings = ClientSettings {
            timeout,
            tls: tls.config()?,
        };
        let client = settings.client(None).map_err(GatewayError::Client)?;
        let pool = WorkerPool {
            targets: urls.to_vec(),
            workers: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            client,
            settings,
        };
        pool.refresh().await;
        Ok(pool)
    }

    /// Resolves the configured targets again; known workers keep their health.
    async fn refresh(&self) {
        let found = expand(&self.targets).await;
        let known = self.snapshot();
        let workers: Vec<Arc<Worker>> = found
            .into_iter()
            .filter_map(|f| {
                if let Some(w) = known.iter().find(|w| w.url == f.url && w.base == f.base) {
                    return Some(w.clone());
                }
                let client = match &f.pin {
                    None => self.client.clone(),
                    Some((name, addr)) => match self.settings.client(Some((name, *addr))) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(worker = %f.url, error = %e, "no client for worker");
                            return None;
                        }
                    },
                };
                // Unhealthy until its /readyz answers: a worker still compiling its layers
                // must not make the gateway look ready. Requests may still try it when no
                // worker is known healthy.
                Some(Arc::new(Worker {
                    url: f.url,
                    base: f.base,
                    client,
                    healthy: AtomicBool::new(false),
                }))
            })
            .collect();
        *self.workers.write().expect("worker list") = workers;
    }

    fn snapshot(&self) -> Vec<Arc<Worker>> {
        self.workers.read().expect("worker list").clone()
    }

    /// Workers to try, healthy ones first, starting at the round-robin position.
    fn order(&self) -> Vec<Arc<Worker>> {
        let workers = self.snapshot();
        let n = workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<Arc<Worker>> =
            (0..n).map(|i| workers[(start + i) % n].clone()).collect();
        order.sort_by_key(|w| !w.healthy.load(Ordering::Relaxed));
        order
    }

    /// Every worker but `than`, healthy ones first, from the round-robin position.
    pub fn others(&self, than: &Arc<Worker>) -> Vec<Arc<Worker>> {
        self.order()
            .into_iter()
            .filter(|w| !Arc::ptr_eq(w, than))
            .collect()
    }

    /// Workers known now (after name resolution).
    pub fn count(&self) -> usize {
        self.workers.read().expect("worker list").len()
    }

    pub fn healthy_count(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|w| w.healthy.load(Ordering::Relaxed))
            .count()
    }

    /// Sends a request to one worker, and to a second one if the first cannot be connected to
    /// or drops the connection before answering.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, ForwardError> {
        self.send_with(method, path, body, &[]).await
    }

    /// [`WorkerPool::send`] with extra request headers.
    pub async fn send_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ForwardError> {
        let mut last_error = String::from("no worker configured");
        for worker in self.order().into_iter().take(2) {
            match self
                .request(&worker, method.clone(), path, body.clone(), headers)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(e) => last_error = e,
            }
            worker.healthy.store(false, Ordering::Relaxed);
        }
        Err(ForwardError::Unreachable(last_error))
    }

    /// One request to `worker` (bodies are ciphertexts, or packing keys on `PUT`).
    pub async fn request(
        &self,
        worker: &Arc<Worker>,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let content_type = if method == reqwest::Method::PUT {
            protocol::PACKING_KEY_CONTENT_TYPE
        } else {
            protocol::CIPHERTEXT_CONTENT_TYPE
        };
        let url = format!("{}{path}", worker.base);
        let mut request = worker.client.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(b) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(b);
        }
        let response = request.send().await.map_err(|e| error_chain(&e))?;
        let status = response.status().as_u16();
        let compute_ms = response
            .headers()
            .get(protocol::COMPUTE_MS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        Ok(Answer {
            worker: worker.clone(),
            status,
            compute_ms,
            body,
        })
    }
}

/// Resolves the worker names again and marks workers healthy or not from their `/readyz`, every
/// `health_interval`.
pub async fn health_loop(state: Arc<AppState>) {
    loop {
        state.workers.refresh().await;
        for w in state.workers.snapshot() {
            let ready = w
                .client
                .get(format!("{}/readyz", w.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let ok = match ready {
                Ok(r) => r.status().is_success(),
                Err(e) => {
                    if w.healthy.load(Ordering::Relaxed) {
                        tracing::warn!(worker = %w.url, error = %error_chain(&e), "worker unreachable");
                    }
                    false
                }
            };
            w.healthy.store(ok, Ordering::Relaxed);
        }
        state
            .metrics
            .workers_healthy
            .set(state.workers.healthy_count() as i64);
        state
            .metrics
            .workers_configured
            .set(state.workers.count() as i64);
        tokio::time::sleep(state.config.health_interval).await;
    }
}

/// An error with its causes (reqwest's own message hides a TLS refusal's reason).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
