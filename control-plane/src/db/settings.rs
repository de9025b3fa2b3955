//! Key-value settings of the installation (the admin token's hash).

use sqlx::Row;

use super::{Db, DbResult};

const ADMIN_TOKEN_HASH: &str = "admin_token_hash";

impl Db {
    pub async fn admin_token_hash(&self) -> DbResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(ADMIN_TOKEN_HASH)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    pub async fn set_admin_token_hash(&self, hash: &str) -> DbResult<()> {
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
            .bind(ADMIN_TOKEN_HASH)
            .bind(hash)
            .execute(self.writer())
            .await?;
        Ok(())
    }
}
