//! Settlement: a reservation turned into billed usage, exactly once per query id.
//!
//! Settling a query claims its id, writes its usage row and rollups and turns its reserved
//! tokens into used ones, atomically (one statement on Postgres, one transaction on SQLite). A
//! query id already claimed (a retry of a billed query) is not billed again: its reservation is
//! released. A settlement whose lease expired and was reclaimed is still billed exactly once,
//! re-admitted against the quota in the same transaction; when the quota has no room left, it
//! bills nothing and fails with [`LedgerError::LeaseExpired`], so the quota is never exceeded.

use sqlx::AnyConnection;
use tokio::sync::oneshot;

use crate::quota::{Lease, Reservation};
use crate::time::{day_start, hour_start};
use crate::{Backend, LedgerError};

/// One FHE query, as billed.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UsageEvent {
    pub query_id: String,
    pub license_id: String,
    pub customer_id: String,
    pub model: String,
    pub layer: String,
    pub tokens: i64,
    pub upload_bytes: i64,
    pub download_bytes: i64,
    pub worker: String,
    pub compute_ms: f64,
    pub status: String,
    pub created_at: i64,
    /// `keyless` or `packed`.
    pub results: String,
    /// The packing key used (empty for keyless results).
    pub key_id: String,
}

/// The columns of a usage row, in the order [`bind_usage`] binds them (`$1` to `$14`).
pub(crate) const USAGE_COLUMNS: &str = "query_id, license_id, customer_id, model, layer, tokens, \
    upload_bytes, download_bytes, worker, compute_ms, status, created_at, results, key_id";

/// Binds a usage row's fields in [`USAGE_COLUMNS`] order (`$1` to `$14` of a single row):
/// the one binding of every settle path (a query or a `query_as`).
macro_rules! bind_usage {
    ($q:expr, $e:expr) => {
        $q.bind(&$e.query_id)
            .bind(&$e.license_id)
            .bind(&$e.customer_id)
            .bind(&$e.model)
            .bind(&$e.layer)
            .bind($e.tokens)
            .bind($e.upload_bytes)
            .bind($e.download_bytes)
            .bind(&$e.worker)
            .bind($e.compute_ms)
            .bind(&$e.status)
            .bind($e.created_at)
            .bind(&$e.results)
            .bind(&$e.key_id)
    };
}
pub(crate) use bind_usage;

/// The start of an insert into a rollup (`usage_hourly` by `hour_start`, `usage_daily` by
/// `day_start`); its rows follow.
pub(crate) fn rollup_insert(table: &str, column: &str) -> String {
    format!(
        "INSERT INTO {table} (license_id, customer_id, model, layer, {column}, requests, tokens, \
         upload_bytes, download_bytes)"
    )
}

/// What a rollup insert does to a bucket that exists: adds the new requests, tokens and bytes.
pub(crate) fn rollup_conflict(table: &str, column: &str) -> String {
    format!(
        "ON CONFLICT (license_id, layer, {column}) DO UPDATE SET \
         requests = {table}.requests + excluded.requests, tokens = {table}.tokens + excluded.tokens, \
         upload_bytes = {table}.upload_bytes + excluded.upload_bytes, \
         download_bytes = {table}.download_bytes + excluded.download_bytes"
    )
}

/// What settling a query did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Settlement {
    /// Whether this call billed the query (false for a retry of a billed query id).
    pub billed: bool,
    /// Tokens used on this layer in the period, after settling.
    pub layer_used: i64,
}

/// One single-layer settlement waiting for its group ([`crate::group_commit`] settles it and
/// answers on `reply`).
pub(crate) struct Job {
    pub lease: Lease,
    pub event: UsageEvent,
    pub reply: oneshot::Sender<Result<Settlement, LedgerError>>,
}

#[derive(sqlx::FromRow)]
struct QuotaRow {
    used: i64,
    reserved: i64,
    quota_tokens: i64,
}

