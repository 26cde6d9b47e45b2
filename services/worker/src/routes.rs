//! HTTP handlers of the worker API.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fhe_linear::{EncryptedBatch, Limits};
use protocol::{codes, ErrorBody, Name};

use crate::AppState;

/// An error answer: status, stable code, message.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                code: self.code.to_string(),
                message: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        404 => "not_found",
        400..=499 => "client_error",
        503 => "overloaded_or_not_ready",
        _ => "error",
    }
}

fn names(model: &str, layer: Option<&str>) -> Result<(Name, Option<Name>), ApiError> {
    let bad = |e: protocol::InvalidName| {
        ApiError::new(StatusCode::BAD_REQUEST, codes::INVALID_NAME, e.to_string())
    };
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
        .with_label_values(&["layers", outcome(response.status())])
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
        .with_label_values(&["apply", outcome(response.status())])
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
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::BODY_TOO_LARGE,
                format!("body over {} bytes", state.config.max_body_bytes),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_BODY, e.body_text())
        }
    })?;
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
            "all workers busy; retry",
        )
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
    let compute_ms = format!("{:.3}", elapsed.as_secs_f64() * 1e3);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                protocol::CIPHERTEXT_CONTENT_TYPE.to_string(),
            ),
            (
                header::HeaderName::from_static(protocol::COMPUTE_MS_HEADER),
                compute_ms,
            ),
        ],
        bytes,
    )
        .into_response())
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
