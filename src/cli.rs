//! The command line: global flags and one subcommand per component.
//!
//! Argument structs are plain data so tests can build them without parsing.

use clap::{Parser, Subcommand};

use crate::telemetry::LogArgs;

/// sandboxd: Kubernetes pods in their own cloud VMs, from one binary.
#[derive(Debug, Parser)]
#[command(name = "sandboxd", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Logging flags, shared by every subcommand.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The components and tools of sandboxd.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: KataConfig, PeerPodConfig and PeerPod controllers.
    Operator(crate::operator::Args),
    /// Run the mutating admission webhook for peer pods.
    Webhook(crate::webhook::Args),
    /// Run the cloud-api-adaptor on a node.
    Caa(crate::caa::Args),
    /// Run the agent-protocol forwarder inside a pod VM.
    Forwarder(crate::forwarder::Args),
    /// Build, publish and delete the pod VM image.
    #[command(subcommand)]
    Image(crate::image::ImageCommand),
    /// The user's command line: install, configure, check and inspect peer pods.
    Ctl(crate::ctl::Args),
    /// Print the version and build target.
    Version,
    /// Developer tools, not part of a deployment (hidden from help).
    #[command(subcommand, hide = true)]
    Dev(DevCommand),
}

/// Developer tools: test peers that demos and `ctl` dry runs start as processes.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Serve the ARM test server (the Azure Resource Manager subset sandboxd uses).
    ArmServer(crate::armtest::Args),
    /// Run a local control plane from the cached test binaries (for `make demo`).
    ControlPlane(crate::devenv::control_plane::Args),
    /// A kubelet stand-in that drives the CAA hypervisor API for bound peer pods (demo only).
    Kubelet(crate::devenv::kubelet::Args),
    /// A kata-agent stand-in on a unix socket: answers health checks, runs no containers.
    Agent(crate::devenv::agent::Args),
}
