//! The domain layer: the operations an admin (through the API or the CLI) performs —
//! create a command, start a provision, retry, cancel, manage nodes, templates and agents.
//! It validates, decides, has `db` store each operation in one transaction, and tells the
//! broker whom to wake. It returns [`DomainError`]s, which the HTTP layer maps to status
//! codes; it knows nothing of HTTP. Depends on `db`, `model` and `broker`; none of them
//! depends on it.

pub mod admins;
pub mod agents;
pub mod commands;
pub mod node_batches;
pub mod nodes;
pub mod templates;
pub mod terraform_state;

use crate::db::DbError;

/// Why an operation was refused or failed. `code` is the stable machine-readable code
/// clients see; `message` is safe to show.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The agent answered with an error.
    #[error("{message}")]
    Upstream { code: &'static str, message: String },
    /// The agent did not answer in time.
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Storage(#[from] DbError),
}

pub type DomainResult<T> = Result<T, DomainError>;

impl DomainError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
        }
    }

    /// A storage `NotFound` named for what was looked up; other errors pass through.
    pub fn not_found(what: impl std::fmt::Display) -> impl FnOnce(DbError) -> Self {
        move |e| match e {
            DbError::NotFound => Self::NotFound(format!("{what} not found")),
            e => Self::Storage(e),
        }
    }
}

impl From<trellis_protocol::CommandError> for DomainError {
    fn from(e: trellis_protocol::CommandError) -> Self {
        let code = match e.code.as_str() {
            "unsupported_command" => "unsupported_command",
            _ => "invalid_params",
        };
        Self::invalid(code, e.message)
    }
}
