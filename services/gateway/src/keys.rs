//! Packing keys: registered once per license (`PUT /v1/keys`), listed (`GET /v1/keys`) and
//! deleted (`DELETE /v1/keys/{id}`) by it, stored in the ledger, checked on every request for
//! packed results, and pushed to workers that have not loaded them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fhe_linear::wire::Header;
use fhe_linear::PackingKey;
use ledger::PackingKeyRecord;
use protocol::{codes, ErrorBody, KeyInfo, KeyList, KeyRegistered};

use crate::auth::{now_ms, Licensed};
use crate::error::Error;
use crate::AppState;

/// Owners of the keys seen recently (key id -> (license id, parameter set id)): requests for
/// packed results skip the ledger round trip. A key never changes owner; an entry lives
/// [`OWNER_TTL`], so that a key deleted through another replica stops working here within it
/// (this replica forgets its own deletions at once). The map is cleared past its bound.
#[derive(Default)]
pub struct KeyOwners(Mutex<HashMap<String, (Owner, Instant)>>);

/// A key's license id and parameter set id.
type Owner = (String, u16);

const OWNERS_BOUND: usize = 100_000;
const OWNER_TTL: Duration = Duration::from_secs(30);

/// Distinct packing keys one license may register (each is kept in the ledger).
pub const MAX_KEYS_PER_LICENSE: usize = 8;

impl KeyOwners {
    fn get(&self, key_id: &str) -> Option<Owner> {
        let map = self.0.lock().expect("key owners");
        map.get(key_id)
            .filter(|(_, at)| at.elapsed() < OWNER_TTL)
            .map(|(owner, _)| owner.clone())
    }

    fn insert(&self, key_id: &str, owner: Owner) {
        let mut map = self.0.lock().expect("key owners");
        if map.len() >= OWNERS_BOUND {
            map.clear();
        }
        map.insert(key_id.to_string(), (owner, Instant::now()));
    }

    fn forget(&self, key_id: &str) {
        self.0.lock().expect("key owners").remove(key_id);
    }
}

/// The largest packing key of any parameter set this build knows.
pub(crate) fn max_key_bytes() -> usize {
    fhe_linear::PARAMETER_SETS
        .iter()
        .filter_map(PackingKey::serialized_len)
        .max()
        .unwrap_or(0)
}

/// Registers the caller's packing key (the body: `fhe_linear`'s packing key format) under its
/// license. Idempotent; the upload is recorded with its size and audited.
#[utoipa::path(put, path = "/v1/keys", tag = "inference",
    request_body(content = Vec<u8>, content_type = "application/vnd.hybrid-fhe.packing-key"),
    security(("license" = [])),
    responses(
        (status = 201, description = "registered", body = KeyRegistered),
        (status = 200, description = "already registered", body = KeyRegistered),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn put_key(
    State(state): State<Arc<AppState>>,
    Licensed(claims): Licensed,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let body = body.map_err(|e| Error::body(e, state.config.max_body_bytes))?;
    if body.len() > max_key_bytes() {
        return Err(Error::new(
            codes::BODY_TOO_LARGE,
            format!("a packing key has at most {} bytes", max_key_bytes()),
        ));
    }

    let key =
        PackingKey::from_bytes(&body).map_err(|e| Error::new(codes::INVALID_KEY, e.to_string()))?;
    let key_id = protocol::key_id(&claims.jti, &body);
    let existing = state.ledger.packing_keys(&claims.jti).await?;
    if existing.len() >= MAX_KEYS_PER_LICENSE && !existing.iter().any(|k| k.key_id == key_id) {
        return Err(Error::new(
            codes::TOO_MANY_KEYS,
            format!("a license registers at most {MAX_KEYS_PER_LICENSE} packing keys"),
        ));
    }
    let record = PackingKeyRecord {
        key_id: key_id.clone(),
        license_id: claims.jti.clone(),
        customer_id: claims.sub.clone(),
        parameter_set: key.params().name.to_string(),
        bytes: body.len() as i64,
        uploaded_at: now_ms(),
    };
    let created = state.ledger.register_packing_key(&record, &body).await?;
    state
        .key_owners
        .insert(&key_id, (claims.jti.clone(), key.params().id.0));
    if created {
        state.metrics.key_uploads.inc();
        state.metrics.key_upload_bytes.inc_by(body.len() as u64);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(KeyRegistered {
            key_id,
            parameter_set: record.parameter_set,
            bytes: body.len(),
            created,
        }),
    )
        .into_response())
}

