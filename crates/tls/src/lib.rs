//! TLS settings of every connection of the product, built with rustls (ring provider):
//!
//! - [`ClientTls`]: what a client trusts (the system's root certificates plus, optionally, a
//!   private CA from a PEM file) and, for mutual TLS, the certificate it presents. The SDK, the
//!   CLI and the gateway's connections to its workers are built from it.
//! - [`ServerTls`]: a service's certificate chain and key (PEM files) and, optionally, the CA
//!   whose client certificates it requires (mutual TLS between gateway and workers).
//!
//! Every file problem is a [`TlsError`] naming the file, so that a misconfigured deployment
//! says which file is wrong instead of failing at the first handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

pub use rustls;

/// ALPN protocol of every TLS connection: the services speak HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.into(),
        reason: reason.to_string(),
    }
}

/// The ring provider, named explicitly so that no process-wide default is needed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file (at least one).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, format!("private key: {e}")))
}

/// The system's root certificates (those `openssl` and `curl` trust: `SSL_CERT_FILE`,
/// `SSL_CERT_DIR` or the distribution's bundle). Unreadable entries are skipped with a warning.
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "skipping a system root certificate");
    }
    found.certs
}

/// What a client trusts and presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// A PEM file of extra trusted CA certificates (a private CA), beside the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// A certificate chain and its key (PEM files) presented to servers that require one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// The system's roots plus `ca_cert`, if any.
    pub fn roots(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let mut roots = system_roots();
        if let Some(path) = &self.ca_cert {
            roots.extend(read_certificates(path)?);
        }
        Ok(roots)
    }

    /// A rustls client configuration: [`ClientTls::roots`], and the identity when set.
    pub fn config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut store = RootCertStore::empty();
        let (added, _ignored) = store.add_parsable_certificates(self.roots()?);
        if added == 0 {
            return Err(TlsError::Config(
                "no trusted root certificate: the system has none and no CA file was given".into(),
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(store);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(read_certificates(cert)?, read_private_key(key)?)
                .map_err(|e| file_error(key, e))?,
        };
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(config)
    }
}

/// A service's TLS: its certificate chain and key, and optionally the CA that signs the client
/// certificates it requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require a client certificate signed by this CA (mutual TLS); none: any client.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// `cert` and `key` given together, or neither (plain HTTP); `client_ca` needs them.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<ServerTls>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTls {
                cert,
                key,
                client_ca,
            })),
            (None, None) if client_ca.is_none() => Ok(None),
            (None, None) => Err(TlsError::Config(
                "a client CA (mutual TLS) needs the server's own certificate and key".into(),
            )),
            _ => Err(TlsError::Config(
                "a TLS certificate and its key go together: give both or neither".into(),
            )),
        }
    }

    /// A rustls server configuration, checked now (files readable, key matching the
    /// certificate).
    pub fn config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut store = RootCertStore::empty();
                for cert in read_certificates(ca)? {
                    store.add(cert).map_err(|e| file_error(ca, e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                        .build()
                        .map_err(|e| file_error(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(read_certificates(&self.cert)?, read_private_key(&self.key)?)
            .map_err(|e| file_error(&self.key, format!("does not fit the certificate: {e}")))?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }
}
