//! Saved plans: `terraform_plan` leaves its plan file (and the initialised template it
//! was made from) in its own workspace, and a later `terraform_apply` with
//! `plan_command_id` applies exactly that file.
//!
//! The plan file holds the variables (sensitive ones too) and the prior state in clear,
//! so it is written 0600 inside the 0700 workspace and kept only until an apply uses it
//! or for [`PLAN_TTL`]; the plan's result carries only resource addresses and actions.
//! The file's SHA-256 goes into the result, and the control plane copies it into the
//! signed apply, so the agent applies the file it reported and nothing put there later.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use trellis_protocol::{CommandError, PlanMode, PlannedResource, TerraformPlanResult};

/// The plan file's name in the template directory.
pub const PLAN_FILE: &str = "trellis.tfplan";
/// The record in the plan's workspace naming where its plan file is.
const MARKER: &str = ".trellis-plan";
/// How long a saved plan may wait for its apply.
pub const PLAN_TTL: Duration = Duration::from_secs(24 * 3600);

/// What [`MARKER`] holds.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The template directory, relative to the workspace.
    dir: String,
    /// The commit the plan was made from.
    commit: String,
    /// Unix seconds when the plan was saved.
    saved_at: u64,
    /// The state the plan was made against (see [`StateMeta`]).
    #[serde(default)]
    state: Option<StateMeta>,
    /// Whether it is a destroy plan (`terraform plan -destroy`; absent: a normal plan).
    #[serde(default)]
    mode: PlanMode,
}

/// Which state version a plan was made against: Terraform refuses a saved plan whose
/// state changed since ("Saved plan is stale"), but only when the plan's prior state had
/// a lineage — a plan made before the first apply would otherwise be applied over a
/// state created meanwhile. Compared by the agent before it applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMeta {
    pub lineage: String,
    pub serial: u64,
}

impl StateMeta {
    /// The lineage and serial of `terraform state pull`'s output (`None`: no state).
    pub fn of_pulled(out: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(out).ok()?;
        Some(Self {
            lineage: v.get("lineage")?.as_str()?.to_string(),
            serial: v.get("serial")?.as_u64()?,
        })
    }
}

/// A saved plan found for an apply.
#[derive(Debug)]
pub struct SavedPlan {
    /// The template directory the plan was made in (initialised, with the plan file).
    pub dir: PathBuf,
    pub commit: String,
    pub sha256: String,
    /// The state the plan was made against.
    pub state: Option<StateMeta>,
    /// A normal or a destroy plan, as it was made.
    pub mode: PlanMode,
    marker: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn missing(plan_id: uuid::Uuid, why: &str) -> CommandError {
    CommandError::new(
        "plan_missing",
        format!("the plan saved by terraform_plan {plan_id} is not on this agent: {why}"),
    )
}

/// SHA-256 (hex) of the file at `path`.
pub async fn sha256_file(path: &Path) -> std::io::Result<String> {
    let bytes = tokio::fs::read(path).await?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Records the plan file in `dir` (inside `workspace`) as saved now, narrowed to 0600;
/// returns its SHA-256.
pub async fn record(
    workspace: &Path,
    dir: &Path,
    commit: &str,
    state: Option<StateMeta>,
    mode: PlanMode,
) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join(PLAN_FILE);
    tokio::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).await?;
    let sha = sha256_file(&file).await?;
    let rel = dir.strip_prefix(workspace).unwrap_or(dir);
    let marker = Marker {
        dir: rel.to_string_lossy().into_owned(),
        commit: commit.to_string(),
        saved_at: now_secs(),
        state,
        mode,
    };
    let body = serde_json::to_vec(&marker).map_err(std::io::Error::other)?;
    tokio::fs::write(workspace.join(MARKER), body).await?;
    Ok(sha)
}

