//! The usage ledger: customers, licenses, revocations, quota reservations, one usage row per
//! billed FHE query (exactly once per query id), hourly and daily rollups, and an append-only
//! audit log.
//!
//! Postgres is the production store (usage rows partitioned by month); SQLite is the embedded
//! default for a single node and the demo. Both run the same queries through sqlx's `Any` driver,
//! each with its own migrations (`migrations/` and `migrations/sqlite/`).
//!
//! Billing rule: a token is one row of an activation batch entering a protected layer. Quotas are
//! kept per (license, layer, period), so a token that crosses several protected layers counts once
//! against each layer's quota, and the billable tokens of a period are the *largest* count over
//! the layers: a generated token crossing every protected layer is billed once, and sending rows to
//! only some layers never lowers the bill below what was sent to any one of them.

mod report;
mod time;

use std::collections::HashSet;
use std::sync::Mutex;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

pub use report::{AuditEntry, Dim, EventCursor, Grain, LicenseListing, UsageBucket, UsageFilter};
pub use time::{day_start, hour_start, month_start, next_month_start};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "quota exceeded: {remaining} of {quota} tokens left in this period, {requested} requested"
    )]
    QuotaExceeded {
        quota: i64,
        remaining: i64,
        requested: i64,
    },
    #[error("unsupported database url (postgres:// or sqlite:)")]
    UnsupportedUrl,
    #[error("ledger database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl LedgerError {
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::QuotaExceeded { .. } => "quota_exceeded",
            LedgerError::UnsupportedUrl => "ledger_config",
            LedgerError::Database(_) | LedgerError::Migrate(_) => "ledger_unavailable",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A license as the ledger records it.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenseRecord {
    pub id: String,
    pub customer_id: String,
    pub model: String,
    pub quota_tokens: i64,
    pub quota_period: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

/// Tokens admitted against a quota, to settle or release.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub license_id: String,
    pub layer: String,
    pub period_start: i64,
    pub tokens: i64,
}

/// What settling a query did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// Whether this call billed the query (false for a retry of a billed query id).
    pub billed: bool,
    /// Tokens used on this layer in the period, after settling.
    pub layer_used: i64,
}

/// One FHE query, as billed.
#[derive(Debug, Clone, PartialEq)]
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

/// A packing key registered by a license.
#[derive(Debug, Clone, PartialEq)]
pub struct PackingKeyRecord {
    pub key_id: String,
    pub license_id: String,
    pub customer_id: String,
    pub parameter_set: String,
    pub bytes: i64,
    pub uploaded_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: String,
}

/// The ledger over a connection pool.
pub struct Ledger {
    pool: AnyPool,
    backend: Backend,
    /// Months whose usage partition exists (Postgres).
    partitions: Mutex<HashSet<i64>>,
}

