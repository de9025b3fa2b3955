//! Test support: the process harness for end-to-end tests, one copy of each test helper,
//! and the Proxmox VE API simulator.
//!
//! * [`harness`]: the real `trellis` and `tendril` binaries, and an admin API client
//! * [`tempdir`], [`db`]: scratch directories and databases that remove themselves
//! * [`pg_instance`]: a private PostgreSQL server, for tests that stop or restart it
//! * [`sse`]: a command's server-sent event stream
//! * [`raw_agent`]: the agent protocol spoken by hand
//! * [`recorder`]: an executor driven directly, its reports recorded
//! * [`git`], [`terraform`]: template repositories and Terraform
//! * [`pve_sim`]: the Proxmox VE API simulator
//! * [`cluster`]: several replicas on one PostgreSQL behind HAProxy

pub mod cluster;
pub mod db;
pub mod git;
pub mod harness;
pub mod pg_instance;
pub mod pve_sim;
pub mod raw_agent;
pub mod recorder;
pub mod sse;
pub mod tempdir;
pub mod terraform;
