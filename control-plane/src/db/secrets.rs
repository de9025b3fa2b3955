//! Commands whose sensitive params cannot be decrypted (see [`crate::secrets`]).

use sqlx::Row;
use trellis_protocol::CommandType;

use super::{Db, DbResult, DispatchRow};
use crate::secrets::SecretError;
use crate::time::now_ms;

/// Set once every command stored before encryption existed has been sealed (v2: URL
/// credentials in any command's params too, not only sensitive Terraform variables).
const SEALED_SETTING: &str = "secrets_sealed_v2";
/// Commands read per page by [`Db::seal_stored_in_clear`].
const SEAL_PAGE: i64 = 500;

impl Db {
    /// `d` with its sensitive params decrypted for the agent, and, for a
    /// `terraform_apply`, the credential of its Terraform state workspace.
    pub fn unseal_dispatch(&self, mut d: DispatchRow) -> Result<DispatchRow, SecretError> {
        d.params = self.secrets.open_params(d.command_type, &d.params)?;
        if d.command_type.is_terraform() {
            d.terraform_state =
                <trellis_protocol::TerraformApplyParams as serde::Deserialize>::deserialize(
                    &d.params,
                )
                .ok()
                .map(|p| self.secrets.state_credential(d.id.0, &p.state_workspace()));
        }
        Ok(d)
    }

    /// Encrypts the sensitive values (Terraform variables, URL credentials) of commands
    /// stored in clear by an earlier version, once per database (then recorded in
    /// `settings`).
    /// A row changed meanwhile (another replica) is left to that writer. Returns how many
    /// commands were rewritten.
    pub async fn seal_stored_in_clear(&self) -> DbResult<u64> {
        let done = sqlx::query("SELECT 1 FROM settings WHERE key = $1")
            .bind(SEALED_SETTING)
            .fetch_optional(&self.pool)
            .await?;
        if done.is_some() {
            return Ok(0);
        }
        let mut sealed = 0;
        let mut after = String::new();
        loop {
            let rows = sqlx::query(
                "SELECT id, type, params FROM commands WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(&after)
            .bind(SEAL_PAGE)
            .fetch_all(&self.pool)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("id")?;
            let mut tx = self.begin_write().await?;
            for r in &rows {
                let text: String = r.try_get("params")?;
                let Ok(params) = serde_json::from_str(&text) else {
                    continue;
                };
                let ty: String = r.try_get("type")?;
                let Some(ty) = CommandType::parse(&ty) else {
                    continue;
                };
                let Some(new) = self.secrets.seal_in_clear(ty, &params) else {
                    continue;
                };
                let id: String = r.try_get("id")?;
                sealed +=
                    sqlx::query("UPDATE commands SET params = $1 WHERE id = $2 AND params = $3")
                        .bind(new.to_string())
                        .bind(&id)
                        .bind(&text)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
            }
            tx.commit().await?;
        }
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(SEALED_SETTING)
        .bind(now_ms().to_string())
        .execute(self.writer())
        .await?;
        Ok(sealed)
    }
}
