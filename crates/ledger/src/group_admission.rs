//! Group admission (Postgres): the single-layer admissions of one key (license, layer, period)
//! that wait together are admitted in one statement, so that they take the key's quota row and
//! the license's rate row once, and pay one commit, instead of queueing for those row locks one
//! by one (each holds them until its commit).
//!
//! A group is admitted all or none, as one request of the group's total tokens and rate cost:
//! the same conditional upserts as a single admission, so concurrent gateways still never admit
//! more than the quota or the rate together. A group that is refused as a whole (the quota or the
//! rate bucket is nearly used up) hands each of its admissions back to be tried alone, exactly
//! as without groups; rate tokens that the group took before its quota refused it are given back
//! first, so that nobody pays them twice. An admission whose caller stopped waiting (its future
//! dropped) may still be admitted with its group: its lease holds the tokens until it expires,
//! like a reservation dropped unsettled.

use std::collections::HashMap;

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::quota::{rate_upsert, Admitted, Lease, ADMIT_CONFLICT, LEASE_COLUMNS};
use crate::{Backend, LedgerError};

/// One admission waiting for its group.
pub(crate) struct Job {
    pub customer_id: String,
    pub model: String,
    pub quota: i64,
    pub per_minute: i64,
    pub cost: i64,
    pub now: i64,
    pub lease: Lease,
    /// `true`: admitted with its group; `false`: to be tried alone.
    pub reply: oneshot::Sender<bool>,
}

/// The parameters of one lease row of the group's `input` list.
const PARAMS_PER_LEASE: usize = 6;
/// The parameters before the lease rows.
const FIXED_PARAMS: usize = 8;

/// Starts the task; admissions sent to the returned channel are admitted in groups of at most
/// `max_group`.
pub(crate) fn start(pool: AnyPool, max_group: usize) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(max_group.max(1) * 64);
    tokio::spawn(run(pool, rx, max_group.max(1)));
    tx
}

type Key = (String, String, i64, i64, i64);

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Job>, max_group: usize) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while waiting.len() < max_group * 4 {
            match rx.try_recv() {
                Ok(job) => waiting.push(job),
                Err(_) => break,
            }
        }
        // One statement per key; different keys' statements run side by side, and the next
        // round starts when all of this round's are done.
        let mut groups: HashMap<Key, Vec<Job>> = HashMap::new();
        for job in waiting {
            let key = (
                job.lease.license_id.clone(),
                job.lease.layer.clone(),
                job.lease.period_start,
                job.quota,
                job.per_minute,
            );
            groups.entry(key).or_default().push(job);
        }
        let mut round = JoinSet::new();
        for (_, mut group) in groups {
            while !group.is_empty() {
                let rest = group.split_off(group.len().min(max_group));
                let pool = pool.clone();
                round.spawn(admit_group(pool, group));
                group = rest;
            }
        }
        while round.join_next().await.is_some() {}
    }
}

async fn admit_group(pool: AnyPool, group: Vec<Job>) {
    let admitted = match group_statement(&pool, &group).await {
        Ok(admitted) => admitted,
        Err(e) => {
            // Each admission, tried alone, meets the fault itself and reports it.
            tracing::warn!(error = %e, admissions = group.len(), "group admission failed");
            false
        }
    };
    for job in group {
        let _ = job.reply.send(admitted);
    }
}

/// The whole group in one statement (rate, quota and every lease); gives the rate tokens back
/// when the quota refused the group. Whether the group was admitted.
async fn group_statement(pool: &AnyPool, group: &[Job]) -> Result<bool, LedgerError> {
    let first = &group[0];
    let tokens: i64 = group.iter().map(|j| j.lease.tokens).sum();
    let cost: i64 = group.iter().map(|j| j.cost).sum();
    let now = group.iter().map(|j| j.now).max().unwrap_or(first.now);
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
    for job in group {
        query = query
            .bind(&job.lease.id)
            .bind(&job.customer_id)
            .bind(&job.model)
            .bind(job.lease.tokens)
            .bind(job.now)
            .bind(job.lease.expires_at);
    }
    let result: Admitted = query.fetch_one(pool).await?;
    if result.rate_ok && !result.admitted {
        sqlx::query(
            "UPDATE rate_buckets SET tokens = LEAST($2, tokens + $3) WHERE license_id = $1",
        )
        .bind(&first.lease.license_id)
        .bind(first.per_minute as f64)
        .bind(cost as f64)
        .execute(pool)
        .await?;
    }
    Ok(result.admitted)
}
