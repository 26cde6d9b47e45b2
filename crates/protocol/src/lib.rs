//! The HTTP protocol between the SDK, the gateway and the workers: routes, headers, error bodies
//! and layer descriptions. Ciphertexts travel as the raw bytes of `fhe_linear`'s wire format.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/models/{model}/layers` | - | [`ModelLayers`] (JSON) |
//! | POST | `/v1/models/{model}/layers/{layer}/apply` | encrypted batch | encrypted result |
//! | PUT | `/v1/keys` (gateway) | packing key | [`KeyRegistered`] (JSON) |
//! | PUT | `/v1/keys/{key_id}` (worker, from the gateway) | packing key | [`KeyRegistered`] (JSON) |
//! | GET | `/healthz`, `/readyz` | - | 200, or 503 while not ready |
//!
//! The gateway adds usage and administration routes: see [`admin`].
//!
//! Requests to apply carry a [`QUERY_ID_HEADER`] (a retry reuses it: it is billed once) and, at
//! the gateway, `Authorization: Bearer <license JWT>`. Every error answer is an [`ErrorBody`] with
//! a stable code from [`codes`].
//!
//! # Packed results
//!
//! A batch's wire header names the result encoding it was encrypted for. A batch for packed
//! results also names, in [`KEY_ID_HEADER`], the packing key the client registered with
//! `PUT /v1/keys` under the same license: the gateway refuses a missing key (`key_required`), an
//! unknown one (`unknown_key`) and one registered by another license (`key_not_owned`). Between
//! gateway and worker the request also carries [`LICENSE_ID_HEADER`]; a worker that has not
//! loaded the key answers `key_not_loaded` and the gateway pushes the key to it and retries.

use fhe_linear::{BlockLayout, LayerShape, LayerSpec, ParameterSet, ResultEncoding};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod admin;

pub const API_VERSION: &str = "v1";
/// Identifies one query; a retried request reuses it.
pub const QUERY_ID_HEADER: &str = "x-query-id";
/// Server compute time of an apply, in milliseconds (answer header).
pub const COMPUTE_MS_HEADER: &str = "x-compute-ms";
/// Media type of ciphertext bodies.
pub const CIPHERTEXT_CONTENT_TYPE: &str = "application/vnd.hybrid-fhe.ciphertext";
/// Media type of packing key bodies.
pub const PACKING_KEY_CONTENT_TYPE: &str = "application/vnd.hybrid-fhe.packing-key";
/// The packing key a request for packed results uses (a [`key_id`]).
pub const KEY_ID_HEADER: &str = "x-packing-key";
/// Gateway to worker: the license a request (or a key) belongs to.
pub const LICENSE_ID_HEADER: &str = "x-license-id";
/// A request for a group of layers that read the same input (one product for all): the
/// group's layers, comma-separated, in order. The gateway meters each; the worker checks them
/// against the group it serves.
pub const LAYER_PARTS_HEADER: &str = "x-layer-parts";

/// Path of the key registration at the gateway.
pub fn keys_path() -> String {
    format!("/{API_VERSION}/keys")
}

/// Path of one key at a worker.
pub fn key_path(key_id: &str) -> String {
    format!("/{API_VERSION}/keys/{key_id}")
}

/// The id of a packing key registered under a license: 32 hex digits of
/// SHA-256(license id, 0, key bytes). The same key under another license has another id.
pub fn key_id(license_id: &str, key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(license_id.as_bytes());
    h.update([0u8]);
    h.update(key);
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `s` looks like a [`key_id`].
pub fn is_key_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The answer to a key registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyRegistered {
    pub key_id: String,
    pub parameter_set: String,
    pub bytes: usize,
    /// False when the same key was already registered (the upload is idempotent).
    pub created: bool,
}

/// A registered packing key, as its license sees it (`GET /v1/keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub key_id: String,
    pub parameter_set: String,
    pub bytes: usize,
    /// When it was registered (ms since the epoch).
    pub uploaded_at_ms: i64,
}

/// The packing keys of a license, oldest first, and how many it may register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyInfo>,
    pub max_keys: usize,
}