impl Reservation<'_> {
    /// Settles the served request: one usage row per lease (`events[i]` for `leases()[i]`), in
    /// one transaction for a group of layers (all billed or none).
    pub async fn settle(mut self, events: &[UsageEvent]) -> Result<Vec<Settlement>, LedgerError> {
        self.open = false;
        if events.len() != self.leases.len() {
            return Err(LedgerError::Mismatch("one usage row per reserved layer"));
        }
        for (lease, e) in self.leases.iter().zip(events) {
            if lease.license_id != e.license_id
                || lease.layer != e.layer
                || lease.tokens != e.tokens
            {
                return Err(LedgerError::Mismatch(
                    "a usage row's license, layer and tokens are its reservation's",
                ));
            }
        }
        let ledger = self.ledger;
        for e in events {
            ledger.ensure_partition(e.created_at).await;
        }
        let backend = ledger.backend();
        if let ([lease], [e], Backend::Postgres) = (&self.leases[..], events, backend) {
            if let Some(group) = ledger.group_commit.get() {
                let (reply, settled) = oneshot::channel();
                let job = Job {
                    lease: lease.clone(),
                    event: e.clone(),
                    reply,
                };
                if group.send(job).await.is_ok() {
                    // No answer: the batch may or may not have committed. Either way a retry
                    // with the same query id is billed at most once, and an uncommitted lease
                    // is reclaimed when it expires.
                    let settled = settled
                        .await
                        .map_err(|_| LedgerError::Unavailable("group settlement stopped".into()))?;
                    return Ok(vec![settled?]);
                }
            }
            let mut conn = ledger.pool().acquire().await?;
            if let Some(settled) = settle_in_one_statement(&mut conn, lease, e).await? {
                return Ok(vec![settled]);
            }
            drop(conn);
            return Ok(vec![settle_late_alone(ledger.pool(), lease, e).await?]);
        }
        let mut tx = ledger.pool().begin().await?;
        let mut out = Vec::with_capacity(events.len());
        for (lease, e) in self.leases.iter().zip(events) {
            let settled = match backend {
                Backend::Postgres => match settle_in_one_statement(&mut tx, lease, e).await? {
                    Some(settled) => settled,
                    None => settle_late(&mut tx, lease, e).await?,
                },
                Backend::Sqlite => settle_steps(&mut tx, lease, e).await?,
            };
            out.push(settled);
        }
        tx.commit().await?;
        Ok(out)
    }
}

/// Postgres: the whole settlement of a live lease as one statement (data-modifying CTEs),
/// atomic by itself and one round trip. `None` when the lease is gone (reclaimed after it
/// expired): then nothing was written.
async fn settle_in_one_statement(
    conn: &mut AnyConnection,
    lease: &Lease,
    e: &UsageEvent,
) -> Result<Option<Settlement>, LedgerError> {
    let rollup = |table: &str, column: &str, param: &str| {
        format!(
            "{table}_up AS ({} SELECT $2, $3, $4, $5, {param}, 1, $6, $7, $8 FROM claim {})",
            rollup_insert(table, column),
            rollup_conflict(table, column)
        )
    };
    let sql = format!(
        "WITH lease AS (DELETE FROM reservations WHERE id = $17 RETURNING tokens), \
         claim AS (INSERT INTO query_claims (license_id, query_id, claimed_at) SELECT $2, $1, $12 \
         WHERE EXISTS (SELECT 1 FROM lease) ON CONFLICT (license_id, query_id) DO NOTHING RETURNING 1), \
         event AS (INSERT INTO usage_events ({USAGE_COLUMNS}) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 FROM claim), \
         {}, {} \
         UPDATE quota_usage SET reserved = reserved - $6, \
         used = used + CASE WHEN EXISTS (SELECT 1 FROM claim) THEN $6 ELSE 0 END \
         WHERE license_id = $2 AND layer = $5 AND period_start = $18 AND EXISTS (SELECT 1 FROM lease) \
         RETURNING used AS layer_used, EXISTS (SELECT 1 FROM claim) AS billed",
        rollup("usage_hourly", "hour_start", "$15"),
        rollup("usage_daily", "day_start", "$16"),
    );
    let query = bind_usage!(sqlx::query(&sql), e)
        .bind(hour_start(e.created_at))
        .bind(day_start(e.created_at))
        .bind(&lease.id)
        .bind(lease.period_start);
    let row = query.fetch_optional(&mut *conn).await?;
    Ok(row
        .map(|r| <Settlement as sqlx::FromRow<_>>::from_row(&r))
        .transpose()?)
}

/// SQLite: the steps of a settlement inside the caller's transaction.
async fn settle_steps(
    conn: &mut AnyConnection,
    lease: &Lease,
    e: &UsageEvent,
) -> Result<Settlement, LedgerError> {
    let live = sqlx::query("DELETE FROM reservations WHERE id = $1")
        .bind(&lease.id)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        == 1;
    if !live {
        return settle_late(conn, lease, e).await;
    }
    let billed = claim(conn, e).await?;
    if billed {
        record_usage(conn, e).await?;
    }
    let layer_used: i64 = sqlx::query_scalar(
        "UPDATE quota_usage SET reserved = reserved - $1, used = used + $2 \
         WHERE license_id = $3 AND layer = $4 AND period_start = $5 RETURNING used",
    )
    .bind(lease.tokens)
    .bind(if billed { lease.tokens } else { 0 })
    .bind(&lease.license_id)
    .bind(&lease.layer)
    .bind(lease.period_start)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Settlement { billed, layer_used })
}

