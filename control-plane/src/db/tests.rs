//! Storage tests on SQLite in memory: transactions that must be all-or-nothing, and the
//! repair sweep for nodes a crash left behind.

use serde_json::json;
use trellis_protocol::CommandType;

use super::*;
use crate::model::{AgentId, CommandId, CommandStatus, NodeId, NodeStatus};
use crate::time::now_ms;

async fn db() -> Db {
    Db::connect("sqlite::memory:").await.unwrap()
}

/// A command to store; its signature is a placeholder (these tests store, never send).
fn command(agent: AgentId, ty: CommandType, key: Option<&str>) -> NewCommand {
    let id = CommandId::new();
    NewCommand {
        id,
        agent_id: agent,
        command_type: ty,
        params: json!({}),
        idempotency_key: key.map(str::to_string),
        created_by: "test".into(),
        deadline_at: now_ms() + 60_000,
        attempt: 1,
        root_id: id,
        retry_of: None,
        signature: Some(format!("test:{id}")),
    }
}

async fn template(db: &Db) -> crate::model::TemplateId {
    db.insert_template(
        &TemplateFields {
            name: "t".into(),
            description: None,
            memory: 1024,
            cores: 1,
            proxmox_template_id: Some(9000),
            proxmox_node: None,
            network_bridge: None,
            pre_provision_commands: vec![],
            post_provision_commands: vec![],
            clone_defaults: None,
        },
        false,
    )
    .await
    .unwrap()
}

