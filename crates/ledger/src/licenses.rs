//! Customers, licenses and revocations.

use crate::audit::insert_audit;
use crate::{Ledger, LedgerError};

/// A license as the ledger records it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LicenseRecord {
    pub id: String,
    pub customer_id: String,
    pub model: String,
    pub quota_tokens: i64,
    pub quota_period: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(sqlx::FromRow)]
struct RevokedId {
    license_id: String,
}

#[derive(sqlx::FromRow)]
struct Count {
    n: i64,
}

impl Ledger {
    pub async fn upsert_customer(&self, id: &str, name: &str, now: i64) -> Result<(), LedgerError> {
        sqlx::query("INSERT INTO customers (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET name = excluded.name")
            .bind(id)
            .bind(name)
            .bind(now)
            .execute(self.pool())
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
        let mut tx = self.pool().begin().await?;
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
        let mut tx = self.pool().begin().await?;
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
        let count: Count =
            sqlx::query_as("SELECT COUNT(*) AS n FROM revocations WHERE license_id = $1")
                .bind(license_id)
                .fetch_one(self.pool())
                .await?;
        Ok(count.n > 0)
    }

    /// Every revoked license id (for a gateway's short-lived cache).
    pub async fn revoked_ids(&self) -> Result<Vec<String>, LedgerError> {
        let rows: Vec<RevokedId> = sqlx::query_as("SELECT license_id FROM revocations")
            .fetch_all(self.pool())
            .await?;
        Ok(rows.into_iter().map(|r| r.license_id).collect())
    }
}
