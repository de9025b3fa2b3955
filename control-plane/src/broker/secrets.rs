//! Readying a claimed command for its agent: its sensitive params decrypted (see
//! [`crate::secrets`]) and its stored signature present (see `db::signatures`).

use trellis_protocol::CommandError;

use super::fanout::Published;
use super::Broker;
use crate::db::DispatchRow;
use crate::model::AgentId;

impl Broker {
    /// `d` ready to send: sensitive params decrypted, signature as stored. `None` when it
    /// cannot be sent as stored — sensitive values that do not decrypt (another key, a
    /// tampered value), or no signature — : the command is then failed and never sent, and
    /// the agent's slot is offered to the next.
    pub async fn unseal(&self, agent_id: AgentId, d: DispatchRow) -> Option<DispatchRow> {
        let id = d.id;
        let signed = d
            .signature
            .as_deref()
            .and_then(trellis_protocol::FrameSignature::from_stored)
            .is_some();
        let err = if !signed {
            tracing::error!(command_id = %id, %agent_id, "a claimed command has no signature; failing it");
            CommandError::new(
                "unsigned",
                "the command was stored without a signature, so it was not sent to the agent: submit it again",
            )
        } else {
            match self.db.unseal_dispatch(d) {
                Ok(d) => return Some(d),
                Err(e) => {
                    tracing::error!(command_id = %id, %agent_id, error = %e, "cannot decrypt a command's sensitive params; failing it");
                    CommandError::new(
                        "secrets_undecryptable",
                        format!("the command's sensitive values cannot be decrypted, so it was not sent to the agent: {e}; submit it again with its values"),
                    )
                }
            }
        };
        match self.db.fail_unsendable(id, &err).await {
            Ok(_) => {
                self.fanout.publish(&id, Published::Status);
                self.wake(agent_id);
            }
            Err(db) => {
                tracing::error!(command_id = %id, error = %db, "cannot fail the unsendable command")
            }
        }
        None
    }
}
