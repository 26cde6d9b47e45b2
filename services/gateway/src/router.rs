//! The gateway's routes over the handlers of `routes` (the metered path and probes), `keys`
//! (packing keys) and `admin` (usage and administration), and the outcome of every answer
//! counted under its route (`gateway_requests_total`).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::Router;

use crate::{admin, keys, keysets, routes, AppState};

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/v1/usage", get(admin::customer_usage))
        .route("/v1/admin/usage", get(admin::usage_report))
        .route("/v1/admin/usage/export.csv", get(admin::usage_export))
        .route(
            "/v1/admin/licenses",
            get(admin::list_licenses).post(admin::issue_license),
        )
        .route(
            "/v1/admin/licenses/{id}/revoke",
            post(admin::revoke_license),
        )
        .route("/v1/admin/audit", get(admin::audit_log))
        .route("/v1/models/{model}/layers", get(routes::layers))
        .route(
            "/v1/models/{model}/layers/{layer}/apply",
            post(routes::apply),
        )
        // Packing keys may be larger than the largest ciphertext a gateway accepts.
        .route(
            "/v1/keys",
            put(keys::put_key)
                .layer(DefaultBodyLimit::max(keys::max_key_bytes().max(limit)))
                .get(keys::list_keys),
        )
        .route("/v1/keys/{key_id}", delete(keys::delete_key))
        .route("/.well-known/jwks.json", get(keysets::jwks))
        .layer(middleware::from_fn_with_state(state.clone(), count_outcome))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The label a route's answers are counted under (a bounded set); none for the probes and the
/// apply route, which counts its own outcome in the task that runs it to its end.
fn route_label(method: &Method, path: &str) -> Option<&'static str> {
    Some(match (method, path) {
        (_, "/v1/models/{model}/layers") => "layers",
        (_, "/v1/usage") => "usage",
        (_, p) if p.starts_with("/v1/admin/") => "admin",
        (&Method::PUT, "/v1/keys") => "put_key",
        (&Method::GET, "/v1/keys") => "list_keys",
        (&Method::DELETE, "/v1/keys/{key_id}") => "delete_key",
        _ => return None,
    })
}

async fn count_outcome(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let label = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| route_label(request.method(), p.as_str()));
    let response = next.run(request).await;
    if let Some(label) = label {
        routes::record(&state, label, &response);
    }
    response
}