async fn node(db: &Db) -> NodeId {
    let id = NodeId::new();
    db.insert_node(&NewNode {
        id,
        application: None,
        // Live node names are unique (migration 0008).
        name: format!("n-{id}"),
        template_id: template(db).await,
        memory: 1024,
        cores: 1,
        name_forced: false,
    })
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_batch_with_a_taken_idempotency_key_stores_nothing() {
    let db = db().await;
    let agent = db.create_agent("a", "hash-a", 4).await.unwrap().id;
    let (a, b) = (
        command(agent, CommandType::TerraformApply, Some("k")),
        command(agent, CommandType::TerraformApply, None),
    );
    db.insert_commands(&[&a, &b]).await.unwrap();
    let names: Vec<String> = db
        .get_stages(a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, CommandType::TerraformApply.stages());
    let (c, d) = (
        command(agent, CommandType::Ping, None),
        command(agent, CommandType::Ping, Some("k")),
    );
    assert!(matches!(
        db.insert_commands(&[&c, &d]).await,
        Err(DbError::Conflict(_))
    ));
    assert!(matches!(db.get_command(c.id).await, Err(DbError::NotFound)));
    assert_eq!(
        db.get_command(b.id).await.unwrap().status,
        CommandStatus::Queued
    );
}

#[tokio::test]
async fn a_provision_start_that_cannot_store_its_command_leaves_the_node_untouched() {
    let db = db().await;
    let agent = db.create_agent("a", "hash-a", 4).await.unwrap().id;
    let n = node(&db).await;
    // A command whose idempotency key is taken fails to insert: the claim rolls back.
    let taken = command(agent, CommandType::Ping, Some("taken"));
    db.insert_commands(&[&taken]).await.unwrap();
    let clash = command(agent, CommandType::Provision, Some("taken"));
    let res = db
        .start_provision(&ProvisionStart {
            node: n,
            agent,
            command: &clash,
        })
        .await;
    assert!(matches!(res, Err(DbError::Conflict(_))), "{res:?}");
    let row = db.get_node(n).await.unwrap();
    assert_eq!(row.status, NodeStatus::PendingProvision);
    assert_eq!(row.last_command_id, None);
    // A good one claims the node and links the command in one step; a second is refused.
    let ok = command(agent, CommandType::Provision, None);
    db.start_provision(&ProvisionStart {
        node: n,
        agent,
        command: &ok,
    })
    .await
    .unwrap();
    let row = db.get_node(n).await.unwrap();
    assert_eq!(row.status, NodeStatus::Provisioning);
    assert_eq!(row.last_command_id, Some(ok.id));
    let again = command(agent, CommandType::Provision, None);
    assert!(matches!(
        db.start_provision(&ProvisionStart {
            node: n,
            agent,
            command: &again,
        })
        .await,
        Err(DbError::Conflict(_))
    ));
    assert!(matches!(
        db.get_command(again.id).await,
        Err(DbError::NotFound)
    ));
}

#[tokio::test]
async fn the_repair_sweep_frees_nodes_whose_command_is_absent_or_terminal() {
    let db = db().await;
    let agent = db.create_agent("a", "hash-a", 4).await.unwrap().id;
    // A node left provisioning with no command at all (as an older version could leave it).
    let orphan = node(&db).await;
    sqlx::query("UPDATE nodes SET status = 'provisioning' WHERE id = $1")
        .bind(orphan.to_string())
        .execute(db.writer())
        .await
        .unwrap();
    // A node whose provision command already succeeded, but whose update was lost.
    let done = node(&db).await;
    let c = command(agent, CommandType::Provision, None);
    db.start_provision(&ProvisionStart {
        node: done,
        agent,
        command: &c,
    })
    .await
    .unwrap();
    sqlx::query("UPDATE commands SET status = 'succeeded', result = $1 WHERE id = $2")
        .bind(
            json!({"vm_id": 105, "node": "pve", "ip_address": "10.0.0.9", "name": "n1",
                   "status": "completed", "stages_completed": []})
            .to_string(),
        )
        .bind(c.id.to_string())
        .execute(db.writer())
        .await
        .unwrap();
    // A node whose command is still running is left alone.
    let busy = node(&db).await;
    let c2 = command(agent, CommandType::Provision, None);
    db.start_provision(&ProvisionStart {
        node: busy,
        agent,
        command: &c2,
    })
    .await
    .unwrap();

    let mut repaired = db.repair_stuck_nodes().await.unwrap();
    repaired.sort();
    let mut want = vec![orphan, done];
    want.sort();
    assert_eq!(repaired, want);
    let o = db.get_node(orphan).await.unwrap();
    assert_eq!(o.status, NodeStatus::Failed);
    assert!(o.error.unwrap().starts_with("command_interrupted"));
    let d = db.get_node(done).await.unwrap();
    assert_eq!(d.status, NodeStatus::Running);
    assert_eq!(d.vm_id, Some(105));
    assert_eq!(d.ip_address.as_deref(), Some("10.0.0.9"));
    assert_eq!(
        db.get_node(busy).await.unwrap().status,
        NodeStatus::Provisioning
    );
    assert!(
        db.repair_stuck_nodes().await.unwrap().is_empty(),
        "idempotent"
    );
}

#[tokio::test]
async fn live_node_names_are_unique_unless_forced() {
    let db = db().await;
    let tid = template(&db).await;
    let insert = |name: &'static str, forced: bool| {
        let db = db.clone();
        async move {
            let id = NodeId::new();
            db.insert_node(&NewNode {
                id,
                application: None,
                name: name.into(),
                template_id: tid,
                memory: 1024,
                cores: 1,
                name_forced: forced,
            })
            .await
            .map(|()| id)
        }
    };
    let web = insert("web", false).await.unwrap();
    let res = insert("WEB", false).await;
    assert!(matches!(res, Err(DbError::NameTaken(_))), "{res:?}");
    let forced = insert("Web", true).await.unwrap();
    let other = insert("db", false).await.unwrap();
    let rename = |name: &str| NodeUpdate {
        name: name.into(),
        template_id: Some(tid),
        memory: 1024,
        cores: 1,
        application: None,
        status: NodeStatus::PendingProvision,
    };
    let res = db.update_node(other, &rename("wEb")).await;
    assert!(matches!(res, Err(DbError::NameTaken(_))), "{res:?}");
    // Another case of its own name keeps a forced node forced; a new name must be free.
    db.update_node(forced, &rename("WEB")).await.unwrap();
    db.update_node(forced, &rename("app")).await.unwrap();
    let res = insert("app", false).await;
    assert!(matches!(res, Err(DbError::NameTaken(_))), "{res:?}");
    // A destroyed node does not hold its name.
    sqlx::query("UPDATE nodes SET status = 'destroyed' WHERE id = $1")
        .bind(web.to_string())
        .execute(db.writer())
        .await
        .unwrap();
    insert("web", false).await.unwrap();
}
