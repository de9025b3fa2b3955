//! Replicas on PostgreSQL, at the storage level: seeding when replicas start together, and
//! the dead-replica sweep (only the dead replica's agents go offline; a replica swept
//! while alive finds out when it renews).

use sqlx::Connection;
use trellis::db::{Db, ReplicaRow};

use crate::common::PgDatabase;

fn replica(id: &str) -> ReplicaRow {
    ReplicaRow {
        id: id.into(),
        name: id.into(),
        hostname: "test".into(),
        version: "test".into(),
        started_at: 0,
        heartbeat_at: 0,
        draining: false,
        leader: false,
        agents_online: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_and_seed_once_on_postgres() {
    let pg = PgDatabase::create().await;
    let url = pg.url.clone();
    // Six replicas connect (and migrate) at once, then all seed at once, five rounds:
    // without the seeding lock, READ COMMITTED lets several count zero templates.
    let dbs: Vec<Db> = futures_util::future::join_all((0..6).map(|_| Db::connect(&url)))
        .await
        .into_iter()
        .map(|d| d.expect("connect and migrate"))
        .collect();
    let one = dbs[0].list_templates().await.unwrap().len();
    assert_eq!(one, 0);
    for _ in 0..5 {
        let gate = std::sync::Arc::new(tokio::sync::Barrier::new(dbs.len()));
        let tasks: Vec<_> = dbs
            .iter()
            .map(|d| {
                let (d, gate) = (d.clone(), gate.clone());
                tokio::spawn(async move {
                    gate.wait().await;
                    trellis::domain::templates::seed(&d).await
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
    }
    let templates = dbs[0].list_templates().await.unwrap();
    let mut names: Vec<&str> = templates.iter().map(|t| t.fields.name.as_str()).collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert!(n > 0);
    assert_eq!(names.len(), n, "seeded more than once: {names:?}");
    for d in &dbs {
        d.close().await;
    }
    pg.drop().await;
}

#[tokio::test]
async fn the_sweep_takes_only_a_dead_replicas_agents_offline_and_the_replica_learns_it_on_renewal()
{
    let pg = PgDatabase::create().await;
    let url = pg.url.clone();
    let db = Db::connect(&url).await.unwrap();
    db.register_replica(&replica("alive")).await.unwrap();
    db.register_replica(&replica("stalled")).await.unwrap();
    let on_alive = db.create_agent("a", "hash-a", 1).await.unwrap();
    let on_stalled = db.create_agent("b", "hash-b", 1).await.unwrap();
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    for (agent, replica) in [(on_alive.id, "alive"), (on_stalled.id, "stalled")] {
        sqlx::query("UPDATE agents SET status = 'online', session_replica = $1 WHERE id = $2")
            .bind(replica)
            .bind(agent.to_string())
            .execute(&mut c)
            .await
            .unwrap();
    }
    // Nothing is swept while both leases are fresh.
    assert_eq!(db.sweep_dead_replicas(10_000).await.unwrap(), (0, 0));
    // "stalled" misses its lease (its heartbeat is 60 s old on the database's clock).
    sqlx::query(
        "UPDATE replicas SET heartbeat_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT - 60000 \
         WHERE id = 'stalled'",
    )
    .execute(&mut c)
    .await
    .unwrap();
    assert_eq!(db.sweep_dead_replicas(10_000).await.unwrap(), (1, 1));
    assert_eq!(
        db.get_agent(on_alive.id).await.unwrap().status.as_str(),
        "online"
    );
    assert_eq!(
        db.get_agent(on_stalled.id).await.unwrap().status.as_str(),
        "offline"
    );
    let names: Vec<String> = db
        .list_replicas()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["alive".to_string()]);
    // The stalled replica finds out at its next renewal (and registers again).
    assert!(!db.renew_replica("stalled", false, false).await.unwrap());
    assert!(db.renew_replica("alive", false, true).await.unwrap());
    assert!(db.list_replicas().await.unwrap()[0].leader);
    db.close().await;
    pg.drop().await;
}

/// The heartbeat flush (one statement per 500 agents) on both databases.
#[tokio::test]
async fn heartbeats_of_many_agents_are_stored_in_a_few_statements_on_both_databases() {
    let pg = PgDatabase::create().await;
    let url = pg.url.clone();
    for url in [url.as_str(), "sqlite::memory:"] {
        let db = Db::connect(url).await.unwrap();
        let mut beats = Vec::new();
        for i in 0..1203 {
            let a = db
                .create_agent(&format!("a{i}"), &format!("hash-{i}"), 1)
                .await
                .unwrap();
            beats.push((a.id, 1_000_000 + i as i64));
        }
        db.record_heartbeats(&beats).await.unwrap();
        for (id, ts) in [beats[0], beats[600], beats[1202]] {
            assert_eq!(
                db.get_agent(id).await.unwrap().last_heartbeat,
                Some(ts),
                "{url}"
            );
        }
        db.close().await;
    }
    pg.drop().await;
}
