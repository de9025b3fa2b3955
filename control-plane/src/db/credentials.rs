//! Converting credential hashes stored before they were keyed (see `crate::auth`).

use sqlx::Row;

use super::{Db, DbResult};

impl Db {
    /// Rewrites every unkeyed credential hash in its keyed form — agents' and admins'
    /// token hashes and the stored bootstrap token hash — and ends every session stored
    /// with an unkeyed secret hash (its admin signs in again). Returns how many were
    /// converted. The caller runs this once per installation (see `crate::auth`).
    pub async fn key_legacy_credentials(&self) -> DbResult<u64> {
        let mut tx = self.begin_write().await?;
        let mut n = 0;
        for (table, key_col, hash_col) in [
            ("agents", "id", "token_hash"),
            ("admins", "id", "token_hash"),
            ("settings", "key", "value"),
        ] {
            let filter = if table == "settings" {
                " WHERE key = 'admin_token_hash'"
            } else {
                ""
            };
            let rows = sqlx::query(&format!(
                "SELECT {key_col}, {hash_col} FROM {table}{filter}"
            ))
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                let key: String = r.try_get(0)?;
                let stored: String = r.try_get(1)?;
                if let Some(keyed) = crate::auth::keyed_from_legacy(&stored) {
                    n += sqlx::query(&format!(
                        "UPDATE {table} SET {hash_col} = $1 WHERE {key_col} = $2 AND {hash_col} = $3"
                    ))
                    .bind(keyed)
                    .bind(&key)
                    .bind(&stored)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
            }
        }
        n += sqlx::query("DELETE FROM admin_sessions WHERE secret_hash NOT LIKE 'k1:%'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
