//! Usage and administration API (types in `protocol::admin`).
//!
//! Customers read their own usage with their license. The vendor's staff use role-scoped admin
//! tokens (`hybrid license admin-token`): `compliance` reads usage reports, the CSV export,
//! licenses and the audit log; `admin` also issues and revokes licenses. Every change and every
//! export is written to the audit log.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use futures_util::StreamExt;
use ledger::{EventCursor, Ledger, LicenseListing, UsageBucket, UsageFilter};
use license::{LicenseClaims, QuotaPeriod};
use protocol::admin::*;
use protocol::{codes, ErrorBody, Name};
use serde::Deserialize;

use crate::auth::{now_ms, period_start, Administrator, Compliance, Licensed};
use crate::error::Error;
use crate::AppState;

/// Rows per page of the CSV export (one database query per page).
const EXPORT_PAGE: i64 = 1000;
/// Longest window of an hourly report.
const MAX_HOURLY_WINDOW_MS: i64 = 93 * 86_400_000;
/// Issuer of licenses signed by the gateway.
const ISSUER: &str = "vendor";

fn bad_query(message: impl Into<String>) -> Error {
    Error::new(codes::BAD_QUERY, message)
}

fn text_filter(name: &str, value: &Option<String>) -> Result<Option<String>, Error> {
    match value {
        Some(v) if v.is_empty() || v.len() > 128 => {
            Err(bad_query(format!("`{name}` must be 1 to 128 characters")))
        }
        v => Ok(v.clone()),
    }
}

/// The ledger filter of a query, with its window defaulted to `[default_from, now]`.
fn filter(q: &UsageQuery, default_from: i64) -> Result<UsageFilter, Error> {
    let from = q.from_ms.unwrap_or(default_from);
    let to = q.to_ms.unwrap_or_else(|| now_ms() + 1);
    if from >= to {
        return Err(bad_query("`from_ms` must be before `to_ms`"));
    }
    Ok(UsageFilter {
        from,
        to,
        customer: text_filter("customer", &q.customer)?,
        license: text_filter("license", &q.license)?,
        model: text_filter("model", &q.model)?,
        layer: text_filter("layer", &q.layer)?,
    })
}

fn grain(g: Grain) -> ledger::Grain {
    match g {
        Grain::Hour => ledger::Grain::Hour,
        Grain::Day => ledger::Grain::Day,
        Grain::Month => ledger::Grain::Month,
    }
}

fn dim(d: Dimension) -> ledger::Dim {
    match d {
        Dimension::Customer => ledger::Dim::Customer,
        Dimension::License => ledger::Dim::License,
        Dimension::Model => ledger::Dim::Model,
        Dimension::Layer => ledger::Dim::Layer,
    }
}

fn row(b: UsageBucket) -> UsageRow {
    UsageRow {
        bucket_start_ms: b.start,
        customer: b.customer_id,
        license: b.license_id,
        model: b.model,
        layer: b.layer,
        requests: b.requests,
        tokens: b.tokens,
        billable_tokens: b.billable_tokens,
        upload_bytes: b.upload_bytes,
        download_bytes: b.download_bytes,
    }
}

async fn report(
    ledger: &Ledger,
    q: &UsageQuery,
    f: UsageFilter,
    dims: Vec<Dimension>,
) -> Result<UsageReport, Error> {
    let group = q.group.unwrap_or_default();
    if group == Grain::Hour && f.to - f.from > MAX_HOURLY_WINDOW_MS {
        return Err(bad_query(
            "hourly reports cover at most 93 days: narrow the window or group by day",
        ));
    }
    let ledger_dims: Vec<_> = dims.iter().copied().map(dim).collect();
    let rows = ledger.usage_report(&f, grain(group), &ledger_dims).await?;
    let in_flight = ledger
        .in_flight(&f, now_ms())
        .await?
        .into_iter()
        .map(|r| InFlightRow {
            license: r.license_id,
            layer: r.layer,
            reserved_tokens: r.tokens,
            requests: r.leases,
            next_expiry_ms: r.next_expiry,
        })
        .collect();
    Ok(UsageReport {
        group,
        by: dims,
        from_ms: f.from,
        to_ms: f.to,
        rows: rows.into_iter().map(row).collect(),
        in_flight,
    })
}

