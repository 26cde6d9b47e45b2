//! Admission: a request's rate-limit tokens and quota, reserved for all of its layers or none,
//! each reservation holding a lease.
//!
//! Quotas are counted per (license, layer, period) in one `quota_usage` row: `used` (billed) and
//! `reserved` (admitted, not yet settled). Admission is one conditional upsert of that row, so
//! concurrent gateways never admit more than the quota together. Each reservation is also a row
//! of `reservations` with an expiry, and `reserved` is the sum of its key's rows: a reservation
//! that nobody settles or releases (its gateway was killed) stops counting once its lease
//! expires. Expired rows are reclaimed lazily, by the next admission of the same key that the
//! quota would otherwise refuse: it costs nothing while the quota has room, needs no sweeper to
//! elect among replicas, and the reports count only live leases as in flight.
//!
//! The rate limit is a token bucket per license in `rate_buckets` (capacity and refill: the
//! license's tokens per minute), taken by the same admission on every replica. It is taken
//! before the quota: a request that the quota then refuses has used its rate tokens.

use sqlx::{AnyConnection, AnyPool};
use tokio::sync::oneshot;

use crate::report::UsageFilter;
use crate::{Backend, Ledger, LedgerError};

/// What to admit: `tokens` rows for each of `layers`, under the license's rate and quota.
#[derive(Debug, Clone)]
pub struct Reserve<'a> {
    pub license_id: &'a str,
    pub customer_id: &'a str,
    pub model: &'a str,
    /// The layers the request is metered for (a group: several), `tokens` each.
    pub layers: &'a [&'a str],
    pub period_start: i64,
    pub quota: i64,
    pub tokens: i64,
    pub rate: Rate,
    pub now: i64,
    /// How long the reservation holds its quota if never settled or released.
    pub lease_ms: i64,
}

/// A license's rate limit and what one request costs against it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_minute: i64,
    pub cost: i64,
}

/// One layer's share of a reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub id: String,
    pub license_id: String,
    pub layer: String,
    pub period_start: i64,
    pub tokens: i64,
    pub expires_at: i64,
}

/// Tokens admitted for a request, until it is settled ([`Reservation::settle`]) or released
/// ([`Reservation::release`]); both consume it. Dropped without either, it is logged and holds
/// its quota until its lease expires.
#[must_use = "a reservation is settled or released; dropped, it holds quota until its lease expires"]
pub struct Reservation<'l> {
    pub(crate) ledger: &'l Ledger,
    pub(crate) leases: Vec<Lease>,
    pub(crate) open: bool,
}

/// Tokens in flight (reserved under a live lease) for one license and layer.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InFlight {
    pub license_id: String,
    pub layer: String,
    pub tokens: i64,
    pub leases: i64,
    /// When the first of them expires (epoch ms).
    pub next_expiry: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct Admitted {
    pub rate_ok: bool,
    pub admitted: bool,
}

/// One single-layer admission, owned, as [`admit_together`] takes it.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub customer_id: String,
    pub model: String,
    pub quota: i64,
    pub per_minute: i64,
    pub cost: i64,
    pub now: i64,
    pub lease: Lease,
}

/// An admission waiting for its group, with where to answer whether the group admitted it
/// (`false`: to be tried alone).
pub(crate) type Waiting = (Admission, oneshot::Sender<bool>);

#[derive(sqlx::FromRow)]
struct Bucket {
    tokens: f64,
    at: i64,
}

#[derive(sqlx::FromRow)]
struct Tokens {
    tokens: i64,
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("leases", &self.leases)
            .field("open", &self.open)
            .finish()
    }
}

impl Reservation<'_> {
    pub fn leases(&self) -> &[Lease] {
        &self.leases
    }

    /// Gives the reservation back (the query will not be billed). A lease already reclaimed
    /// gives nothing back twice.
    pub async fn release(mut self) -> Result<(), LedgerError> {
        self.open = false;
        let ledger = self.ledger;
        let mut tx = ledger.admission_pool().begin().await?;
        for lease in &self.leases {
            remove_lease(&mut tx, lease).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Some(first) = self.leases.first() {
                tracing::warn!(
                    license = %first.license_id,
                    layers = self.leases.len(),
                    tokens = first.tokens,
                    expires_at = first.expires_at,
                    "reservation dropped without settle or release: it holds quota until its lease expires"
                );
            }
        }
    }
}

