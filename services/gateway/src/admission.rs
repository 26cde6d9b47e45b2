//! Per-license admission on this replica: requests in flight; and the revocation list,
//! refreshed from the ledger at most every few seconds so that a revocation reaches every
//! replica quickly.
//!
//! The in-flight cap is per replica (it bounds what one license holds of this process); the
//! rate limit and the quota are enforced across replicas by the ledger, in the statement that
//! reserves the quota.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger::{Ledger, LedgerError};

pub struct Admission {
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
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            revoked: tokio::sync::RwLock::new((None, HashSet::new())),
            refresh,
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
