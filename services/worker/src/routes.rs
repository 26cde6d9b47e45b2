//! HTTP handlers of the worker API.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fhe_linear::{EncryptedBatch, Limits, PackingKey, PreparedPackingKey, ResultEncoding};
use protocol::{codes, KeyRegistered, Name};
use service_kit::{outcome, ApiError};

use crate::AppState;

fn names(model: &str, layer: Option<&str>) -> Result<(Name, Option<Name>), ApiError> {
    let bad = ApiError::invalid_name;
    let model = Name::parse(model).map_err(bad)?;
    let layer = layer.map(Name::parse).transpose().map_err(bad)?;
    Ok((model, layer))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    match state.loaded.get() {
        Some(_) => Ok("ready"),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::NOT_READY,
            "layers are loading",
        )),
    }
}

fn loaded(state: &AppState) -> Result<&crate::Loaded, ApiError> {
    state.loaded.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::NOT_READY,
            "layers are loading",
        )
    })
}

async fn layers(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    let result = (|| {
        let (model, _) = names(&model, None)?;
        let loaded = loaded(&state)?;
        let layers = loaded.models.get(&model).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                codes::UNKNOWN_MODEL,
                format!("no model `{model}`"),
            )
        })?;
        Ok::<_, ApiError>(Json(layers.clone()))
    })();
    let response = result.into_response();
    state
        .metrics
        .requests
        .with_label_values(&["layers", &outcome(&response)])
        .inc();
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The license a request or key belongs to, as the gateway states it.
fn license_id(headers: &HeaderMap) -> Result<String, ApiError> {
    header(headers, protocol::LICENSE_ID_HEADER)
        .filter(|v| (1..=128).contains(&v.len()))
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                codes::BAD_BODY,
                format!("send {}", protocol::LICENSE_ID_HEADER),
            )
        })
}

/// Receives a packing key (from the gateway, which keeps the durable copy) and prepares it.
async fn put_key(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = put_key_inner(&state, &key_id, &headers, body)
        .await
        .into_response();
    state
        .metrics
        .requests
        .with_label_values(&["put_key", &outcome(&response)])
        .inc();
    response
}

async fn put_key_inner(
    state: &Arc<AppState>,
    key_id: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<KeyRegistered>, ApiError> {
    let license = license_id(headers)?;
    let body = body.map_err(|e| ApiError::body(e, state.config.max_body_bytes))?;
    if protocol::key_id(&license, &body) != key_id {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            codes::INVALID_KEY,
            "the key id does not match the key and license",
        ));
    }
    let key = PackingKey::from_bytes(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, codes::INVALID_KEY, e.to_string()))?;
    let parameter_set = key.params().name.to_string();
    let prepared = tokio::task::spawn_blocking(move || PreparedPackingKey::prepare(&key))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                e.to_string(),
            )
        })?;
    let cached = state
        .keys
        .insert(key_id.to_string(), license, Arc::new(prepared));
    state.metrics.keys_cached.set(cached as i64);
    state.metrics.key_loads.inc();
    Ok(Json(KeyRegistered {
        key_id: key_id.to_string(),
        parameter_set,
        bytes: body.len(),
        created: true,
    }))
}

async fn apply(
    State(state): State<Arc<AppState>>,
    Path((model, layer)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = apply_inner(&state, &model, &layer, &headers, body)
        .await
        .into_response();
    state
        .metrics
        .requests
        .with_label_values(&["apply", &outcome(&response)])
        .inc();
    response
}

async fn apply_inner(
    state: &Arc<AppState>,
    model: &str,
    layer: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (model, layer) = names(model, Some(layer))?;
    let layer = layer.expect("asked for");
    let loaded = loaded(state)?;
    if !loaded.models.contains_key(&model) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            codes::UNKNOWN_MODEL,
            format!("no model `{model}`"),
        ));
    }
    let served = loaded
        .layers
        .get(&(model.clone(), layer.clone()))
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                codes::UNKNOWN_LAYER,
                format!("no layer `{layer}` in model `{model}`"),
            )
        })?;
    // A group is asked for by its layers, and a layer never by parts: what the gateway metered
    // is what this worker computes.
    let parts = header(headers, protocol::LAYER_PARTS_HEADER).unwrap_or("");
    if !parts
        .split(',')
        .filter(|p| !p.is_empty())
        .eq(served.parts.iter().map(|p| p.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            codes::LAYER_PARTS_MISMATCH,
            match served.parts.is_empty() {
                true => format!(
                    "`{layer}` is a layer, not a group: send no {}",
                    protocol::LAYER_PARTS_HEADER
                ),
                false => format!(
                    "group `{layer}` computes {}: name them in {}",
                    served
                        .parts
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    protocol::LAYER_PARTS_HEADER
                ),
            },
        ));
    }
    let body = body.map_err(|e| ApiError::body(e, state.config.max_body_bytes))?;
    state.metrics.request_bytes.inc_by(body.len() as u64);
    let limits = Limits {
        max_bytes: state.config.max_body_bytes as u64,
        ..Limits::default()
    };
    let batch = EncryptedBatch::from_bytes(&body, &limits)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    // Packed results: the layer's packed variant and the request's key, of the same license.
    let key = match batch.header().encoding {
        ResultEncoding::Keyless => None,
        ResultEncoding::Packed => {
            if served.packed.is_none() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    codes::RESULTS_NOT_SERVED,
                    "this worker does not serve packed results",
                ));
            }
            let key_id = header(headers, protocol::KEY_ID_HEADER).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    codes::KEY_REQUIRED,
                    format!("packed results need {}", protocol::KEY_ID_HEADER),
                )
            })?;
            let license = license_id(headers)?;
            let cached = state.keys.get(key_id).ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    codes::KEY_NOT_LOADED,
                    format!("packing key {key_id} is not loaded here"),
                )
            })?;
            if cached.license_id != license {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    codes::KEY_NOT_OWNED,
                    "the packing key belongs to another license",
                ));
            }
            Some(cached.key)
        }
    };
    let permit = tokio::time::timeout(
        state.config.queue_timeout,
        state.permits.clone().acquire_owned(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::OVERLOADED,
            "all compute slots busy; retry",
        )
        .retry(1)
    })?
    .map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::OVERLOADED,
            "shutting down",
        )
    })?;
    state.metrics.inflight.inc();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        match (&key, &served.packed) {
            (Some(key), Some(packed)) => packed.apply_packed(&batch, key).map(|r| r.0.to_bytes()),
            _ => served.compiled.apply(&batch).map(|r| r.to_bytes()),
        }
    })
    .await;
    state.metrics.inflight.dec();
    let elapsed = started.elapsed();
    let bytes = result
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                e.to_string(),
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    state.metrics.apply_seconds.observe(elapsed.as_secs_f64());
    state.metrics.response_bytes.inc_by(bytes.len() as u64);
    Ok(service_kit::ciphertext_answer(
        bytes.into(),
        elapsed.as_secs_f64() * 1e3,
    ))
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models/{model}/layers", get(layers))
        .route("/v1/models/{model}/layers/{layer}/apply", post(apply))
        .route("/v1/keys/{key_id}", put(put_key))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
