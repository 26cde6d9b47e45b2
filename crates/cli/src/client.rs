//! What the commands that talk to a gateway share: its URL, the license, the CA that HTTPS
//! trusts beside the system's, result encoding and keys, and the exit codes of failures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hybrid_model::remote::{KeySource, RemoteConfig, RetryPolicy};

/// Exit code of a command refused for good (license, quota, input): the same call fails again.
pub const EXIT_REFUSED: i32 = 77;
/// Exit code of a command that may succeed later (overloaded, rate limited, unreachable).
pub const EXIT_RETRY_LATER: i32 = 75;

/// A CA certificate file (PEM) trusted for HTTPS beside the system's roots.
#[derive(Args, Clone, Debug, Default)]
pub struct CaArgs {
    /// Trust this CA (PEM) for HTTPS, beside the system's roots (a private CA).
    #[arg(long, env = "HYBRID_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl CaArgs {
    pub fn client_tls(&self) -> tls::ClientTls {
        tls::ClientTls {
            ca_cert: self.ca_cert.clone(),
            identity: None,
        }
    }

    /// An async HTTP client trusting the system's roots and `--ca-cert`.
    pub fn http_client(&self) -> Result<reqwest::Client> {
        let config = self.client_tls().config()?;
        reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .user_agent(hybrid_model::remote::USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("HTTP client")
    }
}

/// The gateway and license of remote mode.
#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// Remote mode: the service's base URL (gateway or worker), e.g. https://gateway:8443.
    #[arg(long, env = "HYBRID_URL")]
    pub url: Option<String>,
    /// Remote mode: the license token (JWT).
    #[arg(long, env = "HYBRID_LICENSE", hide_env_values = true)]
    pub license: Option<String>,
    #[command(flatten)]
    pub ca: CaArgs,
    /// How long one protected-layer query may take, retries after overload included.
    #[arg(long, default_value_t = 120)]
    pub deadline_s: u64,
    #[command(flatten)]
    pub results: crate::keys_cmd::ResultsArgs,
}

impl RemoteArgs {
    /// The remote configuration for `model`.
    pub fn config(&self, model: &str) -> Result<RemoteConfig> {
        let url = self
            .url
            .clone()
            .context("remote mode needs --url (or HYBRID_URL)")?;
        Ok(RemoteConfig {
            license: self.license.clone(),
            results: self.results.mode()?,
            keys: self.results.key_source()?,
            tls: self.ca.client_tls(),
            retry: RetryPolicy {
                deadline: Duration::from_secs(self.deadline_s),
                ..RetryPolicy::default()
            },
            ..RemoteConfig::new(url, model)
        })
    }
}

/// Where keys come from for `--keys`: a directory, or the user's key store.
pub fn key_source(dir: &Option<PathBuf>) -> Result<KeySource> {
    Ok(match dir {
        Some(dir) => KeySource::Fixed(std::sync::Arc::new(
            hybrid_model::remote::PackedKeys::load(dir)
                .with_context(|| format!("reading keys from {}", dir.display()))?,
        )),
        None => KeySource::UserStore,
    })
}

/// The exit code of a failed command: [`EXIT_RETRY_LATER`], [`EXIT_REFUSED`] or 1.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<hybrid_model::ModelError>() {
        Some(e) if e.is_retry_later() => EXIT_RETRY_LATER,
        Some(e) if e.is_refused() => EXIT_REFUSED,
        _ => 1,
    }
}
