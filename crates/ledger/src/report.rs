//! Read side of the ledger for compliance and billing: usage grouped by time bucket and by
//! customer, license, model or layer; license lists; pages of raw usage rows (for CSV export)
//! and of the audit log.
//!
//! Reports read the hourly and daily rollups, never the raw usage rows, so their cost does not
//! grow with traffic. Billable tokens follow the crate's billing rule within each bucket: for each
//! license, the largest token count over the layers in the row, summed over the licenses.

use std::collections::{BTreeMap, HashMap};

use crate::settle::USAGE_COLUMNS;
use crate::{day_start, hour_start, month_start, Ledger, LedgerError, UsageEvent};

/// Width of a report's time buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Hour,
    Day,
    /// Calendar months (UTC), summed from the daily rollup.
    Month,
}

/// A column a report can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    Customer,
    License,
    Model,
    Layer,
}

/// Which usage a report or an export covers. Times are epoch milliseconds, `from` inclusive,
/// `to` exclusive (bucket starts for reports, query times for exports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    pub from: i64,
    pub to: i64,
    pub customer: Option<String>,
    pub license: Option<String>,
    pub model: Option<String>,
    pub layer: Option<String>,
}

impl UsageFilter {
    /// `AND column = $n` for each set filter, numbering parameters after `first`.
    pub(crate) fn clauses(&self, first: usize) -> (String, Vec<String>) {
        let mut sql = String::new();
        let mut binds = Vec::new();
        for (column, value) in [
            ("customer_id", &self.customer),
            ("license_id", &self.license),
            ("model", &self.model),
            ("layer", &self.layer),
        ] {
            if let Some(v) = value {
                binds.push(v.clone());
                sql.push_str(&format!(" AND {column} = ${}", first + binds.len()));
            }
        }
        (sql, binds)
    }
}

/// One row of a usage report. A dimension the report is not grouped by is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageBucket {
    /// Start of the time bucket (epoch ms).
    pub start: i64,
    pub customer_id: Option<String>,
    pub license_id: Option<String>,
    pub model: Option<String>,
    pub layer: Option<String>,
    /// FHE queries.
    pub requests: i64,
    /// Rows sent to protected layers, summed over layers.
    pub tokens: i64,
    /// Tokens billed (see the module docs).
    pub billable_tokens: i64,
    pub upload_bytes: i64,
    pub download_bytes: i64,
}

/// A license as listed for administrators.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenseListing {
    pub license: crate::LicenseRecord,
    /// When it was revoked, and why.
    pub revoked: Option<(i64, String)>,
}

/// Where the next page of usage rows starts: after this (created_at, license_id, query_id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCursor {
    pub created_at: i64,
    pub license_id: String,
    pub query_id: String,
}

/// One audit event with its position in the log.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    #[sqlx(flatten)]
    pub event: crate::AuditEvent,
}

/// One row of a rollup table.
#[derive(sqlx::FromRow)]
struct RollupRow {
    license_id: String,
    customer_id: String,
    model: String,
    layer: String,
    bucket_start: i64,
    requests: i64,
    tokens: i64,
    upload_bytes: i64,
    download_bytes: i64,
}

/// A license row with its revocation, if any.
#[derive(sqlx::FromRow)]
struct ListedLicense {
    #[sqlx(flatten)]
    license: crate::LicenseRecord,
    revoked_at: Option<i64>,
    reason: Option<String>,
}

/// Rollup counts of one license, layer and bucket.
#[derive(Default)]
struct Counts {
    requests: i64,
    tokens: i64,
    upload: i64,
    download: i64,
}

