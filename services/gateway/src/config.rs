//! Layered settings: built-in defaults, then a TOML config file, then environment variables,
//! then command-line flags (each layer overrides the ones before it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use license::{KeySet, SigningKey};
use serde::{Deserialize, Serialize};

use crate::GatewayConfig;

/// Every setting, each optional: the shape of the config file and of the flag/environment
/// layer alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// `postgres://...` or `sqlite:PATH?mode=rwc`.
    pub database_url: Option<String>,
    /// Key set (JSON) verifying licenses.
    pub keyset: Option<PathBuf>,
    /// Key set verifying admin tokens (default: `keyset`).
    pub admin_keyset: Option<PathBuf>,
    /// Signing key (PKCS#8 PEM) with which the admin API issues licenses; without it, issuing
    /// over HTTP is disabled.
    pub signing_key: Option<PathBuf>,
    /// Key id of `signing_key` (default: its file name without `.key.pem`).
    pub signing_kid: Option<String>,
    pub audience: Option<String>,
    pub workers: Option<Vec<String>>,
    pub max_body_bytes: Option<usize>,
    pub max_rows_per_request: Option<usize>,
    pub revocation_refresh_ms: Option<u64>,
    pub worker_timeout_ms: Option<u64>,
    pub health_interval_ms: Option<u64>,
    /// How long a reservation holds quota when its request is never settled or released (a
    /// gateway killed mid-request); default: three worker timeouts (the longest forward: a
    /// packed request, its key pushed, and the request again) and 10 s.
    pub reservation_lease_seconds: Option<u64>,
    /// How often the key set files are checked for changes (new keys apply without a restart).
    pub keyset_reload_ms: Option<u64>,
    /// Serve the API over TLS with this certificate chain (PEM) and `tls_key`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM) trusted for `https` workers, beside the system's roots.
    pub worker_ca_cert: Option<PathBuf>,
    /// The certificate (PEM) and key presented to workers that require one (mutual TLS).
    pub worker_client_cert: Option<PathBuf>,
    pub worker_client_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] service_kit::ConfigFileError),
    #[error("setting `{0}` is required (flag, environment variable or config file)")]
    Missing(&'static str),
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("setting `{0}`: {1}")]
    Invalid(&'static str, &'static str),
    #[error("worker_client_cert and worker_client_key go together: give both or neither")]
    ClientIdentity,
}