impl SavedPlan {
    /// The plan `plan_id` saved in `workspace`, if it is there, younger than
    /// [`PLAN_TTL`] and still has the hash `expected` (`plan_missing`,
    /// `plan_hash_mismatch` otherwise). An expired plan is removed.
    pub async fn open(
        workspace: &Path,
        plan_id: uuid::Uuid,
        expected: &str,
    ) -> Result<Self, CommandError> {
        let marker_path = workspace.join(MARKER);
        let Ok(text) = tokio::fs::read(&marker_path).await else {
            return Err(missing(
                plan_id,
                "already applied, expired or never saved here",
            ));
        };
        let marker: Marker = serde_json::from_slice(&text)
            .map_err(|_| missing(plan_id, "its record is unreadable"))?;
        if marker.dir.split('/').any(|c| c == "..") || marker.dir.starts_with('/') {
            return Err(missing(
                plan_id,
                "its record names a directory outside the workspace",
            ));
        }
        let dir = workspace.join(&marker.dir);
        let plan = Self {
            dir,
            commit: marker.commit,
            sha256: String::new(),
            state: marker.state,
            mode: marker.mode,
            marker: marker_path,
        };
        if now_secs().saturating_sub(marker.saved_at) > PLAN_TTL.as_secs() {
            plan.discard().await;
            return Err(missing(plan_id, "it was saved more than 24 h ago"));
        }
        let sha = sha256_file(&plan.dir.join(PLAN_FILE))
            .await
            .map_err(|e| missing(plan_id, &format!("the plan file cannot be read: {e}")))?;
        if !sha.eq_ignore_ascii_case(expected.trim()) {
            return Err(CommandError::new(
                "plan_hash_mismatch",
                format!(
                    "the plan file of terraform_plan {plan_id} has SHA-256 {sha}, not the {expected} it reported: it is not applied"
                ),
            ));
        }
        Ok(Self {
            sha256: sha,
            ..plan
        })
    }

    /// Removes the plan file and its record: a plan is applied at most once.
    pub async fn discard(&self) {
        let _ = tokio::fs::remove_file(self.dir.join(PLAN_FILE)).await;
        let _ = tokio::fs::remove_file(&self.marker).await;
    }
}

/// Removes the saved plan in `workspace` if it is past [`PLAN_TTL`] (run with the
/// workspace retention pass, at the start of each Terraform command, for workspaces not
/// in use), so a plan never applied does not keep its secrets for the whole retention.
pub fn remove_if_expired(workspace: &Path) {
    let marker_path = workspace.join(MARKER);
    let Ok(text) = std::fs::read(&marker_path) else {
        return;
    };
    let marker: Option<Marker> = serde_json::from_slice(&text).ok();
    if let Some(m) = &marker {
        if now_secs().saturating_sub(m.saved_at) <= PLAN_TTL.as_secs() {
            return;
        }
        if !m.dir.split('/').any(|c| c == "..") && !m.dir.starts_with('/') {
            let _ = std::fs::remove_file(workspace.join(&m.dir).join(PLAN_FILE));
        }
    }
    let _ = std::fs::remove_file(&marker_path);
    tracing::info!(workspace = %workspace.display(), "removed a saved terraform plan older than 24 h");
}