/// The packing keys the caller's license registered, oldest first.
#[utoipa::path(get, path = "/v1/keys", tag = "inference", security(("license" = [])),
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn list_keys(
    State(state): State<Arc<AppState>>,
    Licensed(claims): Licensed,
) -> Result<Json<KeyList>, Error> {
    let keys = state.ledger.packing_keys(&claims.jti).await?;
    Ok(Json(KeyList {
        keys: keys
            .into_iter()
            .map(|k| KeyInfo {
                key_id: k.key_id,
                parameter_set: k.parameter_set,
                bytes: k.bytes as usize,
                uploaded_at_ms: k.uploaded_at,
            })
            .collect(),
        max_keys: MAX_KEYS_PER_LICENSE,
    }))
}

/// Deletes one of the caller's packing keys (audited); it frees one of the license's key slots.
/// Requests naming it are refused from then on (`unknown_key`; within 30 s on other replicas).
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "inference",
    params(("key_id" = String, Path)), security(("license" = [])),
    responses((status = 204, description = "deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn delete_key(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
    Licensed(claims): Licensed,
) -> Result<StatusCode, Error> {
    let deleted = state
        .ledger
        .delete_packing_key(&key_id, &claims.jti, now_ms())
        .await?;
    if !deleted {
        // Another license's key is not this caller's business: it learns no more than that it
        // has no key of that id.
        return Err(Error::new(
            codes::UNKNOWN_KEY,
            format!("the license has no packing key {key_id}"),
        ));
    }
    state.key_owners.forget(&key_id);
    Ok(StatusCode::NO_CONTENT)
}

/// Checks the key a request for packed results names: present, registered, registered by this
/// license, for the batch's parameter set. Returns its id.
pub(crate) async fn check_request_key(
    state: &AppState,
    headers: &HeaderMap,
    license_id: &str,
    batch: &Header,
) -> Result<String, Error> {
    let key_id = headers
        .get(protocol::KEY_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| protocol::is_key_id(v))
        .ok_or_else(|| {
            Error::new(
                codes::KEY_REQUIRED,
                format!(
                    "packed results need a registered packing key: PUT {} then send {}",
                    protocol::keys_path(),
                    protocol::KEY_ID_HEADER
                ),
            )
        })?
        .to_string();
    let owner = match state.key_owners.get(&key_id) {
        Some(owner) => owner,
        None => {
            let (record, _) = registered_key(state, &key_id).await?;
            let params = fhe_linear::ParameterSet::by_name(&record.parameter_set)
                .map(|p| p.id.0)
                .unwrap_or(0);
            let owner = (record.license_id, params);
            state.key_owners.insert(&key_id, owner.clone());
            owner
        }
    };
    if owner.0 != license_id {
        return Err(Error::new(
            codes::KEY_NOT_OWNED,
            "the packing key was registered by another license",
        ));
    }
    if owner.1 != batch.param_set.0 {
        return Err(Error::new(
            codes::KEY_PARAMETER_MISMATCH,
            "the packing key belongs to another parameter set than the batch",
        ));
    }
    Ok(key_id)
}

/// A registered key's record and bytes, or `unknown_key`.
async fn registered_key(
    state: &AppState,
    key_id: &str,
) -> Result<(PackingKeyRecord, Vec<u8>), Error> {
    state
        .ledger
        .packing_key(key_id)
        .await?
        .ok_or_else(|| Error::new(codes::UNKNOWN_KEY, format!("no packing key {key_id}")))
}

/// The bytes of a registered key, to push to a worker.
pub(crate) async fn key_bytes(state: &AppState, key_id: &str) -> Result<Bytes, Error> {
    Ok(Bytes::from(registered_key(state, key_id).await?.1))
}
