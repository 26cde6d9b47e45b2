//! HTTP handlers of the worker API.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fhe_linear::{EncryptedBatch, Limits};
use protocol::{codes, Name};
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

async fn apply(
    State(state): State<Arc<AppState>>,
    Path((model, layer)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = apply_inner(&state, &model, &layer, body)
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
    let body = body.map_err(|e| ApiError::body(e, state.config.max_body_bytes))?;
    state.metrics.request_bytes.inc_by(body.len() as u64);
    let limits = Limits {
        max_bytes: state.config.max_body_bytes as u64,
        ..Limits::default()
    };
    let batch = EncryptedBatch::from_bytes(&body, &limits)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
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
        served.compiled.apply(&batch).map(|r| r.to_bytes())
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
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
