//! Customer licenses: JWTs signed by the vendor with Ed25519 (`alg: EdDSA`), with a `kid` in the
//! header naming the signing key. A [`KeySet`] of public keys verifies them, so signing keys rotate
//! without invalidating licenses already issued under an older key that stays in the set.
//!
//! Verification pins the algorithm before anything else: a header with `alg: none`, `HS256`
//! (e.g. "signed" with the public key as an HMAC secret) or anything but `EdDSA` is refused, as
//! are unknown or missing `kid`, a wrong audience, expired or not-yet-valid tokens and tampered
//! payloads, each with its own error code.

use std::collections::HashMap;

use base64::Engine;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;

/// The period a token quota applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
    /// The license's whole lifetime.
    Total,
}

/// The claims of a license.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseClaims {
    /// License id.
    pub jti: String,
    /// Customer id.
    pub sub: String,
    /// Issuer (the vendor).
    pub iss: String,
    /// Audience: the gateway that accepts it.
    pub aud: String,
    /// Model id the license covers.
    pub model: String,
    /// Protected layers it may use (`*` for all).
    pub layers: Vec<String>,
    /// Billable tokens per period.
    pub quota_tokens: u64,
    pub quota_period: QuotaPeriod,
    /// Tokens per minute.
    pub rate_limit_per_minute: u32,
    /// Requests in flight at once.
    pub max_in_flight: u32,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

impl LicenseClaims {
    /// Whether the license covers `layer`.
    pub fn allows_layer(&self, layer: &str) -> bool {
        self.layers.iter().any(|l| l == "*" || l == layer)
    }
}

/// Why a license was refused. Each variant has a stable code ([`LicenseError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenseError {
    #[error("license is not a well-formed token: {0}")]
    Malformed(String),
    #[error("license algorithm `{0}` is not accepted (EdDSA only)")]
    UnsupportedAlgorithm(String),
    #[error("license header has no key id")]
    MissingKeyId,
    #[error("license signed with unknown key `{0}`")]
    UnknownKeyId(String),
    #[error("license signature does not verify")]
    BadSignature,
    #[error("license is for another audience")]
    WrongAudience,
    #[error("license expired")]
    Expired,
    #[error("license is not valid yet")]
    NotYetValid,
    #[error("key: {0}")]
    Key(String),
}

impl LicenseError {
    pub fn code(&self) -> &'static str {
        match self {
            LicenseError::Malformed(_) => "license_malformed",
            LicenseError::UnsupportedAlgorithm(_) => "license_algorithm_refused",
            LicenseError::MissingKeyId => "license_missing_kid",
            LicenseError::UnknownKeyId(_) => "license_unknown_kid",
            LicenseError::BadSignature => "license_bad_signature",
            LicenseError::WrongAudience => "license_wrong_audience",
            LicenseError::Expired => "license_expired",
            LicenseError::NotYetValid => "license_not_yet_valid",
            LicenseError::Key(_) => "license_key_error",
        }
    }
}

/// A vendor signing key. Its `Debug` never prints the secret.
pub struct SigningKey {
    pub kid: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A public verification key, as stored in a key set file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    pub kid: String,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

impl SigningKey {
    /// A fresh key from the operating system's entropy.
    pub fn generate(kid: &str) -> Self {
        SigningKey {
            kid: kid.to_string(),
            key: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// PEM of the secret key (store it like a password): plain PKCS#8 v1 (RFC 5208, the
    /// private key alone), which OpenSSL 3 and Python's `cryptography` read. [`Self::from_pem`]
    /// also reads the v2 files (RFC 5958, with the public key inside) of earlier versions.
    pub fn to_pem(&self) -> Result<String, LicenseError> {
        let v1 = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        Ok(v1
            .to_pkcs8_pem(Default::default())
            .map_err(|e| LicenseError::Key(e.to_string()))?
            .to_string())
    }

    pub fn from_pem(kid: &str, pem: &str) -> Result<Self, LicenseError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map_err(|e| LicenseError::Key(e.to_string()))?;
        Ok(SigningKey {
            kid: kid.to_string(),
            key,
        })
    }

    pub fn public(&self) -> Result<PublicKey, LicenseError> {
        let pem = self
            .key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| LicenseError::Key(e.to_string()))?;
        Ok(PublicKey {
            kid: self.kid.clone(),
            public_key_pem: pem,
        })
    }

    /// Signs `claims` into a license token.
    pub fn issue(&self, claims: &LicenseClaims) -> Result<String, LicenseError> {
        self.sign(claims)
    }

    fn sign(&self, claims: &impl Serialize) -> Result<String, LicenseError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let der = self
            .key
            .to_pkcs8_der()
            .map_err(|e| LicenseError::Key(e.to_string()))?;
        let key = EncodingKey::from_ed_der(der.as_bytes());
        jsonwebtoken::encode(&header, claims, &key).map_err(|e| LicenseError::Key(e.to_string()))
    }
}

/// The public keys a gateway accepts, by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, DecodingKey>,
    public: Vec<PublicKey>,
}

/// The JSON form of a key set file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySetFile {
    pub keys: Vec<PublicKey>,
}

