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
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::quota::{admit_together, Admission, Waiting};
use crate::LedgerError;

/// Starts the task; admissions sent to the returned channel are admitted in groups of at most
/// `max_group`.
pub(crate) fn start(pool: AnyPool, max_group: usize) -> mpsc::Sender<Waiting> {
    let (tx, rx) = mpsc::channel(max_group.max(1) * 64);
    tokio::spawn(run(pool, rx, max_group.max(1)));
    tx
}

type Key = (String, String, i64, i64, i64);

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Waiting>, max_group: usize) {
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
        let mut groups: HashMap<Key, Vec<Waiting>> = HashMap::new();
        for job in waiting {
            let a = &job.0;
            let key = (
                a.lease.license_id.clone(),
                a.lease.layer.clone(),
                a.lease.period_start,
                a.quota,
                a.per_minute,
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

async fn admit_group(pool: AnyPool, group: Vec<Waiting>) {
    let (admissions, replies): (Vec<Admission>, Vec<_>) = group.into_iter().unzip();
    let admitted = match admit_or_give_back(&pool, &admissions).await {
        Ok(admitted) => admitted,
        Err(e) => {
            // Each admission, tried alone, meets the fault itself and reports it.
            tracing::warn!(error = %e, admissions = admissions.len(), "group admission failed");
            false
        }
    };
    for reply in replies {
        let _ = reply.send(admitted);
    }
}

/// The whole group in one statement; gives the rate tokens back when the quota refused the
/// group. Whether the group was admitted.
async fn admit_or_give_back(pool: &AnyPool, group: &[Admission]) -> Result<bool, LedgerError> {
    let result = admit_together(pool, group).await?;
    if result.rate_ok && !result.admitted {
        let first = &group[0];
        let cost: i64 = group.iter().map(|a| a.cost).sum();
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
