//! The workers behind the gateway: round-robin over the healthy ones, health-checked through
//! their `/readyz`, one retry on another worker when a connection fails before any answer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;

use crate::{AppState, GatewayError};

pub struct Worker {
    pub url: String,
    pub healthy: AtomicBool,
}

pub struct WorkerPool {
    pub workers: Vec<Worker>,
    next: AtomicUsize,
    pub client: reqwest::Client,
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
    pub fn new(urls: &[String], timeout: Duration) -> Result<Self, GatewayError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| GatewayError::Client(e.to_string()))?;
        Ok(WorkerPool {
            workers: urls
                .iter()
                .map(|u| Worker {
                    url: u.trim_end_matches('/').to_string(),
                    healthy: AtomicBool::new(true),
                })
                .collect(),
            next: AtomicUsize::new(0),
            client,
        })
    }

    /// Workers to try, healthy ones first, starting at the round-robin position.
    fn order(&self) -> Vec<&Worker> {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<&Worker> = (0..n).map(|i| &self.workers[(start + i) % n]).collect();
        order.sort_by_key(|w| !w.healthy.load(Ordering::Relaxed));
        order
    }

    pub fn healthy_count(&self) -> usize {
        self.workers
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
        let mut last_error = String::from("no worker configured");
        for worker in self.order().into_iter().take(2) {
            let mut request = self
                .client
                .request(method.clone(), format!("{}{path}", worker.url));
            if let Some(b) = &body {
                request = request
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        protocol::CIPHERTEXT_CONTENT_TYPE,
                    )
                    .body(b.clone());
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let compute_ms = response
                        .headers()
                        .get(protocol::COMPUTE_MS_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    match response.bytes().await {
                        Ok(body) => {
                            return Ok(Answer {
                                worker: worker.url.clone(),
                                status,
                                compute_ms,
                                body,
                            })
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            worker.healthy.store(false, Ordering::Relaxed);
        }
        Err(ForwardError::Unreachable(last_error))
    }
}

/// Marks workers healthy or not from their `/readyz`, every `health_interval`.
pub async fn health_loop(state: Arc<AppState>) {
    loop {
        for w in &state.workers.workers {
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
        tokio::time::sleep(state.config.health_interval).await;
    }
}
