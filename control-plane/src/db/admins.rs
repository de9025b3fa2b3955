//! Named admins (token hashes only) and admin browser sessions (session secret hashes).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::sql::is_unique_violation;
use super::{Db, DbError, DbResult};
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub struct AdminRow {
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl AdminRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            name: r.try_get("name")?,
            created_at: r.try_get("created_at")?,
            last_used_at: r.try_get("last_used_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }
}

/// Who a live session acts as, and until when.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub admin_name: String,
    pub expires_at: i64,
}

const COLS: &str = "name, created_at, last_used_at, revoked_at";

impl Db {
    /// `Conflict` when the name is taken (also by a revoked admin).
    pub async fn insert_admin(&self, name: &str, token_hash: &str) -> DbResult<AdminRow> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO admins (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(name)
        .bind(token_hash)
        .bind(now)
        .execute(self.writer())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DbError::Conflict(format!("an admin named {name:?} exists (or existed)"))
            } else {
                e.into()
            }
        })?;
        Ok(AdminRow {
            name: name.into(),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        })
    }

    pub async fn list_admins(&self) -> DbResult<Vec<AdminRow>> {
        let rows = sqlx::query(&format!("SELECT {COLS} FROM admins ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(AdminRow::from_row).collect()
    }

    /// The live (not revoked) admin holding a token with this hash.
    pub async fn admin_by_token_hash(&self, token_hash: &str) -> DbResult<Option<AdminRow>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM admins WHERE token_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(AdminRow::from_row).transpose()
    }

    /// Notes a use of the admin's token (the caller throttles how often).
    pub async fn touch_admin(&self, name: &str, at: i64) -> DbResult<()> {
        sqlx::query("UPDATE admins SET last_used_at = $1 WHERE name = $2")
            .bind(at)
            .bind(name)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// Revokes a live admin and ends its sessions, in one transaction. `NotFound` when no
    /// live admin has the name.
    pub async fn revoke_admin(&self, name: &str) -> DbResult<()> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n =
            sqlx::query("UPDATE admins SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        sqlx::query("DELETE FROM admin_sessions WHERE admin_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a session (and drops expired ones, so the table stays small);
    /// `bootstrap_fp` binds a bootstrap admin's session to its token.
    pub async fn insert_session(
        &self,
        secret_hash: &str,
        admin_name: &str,
        expires_at: i64,
        bootstrap_fp: Option<&str>,
    ) -> DbResult<()> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM admin_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO admin_sessions (secret_hash, admin_name, created_at, expires_at, bootstrap_fp) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(secret_hash)
        .bind(admin_name)
        .bind(now)
        .bind(expires_at)
        .bind(bootstrap_fp)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The unexpired session with this secret hash, if its admin is still live (the
    /// bootstrap admin `bootstrap_name` has no row in `admins`: its session must carry
    /// the current bootstrap token's fingerprint `bootstrap_fp`).
    pub async fn session(
        &self,
        secret_hash: &str,
        bootstrap_name: &str,
        bootstrap_fp: &str,
    ) -> DbResult<Option<SessionRow>> {
        let row = sqlx::query(
            "SELECT s.admin_name, s.expires_at FROM admin_sessions s \
             LEFT JOIN admins a ON a.name = s.admin_name \
             WHERE s.secret_hash = $1 AND s.expires_at > $2 \
             AND ((s.admin_name = $3 AND s.bootstrap_fp = $4) \
                  OR (a.name IS NOT NULL AND a.revoked_at IS NULL))",
        )
        .bind(secret_hash)
        .bind(now_ms())
        .bind(bootstrap_name)
        .bind(bootstrap_fp)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SessionRow {
                admin_name: r.try_get("admin_name")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    pub async fn delete_session(&self, secret_hash: &str) -> DbResult<()> {
        sqlx::query("DELETE FROM admin_sessions WHERE secret_hash = $1")
            .bind(secret_hash)
            .execute(self.writer())
            .await?;
        Ok(())
    }
}
