//! Layered settings: built-in defaults, then a TOML config file, then environment variables,
//! then command-line flags (each layer overrides the ones before it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{PlannerCosts, WorkerConfig};

/// Every setting, each optional: the shape of the config file and of the flag/environment
/// layer alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Server bundles (`server.safetensors` files written by `hybrid compile`).
    pub bundles: Option<Vec<PathBuf>>,
    pub max_body_bytes: Option<usize>,
    /// Requests computed at once (default: the number of cores).
    pub max_concurrency: Option<usize>,
    /// How long a request waits for a compute slot before 503.
    pub queue_timeout_ms: Option<u64>,
    /// Also serve packed results (default true: a second set of weight transforms per layer).
    pub packed_results: Option<bool>,
    /// Prepared packing keys kept in memory (default 64, about 6 MB each).
    pub key_cache_entries: Option<usize>,
    /// The planner's unit costs for packed layouts: `measure` (default: measured on this
    /// machine at start, under a second), `builtin`, or four numbers `input,mac,output,keyswitch`
    /// in ns (a fleet given the same numbers offers the same layouts).
    pub planner_costs: Option<String>,
    /// Serve the API over TLS with this certificate chain (PEM) and `tls_key`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS with the gateways.
    pub tls_client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] service_kit::ConfigFileError),
    #[error("setting `{0}` is required (flag, environment variable or config file)")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl Settings {
    /// Reads a TOML config file; unknown keys are refused.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(service_kit::read_config_file(path)?)
    }

    /// `self` where set, else `base`.
    pub fn over(self, base: Settings) -> Settings {
        Settings {
            listen: self.listen.or(base.listen),
            metrics_listen: self.metrics_listen.or(base.metrics_listen),
            bundles: self.bundles.or(base.bundles),
            max_body_bytes: self.max_body_bytes.or(base.max_body_bytes),
            max_concurrency: self.max_concurrency.or(base.max_concurrency),
            queue_timeout_ms: self.queue_timeout_ms.or(base.queue_timeout_ms),
            packed_results: self.packed_results.or(base.packed_results),
            key_cache_entries: self.key_cache_entries.or(base.key_cache_entries),
            planner_costs: self.planner_costs.or(base.planner_costs),
            tls_cert: self.tls_cert.or(base.tls_cert),
            tls_key: self.tls_key.or(base.tls_key),
            tls_client_ca: self.tls_client_ca.or(base.tls_client_ca),
        }
    }

    /// The worker configuration, with defaults for what is unset.
    pub fn resolve(self) -> Result<WorkerConfig, ConfigError> {
        let bundles = self.bundles.unwrap_or_default();
        if bundles.is_empty() {
            return Err(ConfigError::Missing("bundles"));
        }
        let mut config = WorkerConfig::local(bundles);
        config.listen = self.listen.unwrap_or(([127, 0, 0, 1], 8081).into());
        config.metrics_listen = self.metrics_listen.unwrap_or(([127, 0, 0, 1], 9181).into());
        if let Some(v) = self.max_body_bytes {
            config.max_body_bytes = v;
        }
        if let Some(v) = self.max_concurrency {
            config.max_concurrency = v;
        }
        if let Some(v) = self.queue_timeout_ms {
            config.queue_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.packed_results {
            config.packed_results = v;
        }
        if let Some(v) = self.key_cache_entries {
            config.key_cache_entries = v;
        }
        config.planner_costs = match self.planner_costs.as_deref() {
            None => PlannerCosts::Measure,
            Some(s) => PlannerCosts::parse(s).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "planner_costs must be `measure`, `builtin` or four positive numbers \
                     `input,mac,output,keyswitch` (ns), not `{s}`"
                ))
            })?,
        };
        config.tls = tls::ServerTls::from_parts(self.tls_cert, self.tls_key, self.tls_client_ca)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "bundles = [\"/bundles/a/server.safetensors\"]\nmax_concurrency = 8\nqueue_timeout_ms = 500\n",
        )
        .unwrap();
        let flags = Settings {
            max_concurrency: Some(2),
            ..Settings::default()
        };
        let config = flags
            .over(Settings::from_file(&file).unwrap())
            .resolve()
            .unwrap();
        assert_eq!(config.max_concurrency, 2);
        assert_eq!(config.queue_timeout, Duration::from_millis(500));
        assert_eq!(config.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(config.bundles.len(), 1);
        std::fs::write(&file, "bundle = []\n").unwrap();
        assert!(Settings::from_file(&file).is_err(), "typos are refused");
        assert!(matches!(
            Settings::default().resolve(),
            Err(ConfigError::Missing("bundles"))
        ));
    }

    #[test]
    fn planner_costs_are_measured_unless_built_in_or_given() {
        let with = |v: Option<&str>| {
            Settings {
                bundles: Some(vec!["/b/server.safetensors".into()]),
                planner_costs: v.map(String::from),
                ..Settings::default()
            }
            .resolve()
        };
        assert_eq!(with(None).unwrap().planner_costs, PlannerCosts::Measure);
        assert_eq!(
            with(Some("builtin")).unwrap().planner_costs,
            PlannerCosts::Builtin
        );
        let given = with(Some("17, 0.55,22,50")).unwrap().planner_costs;
        assert_eq!(given, PlannerCosts::Given([17.0, 0.55, 22.0, 50.0]));
        assert_eq!(given.planner().ns_per_mac, 0.55);
        for bad in ["fast", "1,2,3", "1,2,3,0", "1,2,3,inf", "1,2,3,4,5"] {
            let err = with(Some(bad)).unwrap_err();
            assert!(err.to_string().contains("planner_costs"), "{bad}: {err}");
        }
    }
}