fn period_name(p: QuotaPeriod) -> &'static str {
    match p {
        QuotaPeriod::Day => "day",
        QuotaPeriod::Month => "month",
        QuotaPeriod::Total => "total",
    }
}

/// A customer's own license and usage (its license as the token; filters on other customers or
/// licenses are ignored).
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageQuery),
    security(("license" = [])),
    responses((status = 200, body = CustomerUsage), (status = 401, body = ErrorBody)))]
pub(crate) async fn customer_usage(
    State(state): State<Arc<AppState>>,
    Licensed(claims): Licensed,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<impl IntoResponse, Error> {
    let Query(mut q) = query.map_err(|e| bad_query(e.body_text()))?;
    let period = period_start(&claims, now_ms());
    let billed = state.ledger.billable_tokens(&claims.jti, period).await?;
    q.customer = None;
    q.license = Some(claims.jti.clone());
    let dims = q
        .dimensions()
        .map_err(bad_query)?
        .into_iter()
        .filter(|d| matches!(d, Dimension::Layer))
        .collect();
    let f = filter(&q, period)?;
    let report = report(&state.ledger, &q, f, dims).await?;
    let reserved = report
        .in_flight
        .iter()
        .map(|r| r.reserved_tokens)
        .max()
        .unwrap_or(0);
    let packing_keys = state
        .ledger
        .packing_keys(&claims.jti)
        .await?
        .into_iter()
        .map(|k| PackingKeyUpload {
            key_id: k.key_id,
            parameter_set: k.parameter_set,
            bytes: k.bytes,
            uploaded_at_ms: k.uploaded_at,
        })
        .collect();
    Ok(Json(CustomerUsage {
        license_id: claims.jti,
        customer: claims.sub,
        model: claims.model,
        quota_period: period_name(claims.quota_period).into(),
        period_start_ms: period,
        quota_tokens: claims.quota_tokens,
        billable_tokens: billed,
        reserved_tokens: reserved,
        report,
        packing_keys,
    }))
}

/// Usage of every customer, grouped by bucket and dimensions.
#[utoipa::path(get, path = "/v1/admin/usage", tag = "admin", params(UsageQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn usage_report(
    State(state): State<Arc<AppState>>,
    Compliance(_): Compliance,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<impl IntoResponse, Error> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    let dims = q.dimensions().map_err(bad_query)?;
    let f = filter(&q, ledger::month_start(now_ms()))?;
    Ok(Json(report(&state.ledger, &q, f, dims).await?))
}

/// One CSV line per billed query (columns: `protocol::admin::USAGE_CSV_COLUMNS`), streamed page
/// by page. The export itself is audited.
#[utoipa::path(get, path = "/v1/admin/usage/export.csv", tag = "admin", params(ExportQuery),
    security(("admin_token" = [])),
    responses((status = 200, content_type = "text/csv", body = String),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn usage_export(
    State(state): State<Arc<AppState>>,
    Compliance(admin): Compliance,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<impl IntoResponse, Error> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    let q = UsageQuery::from(q);
    let f = filter(&q, ledger::month_start(now_ms()))?;
    let details = format!(
        "from={} to={} customer={} license={} model={} layer={}",
        f.from,
        f.to,
        f.customer.as_deref().unwrap_or("*"),
        f.license.as_deref().unwrap_or("*"),
        f.model.as_deref().unwrap_or("*"),
        f.layer.as_deref().unwrap_or("*"),
    );
    state
        .ledger
        .audit(
            &admin.sub,
            "usage.export",
            "usage_events",
            &details,
            now_ms(),
        )
        .await?;
    let header = csv_bytes(|w| w.write_record(USAGE_CSV_COLUMNS));
    let pages = futures_util::stream::unfold(
        Some((state.ledger.clone(), f, None::<EventCursor>)),
        |cursor| async move {
            let (ledger, f, after) = cursor?;
            match ledger
                .usage_events_page(&f, after.as_ref(), EXPORT_PAGE)
                .await
            {
                Ok(page) if page.is_empty() => None,
                Ok(page) => {
                    let last = page.last().expect("non-empty page");
                    let next = EventCursor {
                        created_at: last.created_at,
                        license_id: last.license_id.clone(),
                        query_id: last.query_id.clone(),
                    };
                    let more = page.len() as i64 == EXPORT_PAGE;
                    let bytes = csv_bytes(|w| {
                        for e in &page {
                            w.write_record([
                                e.created_at.to_string(),
                                e.query_id.clone(),
                                e.license_id.clone(),
                                e.customer_id.clone(),
                                e.model.clone(),
                                e.layer.clone(),
                                e.tokens.to_string(),
                                e.upload_bytes.to_string(),
                                e.download_bytes.to_string(),
                                e.worker.clone(),
                                format!("{:.3}", e.compute_ms),
                                e.status.clone(),
                                e.results.clone(),
                                e.key_id.clone(),
                            ])?;
                        }
                        Ok(())
                    });
                    Some((bytes, more.then_some((ledger, f, Some(next)))))
                }
                // The status line is gone: end the body early, which the client sees as
                // a broken transfer rather than a short file.
                Err(e) => {
                    tracing::error!(error = %e, "usage export interrupted");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        },
    );
    let body = futures_util::stream::once(async move { header }).chain(pages);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"usage.csv\"",
            ),
        ],
        Body::from_stream(body),
    ))
}

