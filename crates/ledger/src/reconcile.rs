//! Reconciliation: whether the ledger's counters agree with its rows, for operators (after an
//! incident) and for the chaos soak.

use crate::{Ledger, LedgerError};

#[derive(sqlx::FromRow)]
struct Key {
    license_id: String,
    layer: String,
    period_start: i64,
    quota_tokens: i64,
    used: i64,
    reserved: i64,
    leased: i64,
}

#[derive(sqlx::FromRow)]
struct Layer {
    license_id: String,
    layer: String,
    used: i64,
    rows: i64,
    row_tokens: i64,
    daily_requests: i64,
    daily_tokens: i64,
}

impl Ledger {
    /// Every disagreement between the ledger's counters and its rows (none: consistent):
    /// per license x layer x period, `reserved` is the sum of its leases and `used` within the
    /// quota; per license x layer, `used` over the periods is the sum of the usage rows, and the
    /// daily rollups count the same requests and tokens as the rows. (Retention, which drops
    /// old usage rows, makes the last two disagree for the months it dropped.)
    pub async fn reconcile(&self) -> Result<Vec<String>, LedgerError> {
        let keys: Vec<Key> = sqlx::query_as(
            "SELECT q.license_id, q.layer, q.period_start, q.quota_tokens, q.used, q.reserved, \
             CAST((SELECT COALESCE(SUM(r.tokens), 0) FROM reservations r WHERE r.license_id = q.license_id \
             AND r.layer = q.layer AND r.period_start = q.period_start) AS BIGINT) AS leased \
             FROM quota_usage q ORDER BY q.license_id, q.layer, q.period_start",
        )
        .fetch_all(self.pool())
        .await?;
        let mut wrong = Vec::new();
        for k in &keys {
            let at = format!("{} {} period {}", k.license_id, k.layer, k.period_start);
            if k.reserved != k.leased {
                wrong.push(format!(
                    "{at}: {} reserved, {} in leases",
                    k.reserved, k.leased
                ));
            }
            if k.used > k.quota_tokens {
                wrong.push(format!("{at}: {} used, quota {}", k.used, k.quota_tokens));
            }
        }
        let layers: Vec<Layer> = sqlx::query_as(
            "SELECT q.license_id, q.layer, CAST(SUM(q.used) AS BIGINT) AS used, \
             CAST((SELECT COUNT(*) FROM usage_events e WHERE e.license_id = q.license_id AND e.layer = q.layer) AS BIGINT) AS rows, \
             CAST((SELECT COALESCE(SUM(e.tokens), 0) FROM usage_events e WHERE e.license_id = q.license_id AND e.layer = q.layer) AS BIGINT) AS row_tokens, \
             CAST((SELECT COALESCE(SUM(d.requests), 0) FROM usage_daily d WHERE d.license_id = q.license_id AND d.layer = q.layer) AS BIGINT) AS daily_requests, \
             CAST((SELECT COALESCE(SUM(d.tokens), 0) FROM usage_daily d WHERE d.license_id = q.license_id AND d.layer = q.layer) AS BIGINT) AS daily_tokens \
             FROM quota_usage q GROUP BY q.license_id, q.layer ORDER BY q.license_id, q.layer",
        )
        .fetch_all(self.pool())
        .await?;
        for l in &layers {
            let at = format!("{} {}", l.license_id, l.layer);
            if l.used != l.row_tokens {
                wrong.push(format!(
                    "{at}: {} used, {} in usage rows",
                    l.used, l.row_tokens
                ));
            }
            if (l.daily_requests, l.daily_tokens) != (l.rows, l.row_tokens) {
                wrong.push(format!(
                    "{at}: daily rollups count {} requests and {} tokens, the usage rows {} and {}",
                    l.daily_requests, l.daily_tokens, l.rows, l.row_tokens
                ));
            }
        }
        Ok(wrong)
    }
}
