//! The usage ledger: customers, licenses, revocations, quota reservations with leases, rate
//! limits shared by every gateway replica, one usage row per billed FHE query (exactly once per
//! query id), hourly and daily rollups, packing keys, and an append-only audit log.
//!
//! Postgres is the production store (usage rows partitioned by month); SQLite is the embedded
//! default for a single node and the demo. Both run the same queries through sqlx's `Any` driver,
//! each with its own migrations (`migrations/` and `migrations/sqlite/`), except where Postgres
//! does in one statement (data-modifying CTEs) what SQLite does in a transaction.
//!
//! Billing rule: a token is one row of an activation batch entering a protected layer. Quotas are
//! kept per (license, layer, period), so a token that crosses several protected layers counts once
//! against each layer's quota, and the billable tokens of a period are the *largest* count over
//! the layers: a generated token crossing every protected layer is billed once, and sending rows to
//! only some layers never lowers the bill below what was sent to any one of them.
//!
//! The modules, by responsibility:
//! - [`licenses`](Ledger::record_license): customers, licenses and revocations;
//! - `quota`: admission (rate limit and quota, all of a request's layers or none) into a
//!   [`Reservation`] with a lease, and its release; `group_admission` and `group_commit`: the
//!   admissions (of one key) and settlements that wait together, in one statement (Postgres);
//! - `settle`: a reservation turned into usage rows, rollups and used quota, exactly once per
//!   query id, also after its lease expired;
//! - `keys`: packing keys; `audit`: the audit log; `partitions`: monthly usage partitions and
//!   retention (Postgres); `report`: the read side for compliance and billing; `reconcile`:
//!   whether the counters agree with the rows.

mod audit;
mod group_admission;
mod group_commit;
mod keys;
mod licenses;
mod partitions;
mod quota;
mod reconcile;
mod report;
mod settle;
mod time;

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::AnyPool;

