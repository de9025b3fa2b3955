//! Test databases: a SQLite file in the test's directory, or a PostgreSQL database of
//! its own on `TRELLIS_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`,
//! trust auth), dropped again when the test is done.

use std::path::Path;

use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The base URL of the PostgreSQL server tests create databases on.
pub fn postgres_base() -> String {
    std::env::var("TRELLIS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// One test's database. The SQLite file lives in the test's directory (removed with
/// it); a PostgreSQL database is dropped (`WITH (FORCE)`, so connections still open do
/// not keep it) when this is dropped. A control plane started on it owns it (see
/// [`crate::harness::ControlPlane::start`]), so it outlives restarts within one test.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    /// The PostgreSQL database to drop.
    pg_name: Option<String>,
}

impl TestDb {
    /// A new SQLite file (`trellis.db` in `dir`) or a new PostgreSQL database.
    pub async fn create(backend: Backend, dir: &Path) -> Self {
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.join("trellis.db").display()),
                pg_name: None,
            },
            Backend::Postgres => {
                let name = format!("trellis_t_{}", uuid::Uuid::new_v4().simple());
                let mut conn = admin_connection().await;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                Self {
                    url: format!("{}/{name}", postgres_base()),
                    pg_name: Some(name),
                }
            }
        }
    }

    /// A database someone else owns (a [`crate::pg_instance::PgInstance`]'s, say):
    /// nothing is dropped with this.
    pub fn existing(url: &str) -> Self {
        Self {
            url: url.to_string(),
            pg_name: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

async fn admin_connection() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&format!("{}/postgres", postgres_base()))
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 must be reachable for the PostgreSQL tests")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop may run inside a runtime (where blocking on async is not allowed) or
        // outside one: a thread of its own with its own runtime works in both cases.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut conn = admin_connection().await;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("drop test database {name}: {e}"))
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("{e}"),
            Err(_) => eprintln!("dropping the test database panicked"),
        }
    }
}