impl Settings {
    /// Reads a TOML config file; unknown keys are refused (a typo never passes silently).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(service_kit::read_config_file(path)?)
    }

    /// `self` where set, else `base`.
    pub fn over(self, base: Settings) -> Settings {
        Settings {
            listen: self.listen.or(base.listen),
            metrics_listen: self.metrics_listen.or(base.metrics_listen),
            database_url: self.database_url.or(base.database_url),
            keyset: self.keyset.or(base.keyset),
            admin_keyset: self.admin_keyset.or(base.admin_keyset),
            signing_key: self.signing_key.or(base.signing_key),
            signing_kid: self.signing_kid.or(base.signing_kid),
            audience: self.audience.or(base.audience),
            workers: self.workers.or(base.workers),
            max_body_bytes: self.max_body_bytes.or(base.max_body_bytes),
            max_rows_per_request: self.max_rows_per_request.or(base.max_rows_per_request),
            revocation_refresh_ms: self.revocation_refresh_ms.or(base.revocation_refresh_ms),
            worker_timeout_ms: self.worker_timeout_ms.or(base.worker_timeout_ms),
            health_interval_ms: self.health_interval_ms.or(base.health_interval_ms),
            reservation_lease_seconds: self
                .reservation_lease_seconds
                .or(base.reservation_lease_seconds),
            keyset_reload_ms: self.keyset_reload_ms.or(base.keyset_reload_ms),
            tls_cert: self.tls_cert.or(base.tls_cert),
            tls_key: self.tls_key.or(base.tls_key),
            worker_ca_cert: self.worker_ca_cert.or(base.worker_ca_cert),
            worker_client_cert: self.worker_client_cert.or(base.worker_client_cert),
            worker_client_key: self.worker_client_key.or(base.worker_client_key),
        }
    }

    /// The gateway configuration, with defaults for what is unset, reading the key files.
    pub fn resolve(self) -> Result<GatewayConfig, ConfigError> {
        let keyset_path = self.keyset.ok_or(ConfigError::Missing("keyset"))?;
        let keyset = read_keyset(&keyset_path)?;
        let admin_keyset = match &self.admin_keyset {
            Some(p) => read_keyset(p)?,
            None => keyset.clone(),
        };
        let signing_key = match &self.signing_key {
            None => None,
            Some(path) => {
                let kid = match self.signing_kid {
                    Some(k) => k,
                    None => kid_from_path(path)?,
                };
                let pem = std::fs::read_to_string(path).map_err(|e| ConfigError::Key {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let key = SigningKey::from_pem(&kid, &pem).map_err(|e| ConfigError::Key {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Some(Arc::new(key))
            }
        };
        let workers = self.workers.unwrap_or_default();
        if workers.is_empty() {
            return Err(ConfigError::Missing("workers"));
        }
        let audience = self.audience.unwrap_or_else(|| "hybrid-gateway".into());
        let database_url = self
            .database_url
            .unwrap_or_else(|| "sqlite:hybrid-ledger.db?mode=rwc".into());
        let mut config = GatewayConfig::local(&database_url, keyset, &audience, workers);
        config.admin_keyset = admin_keyset;
        config.admin_keyset_file = Some(self.admin_keyset.clone().unwrap_or(keyset_path.clone()));
        config.keyset_file = Some(keyset_path);
        if let Some(v) = self.keyset_reload_ms {
            config.keyset_reload = Duration::from_millis(v);
        }
        config.signing_key = signing_key;
        config.listen = self.listen.unwrap_or(([127, 0, 0, 1], 8080).into());
        config.metrics_listen = self.metrics_listen.unwrap_or(([127, 0, 0, 1], 9180).into());
        if let Some(v) = self.max_body_bytes {
            config.max_body_bytes = v;
        }
        if let Some(v) = self.max_rows_per_request {
            config.max_rows_per_request = v;
        }
        if let Some(v) = self.revocation_refresh_ms {
            config.revocation_refresh = Duration::from_millis(v);
        }
        if let Some(v) = self.worker_timeout_ms {
            config.worker_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.health_interval_ms {
            config.health_interval = Duration::from_millis(v);
        }
        config.reservation_lease = match self.reservation_lease_seconds {
            Some(0) => {
                return Err(ConfigError::Invalid(
                    "reservation_lease_seconds",
                    "at least 1",
                ))
            }
            Some(v) => Duration::from_secs(v),
            None => GatewayConfig::default_lease(config.worker_timeout),
        };
        config.tls = tls::ServerTls::from_parts(self.tls_cert, self.tls_key, None)?;
        config.worker_tls = tls::ClientTls {
            ca_cert: self.worker_ca_cert,
            identity: match (self.worker_client_cert, self.worker_client_key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => return Err(ConfigError::ClientIdentity),
            },
        };
        Ok(config)
    }
}

fn read_keyset(path: &Path) -> Result<KeySet, ConfigError> {
    let json = std::fs::read_to_string(path).map_err(|e| ConfigError::Key {
        path: path.into(),
        reason: e.to_string(),
    })?;
    KeySet::from_json(&json).map_err(|e| ConfigError::Key {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// `keys/2026-11.key.pem` -> `2026-11` (the name `hybrid license keygen` gives key files).
fn kid_from_path(path: &Path) -> Result<String, ConfigError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".key.pem"))
        .filter(|k| !k.is_empty())
        .map(String::from)
        .ok_or_else(|| ConfigError::Key {
            path: path.into(),
            reason: "cannot tell the key id from the file name: set signing_kid".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate("2026-11");
        let key_path = dir.path().join("2026-11.key.pem");
        std::fs::write(&key_path, key.to_pem().unwrap()).unwrap();
        let keyset = dir.path().join("keyset.json");
        std::fs::write(
            &keyset,
            KeySet::new(&[key.public().unwrap()]).unwrap().to_json(),
        )
        .unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            format!(
                "listen = \"0.0.0.0:8080\"\nkeyset = {keyset:?}\nsigning_key = {key_path:?}\n\
                 workers = [\"http://w1:8081\", \"http://w2:8081\"]\nmax_rows_per_request = 512\n"
            ),
        )
        .unwrap();
        let from_file = Settings::from_file(&file).unwrap();
        let flags = Settings {
            max_rows_per_request: Some(64),
            ..Settings::default()
        };
        let config = flags.over(from_file).resolve().unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.max_rows_per_request, 64, "flags beat the file");
        assert_eq!(config.workers.len(), 2);
        assert_eq!(config.audience, "hybrid-gateway", "default");
        assert_eq!(config.signing_key.as_ref().unwrap().kid, "2026-11");

        std::fs::write(&file, "listen = \"0.0.0.0:8080\"\nworker = []\n").unwrap();
        let err = Settings::from_file(&file).unwrap_err().to_string();
        assert!(err.contains("unknown field `worker`"), "{err}");
        assert!(matches!(
            Settings::default().resolve(),
            Err(ConfigError::Missing("keyset"))
        ));
    }
}