fn csv_bytes(
    write: impl FnOnce(&mut csv::Writer<Vec<u8>>) -> csv::Result<()>,
) -> Result<Bytes, std::io::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    write(&mut w).map_err(std::io::Error::other)?;
    w.into_inner()
        .map(Bytes::from)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn summary(l: LicenseListing) -> LicenseSummary {
    let (revoked_at_ms, revoke_reason) = match l.revoked {
        Some((at, reason)) => (Some(at), Some(reason)),
        None => (None, None),
    };
    LicenseSummary {
        id: l.license.id,
        customer: l.license.customer_id,
        model: l.license.model,
        quota_tokens: l.license.quota_tokens,
        quota_period: l.license.quota_period,
        issued_at_ms: l.license.issued_at,
        expires_at_ms: l.license.expires_at,
        revoked_at_ms,
        revoke_reason,
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LicenseQuery {
    /// Only this customer's licenses.
    customer: Option<String>,
}

/// Licenses issued through the admin API (or recorded by `hybrid license issue
/// --database-url`), with their revocation.
#[utoipa::path(get, path = "/v1/admin/licenses", tag = "admin", params(LicenseQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = LicenseList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(crate) async fn list_licenses(
    State(state): State<Arc<AppState>>,
    Compliance(_): Compliance,
    query: Result<Query<LicenseQuery>, QueryRejection>,
) -> Result<impl IntoResponse, Error> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    let customer = text_filter("customer", &q.customer)?;
    let licenses = state.ledger.list_licenses(customer.as_deref()).await?;
    Ok(Json(LicenseList {
        licenses: licenses.into_iter().map(summary).collect(),
    }))
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Error {
    Error::new(codes::INVALID_LICENSE_REQUEST, format!("{field}: {e}"))
}

/// Signs a license with the gateway's signing key, records it (audited) and returns its token.
#[utoipa::path(post, path = "/v1/admin/licenses", tag = "admin", request_body = IssueLicense,
    security(("admin_token" = [])),
    responses((status = 201, body = IssuedLicense), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 501, description = "no signing key configured", body = ErrorBody)))]
