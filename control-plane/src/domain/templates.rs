//! Templates: validation, CRUD, and the system templates a new installation starts with.

use super::{DomainError, DomainResult};
use crate::db::{Db, DbError, TemplateFields, TemplateRow};
use crate::model::TemplateId;

pub async fn get(db: &Db, id: TemplateId) -> DomainResult<TemplateRow> {
    db.get_template(id)
        .await
        .map_err(DomainError::not_found(format_args!("template {id}")))
}

fn opt(s: Option<String>) -> Option<String> {
    s.map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Validates and normalises (trims, empty → absent) what an admin sent.
pub fn validate(mut t: TemplateFields) -> DomainResult<TemplateFields> {
    t.name = t.name.trim().to_string();
    if t.name.is_empty() || t.name.len() > 100 {
        return Err(DomainError::invalid(
            "invalid_params",
            "name must be 1–100 characters",
        ));
    }
    super::nodes::validate_size(t.memory, t.cores)?;
    if t.proxmox_template_id
        .is_some_and(|v| !(100..=999_999_999).contains(&v))
    {
        return Err(DomainError::invalid(
            "invalid_params",
            "proxmoxTemplateId must be a Proxmox VMID (100–999999999)",
        ));
    }
    t.description = opt(t.description);
    t.proxmox_node = opt(t.proxmox_node);
    t.network_bridge = opt(t.network_bridge);
    if let Some(d) = &t.clone_defaults {
        d.validate().map_err(|e| {
            DomainError::invalid("invalid_params", format!("cloneDefaults: {}", e.message))
        })?;
    }
    t.clone_defaults = t.clone_defaults.filter(|d| !d.is_empty());
    if let Some(br) = t.network_bridge.as_deref() {
        if !br.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
            return Err(DomainError::invalid(
                "invalid_params",
                format!("networkBridge {br:?} is not a bridge name"),
            ));
        }
    }
    Ok(t)
}

pub async fn create(db: &Db, t: TemplateFields) -> DomainResult<TemplateRow> {
    let t = validate(t)?;
    let id = db.insert_template(&t, false).await?;
    get(db, id).await
}

pub async fn update(db: &Db, id: TemplateId, t: TemplateFields) -> DomainResult<TemplateRow> {
    let t = validate(t)?;
    db.update_template(id, &t)
        .await
        .map_err(DomainError::not_found(format_args!("template {id}")))?;
    get(db, id).await
}

pub async fn delete(db: &Db, id: TemplateId) -> DomainResult<()> {
    db.delete_template(id).await.map_err(|e| match e {
        DbError::Conflict(m) => DomainError::conflict("template_in_use", m),
        e => DomainError::not_found(format_args!("template {id}"))(e),
    })
}

fn cloud_user(user: &str) -> trellis_protocol::CloneOptions {
    trellis_protocol::CloneOptions {
        ci_user: Some(user.into()),
        ..Default::default()
    }
}

/// Seeds a few system templates on an empty database so the demo has something to pick.
pub async fn seed(db: &Db) -> DomainResult<()> {
    let t = |name: &str, desc: &str, memory: i64, cores: i64, vmid: Option<i64>| TemplateFields {
        name: name.into(),
        description: Some(desc.into()),
        memory,
        cores,
        proxmox_template_id: vmid,
        proxmox_node: None,
        network_bridge: Some("vmbr0".into()),
        pre_provision_commands: Vec::new(),
        post_provision_commands: vec!["hostname".into()],
        // The cloud images' default users, so "Copy SSH command" knows whom to log in as.
        clone_defaults: match vmid {
            Some(9000) => Some(cloud_user("debian")),
            Some(9001) => Some(cloud_user("ubuntu")),
            _ => None,
        },
    };
    db.seed_templates(&[
        t(
            "Debian 12 (small)",
            "Debian 12 cloud image, 2 GiB / 2 cores",
            2048,
            2,
            Some(9000),
        ),
        t(
            "Ubuntu 24.04 (medium)",
            "Ubuntu 24.04 LTS cloud image, 4 GiB / 2 cores",
            4096,
            2,
            Some(9001),
        ),
        t(
            "Unmapped example",
            "Not mapped to a Proxmox template yet",
            1024,
            1,
            None,
        ),
    ])
    .await?;
    Ok(())
}