impl Ledger {
    /// Connects and brings the schema up to date. `url`: `postgres://...` or `sqlite:PATH` /
    /// `sqlite::memory:`.
    pub async fn connect(url: &str) -> Result<Self, LedgerError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(LedgerError::UnsupportedUrl);
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        match backend {
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
        }
        let ledger = Ledger {
            pool,
            backend,
            partitions: Mutex::new(HashSet::new()),
        };
        Ok(ledger)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn upsert_customer(&self, id: &str, name: &str, now: i64) -> Result<(), LedgerError> {
        sqlx::query("INSERT INTO customers (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET name = excluded.name")
            .bind(id)
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an issued license and audits it.
    pub async fn record_license(
        &self,
        l: &LicenseRecord,
        actor: &str,
        now: i64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO licenses (id, customer_id, model, quota_tokens, quota_period, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET quota_tokens = excluded.quota_tokens, \
             quota_period = excluded.quota_period, expires_at = excluded.expires_at",
        )
        .bind(&l.id)
        .bind(&l.customer_id)
        .bind(&l.model)
        .bind(l.quota_tokens)
        .bind(&l.quota_period)
        .bind(l.issued_at)
        .bind(l.expires_at)
        .execute(&mut *tx)
        .await?;
        let details = format!(
            "customer={} model={} quota={}/{}",
            l.customer_id, l.model, l.quota_tokens, l.quota_period
        );
        insert_audit(&mut tx, now, actor, "license.issue", &l.id, &details).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Revokes a license (idempotent) and audits it.
    pub async fn revoke(
        &self,
        license_id: &str,
        reason: &str,
        actor: &str,
        now: i64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO revocations (license_id, revoked_at, revoked_by, reason) VALUES ($1, $2, $3, $4) ON CONFLICT (license_id) DO NOTHING")
            .bind(license_id)
            .bind(now)
            .bind(actor)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, now, actor, "license.revoke", license_id, reason).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn is_revoked(&self, license_id: &str) -> Result<bool, LedgerError> {
        let row = sqlx::query("SELECT COUNT(*) FROM revocations WHERE license_id = $1")
            .bind(license_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Every revoked license id (for a gateway's short-lived cache).
    pub async fn revoked_ids(&self) -> Result<Vec<String>, LedgerError> {
        let rows = sqlx::query("SELECT license_id FROM revocations")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(Into::into))
            .collect()
    }

    /// Admits `tokens` against the license's quota for `layer` in the period starting at
    /// `period_start`, atomically: concurrent reservations never exceed the quota together.
    pub async fn reserve(
        &self,
        license_id: &str,
        layer: &str,
        period_start: i64,
        quota: i64,
        tokens: i64,
    ) -> Result<Reservation, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        let reservation = Reservation {
            license_id: license_id.into(),
            layer: layer.into(),
            period_start,
            tokens,
        };
        match admit(&mut conn, &reservation, quota).await? {
            None => Ok(reservation),
            Some(refused) => Err(refused),
        }
    }

    /// Admits `tokens` for each of `layers` (a request for a group of layers), all or none, in
    /// one transaction.
    pub async fn reserve_all(
        &self,
        license_id: &str,
        layers: &[&str],
        period_start: i64,
        quota: i64,
        tokens: i64,
    ) -> Result<Vec<Reservation>, LedgerError> {
        if let [layer] = layers {
            return Ok(vec![
                self.reserve(license_id, layer, period_start, quota, tokens)
                    .await?,
            ]);
        }
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(layers.len());
        for layer in layers {
            let reservation = Reservation {
                license_id: license_id.into(),
                layer: (*layer).into(),
                period_start,
                tokens,
            };
            if let Some(refused) = admit(&mut tx, &reservation, quota).await? {
                tx.rollback().await?;
                return Err(refused);
            }
            out.push(reservation);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Gives a reservation back (the query failed before it could be billed).
    pub async fn release(&self, r: &Reservation) -> Result<(), LedgerError> {
        sqlx::query("UPDATE quota_usage SET reserved = reserved - $1 WHERE license_id = $2 AND layer = $3 AND period_start = $4")
            .bind(r.tokens)
            .bind(&r.license_id)
            .bind(&r.layer)
            .bind(r.period_start)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether a query id was already billed for this license.
    pub async fn is_claimed(&self, license_id: &str, query_id: &str) -> Result<bool, LedgerError> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM query_claims WHERE license_id = $1 AND query_id = $2",
        )
        .bind(license_id)
        .bind(query_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Settles a served query: in one transaction, claims its id, writes its usage row and
    /// rollups and turns its reservation into usage. A query id already claimed (a retry) is not
    /// billed again: its reservation is released.
    pub async fn settle(&self, r: &Reservation, e: &UsageEvent) -> Result<Settlement, LedgerError> {
        self.ensure_partition(e.created_at).await;
        match self.backend {
            Backend::Postgres => self.settle_in_one_statement(r, e).await,
            Backend::Sqlite => self.settle_in_a_transaction(r, e).await,
        }
    }

    /// Settles the queries of a request for a group of layers (one usage row each, see
    /// [`Ledger::settle`]): on SQLite in one transaction, on Postgres one statement each.
    pub async fn settle_all(
        &self,
        items: &[(&Reservation, &UsageEvent)],
    ) -> Result<Vec<Settlement>, LedgerError> {
        let mut out = Vec::with_capacity(items.len());
        match (self.backend, items) {
            (Backend::Sqlite, [_, _, ..]) => {
                let mut tx = self.pool.begin().await?;
                for (r, e) in items {
                    out.push(settle_steps(&mut tx, r, e).await?);
                }
                tx.commit().await?;
            }
            _ => {
                for (r, e) in items {
                    out.push(self.settle(r, e).await?);
                }
            }
        }
        Ok(out)
    }

    /// Postgres: the whole settlement as one statement (data-modifying CTEs), atomic by itself
    /// and one round trip instead of seven.
    async fn settle_in_one_statement(
        &self,
        r: &Reservation,
        e: &UsageEvent,
    ) -> Result<Settlement, LedgerError> {
        let rollup = |table: &str, column: &str, param: &str| {
            format!(
                "{table}_up AS (INSERT INTO {table} (license_id, customer_id, model, layer, {column}, requests, tokens, upload_bytes, download_bytes) \
                 SELECT $1, $3, $4, $5, {param}, 1, $6, $7, $8 FROM claim \
                 ON CONFLICT (license_id, layer, {column}) DO UPDATE SET requests = {table}.requests + 1, \
                 tokens = {table}.tokens + excluded.tokens, upload_bytes = {table}.upload_bytes + excluded.upload_bytes, \
                 download_bytes = {table}.download_bytes + excluded.download_bytes)"
            )
        };
        let sql = format!(
            "WITH claim AS (INSERT INTO query_claims (license_id, query_id, claimed_at) VALUES ($1, $2, $12) \
             ON CONFLICT (license_id, query_id) DO NOTHING RETURNING 1), \
             event AS (INSERT INTO usage_events (query_id, license_id, customer_id, model, layer, tokens, upload_bytes, \
             download_bytes, worker, compute_ms, status, created_at, results, key_id) \
             SELECT $2, $1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $19, $20 FROM claim), \
             {}, {} \
             UPDATE quota_usage SET reserved = reserved - $15, \
             used = used + CASE WHEN EXISTS (SELECT 1 FROM claim) THEN $15 ELSE 0 END \
             WHERE license_id = $16 AND layer = $17 AND period_start = $18 \
             RETURNING used, EXISTS (SELECT 1 FROM claim)",
            rollup("usage_hourly", "hour_start", "$13"),
            rollup("usage_daily", "day_start", "$14"),
        );
        let row = sqlx::query(&sql)
            .bind(&e.license_id)
            .bind(&e.query_id)
            .bind(&e.customer_id)
            .bind(&e.model)
            .bind(&e.layer)
            .bind(e.tokens)
            .bind(e.upload_bytes)
            .bind(e.download_bytes)
            .bind(&e.worker)
            .bind(e.compute_ms)
            .bind(&e.status)
            .bind(e.created_at)
            .bind(hour_start(e.created_at))
            .bind(day_start(e.created_at))
            .bind(r.tokens)
            .bind(&r.license_id)
            .bind(&r.layer)
            .bind(r.period_start)
            .bind(&e.results)
            .bind(&e.key_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Settlement {
            layer_used: row.try_get(0)?,
            billed: row.try_get(1)?,
        })
    }

    /// SQLite: the settlement as a transaction of single statements.
    async fn settle_in_a_transaction(
        &self,
        r: &Reservation,
        e: &UsageEvent,
    ) -> Result<Settlement, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let settled = settle_steps(&mut tx, r, e).await?;
        tx.commit().await?;
        Ok(settled)
    }

    /// Billable tokens of a license in the period starting at `period_start` (largest count
    /// over its protected layers; see the crate docs).
    pub async fn billable_tokens(
        &self,
        license_id: &str,
        period_start: i64,
    ) -> Result<i64, LedgerError> {
        let row = sqlx::query("SELECT COALESCE(MAX(used), 0) FROM quota_usage WHERE license_id = $1 AND period_start = $2")
            .bind(license_id)
            .bind(period_start)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Records a packing key uploaded by a license, and audits it. Idempotent: the same key id
    /// again changes nothing and returns false.
    pub async fn register_packing_key(
        &self,
        record: &PackingKeyRecord,
        blob: &[u8],
    ) -> Result<bool, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO packing_keys (key_id, license_id, customer_id, parameter_set, bytes, key_blob, uploaded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(&record.key_id)
        .bind(&record.license_id)
        .bind(&record.customer_id)
        .bind(&record.parameter_set)
        .bind(record.bytes)
        .bind(blob.to_vec())
        .bind(record.uploaded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if created {
            let details = format!(
                "key {} ({}, {} bytes)",
                record.key_id, record.parameter_set, record.bytes
            );
            insert_audit(
                &mut tx,
                record.uploaded_at,
                &record.license_id,
                "key.upload",
                &record.license_id,
                &details,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    /// Deletes a packing key of `license_id`, and audits it. Returns false when the license has
    /// no such key (usage rows keep naming it: they record what was computed).
    pub async fn delete_packing_key(
        &self,
        key_id: &str,
        license_id: &str,
        now: i64,
    ) -> Result<bool, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM packing_keys WHERE key_id = $1 AND license_id = $2")
            .bind(key_id)
            .bind(license_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if deleted {
            let details = format!("key {key_id}");
            insert_audit(&mut tx, now, license_id, "key.delete", license_id, &details).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// A registered packing key: its record and its bytes.
    pub async fn packing_key(
        &self,
        key_id: &str,
    ) -> Result<Option<(PackingKeyRecord, Vec<u8>)>, LedgerError> {
        let row = sqlx::query(
            "SELECT key_id, license_id, customer_id, parameter_set, bytes, uploaded_at, key_blob \
             FROM packing_keys WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((packing_key_record(&r)?, r.try_get::<Vec<u8>, _>(6)?)))
            .transpose()
    }

    /// The packing keys a license registered, oldest first.
    pub async fn packing_keys(
        &self,
        license_id: &str,
    ) -> Result<Vec<PackingKeyRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT key_id, license_id, customer_id, parameter_set, bytes, uploaded_at \
             FROM packing_keys WHERE license_id = $1 ORDER BY uploaded_at, key_id",
        )
        .bind(license_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(packing_key_record).collect()
    }

    /// Usage rows of a license (newest last).
    pub async fn usage_events(&self, license_id: &str) -> Result<Vec<UsageEvent>, LedgerError> {
        let rows = sqlx::query(
            "SELECT query_id, license_id, customer_id, model, layer, tokens, upload_bytes, download_bytes, worker, compute_ms, status, created_at, \
             results, key_id FROM usage_events WHERE license_id = $1 ORDER BY created_at, query_id",
        )
        .bind(license_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_event).collect()
    }

    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        details: &str,
        now: i64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        insert_audit(&mut tx, now, actor, action, subject, details).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest `limit` audit events, oldest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEvent>, LedgerError> {
        let rows = sqlx::query("SELECT at, actor, action, subject, details FROM audit_events ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut events = rows
            .iter()
            .map(|r| {
                Ok(AuditEvent {
                    at: r.try_get(0)?,
                    actor: r.try_get(1)?,
                    action: r.try_get(2)?,
                    subject: r.try_get(3)?,
                    details: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        events.reverse();
        Ok(events)
    }

    /// Postgres: creates the month's usage partition if missing (best effort: concurrent
    /// creators race harmlessly, and rows outside any month land in the default partition).
    async fn ensure_partition(&self, at: i64) {
        if self.backend != Backend::Postgres {
            return;
        }
        let month = month_start(at);
        if self
            .partitions
            .lock()
            .expect("partition cache")
            .contains(&month)
        {
            return;
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF usage_events FOR VALUES FROM ({month}) TO ({})",
            time::partition_name(month),
            next_month_start(month)
        );
        match sqlx::query(&sql).execute(&self.pool).await {
            Ok(_) => {
                self.partitions
                    .lock()
                    .expect("partition cache")
                    .insert(month);
            }
            Err(e) => tracing_free_log(&format!("usage partition for {month}: {e}")),
        }
    }

    /// Postgres retention: drops every monthly usage partition that ends at or before `cutoff`.
    /// Returns the dropped partitions. (SQLite keeps one table: nothing to drop.)
    pub async fn drop_partitions_before(
        &self,
        cutoff: i64,
        actor: &str,
        now: i64,
    ) -> Result<Vec<String>, LedgerError> {
        if self.backend != Backend::Postgres {
            return Ok(vec![]);
        }
        let rows = sqlx::query(
            "SELECT CAST(c.relname AS TEXT) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_events'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut dropped = Vec::new();
        for r in rows {
            let name: String = r.try_get(0)?;
            if let Some(month) = time::partition_month(&name) {
                if next_month_start(month) <= cutoff {
                    sqlx::query(&format!("DROP TABLE {name}"))
                        .execute(&self.pool)
                        .await?;
                    self.partitions
                        .lock()
                        .expect("partition cache")
                        .remove(&month);
                    dropped.push(name);
                }
            }
        }
        dropped.sort();
        if !dropped.is_empty() {
            self.audit(
                actor,
                "usage.retention",
                "usage_events",
                &dropped.join(","),
                now,
            )
            .await?;
        }
        Ok(dropped)
    }
}

fn tracing_free_log(message: &str) {
    eprintln!("ledger: {message}");
}

async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    at: i64,
    actor: &str,
    action: &str,
    subject: &str,
    details: &str,
) -> Result<(), LedgerError> {
    sqlx::query("INSERT INTO audit_events (at, actor, action, subject, details) VALUES ($1, $2, $3, $4, $5)")
        .bind(at)
        .bind(actor)
        .bind(action)
        .bind(subject)
        .bind(details)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn packing_key_record(r: &AnyRow) -> Result<PackingKeyRecord, LedgerError> {
    Ok(PackingKeyRecord {
        key_id: r.try_get(0)?,
        license_id: r.try_get(1)?,
        customer_id: r.try_get(2)?,
        parameter_set: r.try_get(3)?,
        bytes: r.try_get(4)?,
        uploaded_at: r.try_get(5)?,
    })
}

fn usage_event(r: &AnyRow) -> Result<UsageEvent, LedgerError> {
    Ok(UsageEvent {
        query_id: r.try_get(0)?,
        license_id: r.try_get(1)?,
        customer_id: r.try_get(2)?,
        model: r.try_get(3)?,
        layer: r.try_get(4)?,
        tokens: r.try_get(5)?,
        upload_bytes: r.try_get(6)?,
        download_bytes: r.try_get(7)?,
        worker: r.try_get(8)?,
        compute_ms: r.try_get(9)?,
        status: r.try_get(10)?,
        created_at: r.try_get(11)?,
        results: r.try_get(12)?,
        key_id: r.try_get(13)?,
    })
}

/// The steps of a settlement on SQLite, inside the caller's transaction: claim the query id,
/// write the usage row and rollups, turn the reservation into usage.
async fn settle_steps(
    tx: &mut sqlx::AnyConnection,
    r: &Reservation,
    e: &UsageEvent,
) -> Result<Settlement, LedgerError> {
    let claimed = sqlx::query("INSERT INTO query_claims (license_id, query_id, claimed_at) VALUES ($1, $2, $3) ON CONFLICT (license_id, query_id) DO NOTHING")
        .bind(&e.license_id)
        .bind(&e.query_id)
        .bind(e.created_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if claimed {
        sqlx::query(
            "INSERT INTO usage_events (query_id, license_id, customer_id, model, layer, tokens, upload_bytes, \
             download_bytes, worker, compute_ms, status, created_at, results, key_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&e.query_id)
        .bind(&e.license_id)
        .bind(&e.customer_id)
        .bind(&e.model)
        .bind(&e.layer)
        .bind(e.tokens)
        .bind(e.upload_bytes)
        .bind(e.download_bytes)
        .bind(&e.worker)
        .bind(e.compute_ms)
        .bind(&e.status)
        .bind(e.created_at)
        .bind(&e.results)
        .bind(&e.key_id)
        .execute(&mut *tx)
        .await?;
        for (table, column, start) in [
            ("usage_hourly", "hour_start", hour_start(e.created_at)),
            ("usage_daily", "day_start", day_start(e.created_at)),
        ] {
            let sql = format!(
                "INSERT INTO {table} (license_id, customer_id, model, layer, {column}, requests, tokens, upload_bytes, download_bytes) \
                 VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8) ON CONFLICT (license_id, layer, {column}) DO UPDATE SET \
                 requests = {table}.requests + 1, tokens = {table}.tokens + excluded.tokens, \
                 upload_bytes = {table}.upload_bytes + excluded.upload_bytes, download_bytes = {table}.download_bytes + excluded.download_bytes"
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
                .execute(&mut *tx)
                .await?;
        }
    }
    let used = if claimed { r.tokens } else { 0 };
    let row = sqlx::query(
        "UPDATE quota_usage SET reserved = reserved - $1, used = used + $2 \
         WHERE license_id = $3 AND layer = $4 AND period_start = $5 RETURNING used",
    )
    .bind(r.tokens)
    .bind(used)
    .bind(&r.license_id)
    .bind(&r.layer)
    .bind(r.period_start)
    .fetch_one(&mut *tx)
    .await?;
    let layer_used: i64 = row.try_get(0)?;
    Ok(Settlement {
        billed: claimed,
        layer_used,
    })
}

/// The admission of one reservation on `conn`: `None` when admitted, else the refusal.
async fn admit(
    conn: &mut sqlx::AnyConnection,
    r: &Reservation,
    quota: i64,
) -> Result<Option<LedgerError>, LedgerError> {
    // One statement: create the row or add to it, only where the quota allows.
    let admitted = sqlx::query(
        "INSERT INTO quota_usage (license_id, layer, period_start, quota_tokens, reserved) \
         SELECT $1, $2, $3, $4, $5 WHERE $5 <= $4 \
         ON CONFLICT (license_id, layer, period_start) DO UPDATE \
         SET quota_tokens = excluded.quota_tokens, reserved = quota_usage.reserved + excluded.reserved \
         WHERE quota_usage.used + quota_usage.reserved + excluded.reserved <= excluded.quota_tokens \
         RETURNING used",
    )
    .bind(&r.license_id)
    .bind(&r.layer)
    .bind(r.period_start)
    .bind(quota)
    .bind(r.tokens)
    .fetch_optional(&mut *conn)
    .await?
    .is_some();
    if admitted {
        return Ok(None);
    }
    let row = sqlx::query("SELECT used + reserved FROM quota_usage WHERE license_id = $1 AND layer = $2 AND period_start = $3")
        .bind(&r.license_id)
        .bind(&r.layer)
        .bind(r.period_start)
        .fetch_optional(&mut *conn)
        .await?;
    let taken: i64 = match row {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    Ok(Some(LedgerError::QuotaExceeded {
        quota,
        remaining: (quota - taken).max(0),
        requested: r.tokens,
    }))
}
