//! Trellis templates: what the UI offers, mapped to a Proxmox template VMID.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::sql::{flag, id, string_list};
use super::{Db, DbError, DbResult};
use crate::model::TemplateId;
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub id: TemplateId,
    /// What an admin sets.
    pub fields: TemplateFields,
    pub system: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The fields an admin sets (already validated and trimmed).
#[derive(Debug, Clone)]
pub struct TemplateFields {
    pub name: String,
    pub description: Option<String>,
    pub memory: i64,
    pub cores: i64,
    pub proxmox_template_id: Option<i64>,
    pub proxmox_node: Option<String>,
    pub network_bridge: Option<String>,
    pub pre_provision_commands: Vec<String>,
    pub post_provision_commands: Vec<String>,
    /// Defaults for the clone options of nodes provisioned from it.
    pub clone_defaults: Option<trellis_protocol::CloneOptions>,
}

const COLS: &str =
    "id, name, description, memory, cores, proxmox_template_id, proxmox_node, network_bridge, \
    pre_provision_commands, post_provision_commands, system, created_at, updated_at, clone_defaults";

impl TemplateRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: id(r, "id")?,
            fields: TemplateFields {
                name: r.try_get("name")?,
                description: r.try_get("description")?,
                memory: r.try_get("memory")?,
                cores: r.try_get("cores")?,
                proxmox_template_id: r.try_get("proxmox_template_id")?,
                proxmox_node: r.try_get("proxmox_node")?,
                network_bridge: r.try_get("network_bridge")?,
                pre_provision_commands: string_list(r, "pre_provision_commands")?,
                post_provision_commands: string_list(r, "post_provision_commands")?,
                // Stored by this build from validated options; anything unreadable is no
                // defaults rather than an unreadable template.
                clone_defaults: r
                    .try_get::<Option<String>, _>("clone_defaults")?
                    .and_then(|j| serde_json::from_str(&j).ok()),
            },
            system: flag(r, "system")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

/// The stored form of a template's clone defaults: JSON, or NULL for none.
fn clone_defaults_json(t: &TemplateFields) -> Option<String> {
    t.clone_defaults
        .as_ref()
        .filter(|d| !d.is_empty())
        .and_then(|d| serde_json::to_string(d).ok())
}

fn list_json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

impl Db {
    pub async fn get_template(&self, template: TemplateId) -> DbResult<TemplateRow> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM templates WHERE id = $1"))
            .bind(template.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound)?;
        TemplateRow::from_row(&row)
    }

    pub async fn list_templates(&self) -> DbResult<Vec<TemplateRow>> {
        let rows = sqlx::query(&format!("SELECT {COLS} FROM templates ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(TemplateRow::from_row).collect()
    }

    pub async fn insert_template(&self, t: &TemplateFields, system: bool) -> DbResult<TemplateId> {
        let template = TemplateId::new();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO templates (id, name, description, memory, cores, proxmox_template_id, proxmox_node, \
             network_bridge, pre_provision_commands, post_provision_commands, system, created_at, updated_at, \
             clone_defaults) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)",
        )
        .bind(template.to_string())
        .bind(&t.name)
        .bind(t.description.clone())
        .bind(t.memory)
        .bind(t.cores)
        .bind(t.proxmox_template_id)
        .bind(t.proxmox_node.clone())
        .bind(t.network_bridge.clone())
        .bind(list_json(&t.pre_provision_commands))
        .bind(list_json(&t.post_provision_commands))
        .bind(i64::from(system))
        .bind(now)
        .bind(clone_defaults_json(t))
        .execute(self.writer())
        .await?;
        Ok(template)
    }

    pub async fn update_template(&self, template: TemplateId, t: &TemplateFields) -> DbResult<()> {
        let n = sqlx::query(
            "UPDATE templates SET name = $1, description = $2, memory = $3, cores = $4, proxmox_template_id = $5, \
             proxmox_node = $6, network_bridge = $7, pre_provision_commands = $8, post_provision_commands = $9, \
             updated_at = $10, clone_defaults = $12 WHERE id = $11",
        )
        .bind(&t.name)
        .bind(t.description.clone())
        .bind(t.memory)
        .bind(t.cores)
        .bind(t.proxmox_template_id)
        .bind(t.proxmox_node.clone())
        .bind(t.network_bridge.clone())
        .bind(list_json(&t.pre_provision_commands))
        .bind(list_json(&t.post_provision_commands))
        .bind(now_ms())
        .bind(template.to_string())
        .bind(clone_defaults_json(t))
        .execute(self.writer())
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        Ok(())
    }

    /// Deletes a template no node uses (`Conflict` with the count otherwise), atomically.
    pub async fn delete_template(&self, template: TemplateId) -> DbResult<()> {
        let mut tx = self.begin_write().await?;
        let used: i64 = sqlx::query("SELECT COUNT(*) FROM nodes WHERE template_id = $1")
            .bind(template.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if used > 0 {
            return Err(DbError::Conflict(format!(
                "{used} node(s) use this template; change them first"
            )));
        }
        let n = sqlx::query("DELETE FROM templates WHERE id = $1")
            .bind(template.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Seeds `defaults` as system templates if the table is empty, atomically: replicas
    /// starting together seed once.
    pub async fn seed_templates(&self, defaults: &[TemplateFields]) -> DbResult<bool> {
        let mut tx = self.begin_write().await?;
        // Under READ COMMITTED two replicas would both count zero: one seeds at a time.
        Db::seed_lock(&mut tx).await?;
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM templates")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if n > 0 {
            return Ok(false);
        }
        let now = now_ms();
        for t in defaults {
            sqlx::query(
                "INSERT INTO templates (id, name, description, memory, cores, proxmox_template_id, proxmox_node, \
                 network_bridge, pre_provision_commands, post_provision_commands, system, created_at, updated_at, \
                 clone_defaults) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, $11, $11, $12)",
            )
            .bind(TemplateId::new().to_string())
            .bind(&t.name)
            .bind(t.description.clone())
            .bind(t.memory)
            .bind(t.cores)
            .bind(t.proxmox_template_id)
            .bind(t.proxmox_node.clone())
            .bind(t.network_bridge.clone())
            .bind(list_json(&t.pre_provision_commands))
            .bind(list_json(&t.post_provision_commands))
            .bind(now)
            .bind(clone_defaults_json(t))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}