/// The summary of `terraform show -json <plan>`: addresses and actions only, and whether
/// it is a destroy plan.
pub fn summary(
    show: &Value,
    plan_sha256: String,
    commit: Option<String>,
    mode: PlanMode,
) -> TerraformPlanResult {
    let (mut add, mut change, mut destroy) = (0, 0, 0);
    let mut resources = Vec::new();
    let changes = show
        .get("resource_changes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for rc in changes {
        let Some(address) = rc.get("address").and_then(Value::as_str) else {
            continue;
        };
        let actions: Vec<&str> = rc
            .pointer("/change/actions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let action = match actions.as_slice() {
            ["create"] => {
                add += 1;
                "create"
            }
            ["update"] => {
                change += 1;
                "update"
            }
            ["delete"] => {
                destroy += 1;
                "delete"
            }
            ["delete", "create"] | ["create", "delete"] => {
                add += 1;
                destroy += 1;
                "replace"
            }
            ["read"] => "read",
            _ => continue,
        };
        resources.push(PlannedResource {
            address: address.to_string(),
            action: action.to_string(),
        });
    }
    TerraformPlanResult {
        add,
        change,
        destroy,
        resources,
        plan_sha256,
        resolved_commit: commit,
        mode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plan_past_its_ttl_is_removed_and_a_fresh_one_kept() {
        let ws = std::env::temp_dir().join(format!("tendril-plan-{}", uuid::Uuid::new_v4()));
        let dir = ws.join("t");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |saved_at: u64| {
            std::fs::write(dir.join(PLAN_FILE), b"plan").unwrap();
            let m = Marker {
                dir: "t".into(),
                commit: "c".into(),
                saved_at,
                state: None,
                mode: PlanMode::Normal,
            };
            std::fs::write(ws.join(MARKER), serde_json::to_vec(&m).unwrap()).unwrap();
        };
        write(now_secs() - 60);
        remove_if_expired(&ws);
        assert!(dir.join(PLAN_FILE).exists());
        write(now_secs() - PLAN_TTL.as_secs() - 60);
        remove_if_expired(&ws);
        assert!(!dir.join(PLAN_FILE).exists());
        assert!(!ws.join(MARKER).exists());
        std::fs::remove_dir_all(&ws).unwrap();
    }

    #[test]
    fn the_summary_has_addresses_and_actions_only() {
        let show = json!({
            "variables": {"password": {"value": "hunter2"}},
            "resource_changes": [
                {"address": "null_resource.a", "change": {"actions": ["create"], "after": {"triggers": {"p": "hunter2"}}}},
                {"address": "null_resource.b", "change": {"actions": ["delete", "create"]}},
                {"address": "null_resource.c", "change": {"actions": ["update"]}},
                {"address": "null_resource.d", "change": {"actions": ["no-op"]}},
                {"address": "null_resource.e", "change": {"actions": ["delete"]}}
            ]
        });
        let s = summary(&show, "ab".into(), None, PlanMode::Normal);
        assert_eq!((s.add, s.change, s.destroy), (2, 1, 2));
        let actions: Vec<_> = s
            .resources
            .iter()
            .map(|r| format!("{} {}", r.address, r.action))
            .collect();
        assert_eq!(
            actions,
            [
                "null_resource.a create",
                "null_resource.b replace",
                "null_resource.c update",
                "null_resource.e delete"
            ]
        );
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
        assert_eq!(s.mode, PlanMode::Normal);
        let d = summary(&show, "ab".into(), None, PlanMode::Destroy);
        assert_eq!(serde_json::to_value(&d).unwrap()["mode"], json!("destroy"));
    }

    #[tokio::test]
    async fn a_destroy_plan_is_recorded_as_one() {
        let ws = std::env::temp_dir().join(format!("tendril-plan-{}", uuid::Uuid::new_v4()));
        let dir = ws.join("t");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(PLAN_FILE), b"plan").unwrap();
        let sha = record(&ws, &dir, "c", None, PlanMode::Destroy)
            .await
            .unwrap();
        let id = uuid::Uuid::new_v4();
        let saved = SavedPlan::open(&ws, id, &sha).await.unwrap();
        assert_eq!(saved.mode, PlanMode::Destroy);
        // A record written before destroy plans existed reads as a normal plan.
        let old = json!({"dir": "t", "commit": "c", "saved_at": now_secs()});
        std::fs::write(ws.join(MARKER), old.to_string()).unwrap();
        let saved = SavedPlan::open(&ws, id, &sha).await.unwrap();
        assert_eq!(saved.mode, PlanMode::Normal);
        std::fs::remove_dir_all(&ws).unwrap();
    }
}