impl Ledger {
    /// Usage in `filter`'s window, bucketed by `grain` and grouped by `by`, ordered by bucket
    /// then group.
    pub async fn usage_report(
        &self,
        filter: &UsageFilter,
        grain: Grain,
        by: &[Dim],
    ) -> Result<Vec<UsageBucket>, LedgerError> {
        let (table, column) = match grain {
            Grain::Hour => ("usage_hourly", "hour_start"),
            Grain::Day | Grain::Month => ("usage_daily", "day_start"),
        };
        // Month buckets are summed from days: widen the window to whole days.
        let (from, to) = match grain {
            Grain::Hour => (hour_start(filter.from), filter.to),
            Grain::Day | Grain::Month => (day_start(filter.from), filter.to),
        };
        let (clauses, binds) = filter.clauses(2);
        let sql = format!(
            "SELECT license_id, customer_id, model, layer, {column} AS bucket_start, requests, tokens, upload_bytes, download_bytes \
             FROM {table} WHERE {column} >= $1 AND {column} < $2{clauses}"
        );
        let mut query = sqlx::query_as(&sql).bind(from).bind(to);
        for b in &binds {
            query = query.bind(b);
        }
        let rows: Vec<RollupRow> = query.fetch_all(self.pool()).await?;

        // (license, layer, bucket) -> counts, with the license's customer and model.
        let mut fine: BTreeMap<(String, String, i64), (String, String, Counts)> = BTreeMap::new();
        for r in rows {
            let start = match grain {
                Grain::Month => month_start(r.bucket_start),
                _ => r.bucket_start,
            };
            let entry = fine
                .entry((r.license_id, r.layer, start))
                .or_insert_with(|| (String::new(), String::new(), Counts::default()));
            entry.0 = r.customer_id;
            entry.1 = r.model;
            entry.2.requests += r.requests;
            entry.2.tokens += r.tokens;
            entry.2.upload += r.upload_bytes;
            entry.2.download += r.download_bytes;
        }

        let mut groups: BTreeMap<GroupKey, UsageBucket> = BTreeMap::new();
        // Per group and license: the largest count over the group's layers.
        let mut billable: HashMap<(GroupKey, String), i64> = HashMap::new();
        for ((license, layer, start), (customer, model, c)) in fine {
            let pick = |d: Dim, v: &str| by.contains(&d).then(|| v.to_string());
            let key = GroupKey {
                start,
                customer: pick(Dim::Customer, &customer),
                license: pick(Dim::License, &license),
                model: pick(Dim::Model, &model),
                layer: pick(Dim::Layer, &layer),
            };
            let row = groups.entry(key.clone()).or_insert_with(|| UsageBucket {
                start,
                customer_id: key.customer.clone(),
                license_id: key.license.clone(),
                model: key.model.clone(),
                layer: key.layer.clone(),
                ..UsageBucket::default()
            });
            row.requests += c.requests;
            row.tokens += c.tokens;
            row.upload_bytes += c.upload;
            row.download_bytes += c.download;
            let max = billable.entry((key, license)).or_insert(0);
            *max = (*max).max(c.tokens);
        }
        for ((key, _), tokens) in billable {
            if let Some(row) = groups.get_mut(&key) {
                row.billable_tokens += tokens;
            }
        }
        Ok(groups.into_values().collect())
    }

    /// Licenses, oldest first, optionally of one customer, with their revocation if any.
    pub async fn list_licenses(
        &self,
        customer: Option<&str>,
    ) -> Result<Vec<LicenseListing>, LedgerError> {
        let mut sql = String::from(
            "SELECT l.id, l.customer_id, l.model, l.quota_tokens, l.quota_period, l.issued_at, l.expires_at, \
             r.revoked_at, r.reason FROM licenses l LEFT JOIN revocations r ON r.license_id = l.id",
        );
        if customer.is_some() {
            sql.push_str(" WHERE l.customer_id = $1");
        }
        sql.push_str(" ORDER BY l.issued_at, l.id");
        let mut query = sqlx::query_as(&sql);
        if let Some(c) = customer {
            query = query.bind(c);
        }
        let rows: Vec<ListedLicense> = query.fetch_all(self.pool()).await?;
        Ok(rows
            .into_iter()
            .map(|r| LicenseListing {
                license: r.license,
                revoked: r.revoked_at.map(|at| (at, r.reason.unwrap_or_default())),
            })
            .collect())
    }

    /// Up to `limit` usage rows in `filter`'s window (query times), in (time, license, query id)
    /// order, starting after `after`: pages for a streamed export.
    pub async fn usage_events_page(
        &self,
        filter: &UsageFilter,
        after: Option<&EventCursor>,
        limit: i64,
    ) -> Result<Vec<UsageEvent>, LedgerError> {
        let mut sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_events WHERE created_at >= $1 AND created_at < $2"
        );
        let (clauses, binds) = filter.clauses(2);
        sql.push_str(&clauses);
        let next = 3 + binds.len();
        if after.is_some() {
            let (a, b, c) = (next, next + 1, next + 2);
            sql.push_str(&format!(
                " AND (created_at > ${a} OR (created_at = ${a} AND (license_id > ${b} OR (license_id = ${b} AND query_id > ${c}))))"
            ));
        }
        let limit_param = if after.is_some() { next + 3 } else { next };
        sql.push_str(&format!(
            " ORDER BY created_at, license_id, query_id LIMIT ${limit_param}"
        ));
        let mut query = sqlx::query_as(&sql).bind(filter.from).bind(filter.to);
        for b in &binds {
            query = query.bind(b);
        }
        if let Some(c) = after {
            query = query
                .bind(c.created_at)
                .bind(&c.license_id)
                .bind(&c.query_id);
        }
        Ok(query.bind(limit).fetch_all(self.pool()).await?)
    }

    /// Up to `limit` audit events with ids above `after_id`, oldest first.
    pub async fn audit_page(
        &self,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, subject, details FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct GroupKey {
    start: i64,
    customer: Option<String>,
    license: Option<String>,
    model: Option<String>,
    layer: Option<String>,
}
