//! The key sets that verify licenses and admin tokens, reloaded without a restart when their
//! files change (a vendor adding or retiring a signing key), and published as a JWKS document
//! (`GET /.well-known/jwks.json`, RFC 7517) for tools that verify licenses themselves.
//!
//! A file that no longer parses is logged and counted; the set in use stays as it was.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use license::KeySet;

use crate::AppState;

/// One key set and the file it came from (none: fixed at start).
pub struct Reloadable {
    set: RwLock<Arc<KeySet>>,
    file: Option<PathBuf>,
    modified: RwLock<Option<SystemTime>>,
}

impl Reloadable {
    pub fn new(set: KeySet, file: Option<PathBuf>) -> Self {
        let modified = file.as_ref().and_then(|f| modified(f));
        Reloadable {
            set: RwLock::new(Arc::new(set)),
            file,
            modified: RwLock::new(modified),
        }
    }

    /// The set in use now.
    pub fn get(&self) -> Arc<KeySet> {
        self.set.read().expect("key set").clone()
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
        *self.set.write().expect("key set") = Arc::new(set);
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
                    tracing::info!(keys = ?set.get().kids(), which, "key set reloaded")
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
        state.keysets.get().to_jwks(),
    )
        .into_response()
}
