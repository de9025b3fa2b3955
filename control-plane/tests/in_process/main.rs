//! In-process tests of the control plane: the real router, domain, broker and database
//! (SQLite in memory), driven through `Router::oneshot` and agent sessions over channels.
//! No process is spawned and no port is opened, so they run in milliseconds.

mod api;
mod common;
mod destroy_plans;
mod lifecycle;
mod openapi;
mod pins;
mod proptest_query;
mod replicas;
mod session;
mod storage;
mod targets;
