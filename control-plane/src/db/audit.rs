//! The audit log: one row per mutating admin request, sign-in and failed authentication.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::sql::json_col;
use super::{Db, DbResult};

#[derive(Debug, Clone, Default)]
pub struct AuditRow {
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub target_name: Option<String>,
    /// `success` or `error`.
    pub outcome: String,
    /// The HTTP status answered.
    pub status: i64,
    pub error_code: Option<String>,
    pub remote_addr: Option<String>,
    pub details: Option<serde_json::Value>,
}

/// Filters of `GET /api/audit`; keyset-paged newest first on `(at, id)`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    /// Prefix of the action (`node.` matches `node.power`).
    pub action_prefix: Option<String>,
    pub target_id: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub before: Option<(i64, Option<String>)>,
    pub limit: i64,
}

const COLS: &str = "id, at, actor, action, target_type, target_id, target_name, outcome, status, \
    error_code, remote_addr, details";

impl AuditRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: r.try_get("id")?,
            at: r.try_get("at")?,
            actor: r.try_get("actor")?,
            action: r.try_get("action")?,
            target_type: r.try_get("target_type")?,
            target_id: r.try_get("target_id")?,
            target_name: r.try_get("target_name")?,
            outcome: r.try_get("outcome")?,
            status: r.try_get("status")?,
            error_code: r.try_get("error_code")?,
            remote_addr: r.try_get("remote_addr")?,
            details: json_col(r, "details")?,
        })
    }
}

/// `LIKE` pattern matching strings that start with `prefix` (`\` escapes `%` and `_`).
fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

impl Db {
    pub async fn insert_audit(&self, a: &AuditRow) -> DbResult<()> {
        let mut conn = self.writer().acquire().await?;
        insert_audit_rows(&mut conn, std::slice::from_ref(a)).await
    }

    /// Stores `rows` in one transaction (one commit, so one fsync, for a whole batch of
    /// concurrent admin requests), in multi-row INSERTs of at most 200 rows. On PostgreSQL
    /// a batch that fits one statement runs it alone (atomic on its own; `BEGIN` and
    /// `COMMIT` would be two more round trips).
    pub async fn insert_audit_batch(&self, rows: &[AuditRow]) -> DbResult<()> {
        if self.backend == super::Backend::Postgres && rows.len() <= AUDIT_ROWS {
            let mut conn = self.writer().acquire().await?;
            return insert_audit_rows(&mut conn, rows).await;
        }
        let mut tx = self.begin_write().await?;
        for chunk in rows.chunks(AUDIT_ROWS) {
            insert_audit_rows(&mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_audit(&self, f: &AuditFilter) -> DbResult<Vec<AuditRow>> {
        let mut sql = format!("SELECT {COLS} FROM audit_log WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if f.actor.is_some() {
            sql += &format!(" AND actor = {}", next());
        }
        if f.action_prefix.is_some() {
            sql += &format!(" AND action LIKE {} ESCAPE '\\'", next());
        }
        if f.target_id.is_some() {
            sql += &format!(" AND target_id = {}", next());
        }
        if f.outcome.is_some() {
            sql += &format!(" AND outcome = {}", next());
        }
        if f.since.is_some() {
            sql += &format!(" AND at >= {}", next());
        }
        if f.until.is_some() {
            sql += &format!(" AND at < {}", next());
        }
        match &f.before {
            Some((_, Some(_))) => {
                let (a, b, c) = (next(), next(), next());
                sql += &format!(" AND (at < {a} OR (at = {b} AND id < {c}))");
            }
            Some((_, None)) => sql += &format!(" AND at < {}", next()),
            None => {}
        }
        sql += &format!(" ORDER BY at DESC, id DESC LIMIT {}", next());
        let mut q = sqlx::query(&sql);
        if let Some(a) = &f.actor {
            q = q.bind(a.clone());
        }
        if let Some(a) = &f.action_prefix {
            q = q.bind(like_prefix(a));
        }
        if let Some(t) = &f.target_id {
            q = q.bind(t.clone());
        }
        if let Some(o) = &f.outcome {
            q = q.bind(o.clone());
        }
        if let Some(s) = f.since {
            q = q.bind(s);
        }
        if let Some(u) = f.until {
            q = q.bind(u);
        }
        match &f.before {
            Some((at, Some(id))) => q = q.bind(*at).bind(*at).bind(id.clone()),
            Some((at, None)) => q = q.bind(*at),
            None => {}
        }
        let rows = q.bind(f.limit).fetch_all(&self.pool).await?;
        rows.iter().map(AuditRow::from_row).collect()
    }
}

/// Audit rows per INSERT.
const AUDIT_ROWS: usize = 200;

/// One multi-row INSERT of `rows` (at most [`AUDIT_ROWS`]).
async fn insert_audit_rows(conn: &mut sqlx::AnyConnection, rows: &[AuditRow]) -> DbResult<()> {
    let sql = super::sql::multi_row_insert(
        &format!("INSERT INTO audit_log ({COLS}) VALUES "),
        12,
        rows.len(),
    );
    let mut q = sqlx::query(&sql);
    for a in rows {
        q = q
            .bind(a.id.clone())
            .bind(a.at)
            .bind(a.actor.clone())
            .bind(a.action.clone())
            .bind(a.target_type.clone())
            .bind(a.target_id.clone())
            .bind(a.target_name.clone())
            .bind(a.outcome.clone())
            .bind(a.status)
            .bind(a.error_code.clone())
            .bind(a.remote_addr.clone())
            .bind(a.details.as_ref().map(|d| d.to_string()));
    }
    q.execute(&mut *conn).await?;
    Ok(())
}