pub use audit::AuditEvent;
pub use keys::PackingKeyRecord;
pub use licenses::LicenseRecord;
pub use quota::{InFlight, Lease, Rate, Reservation, Reserve};
pub use report::{AuditEntry, Dim, EventCursor, Grain, LicenseListing, UsageBucket, UsageFilter};
pub use settle::{Settlement, UsageEvent};
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
    #[error("rate limit: {cost} tokens asked, {per_minute} per minute admitted; retry in {retry_after_s} s")]
    RateLimited {
        per_minute: i64,
        cost: i64,
        retry_after_s: u64,
    },
    /// A settlement whose lease had expired and been reclaimed, when the quota no longer has
    /// room for it: nothing was billed.
    #[error("the reservation's lease expired and the quota has no room left for it: {remaining} of {quota} tokens left, {requested} to settle")]
    LeaseExpired {
        quota: i64,
        remaining: i64,
        requested: i64,
    },
    #[error("settlement does not match its reservation: {0}")]
    Mismatch(&'static str),
    #[error("unsupported database url (postgres:// or sqlite:)")]
    UnsupportedUrl,
    #[error("ledger database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("ledger database: {0}")]
    Unavailable(String),
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl LedgerError {
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::QuotaExceeded { .. } => "quota_exceeded",
            LedgerError::RateLimited { .. } => "rate_limited",
            LedgerError::LeaseExpired { .. } => "lease_expired",
            LedgerError::Mismatch(_) => "internal",
            LedgerError::UnsupportedUrl => "ledger_config",
            LedgerError::Database(_) | LedgerError::Unavailable(_) | LedgerError::Migrate(_) => {
                "ledger_unavailable"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// The ledger over a connection pool.
pub struct Ledger {
    pool: AnyPool,
    /// Connections whose commits are not flushed before they return: admissions and releases
    /// (see [`Ledger::admission_pool`]).
    admissions: AnyPool,
    backend: Backend,
    /// Months whose usage partition exists (Postgres).
    partitions: Mutex<HashSet<i64>>,
    /// Where single-layer settlements go to be settled in groups, once started.
    group_commit: OnceLock<tokio::sync::mpsc::Sender<settle::Job>>,
    /// Where single-layer admissions go to be admitted in groups, once started.
    group_admission: OnceLock<tokio::sync::mpsc::Sender<quota::Waiting>>,
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
        let pool = pool_options(backend, Durability::Flushed, 16)
            .connect(url)
            .await?;
        match backend {
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
        }
        // An in-memory SQLite database is one connection's own: it cannot have a second pool.
        let admissions = if url.contains(":memory:") || url.contains("mode=memory") {
            pool.clone()
        } else {
            pool_options(backend, Durability::Unflushed, 8)
                .connect(url)
                .await?
        };
        Ok(Ledger {
            pool,
            admissions,
            backend,
            partitions: Mutex::new(HashSet::new()),
            group_commit: OnceLock::new(),
            group_admission: OnceLock::new(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The pool that admits and releases reservations. Its commits return before they are
    /// flushed to disk (Postgres `synchronous_commit = off`, SQLite `synchronous = NORMAL` in
    /// its write-ahead log); they still survive a crash of the process, and are made durable by
    /// the next flushed commit, such as their settlement. What a crash of the database's machine
    /// can lose is an admission or a release of the last moments: a lost admission is a lease
    /// that has vanished, which its settlement handles as it handles an expired one (billed
    /// exactly once, re-admitted against the quota in the settlement's own transaction, never
    /// above it); a lost release holds its quota until its lease expires. Settlements, keys,
    /// licenses and the audit log use [`Ledger::pool`], whose every commit is flushed.
    pub fn admission_pool(&self) -> &AnyPool {
        &self.admissions
    }

    /// Settles single-layer requests in groups of at most `max_batch` from now on (Postgres;
    /// SQLite, a single writer, is unchanged): the settlements that wait together become one
    /// statement. Starts a task on the current Tokio runtime.
    pub fn start_group_commit(&self, max_batch: usize) {
        if self.backend == Backend::Postgres {
            self.group_commit
                .get_or_init(|| group_commit::start(self.pool.clone(), max_batch));
        }
    }

    /// Admits single-layer requests of the same key that wait together in one statement, in
    /// groups of at most `max_group`, from now on (Postgres; SQLite, a single writer, is
    /// unchanged). Starts a task on the current Tokio runtime.
    pub fn start_group_admission(&self, max_group: usize) {
        if self.backend == Backend::Postgres {
            self.group_admission
                .get_or_init(|| group_admission::start(self.admissions.clone(), max_group));
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Whether a pool's commits wait for their flush to disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    Flushed,
    Unflushed,
}

/// A pool's options: its size (SQLite: 4 connections, a single writer) and what every
/// connection sets when it opens.
fn pool_options(backend: Backend, durability: Durability, postgres_size: u32) -> AnyPoolOptions {
    let options = AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => postgres_size,
        })
        .acquire_timeout(std::time::Duration::from_secs(5));
    options.after_connect(move |conn, _| {
        Box::pin(async move {
            let statements: &[&str] = match (backend, durability) {
                // A write-ahead log: a commit is one append and one flush of the log instead
                // of the rollback journal's several writes and flushes, and readers do not
                // block the writer. `synchronous` FULL (SQLite's default) flushes every commit:
                // a settlement survives a crash of the machine, not only of the process.
                (Backend::Sqlite, Durability::Flushed) => {
                    &["PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL"]
                }
                (Backend::Sqlite, Durability::Unflushed) => {
                    &["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL"]
                }
                (Backend::Postgres, Durability::Flushed) => &[],
                (Backend::Postgres, Durability::Unflushed) => &["SET synchronous_commit = off"],
            };
            for statement in statements {
                sqlx::query(statement).execute(&mut *conn).await?;
            }
            Ok(())
        })
    })
}