/// The settlement of a lease that was reclaimed after it expired, inside the caller's
/// transaction: billed once if the quota still has room, else refused (the caller's
/// transaction rolls back, nothing is billed).
async fn settle_late(
    conn: &mut AnyConnection,
    lease: &Lease,
    e: &UsageEvent,
) -> Result<Settlement, LedgerError> {
    let row: Option<QuotaRow> = sqlx::query_as(
        "SELECT used, reserved, quota_tokens FROM quota_usage WHERE license_id = $1 AND layer = $2 AND period_start = $3",
    )
    .bind(&lease.license_id)
    .bind(&lease.layer)
    .bind(lease.period_start)
    .fetch_optional(&mut *conn)
    .await?;
    let refused = |row: Option<QuotaRow>| {
        let (taken, quota) = row.map_or((0, 0), |r| (r.used + r.reserved, r.quota_tokens));
        LedgerError::LeaseExpired {
            quota,
            remaining: (quota - taken).max(0),
            requested: lease.tokens,
        }
    };
    if !claim(conn, e).await? {
        // A retry of a query billed already: nothing to do.
        let used = row.as_ref().map_or(0, |r| r.used);
        return Ok(Settlement {
            billed: false,
            layer_used: used,
        });
    }
    let used: Option<i64> = sqlx::query_scalar(
        "UPDATE quota_usage SET used = used + $1 \
         WHERE license_id = $2 AND layer = $3 AND period_start = $4 AND used + reserved + $1 <= quota_tokens \
         RETURNING used",
    )
    .bind(lease.tokens)
    .bind(&lease.license_id)
    .bind(&lease.layer)
    .bind(lease.period_start)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(layer_used) = used else {
        return Err(refused(row));
    };
    record_usage(conn, e).await?;
    tracing::info!(license = %e.license_id, query = %e.query_id, "settled after the lease expired");
    Ok(Settlement {
        billed: true,
        layer_used,
    })
}

/// [`settle_late`] in a transaction of its own.
pub(crate) async fn settle_late_alone(
    pool: &sqlx::AnyPool,
    lease: &Lease,
    e: &UsageEvent,
) -> Result<Settlement, LedgerError> {
    let mut tx = pool.begin().await?;
    let settled = settle_late(&mut tx, lease, e).await?;
    tx.commit().await?;
    Ok(settled)
}

/// Claims a query id; false when it was claimed (billed) before.
async fn claim(conn: &mut AnyConnection, e: &UsageEvent) -> Result<bool, LedgerError> {
    Ok(sqlx::query("INSERT INTO query_claims (license_id, query_id, claimed_at) VALUES ($1, $2, $3) ON CONFLICT (license_id, query_id) DO NOTHING")
        .bind(&e.license_id)
        .bind(&e.query_id)
        .bind(e.created_at)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        == 1)
}

/// Writes a claimed query's usage row and adds it to the hourly and daily rollups.
async fn record_usage(conn: &mut AnyConnection, e: &UsageEvent) -> Result<(), LedgerError> {
    let sql = format!(
        "INSERT INTO usage_events ({USAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    );
    bind_usage!(sqlx::query(&sql), e)
        .execute(&mut *conn)
        .await?;
    for (table, column, start) in [
        ("usage_hourly", "hour_start", hour_start(e.created_at)),
        ("usage_daily", "day_start", day_start(e.created_at)),
    ] {
        let sql = format!(
            "{} VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8) {}",
            rollup_insert(table, column),
            rollup_conflict(table, column)
        );
        sqlx::query(&sql)
            .bind(&e.license_id)
            .bind(&e.customer_id)
            .bind(&e.model)
            .bind(&e.layer)
            .bind(start)
            .bind(e.tokens)
            .bind(e.upload_bytes)
            .bind(e.download_bytes)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

impl crate::Ledger {
    /// Usage rows of a license (newest last).
    pub async fn usage_events(&self, license_id: &str) -> Result<Vec<UsageEvent>, LedgerError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {USAGE_COLUMNS} FROM usage_events WHERE license_id = $1 ORDER BY created_at, query_id"
        ))
        .bind(license_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Whether a query id was already billed for this license.
    pub async fn is_claimed(&self, license_id: &str, query_id: &str) -> Result<bool, LedgerError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM query_claims WHERE license_id = $1 AND query_id = $2",
        )
        .bind(license_id)
        .bind(query_id)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }
}