/// Stable error codes of the service.
pub mod codes {
    pub const UNKNOWN_MODEL: &str = "unknown_model";
    pub const UNKNOWN_LAYER: &str = "unknown_layer";
    pub const INVALID_NAME: &str = "invalid_name";
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    pub const BAD_BODY: &str = "bad_body";
    pub const MISSING_QUERY_ID: &str = "missing_query_id";
    pub const OVERLOADED: &str = "overloaded";
    pub const NOT_READY: &str = "not_ready";
    pub const INTERNAL: &str = "internal";
    pub const KEY_REQUIRED: &str = "key_required";
    pub const UNKNOWN_KEY: &str = "unknown_key";
    pub const KEY_NOT_OWNED: &str = "key_not_owned";
    pub const KEY_NOT_LOADED: &str = "key_not_loaded";
    pub const KEY_PARAMETER_MISMATCH: &str = "key_parameter_mismatch";
    pub const INVALID_KEY: &str = "invalid_key";
    pub const TOO_MANY_KEYS: &str = "too_many_keys";
    pub const RESULTS_NOT_SERVED: &str = "results_not_served";
    /// A ciphertext that does not belong to the layer as this worker serves it (another layer's,
    /// or another layout's: `fhe_linear`'s `SpecMismatch`). The gateway tries a packed request
    /// refused so on its other workers.
    pub const LAYER_MISMATCH: &str = "layer_mismatch";
    /// The layers named in `x-layer-parts` are not those of the group (or the layer is no
    /// group).
    pub const LAYER_PARTS_MISMATCH: &str = "layer_parts_mismatch";
    /// A request needs more of the license's rate (tokens per minute, times the layers it
    /// meters) than the license's bucket can ever hold: waiting does not help, smaller requests
    /// do (a layer's `max_rows` says how small).
    pub const EXCEEDS_RATE_LIMIT: &str = "exceeds_rate_limit";
    /// The license's quota for the period is used up (429 without `Retry-After`: retrying
    /// within the period does not help).
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// The license's rate (tokens per minute, over every gateway replica) is spent for now:
    /// 429 with `Retry-After`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The request outlived its reservation's lease, which was reclaimed, and the quota has no
    /// room left for it: nothing was billed, no answer returned (429 without `Retry-After`).
    pub const LEASE_EXPIRED: &str = "lease_expired";
    /// More rows in one request than the gateway admits (`max_rows_per_request`).
    pub const TOO_MANY_ROWS: &str = "too_many_rows";
    pub const TOO_MANY_IN_FLIGHT: &str = "too_many_in_flight";
    /// No worker answered (all unreachable or unhealthy): 503 with `Retry-After`.
    pub const NO_WORKER: &str = "no_worker";
    /// The ledger cannot record usage now: 503 with `Retry-After`, nothing forwarded.
    pub const LEDGER_UNAVAILABLE: &str = "ledger_unavailable";
    pub const LICENSE_MISSING: &str = "license_missing";
    pub const LICENSE_REVOKED: &str = "license_revoked";
    pub const LICENSE_WRONG_MODEL: &str = "license_wrong_model";
    pub const LAYER_NOT_LICENSED: &str = "layer_not_licensed";
    /// A license that does not verify (the license crate's `LicenseError::code`).
    pub const LICENSE_MALFORMED: &str = "license_malformed";
    pub const LICENSE_ALGORITHM_REFUSED: &str = "license_algorithm_refused";
    pub const LICENSE_MISSING_KID: &str = "license_missing_kid";
    pub const LICENSE_UNKNOWN_KID: &str = "license_unknown_kid";
    pub const LICENSE_BAD_SIGNATURE: &str = "license_bad_signature";
    pub const LICENSE_WRONG_AUDIENCE: &str = "license_wrong_audience";
    pub const LICENSE_EXPIRED: &str = "license_expired";
    pub const LICENSE_NOT_YET_VALID: &str = "license_not_yet_valid";
    pub const LICENSE_KEY_ERROR: &str = "license_key_error";
    pub const ADMIN_TOKEN_MISSING: &str = "admin_token_missing";
    pub const ADMIN_TOKEN_INVALID: &str = "admin_token_invalid";
    pub const ADMIN_TOKEN_EXPIRED: &str = "admin_token_expired";
    pub const ADMIN_TOKEN_REVOKED: &str = "admin_token_revoked";
    pub const ADMIN_ROLE_INSUFFICIENT: &str = "admin_role_insufficient";
    /// The gateway has no signing key: licenses are issued offline (`hybrid license issue`).
    pub const ISSUING_DISABLED: &str = "issuing_disabled";
    pub const INVALID_LICENSE_REQUEST: &str = "invalid_license_request";
    pub const BAD_QUERY: &str = "bad_query";
    /// A JSON body that does not parse (400), lacks its content type (415) or has wrong fields
    /// (422).
    pub const BAD_JSON: &str = "bad_json";

