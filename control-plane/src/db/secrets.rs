//! Commands whose sensitive params cannot be decrypted (see [`crate::secrets`]).

use trellis_protocol::CommandError;

use super::nodes::fail_node_of;
use super::sql::error_json;
use super::{Db, DbResult, DispatchRow};
use crate::model::CommandId;
use crate::secrets::SecretError;
use crate::time::now_ms;

impl Db {
    /// `d` with its sensitive params decrypted for the agent.
    pub fn unseal_dispatch(&self, mut d: DispatchRow) -> Result<DispatchRow, SecretError> {
        d.params = self.secrets.open_params(d.command_type, &d.params)?;
        Ok(d)
    }

    /// Ends a claimed command whose sensitive params do not decrypt as `failed` with
    /// `secrets_undecryptable` (it was never sent). False if it had already ended.
    pub async fn fail_undecryptable(&self, id: CommandId, e: &SecretError) -> DbResult<bool> {
        let err = CommandError::new(
            "secrets_undecryptable",
            format!("the command's sensitive values cannot be decrypted, so it was not sent to the agent: {e}; submit it again with its values"),
        );
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE commands SET status = 'failed', error = $1, finished_at = $2 \
             WHERE id = $3 AND status IN ('queued', 'dispatched')",
        )
        .bind(error_json(&err))
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            fail_node_of(&mut tx, id, &format!("secrets_undecryptable: {e}"), now).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }
}