pub(crate) async fn issue_license(
    State(state): State<Arc<AppState>>,
    Administrator(admin): Administrator,
    body: Result<Json<IssueLicense>, JsonRejection>,
) -> Result<impl IntoResponse, Error> {
    let Json(req) = body.map_err(Error::json)?;
    let key = state.config.signing_key.as_ref().ok_or_else(|| {
        Error::new(
            codes::ISSUING_DISABLED,
            "this gateway holds no signing key (setting `signing_key`)",
        )
    })?;
    let customer = Name::parse(&req.customer).map_err(|e| invalid("customer", e))?;
    let model = Name::parse(&req.model).map_err(|e| invalid("model", e))?;
    for layer in &req.layers {
        if layer != "*" {
            Name::parse(layer).map_err(|e| invalid("layers", e))?;
        }
    }
    if req.layers.is_empty() {
        return Err(invalid("layers", "name at least one layer, or `*`"));
    }
    let period: QuotaPeriod = serde_json::from_value(serde_json::json!(req.quota_period))
        .map_err(|_| invalid("quota_period", "day, month or total"))?;
    if !(1..=3650).contains(&req.valid_days) {
        return Err(invalid("valid_days", "1 to 3650"));
    }
    let id = match &req.id {
        Some(id) => Name::parse(id).map_err(|e| invalid("id", e))?.to_string(),
        None => format!("lic-{}", uuid::Uuid::new_v4()),
    };
    let now = now_ms();
    let now_s = (now / 1000) as u64;
    let claims = LicenseClaims {
        jti: id.clone(),
        sub: customer.to_string(),
        iss: ISSUER.into(),
        aud: state.config.audience.clone(),
        model: model.to_string(),
        layers: req.layers.clone(),
        quota_tokens: req.quota_tokens,
        quota_period: period,
        rate_limit_per_minute: req.rate_limit_per_minute,
        max_in_flight: req.max_in_flight,
        iat: now_s,
        nbf: now_s,
        exp: now_s + u64::from(req.valid_days) * 86_400,
    };
    let token = key.issue(&claims).map_err(Error::internal)?;
    let record = ledger::LicenseRecord {
        id,
        customer_id: customer.to_string(),
        model: model.to_string(),
        quota_tokens: req.quota_tokens.min(i64::MAX as u64) as i64,
        quota_period: period_name(period).into(),
        issued_at: now,
        expires_at: (claims.exp * 1000) as i64,
    };
    let name = req.customer_name.as_deref().unwrap_or(customer.as_str());
    state
        .ledger
        .upsert_customer(customer.as_str(), name, now)
        .await?;
    // Recorded (and audited) before the token leaves: no license exists unrecorded.
    state
        .ledger
        .record_license(&record, &admin.sub, now)
        .await?;
    let license = summary(LicenseListing {
        license: record,
        revoked: None,
    });
    Ok((StatusCode::CREATED, Json(IssuedLicense { license, token })))
}

/// Revokes a license (or an admin token) by id; gateways refuse it within seconds.
#[utoipa::path(post, path = "/v1/admin/licenses/{id}/revoke", tag = "admin",
    params(("id" = String, Path, description = "license id (`jti`)")),
    request_body = RevokeLicense, security(("admin_token" = [])),
    responses((status = 200, body = RevokedLicense), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(crate) async fn revoke_license(
    State(state): State<Arc<AppState>>,
    Administrator(admin): Administrator,
    Path(id): Path<String>,
    body: Result<Json<RevokeLicense>, JsonRejection>,
) -> Result<impl IntoResponse, Error> {
    let Json(req) = body.map_err(Error::json)?;
    let id = Name::parse(&id).map_err(Error::name)?;
    if req.reason.trim().is_empty() || req.reason.len() > 1000 {
        return Err(invalid("reason", "1 to 1000 characters"));
    }
    let now = now_ms();
    state
        .ledger
        .revoke(id.as_str(), &req.reason, &admin.sub, now)
        .await?;
    Ok(Json(RevokedLicense {
        id: id.to_string(),
        revoked_at_ms: now,
    }))
}

/// The audit log, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", params(AuditQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = AuditLog), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(crate) async fn audit_log(
    State(state): State<Arc<AppState>>,
    Compliance(_): Compliance,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<impl IntoResponse, Error> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page = state.ledger.audit_page(q.after.unwrap_or(0), limit).await?;
    let next_after = if page.len() as i64 == limit {
        page.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(AuditLog {
        next_after,
        entries: page
            .into_iter()
            .map(|e| AuditEntry {
                id: e.id,
                at_ms: e.event.at,
                actor: e.event.actor,
                action: e.event.action,
                subject: e.event.subject,
                details: e.event.details,
            })
            .collect(),
    }))
}
