//! Group commit of settlements (Postgres): one background task settles the queries that wait
//! together in one statement, so that a busy gateway pays one round trip and one WAL flush for
//! many settlements instead of one each.
//!
//! Exactly-once holds as for single settlements: the batch claims its query ids with the same
//! unique index, and a batch never holds the same (license, query id) twice (a second one waits
//! for the next batch, where its claim finds the first). A settlement whose lease is gone is
//! settled on its own afterwards ([`crate::settle`]'s late path). One task, one statement at a
//! time: batches never lock the same quota rows in different orders.

use std::collections::{HashMap, HashSet, VecDeque};

use sqlx::AnyPool;
use tokio::sync::mpsc;

use crate::settle::{
    bind_usage, rollup_conflict, rollup_insert, settle_late_alone, Job, Settlement, USAGE_COLUMNS,
};
use crate::time::{day_start, hour_start};
use crate::LedgerError;

/// The parameters of one row of the batch's `input` list.
const PARAMS_PER_ROW: usize = 18;

/// Starts the task; settlements sent to the returned channel are settled in batches of at most
/// `max_batch`.
pub(crate) fn start(pool: AnyPool, max_batch: usize) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(max_batch.max(1) * 64);
    tokio::spawn(run(pool, rx, max_batch.max(1)));
    tx
}

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(job) => pending.push_back(job),
                None => return,
            }
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => break,
            }
        }
        // A batch with each (license, query id) once; the others wait for the next.
        let mut batch = Vec::with_capacity(max_batch);
        let mut seen = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(job) = pending.pop_front() {
            let key = (job.event.license_id.clone(), job.event.query_id.clone());
            if batch.len() < max_batch && seen.insert(key) {
                batch.push(job);
            } else {
                later.push_back(job);
            }
        }
        pending = later;
        settle_batch(&pool, batch).await;
    }
}

/// Per row of the batch: (lease live, billed, used on its key after the whole batch).
#[derive(sqlx::FromRow)]
struct Row {
    lease_id: String,
    live: bool,
    billed: bool,
    layer_used: i64,
}

async fn settle_batch(pool: &AnyPool, batch: Vec<Job>) {
    let outcome = match batch_statement(pool, &batch).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, settlements = batch.len(), "group settlement failed");
            let message = e.to_string();
            for job in batch {
                let _ = job
                    .reply
                    .send(Err(LedgerError::Unavailable(message.clone())));
            }
            return;
        }
    };
    // Each row's tokens used on its key as of its own settlement, in batch order.
    let mut after: HashMap<(&str, &str, i64), i64> = HashMap::new();
    let mut settled = Vec::with_capacity(batch.len());
    for job in batch.iter().rev() {
        let row = &outcome[&job.lease.id];
        let key = (
            job.lease.license_id.as_str(),
            job.lease.layer.as_str(),
            job.lease.period_start,
        );
        let used = after.entry(key).or_insert(row.layer_used);
        settled.push((row.live, row.billed, *used));
        if row.billed {
            *used -= job.lease.tokens;
        }
    }
    settled.reverse();
    for (job, (live, billed, layer_used)) in batch.into_iter().zip(settled) {
        let result = if live {
            Ok(Settlement { billed, layer_used })
        } else {
            settle_late_alone(pool, &job.lease, &job.event).await
        };
        let _ = job.reply.send(result);
    }
}

/// The whole batch as one statement of data-modifying CTEs over a list of input rows.
async fn batch_statement(
    pool: &AnyPool,
    batch: &[Job],
) -> Result<HashMap<String, Row>, LedgerError> {
    let rows: Vec<String> = (0..batch.len())
        .map(|i| {
            let first = i * PARAMS_PER_ROW;
            let params: Vec<String> = (1..=PARAMS_PER_ROW)
                .map(|p| format!("${}", first + p))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    let rollup = |table: &str, column: &str| {
        format!(
            "{table}_up AS ({} SELECT license_id, MIN(customer_id), MIN(model), layer, {column}, COUNT(*), \
             CAST(SUM(tokens) AS BIGINT), CAST(SUM(upload_bytes) AS BIGINT), CAST(SUM(download_bytes) AS BIGINT) \
             FROM billed GROUP BY license_id, layer, {column} {})",
            rollup_insert(table, column),
            rollup_conflict(table, column)
        )
    };
    let sql = format!(
        "WITH input ({USAGE_COLUMNS}, hour_start, day_start, lease_id, period_start) AS (VALUES {}), \
         lease AS (DELETE FROM reservations r USING input i WHERE r.id = i.lease_id RETURNING r.id), \
         live AS (SELECT i.* FROM input i JOIN lease l ON l.id = i.lease_id), \
         claim AS (INSERT INTO query_claims (license_id, query_id, claimed_at) \
         SELECT license_id, query_id, created_at FROM live ON CONFLICT (license_id, query_id) DO NOTHING \
         RETURNING license_id, query_id), \
         billed AS (SELECT live.* FROM live JOIN claim c ON c.license_id = live.license_id AND c.query_id = live.query_id), \
         event AS (INSERT INTO usage_events ({USAGE_COLUMNS}) SELECT {USAGE_COLUMNS} FROM billed), \
         {}, {}, \
         quota AS (UPDATE quota_usage q SET reserved = q.reserved - k.reserved, used = q.used + k.used \
         FROM (SELECT live.license_id, live.layer, live.period_start, CAST(SUM(live.tokens) AS BIGINT) AS reserved, \
         CAST(SUM(CASE WHEN c.query_id IS NULL THEN 0 ELSE live.tokens END) AS BIGINT) AS used \
         FROM live LEFT JOIN claim c ON c.license_id = live.license_id AND c.query_id = live.query_id \
         GROUP BY live.license_id, live.layer, live.period_start) k \
         WHERE q.license_id = k.license_id AND q.layer = k.layer AND q.period_start = k.period_start \
         RETURNING q.license_id, q.layer, q.period_start, q.used) \
         SELECT i.lease_id, l.id IS NOT NULL AS live, c.query_id IS NOT NULL AS billed, \
         COALESCE(u.used, 0) AS layer_used FROM input i \
         LEFT JOIN lease l ON l.id = i.lease_id \
         LEFT JOIN claim c ON c.license_id = i.license_id AND c.query_id = i.query_id \
         LEFT JOIN quota u ON u.license_id = i.license_id AND u.layer = i.layer AND u.period_start = i.period_start",
        rows.join(", "),
        rollup("usage_hourly", "hour_start"),
        rollup("usage_daily", "day_start"),
    );
    let mut query = sqlx::query_as::<_, Row>(&sql);
    for job in batch {
        let e = &job.event;
        query = bind_usage!(query, e)
            .bind(hour_start(e.created_at))
            .bind(day_start(e.created_at))
            .bind(&job.lease.id)
            .bind(job.lease.period_start);
    }
    let rows = query.fetch_all(pool).await?;
    Ok(rows.into_iter().map(|r| (r.lease_id.clone(), r)).collect())
}
