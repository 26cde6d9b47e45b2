//! Who is asking: the bearer license of customers and the role-scoped admin tokens of the
//! vendor's staff, verified (signature once per license and key set; audience, time and
//! revocation on every request) and read by extractors.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use license::{AdminClaims, LicenseClaims, LicenseError, QuotaPeriod, Role};
use protocol::codes;

use crate::error::Error;
use crate::AppState;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The start of the license's current quota period.
pub(crate) fn period_start(claims: &LicenseClaims, now: i64) -> i64 {
    match claims.quota_period {
        QuotaPeriod::Day => ledger::day_start(now),
        QuotaPeriod::Month => ledger::month_start(now),
        QuotaPeriod::Total => 0,
    }
}

/// Verifies the bearer license, including revocation.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<LicenseClaims, Error> {
    let token = bearer(headers).ok_or_else(|| {
        Error::new(
            codes::LICENSE_MISSING,
            "send Authorization: Bearer <license>",
        )
    })?;
    let now = (now_ms() / 1000) as u64;
    let claims = state
        .keysets
        .verify_license(token, &state.config.audience, now)?;
    refuse_revoked(
        state,
        &claims.jti,
        codes::LICENSE_REVOKED,
        "this license was revoked",
    )
    .await?;
    Ok(claims)
}

/// `code` when token id `jti` is on the revocation list (refreshed every few seconds).
async fn refuse_revoked(
    state: &AppState,
    jti: &str,
    code: &'static str,
    message: &'static str,
) -> Result<(), Error> {
    if state.admission.is_revoked(&state.ledger, jti).await? {
        return Err(Error::new(code, message));
    }
    Ok(())
}

/// Verifies an admin token and that its role is at least `needed`.
async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    needed: Role,
) -> Result<AdminClaims, Error> {
    let token = bearer(headers).ok_or_else(|| {
        Error::new(
            codes::ADMIN_TOKEN_MISSING,
            "send Authorization: Bearer <admin token>",
        )
    })?;
    let now = (now_ms() / 1000) as u64;
    let audience = license::admin_audience(&state.config.audience);
    let claims = state
        .admin_keysets
        .verify_admin(token, &audience, now)
        .map_err(|e| {
            let code = match e {
                LicenseError::Expired => codes::ADMIN_TOKEN_EXPIRED,
                _ => codes::ADMIN_TOKEN_INVALID,
            };
            Error::new(code, e.to_string())
        })?;
    refuse_revoked(
        state,
        &claims.jti,
        codes::ADMIN_TOKEN_REVOKED,
        "this admin token was revoked",
    )
    .await?;
    if claims.role < needed {
        return Err(Error::new(
            codes::ADMIN_ROLE_INSUFFICIENT,
            format!(
                "this action needs the `{}` role; the token has `{}`",
                needed.as_str(),
                claims.role.as_str()
            ),
        ));
    }
    Ok(claims)
}

/// A request's verified license.
pub(crate) struct Licensed(pub LicenseClaims);

impl FromRequestParts<Arc<AppState>> for Licensed {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, &parts.headers).await.map(Licensed)
    }
}

/// A request's verified admin token with at least the `compliance` role (reads).
pub(crate) struct Compliance(pub AdminClaims);

impl FromRequestParts<Arc<AppState>> for Compliance {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authorize(state, &parts.headers, Role::Compliance)
            .await
            .map(Compliance)
    }
}

/// A request's verified admin token with the `admin` role (issues and revokes).
pub(crate) struct Administrator(pub AdminClaims);

impl FromRequestParts<Arc<AppState>> for Administrator {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authorize(state, &parts.headers, Role::Admin)
            .await
            .map(Administrator)
    }
}
