//! The worker's cache of prepared packing keys: bounded, least recently used out first.
//!
//! A prepared key (about 6 MB of spectra at N = 4096) takes tens of milliseconds to build, so
//! workers keep the keys of their active clients. The durable copy lives in the gateway's
//! ledger: a miss answers `key_not_loaded` and the gateway pushes the key again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fhe_linear::PreparedPackingKey;

/// One cached key and the license it was registered under.
pub struct CachedKey {
    pub license_id: String,
    pub key: Arc<PreparedPackingKey>,
}

struct Entry {
    license_id: String,
    key: Arc<PreparedPackingKey>,
    last_used: u64,
}

/// A bounded LRU map from key id to prepared key.
pub struct KeyCache {
    capacity: usize,
    inner: Mutex<(HashMap<String, Entry>, u64)>,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        KeyCache {
            capacity: capacity.max(1),
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// The key, marked as just used.
    pub fn get(&self, key_id: &str) -> Option<CachedKey> {
        let mut guard = self.inner.lock().expect("key cache");
        let (map, clock) = &mut *guard;
        *clock += 1;
        let entry = map.get_mut(key_id)?;
        entry.last_used = *clock;
        Some(CachedKey {
            license_id: entry.license_id.clone(),
            key: entry.key.clone(),
        })
    }

    /// Inserts a key, evicting the least recently used one when full. Returns the entries now.
    pub fn insert(
        &self,
        key_id: String,
        license_id: String,
        key: Arc<PreparedPackingKey>,
    ) -> usize {
        let mut guard = self.inner.lock().expect("key cache");
        let (map, clock) = &mut *guard;
        *clock += 1;
        if !map.contains_key(&key_id) && map.len() >= self.capacity {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| id.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            key_id,
            Entry {
                license_id,
                key,
                last_used: *clock,
            },
        );
        map.len()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("key cache").0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhe_linear::{ClientKey, PackingKey, HFHE_GLWE_4096_V1};

    #[test]
    fn least_recently_used_goes_first() {
        let client = ClientKey::generate(&HFHE_GLWE_4096_V1);
        let key = Arc::new(PreparedPackingKey::prepare(
            &PackingKey::generate(&client).unwrap(),
        ));
        let cache = KeyCache::new(2);
        cache.insert("a".into(), "l1".into(), key.clone());
        cache.insert("b".into(), "l1".into(), key.clone());
        assert!(cache.get("a").is_some()); // b is now the oldest
        assert_eq!(cache.insert("c".into(), "l2".into(), key), 2);
        assert!(cache.get("b").is_none());
        assert_eq!(cache.get("a").unwrap().license_id, "l1");
        assert_eq!(cache.get("c").unwrap().license_id, "l2");
    }
}
