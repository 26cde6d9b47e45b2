//! HTTP handlers of the gateway.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fhe_linear::{Limits, ResultEncoding};
use ledger::{LedgerError, UsageEvent};
use license::LicenseClaims;
use protocol::{codes, ErrorBody, ModelLayers, Name};
use service_kit::outcome;

use crate::auth::{authenticate, now_ms, period_start, Licensed};
use crate::error::Error;
use crate::workers::ForwardError;
use crate::{keys, AppState};

fn names(model: &str, layer: &str) -> Result<(Name, Name), Error> {
    let bad = Error::name;
    Ok((
        Name::parse(model).map_err(bad)?,
        Name::parse(layer).map_err(bad)?,
    ))
}

/// Most layers one grouped request may name.
const MAX_PARTS: usize = 16;

/// The layers a request is metered for: its layer, or a group's layers named in
/// `x-layer-parts` (checked again by the worker against the group it serves).
fn metered_layers(layer: &Name, headers: &HeaderMap) -> Result<Vec<Name>, Error> {
    let Some(value) = headers.get(protocol::LAYER_PARTS_HEADER) else {
        return Ok(vec![layer.clone()]);
    };
    let bad = |why: String| Error::new(codes::LAYER_PARTS_MISMATCH, why);
    let parts: Vec<Name> = value
        .to_str()
        .map_err(|_| bad(format!("{} is not text", protocol::LAYER_PARTS_HEADER)))?
        .split(',')
        .map(|p| Name::parse(p.trim()).map_err(Error::name))
        .collect::<Result<_, _>>()?;
    let unique: std::collections::HashSet<&str> = parts.iter().map(Name::as_str).collect();
    if parts.len() < 2 || parts.len() > MAX_PARTS || unique.len() != parts.len() {
        return Err(bad(format!(
            "{} names 2 to {MAX_PARTS} distinct layers",
            protocol::LAYER_PARTS_HEADER
        )));
    }
    Ok(parts)
}

fn query_id(headers: &HeaderMap) -> Result<String, Error> {
    let id = headers
        .get(protocol::QUERY_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id.to_string())
    } else {
        Err(Error::new(
            codes::MISSING_QUERY_ID,
            format!(
                "send {}: 1 to 128 of A-Z a-z 0-9 - _",
                protocol::QUERY_ID_HEADER
            ),
        ))
    }
}

pub(crate) fn record(state: &AppState, route: &str, response: &Response) {
    state
        .metrics
        .requests
        .with_label_values(&[route, &outcome(response)])
        .inc();
}

