//! The control plane's vocabulary: typed ids and the status enums of agents, commands and
//! nodes, with the node state machine. A leaf module (no I/O, no imports from the rest of
//! the crate) so that `db`, `domain`, `broker` and `api` all speak it without depending on
//! each other. The strings here are the only spelling of a status: the database stores
//! them, the API shows them, and the UI's types are generated from the API document.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::from_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

id_type!(
    /// A registered agent (one per hypervisor host).
    AgentId
);
id_type!(
    /// A command (one attempt; retries get new ids).
    CommandId
);
id_type!(
    /// A node: the record of one VM Trellis provisions.
    NodeId
);
id_type!(
    /// A Trellis template (what the UI offers, mapped to a Proxmox template).
    TemplateId
);

macro_rules! status_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[derive(utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($s => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_enum!(
    /// Where a command is in its life. Terminal: succeeded, failed, cancelled, timed_out.
    CommandStatus {
        /// Stored; waiting for its agent (or a free slot on it).
        Queued = "queued",
        /// Claimed for a session and sent; not yet accepted by the agent.
        Dispatched = "dispatched",
        /// Accepted by the agent, or reporting events.
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        TimedOut = "timed_out",
    }
);

impl CommandStatus {
    pub const TERMINAL: [CommandStatus; 4] = [
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }

    /// The status a command ends with for an agent's final status.
    pub fn from_final(s: trellis_protocol::FinalStatus) -> Self {
        use trellis_protocol::FinalStatus as F;
        match s {
            F::Succeeded => Self::Succeeded,
            F::Failed => Self::Failed,
            F::Cancelled => Self::Cancelled,
            F::TimedOut => Self::TimedOut,
        }
    }

    /// The agent-side final status this terminal status corresponds to.
    pub fn to_final(self) -> trellis_protocol::FinalStatus {
        use trellis_protocol::FinalStatus as F;
        match self {
            Self::Succeeded => F::Succeeded,
            Self::Cancelled => F::Cancelled,
            Self::TimedOut => F::TimedOut,
            _ => F::Failed,
        }
    }
}

status_enum!(
    /// Whether an agent has a live session.
    AgentStatus {
        Online = "online",
        Offline = "offline",
    }
);

status_enum!(
    /// The life of a node: `pending_provision → provisioning → running ⇄ stopped`, then
    /// `→ destroying → destroyed`; `failed` when a provision or destroy did not succeed;
    /// `missing` when the agent's inventory no longer shows its VM. The transitions are
    /// the functions below; `db::nodes` commits each with the command outcome (or the
    /// inventory) that causes it.
    NodeStatus {
        /// Created; no VM yet.
        PendingProvision = "pending_provision",
        /// A provision command is building its VM.
        Provisioning = "provisioning",
        Running = "running",
        Stopped = "stopped",
        /// The last provision or destroy failed, was cancelled or timed out.
        Failed = "failed",
        /// A destroy command is deleting its VM.
        Destroying = "destroying",
        /// Its VM was deleted by Trellis; the record is kept with its history.
        Destroyed = "destroyed",
        /// Its VM is gone from the hypervisor (deleted outside Trellis).
        Missing = "missing",
    }
);

impl NodeStatus {
    /// Statuses an admin may set by hand (and only on a node that has a VM).
    pub const SETTABLE: [NodeStatus; 2] = [Self::Running, Self::Stopped];

    /// A command is changing the node (nothing else may start on it).
    pub fn is_transitional(self) -> bool {
        matches!(self, Self::Provisioning | Self::Destroying)
    }

    /// Power actions are possible (on a node that has a VM).
    pub fn can_power(self) -> bool {
        matches!(self, Self::Running | Self::Stopped | Self::Failed)
    }

    /// Destroy is possible (on a node that has a VM; a `missing` one ends `destroyed`).
    pub fn can_destroy(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Stopped | Self::Failed | Self::Missing
        )
    }

    /// The inventory decides the status only in these (never during a command, never
    /// for a record whose VM Trellis deleted).
    pub fn follows_inventory(self) -> bool {
        matches!(self, Self::Running | Self::Stopped | Self::Missing)
    }

    /// Where the inventory moves a node: its VM's reported status, or `missing`.
    pub fn from_inventory(vm_status: Option<&str>) -> NodeStatus {
        match vm_status {
            Some("running") => Self::Running,
            Some(_) => Self::Stopped,
            None => Self::Missing,
        }
    }

    /// Where a destroy's end moves a node that was `destroying`.
    pub fn after_destroy(outcome: CommandStatus) -> NodeStatus {
        match outcome {
            CommandStatus::Succeeded => Self::Destroyed,
            _ => Self::Failed,
        }
    }

    /// Where a power command's end moves a node: the state Proxmox reported, or where it
    /// was when the command did not succeed.
    pub fn after_power(self, outcome: CommandStatus, reported_running: Option<bool>) -> NodeStatus {
        match (outcome, reported_running) {
            (CommandStatus::Succeeded, Some(true)) => Self::Running,
            (CommandStatus::Succeeded, Some(false)) => Self::Stopped,
            _ => self,
        }
    }

    /// Where a node that was `provisioning` goes when its provision command ends.
    pub fn after_provision(outcome: CommandStatus, has_result: bool) -> NodeStatus {
        match outcome {
            CommandStatus::Succeeded if has_result => NodeStatus::Running,
            _ => NodeStatus::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_string_and_serde() {
        for s in CommandStatus::ALL {
            assert_eq!(CommandStatus::parse(s.as_str()), Some(*s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for s in NodeStatus::ALL {
            assert_eq!(NodeStatus::parse(s.as_str()), Some(*s));
        }
        for s in AgentStatus::ALL {
            assert_eq!(AgentStatus::parse(s.as_str()), Some(*s));
        }
        assert_eq!(CommandStatus::parse("bogus"), None);
    }

    #[test]
    fn terminal_statuses_map_to_and_from_the_agent_final_status() {
        for s in CommandStatus::TERMINAL {
            assert!(s.is_terminal());
            assert_eq!(CommandStatus::from_final(s.to_final()), s);
        }
        assert!(!CommandStatus::Running.is_terminal());
    }

    #[test]
    fn a_node_runs_only_after_a_provision_that_succeeded_with_a_result() {
        use CommandStatus as C;
        assert_eq!(
            NodeStatus::after_provision(C::Succeeded, true),
            NodeStatus::Running
        );
        assert_eq!(
            NodeStatus::after_provision(C::Succeeded, false),
            NodeStatus::Failed
        );
        for c in [C::Failed, C::Cancelled, C::TimedOut] {
            assert_eq!(NodeStatus::after_provision(c, true), NodeStatus::Failed);
        }
    }

    #[test]
    fn the_lifecycle_moves_only_where_it_may() {
        use CommandStatus as C;
        use NodeStatus as N;
        assert_eq!(N::after_destroy(C::Succeeded), N::Destroyed);
        assert_eq!(N::after_destroy(C::Failed), N::Failed);
        assert_eq!(N::after_destroy(C::TimedOut), N::Failed);
        assert_eq!(
            N::Running.after_power(C::Succeeded, Some(false)),
            N::Stopped
        );
        assert_eq!(N::Stopped.after_power(C::Succeeded, Some(true)), N::Running);
        assert_eq!(N::Running.after_power(C::Failed, None), N::Running);
        assert_eq!(N::from_inventory(Some("running")), N::Running);
        assert_eq!(N::from_inventory(Some("stopped")), N::Stopped);
        assert_eq!(N::from_inventory(None), N::Missing);
        for s in NodeStatus::ALL {
            // Nothing starts on a node a command is changing; a destroyed record stays so.
            if s.is_transitional() || *s == N::Destroyed || *s == N::PendingProvision {
                assert!(!s.can_power() && !s.can_destroy(), "{s}");
            }
            if s.follows_inventory() {
                assert!(!s.is_transitional());
            }
        }
        assert!(N::Missing.can_destroy() && !N::Missing.can_power());
    }

    #[test]
    fn ids_parse_and_print_as_uuids() {
        let id = CommandId::new();
        assert_eq!(id.to_string().parse::<CommandId>().unwrap(), id);
        assert_eq!(
            serde_json::to_value(id).unwrap(),
            serde_json::json!(id.0.to_string())
        );
    }
}
