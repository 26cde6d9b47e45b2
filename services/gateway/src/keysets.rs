//! The key sets that verify licenses and admin tokens, reloaded without a restart when their
//! files change (a vendor adding or retiring a signing key), and published as a JWKS document
//! (`GET /.well-known/jwks.json`, RFC 7517) for tools that verify licenses themselves.
//!
//! A file that no longer parses is logged and counted; the set in use stays as it was.
//!
//! A license's signature is verified once, not once per request: verified claims are kept by
//! the SHA-256 of the token (at most [`VERIFIED_LICENSES`], emptied when full) with the key set
//! that verified them, so a reloaded set verifies every license again. Expiry is checked on
//! every request; revocation too, by the caller.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use license::{KeySet, LicenseClaims, LicenseError};
use sha2::{Digest, Sha256};

use crate::AppState;

/// Licenses kept verified per key set, at most.
pub const VERIFIED_LICENSES: usize = 10_000;

/// A key set with the licenses it verified.
struct Keys {
    set: KeySet,
    verified: Mutex<HashMap<[u8; 32], LicenseClaims>>,
}

impl Keys {
    fn new(set: KeySet) -> Arc<Self> {
        Arc::new(Keys {
            set,
            verified: Mutex::new(HashMap::new()),
        })
    }
}

/// One key set and the file it came from (none: fixed at start).
pub struct Reloadable {
    set: RwLock<Arc<Keys>>,
    file: Option<PathBuf>,
    modified: RwLock<Option<SystemTime>>,
}

impl Reloadable {
    pub fn new(set: KeySet, file: Option<PathBuf>) -> Self {
        let modified = file.as_ref().and_then(|f| modified(f));
        Reloadable {
            set: RwLock::new(Keys::new(set)),
            file,
            modified: RwLock::new(modified),
        }
    }

    fn keys(&self) -> Arc<Keys> {
        self.set.read().expect("key set").clone()
    }

    /// Verifies an admin token with the set in use now (admin tokens are not kept: they are
    /// few and short-lived).
    pub fn verify_admin(
        &self,
        token: &str,
        audience: &str,
        now: u64,
    ) -> Result<license::AdminClaims, LicenseError> {
        self.keys().set.verify_admin(token, audience, now)
    }

    /// The set in use now as a JWKS document.
    pub fn to_jwks(&self) -> String {
        self.keys().set.to_jwks()
    }

    /// The key ids of the set in use now.
    pub fn kids(&self) -> Vec<String> {
        self.keys().set.kids()
    }

    /// Verifies a license for `audience` at `now` (seconds): its signature once per key set,
    /// its time window every time.
    pub fn verify_license(
        &self,
        token: &str,
        audience: &str,
        now: u64,
    ) -> Result<LicenseClaims, LicenseError> {
        let keys = self.keys();
        let mut hash = Sha256::new();
        hash.update(audience.as_bytes());
        hash.update([0]);
        hash.update(token.as_bytes());
        let digest: [u8; 32] = hash.finalize().into();
        let known = keys
            .verified
            .lock()
            .expect("verified licenses")
            .get(&digest)
            .cloned();
        if let Some(claims) = known {
            claims.check_time(now)?;
            return Ok(claims);
        }
        let claims = keys.set.verify(token, audience, now)?;
        let mut verified = keys.verified.lock().expect("verified licenses");
        if verified.len() >= VERIFIED_LICENSES {
            verified.clear();
        }
        verified.insert(digest, claims.clone());
        Ok(claims)
    }

    /// Reads the file again if it changed since it was last read. `Ok(true)` when the set was
    /// replaced; `Err` (the set unchanged) when the changed file does not read.
    fn reload(&self) -> Result<bool, String> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let now = modified(file);
        if now == *self.modified.read().expect("mtime") {
            return Ok(false);
        }
        *self.modified.write().expect("mtime") = now;
        let json = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
        let set = KeySet::from_json(&json).map_err(|e| e.to_string())?;
        *self.set.write().expect("key set") = Keys::new(set);
        Ok(true)
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Checks both key set files every `every`, replacing a set whose file changed.
pub async fn reload_loop(state: Arc<AppState>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        for (which, set) in [("license", &state.keysets), ("admin", &state.admin_keysets)] {
            match set.reload() {
                Ok(true) => {
                    tracing::info!(keys = ?set.kids(), which, "key set reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    state.metrics.keyset_reload_errors.inc();
                    tracing::error!(error = %e, which, "key set file does not read; keeping the set in use")
                }
            }
        }
    }
}

/// The public keys that verify licenses, as a JWKS document (RFC 7517).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "health",
    responses((status = 200, description = "JWKS (RFC 7517) of the license signing keys",
        content_type = "application/jwk-set+json", body = String)))]
pub(crate) async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/jwk-set+json")],
        state.keysets.to_jwks(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use license::{QuotaPeriod, SigningKey};

    fn claims(exp: u64) -> LicenseClaims {
        LicenseClaims {
            jti: "lic-1".into(),
            sub: "acme".into(),
            iss: "vendor".into(),
            aud: "gw".into(),
            model: "tiny".into(),
            layers: vec![],
            quota_tokens: 10,
            quota_period: QuotaPeriod::Month,
            rate_limit_per_minute: 10,
            max_in_flight: 1,
            iat: 1_000,
            nbf: 1_000,
            exp,
        }
    }

    #[test]
    fn verified_licenses_still_expire_and_a_new_key_set_verifies_again() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (SigningKey::generate("old"), SigningKey::generate("new"));
        let file = dir.path().join("keyset.json");
        let set = |k: &SigningKey| KeySet::new(&[k.public().unwrap()]).unwrap();
        std::fs::write(&file, set(&old).to_json()).unwrap();
        let keys = Reloadable::new(set(&old), Some(file.clone()));
        let token = old.issue(&claims(2_000)).unwrap();
        assert!(keys.verify_license(&token, "gw", 1_500).is_ok());
        // Kept, yet its expiry holds; another audience is verified on its own.
        assert!(keys.verify_license(&token, "gw", 1_600).is_ok());
        assert_eq!(
            keys.verify_license(&token, "gw", 2_000 + license::LEEWAY_SECONDS + 1),
            Err(LicenseError::Expired)
        );
        assert_eq!(
            keys.verify_license(&token, "other", 1_500),
            Err(LicenseError::WrongAudience)
        );
        // The old key retired: the kept license no longer passes.
        std::fs::write(&file, set(&new).to_json()).unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(keys.reload(), Ok(true));
        assert!(matches!(
            keys.verify_license(&token, "gw", 1_500),
            Err(LicenseError::UnknownKeyId(_))
        ));
    }
}
