//! The replicas of the control plane (several `trellis serve` on one PostgreSQL).

use axum::extract::State;

use super::types::{Replica, ReplicaList};
use super::{ApiResult, AppState, Json};
use crate::time::rfc3339;

/// The running replicas: which holds how many agent sessions, which is the housekeeping
/// leader, which are draining. SQLite has one.
#[utoipa::path(get, path = "/api/cluster/replicas", tag = "cluster",
    responses((status = 200, body = ReplicaList)))]
pub async fn replicas(State(s): State<AppState>) -> ApiResult<Json<ReplicaList>> {
    let me = &s.broker.replica.id;
    let items =
        s.db.list_replicas()
            .await?
            .into_iter()
            .map(|r| Replica {
                this: &r.id == me,
                id: r.id,
                name: r.name,
                hostname: r.hostname,
                version: r.version,
                started_at: rfc3339(r.started_at),
                heartbeat_at: rfc3339(r.heartbeat_at),
                draining: r.draining,
                leader: r.leader,
                agents_online: r.agents_online,
            })
            .collect();
    Ok(Json(ReplicaList { items }))
}
