//! sandboxd runs Kubernetes pods in their own cloud VMs ("peer pods") from one binary.
//!
//! The library holds every component; `src/main.rs` only parses the command line and
//! dispatches. Modules that describe data or wire formats import nothing else of the crate.

pub mod agent;
pub mod api;
pub mod armtest;
pub mod caa;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod ctl;
pub mod devenv;
pub mod forwarder;
pub mod image;
pub mod k8s;
pub mod operator;
pub mod pki;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;

#[cfg(test)]
mod module_rules;

/// The version reported by every component (`sandboxd version`, `/metrics` build info).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