impl KeySet {
    pub fn new(keys: &[PublicKey]) -> Result<Self, LicenseError> {
        let mut set = KeySet::default();
        for k in keys {
            set.insert(k.clone())?;
        }
        Ok(set)
    }

    /// Reads a key set file, or a JWKS document (RFC 7517: `{"keys": [{"kty": "OKP", "crv":
    /// "Ed25519", "kid", "x"}]}`) such as [`KeySet::to_jwks`] writes.
    pub fn from_json(json: &str) -> Result<Self, LicenseError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| LicenseError::Key(e.to_string()))?;
        let is_jwks = value["keys"]
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k.get("kty").is_some()));
        if is_jwks {
            return Self::from_jwks(&value);
        }
        let file: KeySetFile =
            serde_json::from_value(value).map_err(|e| LicenseError::Key(e.to_string()))?;
        Self::new(&file.keys)
    }

    /// The public keys as a JWKS document (RFC 7517, Ed25519 keys as RFC 8037 `OKP` keys), for
    /// tools and services that verify licenses themselves.
    pub fn to_jwks(&self) -> String {
        use ed25519_dalek::pkcs8::DecodePublicKey;
        let keys: Vec<serde_json::Value> = self
            .public
            .iter()
            .filter_map(|k| {
                let key =
                    ed25519_dalek::VerifyingKey::from_public_key_pem(&k.public_key_pem).ok()?;
                Some(serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "kid": k.kid,
                    "use": "sig",
                    "alg": "EdDSA",
                    "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.to_bytes()),
                }))
            })
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({ "keys": keys })).expect("serialisable")
    }

    fn from_jwks(value: &serde_json::Value) -> Result<Self, LicenseError> {
        let bad = |m: &str| LicenseError::Key(format!("JWKS: {m}"));
        let mut keys = Vec::new();
        for k in value["keys"].as_array().into_iter().flatten() {
            if k["kty"] != "OKP" || k["crv"] != "Ed25519" {
                return Err(bad(
                    "only Ed25519 keys (kty OKP, crv Ed25519) are supported",
                ));
            }
            let kid = k["kid"].as_str().ok_or_else(|| bad("a key without kid"))?;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(k["x"].as_str().ok_or_else(|| bad("a key without x"))?)
                .map_err(|e| bad(&e.to_string()))?;
            let bytes: [u8; 32] = x.try_into().map_err(|_| bad("x is not 32 bytes"))?;
            let key =
                ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| bad(&e.to_string()))?;
            let pem = key
                .to_public_key_pem(Default::default())
                .map_err(|e| bad(&e.to_string()))?;
            keys.push(PublicKey {
                kid: kid.to_string(),
                public_key_pem: pem,
            });
        }
        Self::new(&keys)
    }

    /// The key ids in the set.
    pub fn kids(&self) -> Vec<String> {
        self.public.iter().map(|k| k.kid.clone()).collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&KeySetFile {
            keys: self.public.clone(),
        })
        .expect("serialisable")
    }

    /// Adds (or replaces) a key.
    pub fn insert(&mut self, key: PublicKey) -> Result<(), LicenseError> {
        let decoding = DecodingKey::from_ed_pem(key.public_key_pem.as_bytes())
            .map_err(|e| LicenseError::Key(e.to_string()))?;
        self.keys.insert(key.kid.clone(), decoding);
        self.public.retain(|k| k.kid != key.kid);
        self.public.push(key);
        Ok(())
    }

    /// Verifies a license for `audience` at time `now` (seconds since the epoch).
    pub fn verify(
        &self,
        token: &str,
        audience: &str,
        now: u64,
    ) -> Result<LicenseClaims, LicenseError> {
        self.verify_token(token, audience, now)
    }

    /// Verifies an admin token for `audience` (see [`admin_audience`]) at time `now`.
    pub fn verify_admin(
        &self,
        token: &str,
        audience: &str,
        now: u64,
    ) -> Result<AdminClaims, LicenseError> {
        self.verify_token(token, audience, now)
    }

    fn verify_token<C: serde::de::DeserializeOwned + Validity>(
        &self,
        token: &str,
        audience: &str,
        now: u64,
    ) -> Result<C, LicenseError> {
        let (alg, kid) = raw_header(token)?;
        if alg != "EdDSA" {
            return Err(LicenseError::UnsupportedAlgorithm(alg));
        }
        let kid = kid.ok_or(LicenseError::MissingKeyId)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| LicenseError::UnknownKeyId(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "sub", "jti"]);
        // Time is checked below against `now`, so that callers (and tests) control the clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let data = jsonwebtoken::decode::<C>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => LicenseError::BadSignature,
                ErrorKind::InvalidAudience => LicenseError::WrongAudience,
                ErrorKind::InvalidAlgorithm => LicenseError::UnsupportedAlgorithm("?".into()),
                _ => LicenseError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        check_window(claims.window(), now)?;
        Ok(claims)
    }
}