/// Deletes a lease and takes its tokens off its key's `reserved`; nothing when it is gone
/// already (reclaimed after expiry).
async fn remove_lease(conn: &mut AnyConnection, lease: &Lease) -> Result<(), LedgerError> {
    let removed = sqlx::query("DELETE FROM reservations WHERE id = $1")
        .bind(&lease.id)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        == 1;
    if removed {
        sqlx::query("UPDATE quota_usage SET reserved = reserved - $1 WHERE license_id = $2 AND layer = $3 AND period_start = $4")
            .bind(lease.tokens)
            .bind(&lease.license_id)
            .bind(&lease.layer)
            .bind(lease.period_start)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

impl Ledger {
    /// Admits `req.tokens` for each of its layers against the license's rate and quota,
    /// atomically: concurrent admissions on any number of gateways never exceed the quota
    /// together, and a group of layers is admitted all or none.
    pub async fn reserve(&self, req: &Reserve<'_>) -> Result<Reservation<'_>, LedgerError> {
        let leases: Vec<Lease> = req
            .layers
            .iter()
            .map(|layer| Lease {
                id: uuid::Uuid::new_v4().simple().to_string(),
                license_id: req.license_id.into(),
                layer: (*layer).into(),
                period_start: req.period_start,
                tokens: req.tokens,
                expires_at: req.now + req.lease_ms,
            })
            .collect();
        if self.backend == Backend::Postgres && leases.len() == 1 {
            let admission = Admission {
                customer_id: req.customer_id.into(),
                model: req.model.into(),
                quota: req.quota,
                per_minute: req.rate.per_minute,
                cost: req.rate.cost,
                now: req.now,
                lease: leases[0].clone(),
            };
            if let Some(group) = self.group_admission.get() {
                // Admitted with the others that wait for the same key, or tried alone below.
                let (reply, admitted) = oneshot::channel();
                if group.send((admission.clone(), reply)).await.is_ok()
                    && admitted.await.unwrap_or(false)
                {
                    return Ok(self.reservation(leases));
                }
            }
            // The common case in one round trip: rate, quota and lease in one statement.
            let result =
                admit_together(self.admission_pool(), std::slice::from_ref(&admission)).await?;
            if !result.rate_ok {
                return Err(self.rate_refusal(req).await?);
            }
            if result.admitted {
                return Ok(self.reservation(leases));
            }
            // Refused by the quota: reclaim expired leases and try once more.
            return self.admit_leases(req, leases).await;
        }
        let taken = sqlx::query(&format!("{} RETURNING at", rate_upsert(self.backend)))
            .bind(req.license_id)
            .bind(req.rate.per_minute as f64)
            .bind(req.rate.cost as f64)
            .bind(req.now)
            .fetch_optional(self.admission_pool())
            .await?
            .is_some();
        if !taken {
            return Err(self.rate_refusal(req).await?);
        }
        self.admit_leases(req, leases).await
    }

    fn reservation(&self, leases: Vec<Lease>) -> Reservation<'_> {
        Reservation {
            ledger: self,
            leases,
            open: true,
        }
    }

    /// The quota part of an admission, in one transaction: each layer admitted (after
    /// reclaiming its expired leases when the quota would refuse), all or none.
    async fn admit_leases(
        &self,
        req: &Reserve<'_>,
        leases: Vec<Lease>,
    ) -> Result<Reservation<'_>, LedgerError> {
        let mut tx = self.admission_pool().begin().await?;
        for lease in &leases {
            let mut admitted = admit_step(&mut tx, lease, req.quota).await?;
            if !admitted && reclaim(&mut tx, lease, req.now).await? > 0 {
                admitted = admit_step(&mut tx, lease, req.quota).await?;
            }
            if !admitted {
                let taken = taken(&mut tx, lease).await?;
                tx.rollback().await?;
                return Err(LedgerError::QuotaExceeded {
                    quota: req.quota,
                    remaining: (req.quota - taken).max(0),
                    requested: req.tokens,
                });
            }
            sqlx::query(&format!(
                "INSERT INTO reservations ({LEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .bind(&lease.id)
            .bind(&lease.license_id)
            .bind(req.customer_id)
            .bind(req.model)
            .bind(&lease.layer)
            .bind(lease.period_start)
            .bind(lease.tokens)
            .bind(req.now)
            .bind(lease.expires_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(self.reservation(leases))
    }

    /// The refusal of a request that its license's rate bucket cannot pay, with the wait.
    async fn rate_refusal(&self, req: &Reserve<'_>) -> Result<LedgerError, LedgerError> {
        let bucket: Option<Bucket> =
            sqlx::query_as("SELECT tokens, at FROM rate_buckets WHERE license_id = $1")
                .bind(req.license_id)
                .fetch_optional(self.pool())
                .await?;
        let per_minute = req.rate.per_minute.max(1) as f64;
        let held = bucket.map_or(per_minute, |b| {
            (b.tokens + (req.now - b.at).max(0) as f64 * per_minute / 60_000.0).min(per_minute)
        });
        let wait = ((req.rate.cost as f64 - held) * 60.0 / per_minute).ceil();
        Ok(LedgerError::RateLimited {
            per_minute: req.rate.per_minute,
            cost: req.rate.cost,
            retry_after_s: (wait.max(1.0)) as u64,
        })
    }

    /// Tokens in flight (live leases) in `filter` (its time window is ignored: in flight is
    /// now), per license and layer.
    pub async fn in_flight(
        &self,
        filter: &UsageFilter,
        now: i64,
    ) -> Result<Vec<InFlight>, LedgerError> {
        let (clauses, binds) = filter.clauses(1);
        let sql = format!(
            "SELECT license_id, layer, CAST(SUM(tokens) AS BIGINT) AS tokens, COUNT(*) AS leases, \
             MIN(expires_at) AS next_expiry FROM reservations WHERE expires_at > $1{clauses} \
             GROUP BY license_id, layer ORDER BY license_id, layer"
        );
        let mut query = sqlx::query_as(&sql).bind(now);
        for b in &binds {
            query = query.bind(b);
        }
        Ok(query.fetch_all(self.pool()).await?)
    }

    /// Billable tokens of a license in the period starting at `period_start` (largest count
    /// over its protected layers; see the crate docs).
    pub async fn billable_tokens(
        &self,
        license_id: &str,
        period_start: i64,
    ) -> Result<i64, LedgerError> {
        let billed: Tokens = sqlx::query_as("SELECT CAST(COALESCE(MAX(used), 0) AS BIGINT) AS tokens FROM quota_usage WHERE license_id = $1 AND period_start = $2")
            .bind(license_id)
            .bind(period_start)
            .fetch_one(self.pool())
            .await?;
        Ok(billed.tokens)
    }
}

/// The parameters before the lease rows of [`admit_together`]'s statement.
const FIXED_PARAMS: usize = 8;
/// The parameters of one of its lease rows.
const PARAMS_PER_LEASE: usize = 6;

/// Single-layer admissions of one key (Postgres), in one statement, as one request of their
/// total tokens and rate cost: the rate bucket, then the quota, then a lease row each, all or
/// none. Whether the rate was taken and whether they were admitted.
pub(crate) async fn admit_together(
    pool: &AnyPool,
    group: &[Admission],
) -> Result<Admitted, LedgerError> {
    let first = &group[0];
    let tokens: i64 = group.iter().map(|a| a.lease.tokens).sum();
    let cost: i64 = group.iter().map(|a| a.cost).sum();
    let now = group.iter().map(|a| a.now).max().unwrap_or(first.now);
    let rows: Vec<String> = (0..group.len())
        .map(|i| {
            let base = FIXED_PARAMS + i * PARAMS_PER_LEASE;
            let params: Vec<String> = (1..=PARAMS_PER_LEASE)
                .map(|p| format!("${}", base + p))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    let sql = format!(
        "WITH rate AS ({} RETURNING 1), \
         admitted AS (INSERT INTO quota_usage (license_id, layer, period_start, quota_tokens, reserved) \
         SELECT $1, $5, $6, $7, $8 WHERE $8 <= $7 AND EXISTS (SELECT 1 FROM rate) {ADMIT_CONFLICT} RETURNING 1), \
         input (id, customer_id, model, tokens, reserved_at, expires_at) AS (VALUES {}), \
         lease AS (INSERT INTO reservations ({LEASE_COLUMNS}) \
         SELECT i.id, $1, i.customer_id, i.model, $5, $6, i.tokens, i.reserved_at, i.expires_at \
         FROM input i, admitted RETURNING 1) \
         SELECT EXISTS (SELECT 1 FROM rate) AS rate_ok, EXISTS (SELECT 1 FROM lease) AS admitted",
        rate_upsert(Backend::Postgres),
        rows.join(", "),
    );
    let mut query = sqlx::query_as(&sql)
        .bind(&first.lease.license_id)
        .bind(first.per_minute as f64)
        .bind(cost as f64)
        .bind(now)
        .bind(&first.lease.layer)
        .bind(first.lease.period_start)
        .bind(first.quota)
        .bind(tokens);
    for a in group {
        query = query
            .bind(&a.lease.id)
            .bind(&a.customer_id)
            .bind(&a.model)
            .bind(a.lease.tokens)
            .bind(a.now)
            .bind(a.lease.expires_at);
    }
    Ok(query.fetch_one(pool).await?)
}

/// The rate bucket taken by `$3` tokens (`$1` license, `$2` tokens per minute, `$4` now): one
/// upsert that writes only when the bucket, refilled since its last use, holds enough.
fn rate_upsert(backend: Backend) -> String {
    let (least, greatest) = match backend {
        Backend::Postgres => ("LEAST", "GREATEST"),
        Backend::Sqlite => ("MIN", "MAX"),
    };
    let refilled = format!(
        "{least}($2, rate_buckets.tokens + {greatest}(0, $4 - rate_buckets.at) * $2 / 60000.0)"
    );
    format!(
        "INSERT INTO rate_buckets (license_id, tokens, at) SELECT $1, $2 - $3, $4 WHERE $3 <= $2 \
         ON CONFLICT (license_id) DO UPDATE SET tokens = {refilled} - $3, at = {greatest}(rate_buckets.at, $4) \
         WHERE {refilled} >= $3"
    )
}

/// The columns of a lease row.
const LEASE_COLUMNS: &str =
    "id, license_id, customer_id, model, layer, period_start, tokens, reserved_at, expires_at";

/// Creates the key's row or adds to it, only where the quota allows (`$1` license, `$2` layer,
/// `$3` period, `$4` quota, `$5` tokens).
const ADMIT_INSERT: &str =
    "INSERT INTO quota_usage (license_id, layer, period_start, quota_tokens, reserved) \
     SELECT $1, $2, $3, $4, $5 WHERE $5 <= $4";
const ADMIT_CONFLICT: &str = "ON CONFLICT (license_id, layer, period_start) DO UPDATE \
     SET quota_tokens = excluded.quota_tokens, reserved = quota_usage.reserved + excluded.reserved \
     WHERE quota_usage.used + quota_usage.reserved + excluded.reserved <= excluded.quota_tokens";

/// One layer's quota admission on `conn`: whether it was admitted.
async fn admit_step(
    conn: &mut AnyConnection,
    lease: &Lease,
    quota: i64,
) -> Result<bool, LedgerError> {
    Ok(
        sqlx::query(&format!("{ADMIT_INSERT} {ADMIT_CONFLICT} RETURNING used"))
            .bind(&lease.license_id)
            .bind(&lease.layer)
            .bind(lease.period_start)
            .bind(quota)
            .bind(lease.tokens)
            .fetch_optional(&mut *conn)
            .await?
            .is_some(),
    )
}

/// Tokens used and reserved on a lease's key.
async fn taken(conn: &mut AnyConnection, lease: &Lease) -> Result<i64, LedgerError> {
    let taken: Option<Tokens> = sqlx::query_as(
        "SELECT used + reserved AS tokens FROM quota_usage WHERE license_id = $1 AND layer = $2 AND period_start = $3",
    )
    .bind(&lease.license_id)
    .bind(&lease.layer)
    .bind(lease.period_start)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(taken.map_or(0, |t| t.tokens))
}

/// Reclaims the expired leases of a lease's key, inside the caller's transaction: deletes them
/// and recounts `reserved` from the leases that remain (which also heals a count left by a
/// gateway that predates leases). Returns the tokens reclaimed.
async fn reclaim(conn: &mut AnyConnection, key: &Lease, now: i64) -> Result<i64, LedgerError> {
    // A write first: it takes the row's lock (Postgres) or the database's (SQLite), so no
    // admission of this key runs between the count and the update.
    let before: Option<Tokens> = sqlx::query_as(
        "UPDATE quota_usage SET reserved = reserved WHERE license_id = $1 AND layer = $2 AND period_start = $3 \
         RETURNING reserved AS tokens",
    )
    .bind(&key.license_id)
    .bind(&key.layer)
    .bind(key.period_start)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(before) = before else {
        return Ok(0);
    };
    sqlx::query(
        "DELETE FROM reservations WHERE license_id = $1 AND layer = $2 AND period_start = $3 AND expires_at <= $4",
    )
    .bind(&key.license_id)
    .bind(&key.layer)
    .bind(key.period_start)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let live: Tokens = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) AS tokens FROM reservations \
         WHERE license_id = $1 AND layer = $2 AND period_start = $3",
    )
    .bind(&key.license_id)
    .bind(&key.layer)
    .bind(key.period_start)
    .fetch_one(&mut *conn)
    .await?;
    let reclaimed = before.tokens - live.tokens;
    if reclaimed != 0 {
        sqlx::query("UPDATE quota_usage SET reserved = $1 WHERE license_id = $2 AND layer = $3 AND period_start = $4")
            .bind(live.tokens)
            .bind(&key.license_id)
            .bind(&key.layer)
            .bind(key.period_start)
            .execute(&mut *conn)
            .await?;
        tracing::info!(license = %key.license_id, layer = %key.layer, tokens = reclaimed, "reclaimed reservations whose lease expired");
    }
    Ok(reclaimed.max(0))
}