/// Applies a protected layer to an encrypted batch (the body: `fhe_linear`'s wire format).
/// Metered: the batch's rows are reserved against the license's quota and billed once per
/// query id.
#[utoipa::path(post, path = "/v1/models/{model}/layers/{layer}/apply", tag = "inference",
    params(("model" = String, Path), ("layer" = String, Path),
        ("x-query-id" = String, Header, description = "1 to 128 of A-Z a-z 0-9 - _; a retry reuses it"),
        ("x-packing-key" = Option<String>, Header, description = "packed results: the key id from PUT /v1/keys"),
        ("x-layer-parts" = Option<String>, Header, description = "a group of layers served as one product (the layer listing's `parts`): its layers, comma-separated; each is metered")),
    request_body(content = Vec<u8>, content_type = "application/vnd.hybrid-fhe.ciphertext"),
    security(("license" = [])),
    responses(
        (status = 200, description = "encrypted result", content_type = "application/vnd.hybrid-fhe.ciphertext", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "exceeds_rate_limit: more rows than the license's rate admits at once", body = ErrorBody),
        (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn apply(
    State(state): State<Arc<AppState>>,
    Path((model, layer)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The request runs to its end in a task of its own. A client that goes away (a timeout,
    // Ctrl-C, a dropped connection) drops this handler's future, not the task: its reservation
    // is always settled (the worker's answer billed once, as the work was done; a retry with
    // the same query id is not billed again) or released, never stranded.
    let task = tokio::spawn(apply_to_end(state, model, layer, headers, body));
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "apply task failed");
        Error::new(codes::INTERNAL, "the request failed inside the gateway").into_response()
    })
}

async fn apply_to_end(
    state: Arc<AppState>,
    model: String,
    layer: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let mut in_worker = None;
    let response = apply_inner(&state, &model, &layer, &headers, body, &mut in_worker)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let total = started.elapsed();
    let latency = &state.metrics.latency;
    latency
        .with_label_values(&["total"])
        .observe(total.as_secs_f64());
    if let Some(w) = in_worker {
        latency
            .with_label_values(&["worker"])
            .observe(w.as_secs_f64());
        latency
            .with_label_values(&["overhead"])
            .observe(total.saturating_sub(w).as_secs_f64());
    }
    record(&state, "apply", &response);
    response
}

async fn apply_inner(
    state: &Arc<AppState>,
    model: &str,
    layer: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    in_worker: &mut Option<std::time::Duration>,
) -> Result<Response, Error> {
    let (model, layer) = names(model, layer)?;
    let claims = authenticate(state, headers).await?;
    if claims.model != model.as_str() {
        return Err(Error::new(
            codes::LICENSE_WRONG_MODEL,
            format!("the license covers model `{}`", claims.model),
        ));
    }
    let metered = metered_layers(&layer, headers)?;
    if let Some(part) = metered.iter().find(|l| !claims.allows_layer(l.as_str())) {
        return Err(Error::new(
            codes::LAYER_NOT_LICENSED,
            format!("the license does not cover layer `{part}`"),
        ));
    }
    let query_id = query_id(headers)?;
    let body = body.map_err(|e| Error::body(e, state.config.max_body_bytes))?;
    // Meter from the header only; the ciphertext itself is the worker's business.
    let limits = Limits {
        max_bytes: state.config.max_body_bytes as u64,
        max_tokens: state.config.max_rows_per_request,
        ..Limits::default()
    };
    let header = fhe_linear::wire::read_batch_header(&body, &limits).map_err(|e| match &e {
        fhe_linear::WireError::InvalidHeader(m) if m.contains("tokens outside") => {
            Error::new(codes::TOO_MANY_ROWS, e.to_string())
        }
        _ => Error::from(e),
    })?;
    let tokens = header.tokens;
    let key_id = match header.encoding {
        ResultEncoding::Keyless => None,
        ResultEncoding::Packed => {
            Some(keys::check_request_key(state, headers, &claims.jti, &header).await?)
        }
    };
    let rate_cost = tokens * metered.len();
    if rate_cost > claims.rate_limit_per_minute.max(1) as usize {
        // No wait would let the bucket hold that much: smaller requests, not retries.
        return Err(Error::new(
            codes::EXCEEDS_RATE_LIMIT,
            format!(
                "{tokens} rows x {} layers exceed the license's rate of {} tokens per minute: \
                 send at most {} rows per request (the layer's max_rows)",
                metered.len(),
                claims.rate_limit_per_minute,
                max_rows(&state.config, &claims, metered.len())
            ),
        ));
    }
    let _slot = state
        .admission
        .enter(&claims.jti, claims.max_in_flight)
        .ok_or_else(|| {
            Error::new(
                codes::TOO_MANY_IN_FLIGHT,
                "too many requests in flight for this license",
            )
            .retry(1)
        })?;

    let now = now_ms();
    let period = period_start(&claims, now);
    // Reserve the batch's tokens for every metered layer before forwarding anything (fail
    // closed): the license's rate (shared by every replica) and quota, all of a group's
    // layers or none, under a lease that frees the quota if this gateway dies mid-request.
    let layers: Vec<&str> = metered.iter().map(Name::as_str).collect();
    let reserve = ledger::Reserve {
        license_id: &claims.jti,
        customer_id: &claims.sub,
        model: model.as_str(),
        layers: &layers,
        period_start: period,
        quota: claims.quota_tokens as i64,
        tokens: tokens as i64,
        rate: ledger::Rate {
            per_minute: claims.rate_limit_per_minute.max(1) as i64,
            cost: rate_cost as i64,
        },
        now,
        lease_ms: state.config.reservation_lease.as_millis() as i64,
    };
    // One query id per metered layer: a group's under `ID.i` (ids never contain a dot), so
    // that a retry of the same query is billed once per layer.
    let query_ids: Vec<String> = match metered.len() {
        1 => vec![query_id.clone()],
        k => (0..k).map(|i| format!("{query_id}.{i}")).collect(),
    };
    let reservation = match state.ledger.reserve(&reserve).await {
        Ok(r) => Some(r),
        Err(LedgerError::QuotaExceeded { .. })
            if already_billed(state, &claims.jti, &query_ids).await? =>
        {
            // A retry of a query billed before (its answer was lost): paid for, so answered
            // again without quota, and not billed again.
            None
        }
        Err(e) => {
            if matches!(e, LedgerError::QuotaExceeded { .. }) {
                state.metrics.quota_rejections.inc();
            }
            return Err(e.into());
        }
    };
    state.metrics.bytes_in.inc_by(body.len() as u64);

    let forward_started = Instant::now();
    let path = protocol::apply_path(&model, &layer);
    let parts_header = layers.join(",");
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if metered.len() > 1 {
        extra.push((protocol::LAYER_PARTS_HEADER, &parts_header));
    }
    let sent = match &key_id {
        None => {
            state
                .workers
                .send_with(reqwest::Method::POST, &path, Some(body.clone()), &extra)
                .await
        }
        Some(key_id) => forward_packed(state, &path, &body, key_id, &claims.jti, &extra).await,
    };
    *in_worker = Some(forward_started.elapsed());
    let answer = match sent {
        Ok(a) if a.status == 200 => a,
        Ok(a) => {
            // The worker refused the request (malformed, wrong shape...): nothing to bill.
            if let Some(r) = reservation {
                r.release().await?;
            }
            let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (status, a.body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(response);
        }
        Err(ForwardError::Unreachable(reason)) => {
            if let Some(r) = reservation {
                r.release().await?;
            }
            return Err(
                Error::new(codes::NO_WORKER, format!("no worker answered: {reason}")).retry(1),
            );
        }
    };
    // One usage row per metered layer: a group's bytes and compute time shared among its
    // layers, each under its own query id.
    let k = metered.len();
    let share = |total: usize, i: usize| (total / k + usize::from(i < total % k)) as i64;
    let events: Vec<UsageEvent> = metered
        .iter()
        .enumerate()
        .map(|(i, part)| UsageEvent {
            query_id: query_ids[i].clone(),
            license_id: claims.jti.clone(),
            customer_id: claims.sub.clone(),
            model: model.to_string(),
            layer: part.to_string(),
            tokens: tokens as i64,
            upload_bytes: share(body.len(), i),
            download_bytes: share(answer.body.len(), i),
            worker: answer.worker.url.clone(),
            compute_ms: answer.compute_ms / k as f64,
            status: "ok".into(),
            created_at: now,
            results: header.encoding.as_str().into(),
            key_id: key_id.clone().unwrap_or_default(),
        })
        .collect();
    // Not recorded, not returned: the client retries with the same query id.
    let Some(reservation) = reservation else {
        state.metrics.bytes_out.inc_by(answer.body.len() as u64);
        return Ok(service_kit::ciphertext_answer(
            answer.body,
            answer.compute_ms,
        ));
    };
    let settlements = reservation.settle(&events).await.map_err(|e| {
        if matches!(e, LedgerError::LeaseExpired { .. }) {
            state.metrics.quota_rejections.inc();
        }
        Error::from(e)
    })?;
    for (part, settled) in metered.iter().zip(settlements) {
        if settled.billed {
            state.metrics.tokens_metered.inc_by(tokens as u64);
            let d_in = header.shape.d_in as i64;
            if settled.layer_used >= d_in && settled.layer_used - (tokens as i64) < d_in {
                state.metrics.extraction_alerts.inc();
                tracing::warn!(license = %claims.jti, layer = %part, rows = settled.layer_used, d_in, "license sent more rows to one layer than its input width this period");
            }
        }
    }
    state.metrics.bytes_out.inc_by(answer.body.len() as u64);
    Ok(service_kit::ciphertext_answer(
        answer.body,
        answer.compute_ms,
    ))
}

/// Whether every query id of a request was billed before (a retry whose first answer was lost).
async fn already_billed(
    state: &AppState,
    license_id: &str,
    query_ids: &[String],
) -> Result<bool, Error> {
    for id in query_ids {
        if !state.ledger.is_claimed(license_id, id).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a worker's answer is the error `code` (with `status`).
fn answer_is(answer: &crate::workers::Answer, status: StatusCode, code: &str) -> bool {
    answer.status == status.as_u16()
        && serde_json::from_slice::<ErrorBody>(&answer.body).is_ok_and(|e| e.code == code)
}

/// Forwards a request for packed results with its key id; a worker that has not loaded the key
/// gets it from the ledger and the request again. Workers that plan their packed layouts with
/// different unit costs can offer different layouts of a layer: a batch that one worker refuses
/// as another layout's (`layer_mismatch`) is tried on the other workers, so that a fleet in
/// transition (or measured apart) still answers every client whose layout one of them serves.
async fn forward_packed(
    state: &AppState,
    path: &str,
    body: &Bytes,
    key_id: &str,
    license_id: &str,
    extra: &[(&str, &str)],
) -> Result<crate::workers::Answer, ForwardError> {
    let mut headers = vec![
        (protocol::KEY_ID_HEADER, key_id),
        (protocol::LICENSE_ID_HEADER, license_id),
    ];
    headers.extend_from_slice(extra);
    let first = state
        .workers
        .send_with(reqwest::Method::POST, path, Some(body.clone()), &headers)
        .await?;
    let mut answer = with_key(state, first, path, body, key_id, license_id, &headers).await?;
    if !answer_is(&answer, StatusCode::BAD_REQUEST, codes::LAYER_MISMATCH) {
        return Ok(answer);
    }
    for worker in state.workers.others(&answer.worker) {
        let Ok(next) = state
            .workers
            .request(
                &worker,
                reqwest::Method::POST,
                path,
                Some(body.clone()),
                &headers,
            )
            .await
        else {
            continue;
        };
        answer = with_key(state, next, path, body, key_id, license_id, &headers).await?;
        if !answer_is(&answer, StatusCode::BAD_REQUEST, codes::LAYER_MISMATCH) {
            break;
        }
    }
    Ok(answer)
}

/// `answer`, or, when its worker had not loaded the key, the worker's answer after the key was
/// pushed to it.
async fn with_key(
    state: &AppState,
    answer: crate::workers::Answer,
    path: &str,
    body: &Bytes,
    key_id: &str,
    license_id: &str,
    headers: &[(&str, &str)],
) -> Result<crate::workers::Answer, ForwardError> {
    if !answer_is(&answer, StatusCode::CONFLICT, codes::KEY_NOT_LOADED) {
        return Ok(answer);
    }
    let blob = match keys::key_bytes(state, key_id).await {
        Ok(blob) => blob,
        Err(_) => return Ok(answer),
    };
    state.metrics.key_pushes.inc();
    let unreachable = |e: String| ForwardError::Unreachable(e);
    let pushed = state
        .workers
        .request(
            &answer.worker,
            reqwest::Method::PUT,
            &protocol::key_path(key_id),
            Some(blob),
            &[(protocol::LICENSE_ID_HEADER, license_id)],
        )
        .await
        .map_err(unreachable)?;
    if pushed.status != 200 {
        return Ok(pushed);
    }
    state
        .workers
        .request(
            &answer.worker,
            reqwest::Method::POST,
            path,
            Some(body.clone()),
            headers,
        )
        .await
        .map_err(unreachable)
}

/// The protected layers a model serves, with what a client needs to encrypt for them.
#[utoipa::path(get, path = "/v1/models/{model}/layers", tag = "inference",
    params(("model" = String, Path)), security(("license" = [])),
    responses((status = 200, body = ModelLayers), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn layers(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    Licensed(claims): Licensed,
) -> Result<Response, Error> {
    let model = Name::parse(&model).map_err(Error::name)?;
    if claims.model != model.as_str() {
        return Err(Error::new(
            codes::LICENSE_WRONG_MODEL,
            format!("the license covers model `{}`", claims.model),
        ));
    }
    let a = match state
        .workers
        .send(reqwest::Method::GET, &protocol::layers_path(&model), None)
        .await
    {
        Ok(a) => a,
        Err(ForwardError::Unreachable(reason)) => {
            return Err(Error::new(codes::NO_WORKER, reason).retry(1))
        }
    };
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
    // Each layer says how many rows this license may send it at once.
    let body = match serde_json::from_slice::<ModelLayers>(&a.body) {
        Ok(mut served) if status == StatusCode::OK => {
            for layer in &mut served.layers {
                let parts = layer.parts.len().max(1);
                layer.max_rows = Some(max_rows(&state.config, &claims, parts));
            }
            serde_json::to_vec(&served)
                .map(Into::into)
                .unwrap_or(a.body)
        }
        _ => a.body,
    };
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Rows one request of `parts` metered layers may carry for a license: the row cap, and what
/// its rate bucket holds.
fn max_rows(config: &crate::GatewayConfig, claims: &LicenseClaims, parts: usize) -> usize {
    let rate = claims.rate_limit_per_minute.max(1) as usize / parts.max(1);
    config.max_rows_per_request.min(rate)
}

/// Alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = String)))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the ledger answers and at least one worker is healthy.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = String), (status = 503, body = ErrorBody)))]
pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Result<&'static str, Error> {
    state.ledger.ping().await?;
    if state.workers.healthy_count() == 0 {
        return Err(Error::new(codes::NO_WORKER, "no healthy worker").retry(1));
    }
    Ok("ready")
}
