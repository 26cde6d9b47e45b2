//! Packing keys that licenses registered for packed results (stored once, pushed to workers).

use crate::audit::insert_audit;
use crate::{Ledger, LedgerError};

/// A packing key registered by a license.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PackingKeyRecord {
    pub key_id: String,
    pub license_id: String,
    pub customer_id: String,
    pub parameter_set: String,
    pub bytes: i64,
    pub uploaded_at: i64,
}

#[derive(sqlx::FromRow)]
struct StoredKey {
    #[sqlx(flatten)]
    record: PackingKeyRecord,
    key_blob: Vec<u8>,
}

impl Ledger {
    /// Records a packing key uploaded by a license, and audits it. Idempotent: the same key id
    /// again changes nothing and returns false.
    pub async fn register_packing_key(
        &self,
        record: &PackingKeyRecord,
        blob: &[u8],
    ) -> Result<bool, LedgerError> {
        let mut tx = self.pool().begin().await?;
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
        let mut tx = self.pool().begin().await?;
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
        let stored: Option<StoredKey> = sqlx::query_as(
            "SELECT key_id, license_id, customer_id, parameter_set, bytes, uploaded_at, key_blob \
             FROM packing_keys WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(stored.map(|s| (s.record, s.key_blob)))
    }

    /// The packing keys a license registered, oldest first.
    pub async fn packing_keys(
        &self,
        license_id: &str,
    ) -> Result<Vec<PackingKeyRecord>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT key_id, license_id, customer_id, parameter_set, bytes, uploaded_at \
             FROM packing_keys WHERE license_id = $1 ORDER BY uploaded_at, key_id",
        )
        .bind(license_id)
        .fetch_all(self.pool())
        .await?)
    }
}
