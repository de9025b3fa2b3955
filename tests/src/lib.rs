//! Test support: process harness for end-to-end tests, and the Proxmox VE API simulator.

pub mod harness;
pub mod pve_sim;
