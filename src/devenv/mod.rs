//! Developer environment for `make demo` (hidden `sandboxd dev ...` subcommands, not part of a
//! deployment): a local control plane from the cached test binaries, and a clearly labelled
//! kubelet stand-in that drives the CAA hypervisor API the way the kata shim does, and a
//! kata-agent stand-in (`dev agent`) for tests and demo images.

pub mod agent;
pub mod control_plane;
pub mod kubelet;
pub mod network;
pub mod node;
pub mod systemd;

/// Errors of the developer environment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A control plane binary is missing.
    #[error("control plane binaries not found ({0}); run `make control-plane` first")]
    Binaries(String),
    /// A process could not be started or exited.
    #[error("{name}: {reason}")]
    Process {
        /// Which component.
        name: String,
        /// Why.
        reason: String,
    },
    /// The API server did not become ready.
    #[error("kube-apiserver not ready: {0}")]
    NotReady(String),
    /// File system.
    #[error("{0}")]
    Io(String),
    /// The API server refused.
    #[error("API server: {0}")]
    Kube(#[from] kube::Error),
    /// The hypervisor API failed.
    #[error("{0}")]
    Hypervisor(String),
    /// Certificates.
    #[error("certificates: {0}")]
    Pki(String),
    /// The kata-agent stand-in or a call to it failed.
    #[error("agent: {0}")]
    Agent(String),
}

impl Error {
    /// A short, stable label for metrics.
    #[cfg(test)]
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Binaries(_) => "binaries",
            Error::Process { .. } => "process",
            Error::NotReady(_) => "not_ready",
            Error::Io(_) => "io",
            Error::Kube(_) => "kube",
            Error::Hypervisor(_) => "hypervisor",
            Error::Pki(_) => "pki",
            Error::Agent(_) => "agent",
        }
    }
}

pub(crate) fn io(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{what}: {e}"))
}
