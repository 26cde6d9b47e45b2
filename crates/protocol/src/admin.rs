//! JSON types of the usage and administration API of the gateway.
//!
//! | method | path | token | answer |
//! |---|---|---|---|
//! | GET | `/v1/usage` | license | [`CustomerUsage`]: the license's own usage |
//! | GET | `/v1/admin/usage` | compliance | [`UsageReport`] |
//! | GET | `/v1/admin/usage/export.csv` | compliance | usage rows as CSV, streamed |
//! | GET | `/v1/admin/licenses` | compliance | [`LicenseList`] |
//! | POST | `/v1/admin/licenses` | admin | [`IssueLicense`] -> [`IssuedLicense`] |
//! | POST | `/v1/admin/licenses/{id}/revoke` | admin | [`RevokeLicense`] -> [`RevokedLicense`] |
//! | GET | `/v1/admin/audit` | compliance | [`AuditLog`] |
//!
//! Admin tokens are role-scoped JWTs (`compliance` reads, `admin` also issues and revokes).
//! Times are epoch milliseconds.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Width of a report's time buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Grain {
    Hour,
    #[default]
    Day,
    Month,
}

/// A column usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dimension {
    Customer,
    License,
    Model,
    Layer,
}

impl std::str::FromStr for Dimension {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "customer" => Ok(Dimension::Customer),
            "license" => Ok(Dimension::License),
            "model" => Ok(Dimension::Model),
            "layer" => Ok(Dimension::Layer),
            _ => Err(format!(
                "unknown dimension `{s}` (customer, license, model, layer)"
            )),
        }
    }
}

/// Query parameters of usage reports and exports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Bucket width (default `day`).
    pub group: Option<Grain>,
    /// Comma-separated dimensions to group by: customer, license, model, layer.
    pub by: Option<String>,
    /// Window start, epoch ms, inclusive (default: start of the current month; for a license:
    /// start of its current quota period).
    pub from_ms: Option<i64>,
    /// Window end, epoch ms, exclusive (default: now).
    pub to_ms: Option<i64>,
    pub customer: Option<String>,
    pub license: Option<String>,
    pub model: Option<String>,
    pub layer: Option<String>,
}

impl UsageQuery {
    /// The `by` dimensions, parsed.
    pub fn dimensions(&self) -> Result<Vec<Dimension>, String> {
        let mut dims = match &self.by {
            None => Vec::new(),
            Some(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::parse)
                .collect::<Result<Vec<_>, _>>()?,
        };
        dims.sort();
        dims.dedup();
        Ok(dims)
    }
}

/// Query parameters of the CSV export.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// Earliest query time, epoch ms, inclusive (default: start of the current month).
    pub from_ms: Option<i64>,
    /// Latest query time, epoch ms, exclusive (default: now).
    pub to_ms: Option<i64>,
    pub customer: Option<String>,
    pub license: Option<String>,
    pub model: Option<String>,
    pub layer: Option<String>,
}

impl From<ExportQuery> for UsageQuery {
    fn from(q: ExportQuery) -> Self {
        UsageQuery {
            group: None,
            by: None,
            from_ms: q.from_ms,
            to_ms: q.to_ms,
            customer: q.customer,
            license: q.license,
            model: q.model,
            layer: q.layer,
        }
    }
}

/// One row of a usage report; dimensions the report is not grouped by are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    pub bucket_start_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// FHE queries.
    pub requests: i64,
    /// Rows sent to protected layers, summed over layers.
    pub tokens: i64,
    /// Tokens billed: per license, the largest count over the row's layers (a token crossing
    /// several protected layers is billed once), summed over licenses.
    pub billable_tokens: i64,
    pub upload_bytes: i64,
    pub download_bytes: i64,
}

