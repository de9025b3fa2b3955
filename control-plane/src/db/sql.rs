//! The workarounds that one set of run-time queries over sqlx's `Any` driver needs on both
//! SQLite and PostgreSQL, in one place: ids and JSON stored as TEXT, a NULL `f64` that must
//! not be bound, NUL bytes PostgreSQL TEXT refuses, unique-violation codes of both
//! backends, and multi-row `INSERT` statements with numbered placeholders.

use std::str::FromStr;

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{DbError, DbResult};
use crate::model::CommandStatus;

/// `('succeeded','failed','cancelled','timed_out')`, for `status NOT IN …`.
pub(super) const TERMINAL_SQL: &str = "('succeeded','failed','cancelled','timed_out')";

/// "No percent". Bound instead of a NULL: sqlx 0.8's `Any` driver binds a NULL `f64` as
/// PostgreSQL `float4`, and a statement first prepared that way then rejects every real
/// `f64` ("incorrect binary data format").
pub(super) const NO_PERCENT: f64 = -1.0;

/// Whether an error is a unique-constraint violation (PostgreSQL 23505, SQLite 2067/1555).
pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code()
                .is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
                || d.message().contains("UNIQUE constraint failed")
        }
        _ => false,
    }
}

/// Whether a failed statement was refused because of the data it carried (a value the
/// database cannot hold, a constraint, a trigger), not because storage is in trouble
/// (unreachable, busy, full). Only such failures are worth retrying without the offending
/// part: PostgreSQL classes 22 (data exception), 23 (integrity), 54 (program limit) and
/// P0001 (raised by a trigger); SQLite's primary codes 18 (too big), 19 (constraint,
/// trigger), 20 (mismatch) and 25 (range).
pub fn is_data_error(e: &DbError) -> bool {
    let DbError::Sqlx(sqlx::Error::Database(d)) = e else {
        return false;
    };
    let Some(code) = d.code() else { return false };
    // PostgreSQL's SQLSTATE has five characters; SQLite's (extended) codes are numbers
    // below 10 000 that keep the primary code in the low byte.
    if code.len() != 5 {
        return code
            .parse::<u32>()
            .is_ok_and(|n| matches!(n & 0xff, 18 | 19 | 20 | 25));
    }
    code.starts_with("22") || code.starts_with("23") || code.starts_with("54") || code == "P0001"
}

/// Storage trouble that is not about one request's data: the API answers it with 503/507
/// and a message that says so, rather than a bare 500 (see `AppError`'s `From<DbError>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageTrouble {
    /// The database cannot grow: SQLite `SQLITE_FULL` (13: the disk, or the
    /// `max_page_count` limit), PostgreSQL `53100` (disk full).
    Full,
    /// The database cannot be reached or is going away: the pool timed out or was
    /// closed, the connection broke (I/O, TLS, protocol), PostgreSQL classes 08
    /// (connection exception), 57P01–57P03 (shutting down, cannot connect now) and 53
    /// (out of resources); SQLite `BUSY`/`LOCKED`/`IOERR`/`CANTOPEN`.
    Unavailable,
}

/// What kind of storage trouble an error is, if any (see [`StorageTrouble`]).
pub fn storage_trouble(e: &DbError) -> Option<StorageTrouble> {
    match e {
        DbError::Full(_) => Some(StorageTrouble::Full),
        DbError::Unavailable(_) => Some(StorageTrouble::Unavailable),
        DbError::Sqlx(e) => match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Some(StorageTrouble::Unavailable),
            sqlx::Error::Database(d) => {
                let code = d.code()?;
                if code.len() != 5 {
                    // SQLite: the primary code is the low byte of the extended one.
                    return match code.parse::<u32>().ok()? & 0xff {
                        13 => Some(StorageTrouble::Full),
                        5 | 6 | 10 | 14 => Some(StorageTrouble::Unavailable),
                        _ => None,
                    };
                }
                if code == "53100" {
                    Some(StorageTrouble::Full)
                } else if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P")
                {
                    Some(StorageTrouble::Unavailable)
                } else {
                    None
                }
            }
            _ => None,
        },
        _ => None,
    }
}

/// A TEXT id column as a typed id.
pub(super) fn id<T: From<Uuid>>(row: &AnyRow, col: &str) -> DbResult<T> {
    let s: String = row.try_get(col)?;
    Uuid::from_str(&s)
        .map(T::from)
        .map_err(|e| DbError::Corrupt(format!("{col}: {e}")))
}

pub(super) fn opt_id<T: From<Uuid>>(row: &AnyRow, col: &str) -> DbResult<Option<T>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| {
        Uuid::from_str(&s)
            .map(T::from)
            .map_err(|e| DbError::Corrupt(format!("{col}: {e}")))
    })
    .transpose()
}

