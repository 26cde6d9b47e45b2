//! Monthly partitions of the usage rows (Postgres) and retention by whole months.

use crate::time::{self, month_start, next_month_start};
use crate::{Backend, Ledger, LedgerError};

#[derive(sqlx::FromRow)]
struct Partition {
    name: String,
}

impl Ledger {
    /// Postgres: creates the month's usage partition if missing (best effort: concurrent
    /// creators race harmlessly, and rows outside any month land in the default partition).
    pub(crate) async fn ensure_partition(&self, at: i64) {
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
        match sqlx::query(&sql).execute(self.pool()).await {
            Ok(_) => {
                self.partitions
                    .lock()
                    .expect("partition cache")
                    .insert(month);
            }
            Err(e) => {
                tracing::warn!(month, error = %e, "usage partition not created: rows go to the default partition")
            }
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
        let partitions: Vec<Partition> = sqlx::query_as(
            "SELECT CAST(c.relname AS TEXT) AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_events'",
        )
        .fetch_all(self.pool())
        .await?;
        let mut dropped = Vec::new();
        for Partition { name } in partitions {
            if let Some(month) = time::partition_month(&name) {
                if next_month_start(month) <= cutoff {
                    sqlx::query(&format!("DROP TABLE {name}"))
                        .execute(self.pool())
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