/// Whether `now` lies in a token's (`nbf`, `exp`) window, with [`LEEWAY_SECONDS`] either side.
fn check_window((nbf, exp): (u64, u64), now: u64) -> Result<(), LicenseError> {
    if now > exp + LEEWAY_SECONDS {
        return Err(LicenseError::Expired);
    }
    if now + LEEWAY_SECONDS < nbf {
        return Err(LicenseError::NotYetValid);
    }
    Ok(())
}

impl LicenseClaims {
    /// Whether the license is valid at `now` (seconds), as [`KeySet::verify`] checks it: for
    /// claims verified earlier and kept.
    pub fn check_time(&self, now: u64) -> Result<(), LicenseError> {
        check_window(self.window(), now)
    }
}

/// Claims with a validity window.
trait Validity {
    /// (`nbf`, `exp`) in seconds since the epoch.
    fn window(&self) -> (u64, u64);
}

impl Validity for LicenseClaims {
    fn window(&self) -> (u64, u64) {
        (self.nbf, self.exp)
    }
}

impl Validity for AdminClaims {
    fn window(&self) -> (u64, u64) {
        (self.nbf, self.exp)
    }
}

/// What an admin token may do on the gateway's admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read usage, exports, licenses and the audit log.
    Compliance,
    /// Everything compliance may, plus issuing and revoking licenses.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Compliance => "compliance",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "compliance" => Ok(Role::Compliance),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role `{s}` (compliance | admin)")),
        }
    }
}

/// The claims of an admin token: a short-lived, role-scoped JWT for the vendor's staff. Its
/// audience is the gateway's admin audience ([`admin_audience`]), never a license audience, so
/// neither kind of token passes for the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminClaims {
    /// Token id (revocable like a license id).
    pub jti: String,
    /// Who acts (written to the audit log).
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub role: Role,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// The audience of admin tokens for a gateway whose licenses name `audience`.
pub fn admin_audience(audience: &str) -> String {
    format!("{audience}/admin")
}

impl SigningKey {
    /// Signs admin claims into an admin token.
    pub fn issue_admin(&self, claims: &AdminClaims) -> Result<String, LicenseError> {
        self.sign(claims)
    }
}

/// Reads `alg` and `kid` from a token's header without trusting anything else.
fn raw_header(token: &str) -> Result<(String, Option<String>), LicenseError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(LicenseError::Malformed(
            "a token has three dot-separated parts".into(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|e| LicenseError::Malformed(format!("header: {e}")))?;
    #[derive(Deserialize)]
    struct Raw {
        alg: String,
        kid: Option<String>,
    }
    let raw: Raw = serde_json::from_slice(&bytes)
        .map_err(|e| LicenseError::Malformed(format!("header: {e}")))?;
    Ok((raw.alg, raw.kid))
}

/// Decodes the claims of a token without verifying it (for display only).
pub fn inspect_unverified(token: &str) -> Result<serde_json::Value, LicenseError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| LicenseError::Malformed("no payload".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| LicenseError::Malformed(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| LicenseError::Malformed(e.to_string()))
}

#[cfg(test)]
mod key_file_tests {
    use super::*;

    #[test]
    fn signing_keys_are_written_as_pkcs8_v1_and_both_versions_read() {
        let key = SigningKey::generate("k1");
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        // v1: version 0 and no public key: 48 bytes of DER (v2 with the public key: 83).
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let der = ed25519_dalek::pkcs8::KeypairBytes::from_pkcs8_pem(&pem).unwrap();
        assert!(der.public_key.is_none());
        let again = SigningKey::from_pem("k1", &pem).unwrap();
        assert_eq!(again.key.to_bytes(), key.key.to_bytes());
        // Files of earlier versions (PKCS#8 v2, public key inside) still read.
        let v2 = key.key.to_pkcs8_pem(Default::default()).unwrap();
        assert!(v2.len() > pem.len());
        let old = SigningKey::from_pem("k1", &v2).unwrap();
        assert_eq!(old.key.to_bytes(), key.key.to_bytes());

        // OpenSSL reads it, where it is installed.
        let path = std::env::temp_dir().join(format!("hybrid-key-{}.pem", std::process::id()));
        std::fs::write(&path, &pem).unwrap();
        match std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(&path)
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "openssl: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("SKIPPED: openssl is not installed here: {e}"),
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn key_sets_round_trip_through_jwks_and_verify_the_same_licenses() {
        let key = SigningKey::generate("k1");
        let set = KeySet::new(&[key.public().unwrap()]).unwrap();
        let jwks = set.to_jwks();
        let doc: serde_json::Value = serde_json::from_str(&jwks).unwrap();
        let jwk = &doc["keys"][0];
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["crv"], "Ed25519");
        assert_eq!(jwk["kid"], "k1");
        assert_eq!(jwk["x"].as_str().unwrap().len(), 43, "32 bytes, base64url");
        let back = KeySet::from_json(&jwks).unwrap();
        assert_eq!(back.kids(), vec!["k1".to_string()]);
        assert_eq!(back.to_jwks(), jwks);
        // A JWKS key of another type is refused with a clear error.
        let rsa = r#"{"keys": [{"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"}]}"#;
        let err = KeySet::from_json(rsa).err().unwrap().to_string();
        assert!(err.contains("only Ed25519"), "{err}");
    }
}
