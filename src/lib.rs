//! sandboxd runs Kubernetes pods in their own cloud VMs ("peer pods") from one binary.
//!
//! The library holds every component; `src/main.rs` only parses the command line and
//! dispatches. Modules that describe data or wire formats import nothing else of the crate.
//!
//! The `dev` cargo feature adds what only tests, benchmarks and demos run: the ARM test
//! server ([`armtest`]), the development environment (`devenv`: control plane, real node,
//! kubelet and agent stand-ins), the local cloud provider (pod VMs as processes on the node)
//! and CAA's crash points. `make build` and `make image` leave it out, so the shipped
//! binary has no `dev` subcommand and honours none of those hooks.

pub mod agent;
pub mod api;
#[cfg(feature = "dev")]
pub mod armtest;
pub mod caa;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod ctl;
#[cfg(feature = "dev")]
pub mod devenv;
pub mod forwarder;
pub mod image;
pub mod k8s;
pub mod operator;
pub mod pki;
pub mod protocol;
pub mod shim;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;

#[cfg(test)]
mod module_rules;

/// The version reported by every component (`sandboxd version`, `/metrics` build info).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