    /// The HTTP status of every code the gateway answers with itself (worker answers it passes
    /// on keep the worker's status): the one table of both.
    pub fn http_status(code: &str) -> u16 {
        match code {
            INVALID_NAME
            | BAD_BODY
            | MISSING_QUERY_ID
            | KEY_REQUIRED
            | KEY_PARAMETER_MISMATCH
            | INVALID_KEY
            | LAYER_PARTS_MISMATCH
            | TOO_MANY_ROWS
            | BAD_QUERY
            | BAD_JSON
            | RESULTS_NOT_SERVED => 400,
            LICENSE_MISSING
            | LICENSE_REVOKED
            | LICENSE_MALFORMED
            | LICENSE_ALGORITHM_REFUSED
            | LICENSE_MISSING_KID
            | LICENSE_UNKNOWN_KID
            | LICENSE_BAD_SIGNATURE
            | LICENSE_WRONG_AUDIENCE
            | LICENSE_EXPIRED
            | LICENSE_NOT_YET_VALID
            | LICENSE_KEY_ERROR
            | ADMIN_TOKEN_MISSING
            | ADMIN_TOKEN_INVALID
            | ADMIN_TOKEN_EXPIRED
            | ADMIN_TOKEN_REVOKED => 401,
            LICENSE_WRONG_MODEL | LAYER_NOT_LICENSED | KEY_NOT_OWNED | ADMIN_ROLE_INSUFFICIENT => {
                403
            }
            UNKNOWN_MODEL | UNKNOWN_LAYER | UNKNOWN_KEY => 404,
            TOO_MANY_KEYS | KEY_NOT_LOADED => 409,
            BODY_TOO_LARGE => 413,
            EXCEEDS_RATE_LIMIT | INVALID_LICENSE_REQUEST => 422,
            QUOTA_EXCEEDED | RATE_LIMITED | LEASE_EXPIRED | TOO_MANY_IN_FLIGHT => 429,
            ISSUING_DISABLED => 501,
            NO_WORKER | LEDGER_UNAVAILABLE | OVERLOADED | NOT_READY => 503,
            _ => 500,
        }
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// A model or layer name as it appears in a path: 1 to 128 of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name `{0}`: use 1 to 128 of A-Z a-z 0-9 . _ -")]
pub struct InvalidName(pub String);

impl Name {
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let ok = (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Name(s.to_string()))
        } else {
            Err(InvalidName(s.chars().take(130).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Path of the layer list of a model.
pub fn layers_path(model: &Name) -> String {
    format!("/{API_VERSION}/models/{model}/layers")
}

/// Path of the apply endpoint of a layer.
pub fn apply_path(model: &Name, layer: &Name) -> String {
    format!("/{API_VERSION}/models/{model}/layers/{layer}/apply")
}

/// Public description of a served layer: everything a client needs to encrypt for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayerInfo {
    #[schema(value_type = String)]
    pub name: Name,
    pub d_in: usize,
    pub d_out: usize,
    pub parameter_set: String,
    pub n_i: usize,
    pub n_o: usize,
    pub t_b: usize,
    pub input_bits: u32,
    pub output_bits: u32,
    /// Width of the layer's activations when wider than 8 bits (the client quantizes its input
    /// to as many; every variant of the layer takes the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_bits: Option<u32>,
    /// The packed-result variant of the layer, when the server offers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<LayerVariant>,
    /// For a group of layers that read the same input, served as one product: its layers, in
    /// the order of their outputs (requests name them in `x-layer-parts`). Empty for a layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub parts: Vec<Name>,
    /// Rows (tokens) one request may carry for this caller: the gateway's row cap, and the
    /// license's rate divided by the layers the request meters. Absent: unbounded here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<usize>,
}

/// One more way a server computes a layer (today: packed results).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayerVariant {
    pub results: String,
    pub parameter_set: String,
    pub n_i: usize,
    pub n_o: usize,
    pub t_b: usize,
    pub input_bits: u32,
    pub output_bits: u32,
}

/// The layers a server offers for one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelLayers {
    #[schema(value_type = String)]
    pub model: Name,
    pub layers: Vec<LayerInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown parameter set `{0}`")]
    UnknownParameterSet(String),
    #[error("layer {name}: {reason}")]
    Invalid { name: String, reason: String },
}

impl LayerInfo {
    pub fn from_spec(name: Name, spec: &LayerSpec) -> Self {
        LayerInfo {
            name,
            d_in: spec.shape.d_in,
            d_out: spec.shape.d_out,
            parameter_set: spec.params.name.to_string(),
            n_i: spec.layout.n_i,
            n_o: spec.layout.n_o,
            t_b: spec.layout.t_b,
            input_bits: spec.input_bits,
            output_bits: spec.output_bits,
            activation_bits: (spec.activation_bits != fhe_linear::DEFAULT_ACTIVATION_BITS)
                .then_some(spec.activation_bits),
            packed: None,
            parts: vec![],
            max_rows: None,
        }
    }

    /// Adds the packed variant.
    pub fn with_packed(mut self, spec: &LayerSpec) -> Self {
        self.packed = Some(LayerVariant {
            results: spec.encoding.as_str().to_string(),
            parameter_set: spec.params.name.to_string(),
            n_i: spec.layout.n_i,
            n_o: spec.layout.n_o,
            t_b: spec.layout.t_b,
            input_bits: spec.input_bits,
            output_bits: spec.output_bits,
        });
        self
    }

    /// Rebuilds the (keyless) spec, refusing parameters this build does not know or whose
    /// precisions do not follow from the noise budget.
    pub fn to_spec(&self) -> Result<LayerSpec, SpecError> {
        self.rebuild(
            ResultEncoding::Keyless,
            &self.parameter_set,
            (self.n_i, self.n_o, self.t_b),
            (self.input_bits, self.output_bits),
        )
    }

    /// Rebuilds the packed spec, if the server offers one (same checks as [`LayerInfo::to_spec`]).
    pub fn packed_spec(&self) -> Option<Result<LayerSpec, SpecError>> {
        let v = self.packed.as_ref()?;
        if v.results != ResultEncoding::Packed.as_str() {
            return Some(Err(SpecError::Invalid {
                name: self.name.to_string(),
                reason: format!("unknown result encoding `{}`", v.results),
            }));
        }
        Some(self.rebuild(
            ResultEncoding::Packed,
            &v.parameter_set,
            (v.n_i, v.n_o, v.t_b),
            (v.input_bits, v.output_bits),
        ))
    }

    fn rebuild(
        &self,
        encoding: ResultEncoding,
        parameter_set: &str,
        (n_i, n_o, t_b): (usize, usize, usize),
        bits: (u32, u32),
    ) -> Result<LayerSpec, SpecError> {
        let params = ParameterSet::by_name(parameter_set)
            .ok_or_else(|| SpecError::UnknownParameterSet(parameter_set.to_string()))?;
        let layout = BlockLayout { n_i, n_o, t_b };
        let shape = LayerShape::new(self.d_in, self.d_out);
        let activation_bits = self
            .activation_bits
            .unwrap_or(fhe_linear::DEFAULT_ACTIVATION_BITS);
        let spec =
            LayerSpec::with_encoding_and_width(params, shape, layout, encoding, activation_bits)
                .map_err(|e| SpecError::Invalid {
                    name: self.name.to_string(),
                    reason: e.to_string(),
                })?;
        if (spec.input_bits, spec.output_bits) != bits {
            return Err(SpecError::Invalid {
                name: self.name.to_string(),
                reason: format!(
                    "precisions {}/{} differ from the budget's {}/{}",
                    bits.0, bits.1, spec.input_bits, spec.output_bits
                ),
            });
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed() {
        assert!(Name::parse("layers.1.mixer.Wqkv").is_ok());
        assert!(Name::parse("phi-1_5").is_ok());
        for bad in ["", "a/b", "a b", "../x", &"x".repeat(129)] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Name>("\"a/b\"").is_err());
    }

    #[test]
    fn layer_info_round_trips_and_is_checked() {
        let spec =
            LayerSpec::choose(&fhe_linear::HFHE_GLWE_2048_V1, LayerShape::new(64, 192), 1).unwrap();
        let info = LayerInfo::from_spec(Name::parse("layers.1.mixer.Wqkv").unwrap(), &spec);
        assert_eq!(info.to_spec().unwrap(), spec);
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<LayerInfo>(&json).unwrap(), info);
        let mut bad = info.clone();
        bad.output_bits -= 1;
        assert!(bad.to_spec().is_err());
        bad = info.clone();
        bad.parameter_set = "other".into();
        assert!(matches!(
            bad.to_spec(),
            Err(SpecError::UnknownParameterSet(_))
        ));
        bad = info;
        bad.n_o = 3;
        assert!(bad.to_spec().is_err());
        assert_eq!(
            apply_path(&Name::parse("m").unwrap(), &Name::parse("l").unwrap()),
            "/v1/models/m/layers/l/apply"
        );
    }

    #[test]
    fn packed_variants_round_trip_and_key_ids_bind_the_license() {
        let shape = LayerShape::new(64, 192);
        let keyless = LayerSpec::choose(&fhe_linear::HFHE_GLWE_2048_V1, shape, 1).unwrap();
        let layout = BlockLayout {
            n_i: 64,
            n_o: 64,
            t_b: 1,
        };
        let packed = LayerSpec::packed(&fhe_linear::HFHE_GLWE_4096_V1, shape, layout).unwrap();
        let info = LayerInfo::from_spec(Name::parse("l").unwrap(), &keyless).with_packed(&packed);
        let json = serde_json::to_string(&info).unwrap();
        let back: LayerInfo = serde_json::from_str(&json).unwrap();
        assert_eq!(back.packed_spec().unwrap().unwrap(), packed);
        assert_eq!(back.to_spec().unwrap(), keyless);
        let mut bad = back;
        bad.packed.as_mut().unwrap().n_i = 1024;
        assert!(bad.packed_spec().unwrap().is_err());
        // A wider layer's width travels with it and is rebuilt into both variants.
        let wide = keyless.with_activation_bits(11).unwrap();
        let info = LayerInfo::from_spec(Name::parse("l").unwrap(), &wide)
            .with_packed(&packed.with_activation_bits(11).unwrap());
        assert_eq!(info.activation_bits, Some(11));
        let back: LayerInfo = serde_json::from_str(&serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(back.to_spec().unwrap(), wide);
        assert_eq!(back.packed_spec().unwrap().unwrap().activation_bits, 11);
        // 8-bit layers list no width, as before.
        assert!(!json.contains("activation_bits"), "{json}");
        // Older descriptions without a packed variant still parse.
        let plain =
            serde_json::to_string(&LayerInfo::from_spec(Name::parse("l").unwrap(), &keyless))
                .unwrap();
        assert!(!plain.contains("packed"));
        let a = key_id("license-a", b"key");
        assert!(is_key_id(&a));
        assert_ne!(a, key_id("license-b", b"key"));
        assert_eq!(a, key_id("license-a", b"key"));
        assert!(!is_key_id("../etc"));
    }
}
