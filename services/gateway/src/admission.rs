//! Per-license admission on this replica: rate limit (tokens per minute, a token bucket) and
//! requests in flight; and the revocation list, refreshed from the ledger at most every few
//! seconds so that a revocation reaches every replica quickly.
//!
//! Rate and in-flight limits are per replica (N replicas allow up to N times the rate); the
//! quota, which is what is billed, is enforced across replicas by the ledger.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger::{Ledger, LedgerError};

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Admission {
    buckets: Mutex<HashMap<String, Bucket>>,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
    revoked: tokio::sync::RwLock<(Option<Instant>, HashSet<String>)>,
    refresh: Duration,
}

/// Releases an in-flight slot when dropped.
pub struct InFlight {
    map: Arc<Mutex<HashMap<String, u32>>>,
    license: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("in-flight map");
        if let Some(n) = map.get_mut(&self.license) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.license);
            }
        }
    }
}

impl Admission {
    pub fn new(refresh: Duration) -> Self {
        Admission {
            buckets: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            revoked: tokio::sync::RwLock::new((None, HashSet::new())),
            refresh,
        }
    }

    /// Takes `tokens` from the license's bucket (capacity and refill: `per_minute`). Returns the
    /// seconds to wait when the bucket is short.
    pub fn take_rate(&self, license: &str, per_minute: u32, tokens: usize) -> Result<(), u64> {
        let capacity = per_minute.max(1) as f64;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets");
        let b = buckets.entry(license.to_string()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * capacity / 60.0).min(capacity);
        b.at = now;
        if b.tokens >= tokens as f64 {
            b.tokens -= tokens as f64;
            Ok(())
        } else {
            Err((((tokens as f64 - b.tokens) * 60.0 / capacity).ceil() as u64).max(1))
        }
    }

    /// Takes an in-flight slot, or `None` at the license's cap.
    pub fn enter(&self, license: &str, cap: u32) -> Option<InFlight> {
        let mut map = self.in_flight.lock().expect("in-flight map");
        let n = map.entry(license.to_string()).or_insert(0);
        if *n >= cap.max(1) {
            return None;
        }
        *n += 1;
        Some(InFlight {
            map: self.in_flight.clone(),
            license: license.to_string(),
        })
    }

    /// Whether the license is revoked, from a list at most `refresh` old. Fails (closed) when
    /// the list is stale and the ledger cannot be read.
    pub async fn is_revoked(&self, ledger: &Ledger, license: &str) -> Result<bool, LedgerError> {
        {
            let cached = self.revoked.read().await;
            if cached.0.is_some_and(|at| at.elapsed() < self.refresh) {
                return Ok(cached.1.contains(license));
            }
        }
        let ids: HashSet<String> = ledger.revoked_ids().await?.into_iter().collect();
        let revoked = ids.contains(license);
        *self.revoked.write().await = (Some(Instant::now()), ids);
        Ok(revoked)
    }
}
