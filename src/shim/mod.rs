//! `sandboxd shim` (installed on a node as `containerd-shim-sandboxd-v2`): containerd's
//! runtime v2 shim for the `kata-remote` runtime handler, playing the kata shim's role for a
//! remote hypervisor with nothing but sandboxd.
//!
//! One shim process serves a whole pod: containerd starts it for the sandbox (pause)
//! container and every app container of the pod is created through the same process (the
//! containers are grouped by `io.kubernetes.cri.sandbox-id`, as kata groups them). Towards
//! containerd it serves the task API (`containerd.task.v2.Task` and `v3`) on a unix socket
//! and publishes task events on containerd's ttrpc events service; towards the node's CAA
//! it calls the remote hypervisor API as kata's `remote.go` does; towards the pod VM it
//! calls the kata agent API (through the agent socket CAA returns) as kata's shim does for
//! a remote hypervisor: guest pull, files copied with `CopyFile` (and again when they
//! change), stdio through `ReadStdout`/`WriteStdin`.
//!
//! - [`boot`]: the command line containerd uses (`start`, `delete`, the daemon), the socket
//!   address.
//! - [`config`]: the kata configuration the runtime handler names (`ConfigPath`).
//! - [`spec`]: containerd's OCI spec (JSON) as the agent's protobuf spec.
//! - [`share`]: the container's bind mounts copied into the VM, watched, re-sent.
//! - [`vm`]: the hypervisor and agent clients.
//! - [`pod`]: the pod, its containers and processes; every task method's `do_*`.
//! - [`task`]: the ttrpc task service, each method delegating to one `do_*`.
//! - [`stdio`]: containerd's FIFOs to and from the agent's streams.
//! - [`events`]: task events published to containerd.

pub(crate) mod boot;
pub(crate) mod config;
pub(crate) mod events;
pub(crate) mod pod;
pub(crate) mod share;
pub(crate) mod spec;
pub(crate) mod stdio;
pub(crate) mod task;
pub(crate) mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

/// The name containerd runs the shim as (`runtime_type` `io.containerd.sandboxd.v2`, or a
/// `runtime_path` to this file).
pub const BINARY_NAME: &str = "containerd-shim-sandboxd-v2";

/// Errors of the shim; each maps to one ttrpc code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// containerd sent something the shim cannot use (a missing field, a bad spec).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call comes in the wrong state (no sandbox yet, a process not started, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A task method this shim does not implement (pause, checkpoint).
    #[error("{0} is not supported by sandboxd shim")]
    Unimplemented(&'static str),
    /// A call to CAA's hypervisor API failed.
    #[error("CAA {call} ({socket}): {detail}")]
    Hypervisor {
        /// The method.
        call: &'static str,
        /// CAA's socket.
        socket: String,
        /// What went wrong.
        detail: String,
    },
    /// A call to the agent in the pod VM failed.
    #[error("agent {call}: {detail}")]
    Agent {
        /// The method.
        call: &'static str,
        /// What went wrong.
        detail: String,
        /// The agent's status code, when it answered one.
        code: Option<ttrpc::Code>,
    },
    /// The kata configuration could not be read.
    #[error("kata configuration {path}: {detail}")]
    Config {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A file or system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl Error {
    /// The ttrpc status code containerd sees for this error: the one mapping of the shim.
    /// containerd turns NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION and UNIMPLEMENTED
    /// into its own error kinds (errdefs), so they must be these codes.
    pub(crate) fn code(&self) -> ttrpc::Code {
        match self {
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Agent {
                code: Some(ttrpc::Code::NOT_FOUND),
                ..
            } => ttrpc::Code::NOT_FOUND,
            Error::Hypervisor { .. } | Error::Agent { .. } => ttrpc::Code::UNAVAILABLE,
            Error::Config { .. } | Error::Io { .. } => ttrpc::Code::INTERNAL,
        }
    }

    /// The ttrpc error answered for this error.
    pub(crate) fn to_ttrpc(&self) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(self.code(), self.to_string()))
    }
}

/// An [`Error::Io`] for `what`.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// `sandboxd shim ARGS...`: containerd's shim command line (Go flag syntax, see
/// [`boot::Flags`]).
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// containerd's arguments: `-namespace NS -address ADDR -publish-binary PATH -id ID
    /// [-debug] [-bundle DIR] start|delete`, or none of the actions (the daemon).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Whether this process was started under the shim's name (`containerd-shim-*`).
pub fn started_as_shim() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("containerd-shim-"))
}

/// The process entry when started as `containerd-shim-sandboxd-v2`: containerd's flags
/// follow the program name.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    run_args(&args)
}

/// Runs the shim with containerd's arguments (after the program name or `sandboxd shim`).
pub fn run_args(args: &[String]) -> ExitCode {
    let flags = match boot::Flags::parse(args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    boot::run(flags)
}
