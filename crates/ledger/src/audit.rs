//! The audit log: administrative actions, append-only (Postgres refuses updates and deletes
//! with a trigger).

use crate::{Ledger, LedgerError};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditEvent {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: String,
}

impl Ledger {
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        details: &str,
        now: i64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.pool().begin().await?;
        insert_audit(&mut tx, now, actor, action, subject, details).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest `limit` audit events, oldest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEvent>, LedgerError> {
        let mut events: Vec<AuditEvent> = sqlx::query_as(
            "SELECT at, actor, action, subject, details FROM audit_events ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        events.reverse();
        Ok(events)
    }
}

/// Appends one audit event inside the caller's transaction (it commits with what it records).
pub(crate) async fn insert_audit(
    tx: &mut sqlx::AnyConnection,
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
        .execute(&mut *tx)
        .await?;
    Ok(())
}