/// A TEXT JSON column.
pub(super) fn json_col(row: &AnyRow, col: &str) -> DbResult<Option<serde_json::Value>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| DbError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

/// A TEXT column holding a JSON list of strings (missing or malformed: empty).
pub(super) fn string_list(row: &AnyRow, col: &str) -> DbResult<Vec<String>> {
    let s: Option<String> = row.try_get(col)?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default())
}

/// A command status column.
pub(super) fn command_status(row: &AnyRow, col: &str) -> DbResult<CommandStatus> {
    let s: String = row.try_get(col)?;
    CommandStatus::parse(&s).ok_or_else(|| DbError::Corrupt(format!("{col}: status {s:?}")))
}

/// A 0/1 INTEGER column as a bool.
pub(super) fn flag(row: &AnyRow, col: &str) -> DbResult<bool> {
    Ok(row.try_get::<i64, _>(col)? != 0)
}

/// PostgreSQL TEXT cannot hold NUL; program output sometimes does.
pub(super) fn no_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// `$1, $2, …, $n`: the placeholders of an `IN (…)` list of `n` values.
pub(super) fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `n` rounded up to a power of two: the row count a set-based statement is sent with
/// (its list repeated to that length). A statement's text depends on its row count, and
/// PostgreSQL parses and plans every new text again (and sqlx caches 100 per connection):
/// a handful of sizes instead of every count from 1 to a few hundred keeps them prepared,
/// and lets PostgreSQL switch to its generic plan.
pub(super) fn padded(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `items` followed by repeats of its first element up to [`padded`] length. Only for
/// keys of a `SELECT … IN (…)` or rows of an `UPDATE … FROM (VALUES …)` joined on a key,
/// where a repeat changes nothing (a target row is updated once and returned once).
pub(super) fn padded_rows<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let extra = padded(items.len()) - items.len();
    items
        .iter()
        .chain(items.first().into_iter().cycle().take(extra))
}

/// The rows of `sql`, whose `{keys}` stands for an `IN` list of `keys` (padded: see
/// [`padded`]), each bound as text.
pub(super) async fn fetch_by_keys<T: ToString>(
    pool: &sqlx::AnyPool,
    sql: &str,
    keys: &[T],
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let sql = sql.replace("{keys}", &placeholders(padded(keys.len())));
    let mut q = sqlx::query(&sql);
    for k in padded_rows(keys) {
        q = q.bind(k.to_string());
    }
    q.fetch_all(pool).await
}

/// `INSERT … VALUES ($1,…,$cols),(…)` for `rows` rows.
pub fn multi_row_insert(head: &str, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(head.len() + rows * cols * 5);
    sql.push_str(head);
    push_rows(&mut sql, 0, cols, rows);
    sql
}

/// `(${after+1},…),(…)`: `rows` rows of `cols` placeholders numbered from `after + 1`,
/// row by row — the `VALUES` of a set-based statement (`WITH v(…) AS (VALUES …) UPDATE …
/// FROM v`, which both backends run) whose first `after` parameters are shared.
pub(super) fn values_rows(after: usize, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(rows * cols * 5);
    push_rows(&mut sql, after, cols, rows);
    sql
}

fn push_rows(sql: &mut String, after: usize, cols: usize, rows: usize) {
    use std::fmt::Write;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ",(" });
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            let _ = write!(sql, "${}", after + r * cols + c + 1);
        }
        sql.push(')');
    }
}

pub(super) fn error_json(e: &trellis_protocol::CommandError) -> String {
    serde_json::to_string(e).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_insert_numbers_placeholders_row_by_row() {
        assert_eq!(
            multi_row_insert("INSERT INTO t (a, b) VALUES ", 2, 3),
            "INSERT INTO t (a, b) VALUES ($1,$2),($3,$4),($5,$6)"
        );
    }

    #[test]
    fn padded_lists_repeat_the_first_item_up_to_a_power_of_two() {
        assert_eq!(padded(0), 1);
        assert_eq!(padded(1), 1);
        assert_eq!(padded(3), 4);
        assert_eq!(padded(64), 64);
        assert_eq!(padded(65), 128);
        let v: Vec<i32> = padded_rows(&[7, 8, 9]).copied().collect();
        assert_eq!(v, [7, 8, 9, 7]);
        assert_eq!(padded_rows::<i32>(&[]).count(), 0);
    }

    #[test]
    fn values_rows_number_after_the_shared_parameters() {
        assert_eq!(values_rows(1, 2, 2), "($2,$3),($4,$5)");
        assert_eq!(values_rows(0, 1, 1), "($1)");
    }

    #[test]
    fn nul_bytes_are_replaced() {
        assert_eq!(no_nul("a\0b"), "a\u{FFFD}b");
        assert_eq!(no_nul("ab"), "ab");
    }
}