/// Usage grouped by time bucket and dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    pub group: Grain,
    pub by: Vec<Dimension>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub rows: Vec<UsageRow>,
    /// Tokens in flight now (admitted, not yet settled, under a live lease) in the report's
    /// filter, per license and layer. They are not billed until settled; an expired lease no
    /// longer holds quota.
    #[serde(default)]
    pub in_flight: Vec<InFlightRow>,
}

/// Tokens reserved under live leases for one license and layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InFlightRow {
    pub license: String,
    pub layer: String,
    pub reserved_tokens: i64,
    /// Requests (reservations) in flight.
    pub requests: i64,
    /// When the first of their leases expires.
    pub next_expiry_ms: i64,
}

/// A customer's view of its own license and usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CustomerUsage {
    pub license_id: String,
    pub customer: String,
    pub model: String,
    /// `day`, `month` or `total`.
    pub quota_period: String,
    pub period_start_ms: i64,
    pub quota_tokens: u64,
    /// Billable tokens in the current quota period.
    pub billable_tokens: i64,
    /// Tokens in flight in the current period (admitted, not yet settled; largest over the
    /// layers, as billing counts): they hold quota until settled, released or their lease
    /// expires.
    #[serde(default)]
    pub reserved_tokens: i64,
    /// The license's usage over the requested window.
    pub report: UsageReport,
    /// Packing keys the license registered (one-time uploads for packed results).
    #[serde(default)]
    pub packing_keys: Vec<PackingKeyUpload>,
}

/// One packing key upload, as part of a license's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PackingKeyUpload {
    pub key_id: String,
    pub parameter_set: String,
    pub bytes: i64,
    pub uploaded_at_ms: i64,
}

/// A license as administrators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LicenseSummary {
    pub id: String,
    pub customer: String,
    pub model: String,
    pub quota_tokens: i64,
    pub quota_period: String,
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LicenseList {
    pub licenses: Vec<LicenseSummary>,
}

fn all_layers() -> Vec<String> {
    vec!["*".into()]
}
fn default_rate() -> u32 {
    6000
}
fn default_in_flight() -> u32 {
    4
}
fn default_days() -> u32 {
    30
}
fn default_period() -> String {
    "month".into()
}

/// A license to issue. The gateway signs it with the vendor key it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IssueLicense {
    /// Customer id (created if new).
    pub customer: String,
    /// Display name of a new customer (default: the id).
    #[serde(default)]
    pub customer_name: Option<String>,
    pub model: String,
    /// Protected layers the license may use (`*` for all; the default).
    #[serde(default = "all_layers")]
    pub layers: Vec<String>,
    /// Billable tokens per period.
    pub quota_tokens: u64,
    /// `day`, `month` (default) or `total`.
    #[serde(default = "default_period")]
    pub quota_period: String,
    /// Tokens per minute (default 6000).
    #[serde(default = "default_rate")]
    pub rate_limit_per_minute: u32,
    /// Requests in flight at once (default 4).
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// Validity in days from now (default 30).
    #[serde(default = "default_days")]
    pub valid_days: u32,
    /// License id (default: a random one).
    #[serde(default)]
    pub id: Option<String>,
}

/// An issued license: its record and the token to hand to the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IssuedLicense {
    pub license: LicenseSummary,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokeLicense {
    pub reason: String,
}

/// A revocation as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokedLicense {
    pub id: String,
    pub revoked_at_ms: i64,
}

/// Query parameters of the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries with ids above this one (default 0: from the start).
    pub after: Option<i64>,
    /// Entries per page (default 100, at most 1000).
    pub limit: Option<i64>,
}

/// One administrative action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: String,
}

/// A page of the audit log, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
    /// Pass as `after` for the next page; absent at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<i64>,
}

/// Column names of the CSV export, in order.
pub const USAGE_CSV_COLUMNS: [&str; 14] = [
    "created_at_ms",
    "query_id",
    "license_id",
    "customer_id",
    "model",
    "layer",
    "tokens",
    "upload_bytes",
    "download_bytes",
    "worker",
    "compute_ms",
    "status",
    "results",
    "key_id",
];
