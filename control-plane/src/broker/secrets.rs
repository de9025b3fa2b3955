//! Decrypting a dispatch's sensitive params just before it is sent (see [`crate::secrets`]).

use super::fanout::Published;
use super::Broker;
use crate::db::DispatchRow;
use crate::model::AgentId;

impl Broker {
    /// `d` with its sensitive params decrypted, ready for the agent. `None` when they
    /// cannot be decrypted (another key, a tampered value): the command is then failed with
    /// `secrets_undecryptable` and never sent, and the agent's slot is offered to the next.
    pub async fn unseal(&self, agent_id: AgentId, d: DispatchRow) -> Option<DispatchRow> {
        let id = d.id;
        let e = match self.db.unseal_dispatch(d) {
            Ok(d) => return Some(d),
            Err(e) => e,
        };
        tracing::error!(command_id = %id, %agent_id, error = %e, "cannot decrypt a command's sensitive params; failing it");
        match self.db.fail_undecryptable(id, &e).await {
            Ok(_) => {
                self.fanout.publish(&id, Published::Status);
                self.wake(agent_id);
            }
            Err(db) => {
                tracing::error!(command_id = %id, error = %db, "cannot fail the undecryptable command")
            }
        }
        None
    }
}
