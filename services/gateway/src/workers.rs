//! The workers behind the gateway: round-robin over the healthy ones, health-checked through
//! their `/readyz`, one retry on another worker when a connection fails before any answer.
//!
//! A worker is configured by URL. `dns+http://NAME:PORT` stands for every address `NAME`
//! resolves to (e.g. a Kubernetes headless Service, one address per ready pod), resolved again at
//! every health check, so that workers added or removed by an autoscaler get their share.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;

use crate::{AppState, GatewayError};

pub struct Worker {
    pub url: String,
    pub healthy: AtomicBool,
}

pub struct WorkerPool {
    /// The configured URLs.
    targets: Vec<String>,
    /// The workers they stand for now.
    workers: RwLock<Vec<Arc<Worker>>>,
    next: AtomicUsize,
    pub client: reqwest::Client,
}

const DNS_SCHEME: &str = "dns+";

/// The workers of the configured `targets` now: URLs as they are, `dns+` ones one per address.
async fn expand(targets: &[String]) -> Vec<String> {
    let mut urls = Vec::new();
    for t in targets {
        let Some(url) = t.strip_prefix(DNS_SCHEME) else {
            urls.push(t.trim_end_matches('/').to_string());
            continue;
        };
        let url = url.trim_end_matches('/');
        let Some((scheme, authority)) = url.split_once("://") else {
            continue;
        };
        let authority = authority.split('/').next().unwrap_or(authority);
        match tokio::net::lookup_host(authority).await {
            Ok(addrs) => {
                let mut found: Vec<String> = addrs.map(|a| format!("{scheme}://{a}")).collect();
                found.sort();
                found.dedup();
                urls.extend(found);
            }
            Err(e) => tracing::warn!(target = %t, error = %e, "worker name does not resolve"),
        }
    }
    urls
}

/// A worker's answer.
pub struct Answer {
    pub worker: String,
    pub status: u16,
    pub compute_ms: f64,
    pub body: Bytes,
}

pub enum ForwardError {
    /// No worker could be reached.
    Unreachable(String),
}

impl WorkerPool {
    pub async fn new(urls: &[String], timeout: Duration) -> Result<Self, GatewayError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| GatewayError::Client(e.to_string()))?;
        let pool = WorkerPool {
            targets: urls.to_vec(),
            workers: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            client,
        };
        pool.refresh().await;
        Ok(pool)
    }

    /// Resolves the configured targets again; known workers keep their health.
    async fn refresh(&self) {
        let urls = expand(&self.targets).await;
        let mut workers = self.workers.write().expect("worker list");
        let known = std::mem::take(&mut *workers);
        *workers = urls
            .into_iter()
            .map(|url| {
                known
                    .iter()
                    .find(|w| w.url == url)
                    .cloned()
                    .unwrap_or_else(|| {
                        // Unhealthy until its /readyz answers: a worker still compiling its
                        // layers must not make the gateway look ready. Requests may still try
                        // it when no worker is known healthy.
                        Arc::new(Worker {
                            url,
                            healthy: AtomicBool::new(false),
                        })
                    })
            })
            .collect();
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
                .request(&worker.url, method.clone(), path, body.clone(), headers)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(e) => last_error = e,
            }
            worker.healthy.store(false, Ordering::Relaxed);
        }
        Err(ForwardError::Unreachable(last_error))
    }

    /// One request to the worker at `url` (bodies are ciphertexts, or packing keys on `PUT`).
    pub async fn request(
        &self,
        url: &str,
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
        let mut request = self.client.request(method, format!("{url}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(b) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(b);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let compute_ms = response
            .headers()
            .get(protocol::COMPUTE_MS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        Ok(Answer {
            worker: url.to_string(),
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
            let ok = state
                .workers
                .client
                .get(format!("{}/readyz", w.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
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
