//! `sandboxd agent`: the kata agent API inside the pod VM, started by sandboxd's init.
//!
//! It serves `grpc.AgentService` and `grpc.Health` (ttrpc, the messages of `proto/agent.proto`)
//! on `/run/kata-containers/agent.sock` and runs the pod's containers with youki's
//! `libcontainer` (cgroup v2, no systemd), their images pulled in the VM with `oci-client`.
//! What a peer pod's life calls from the kata shim is answered as kata's agent answers it;
//! every other method answers `Unimplemented` naming the method.
//!
//! - [`rpc`]: each ttrpc method delegates to one `do_*` of [`sandbox::Agent`]; one error→code
//!   mapping ([`Error::code`]).
//! - [`sandbox`]: the sandbox, its containers and processes, OOM events, metrics.
//! - [`container`]: OCI spec conversion and libcontainer.
//! - [`process`]: stdio pipes and terminals, the exit reaper.
//! - [`files`]: `CopyFile` under the container share directory.
//! - [`storage`]: `image_guest_pull`, `local`, `ephemeral` storages.
//! - [`seccomp`]: the spec's seccomp profile compiled to BPF.
//! - [`pause`]: the sandbox's pause process, built into sandboxd.

pub(crate) mod container;
pub(crate) mod files;
pub(crate) mod image;
pub mod pause;
pub(crate) mod process;
pub(crate) mod rpc;
pub(crate) mod sandbox;
pub(crate) mod seccomp;
pub(crate) mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub(crate) use sandbox::Agent;

/// kata-agent's socket in the VM.
pub const SOCKET: &str = "/run/kata-containers/agent.sock";
/// kata's base directory of container bundles in the VM.
pub(crate) const CONTAINER_BASE: &str = "/run/kata-containers";
/// Where the shim's files land (`CopyFile`), under [`CONTAINER_BASE`].
pub(crate) const SHARE_DIR: &str = "/run/kata-containers/shared/containers";
/// Registry credentials CAA writes into the VM (a container `auth.json`).
pub(crate) const AUTH_FILE: &str = crate::forwarder::config::AUTH_PATH;
/// The image store inside the VM (a tmpfs sized from the VM's memory; never the initramfs).
pub(crate) const IMAGE_STORE: &str = "/run/sandboxd/images";
/// libcontainer's state directory.
pub(crate) const STATE_DIR: &str = "/run/sandboxd/containers";

/// Errors of the agent; each maps to one ttrpc code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (a missing field, a path outside the share directory, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container, process or sandbox.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call comes in the wrong state (no sandbox yet, container not created, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A method sandboxd's agent does not implement.
    #[error("{0} is not implemented by sandboxd agent")]
    Unimplemented(&'static str),
    /// An image could not be pulled (bad reference, missing tag, auth, digest).
    #[error("pulling image {image}: {detail}")]
    Image {
        /// The image reference.
        image: String,
        /// What went wrong.
        detail: String,
    },
    /// A container operation failed.
    #[error("container {id}: {detail}")]
    Container {
        /// The container.
        id: String,
        /// What went wrong.
        detail: String,
    },
    /// A file system or system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Serving the socket failed.
    #[error("serving {socket}: {detail}")]
    Serve {
        /// The socket.
        socket: String,
        /// The error.
        detail: String,
    },
}

impl Error {
    /// The ttrpc status code of this error: the one mapping of the agent.
    pub(crate) fn code(&self) -> ttrpc::Code {
        match self {
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Image { .. } | Error::Container { .. } | Error::Io { .. } => {
                ttrpc::Code::INTERNAL
            }
            Error::Serve { .. } => ttrpc::Code::UNAVAILABLE,
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

/// An [`Error::Io`] for `what` from a nix error.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |e| Error::Io {
        what,
        source: std::io::Error::from(e),
    }
}

/// Where the agent keeps its things; the defaults are the pod VM's paths, tests point them
/// into a scratch directory.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    /// Container bundles (`<base>/<cid>/rootfs`, `config.json`), kata's `/run/kata-containers`.
    pub base: PathBuf,
    /// `CopyFile` destinations, kata's `/run/kata-containers/shared/containers`.
    pub share: PathBuf,
    /// libcontainer's state.
    pub state: PathBuf,
    /// Image layers and unpacked images.
    pub images: PathBuf,
    /// Registry credentials (`auth.json`); absent = anonymous pulls.
    pub auth: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            base: CONTAINER_BASE.into(),
            share: SHARE_DIR.into(),
            state: STATE_DIR.into(),
            images: IMAGE_STORE.into(),
            auth: AUTH_FILE.into(),
        }
    }
}

impl Paths {
    /// Every path under `root` (for tests and runs outside a VM).
    pub(crate) fn under(root: &Path) -> Self {
        Self {
            base: root.join("kata"),
            share: root.join("kata/shared/containers"),
            state: root.join("state"),
            images: root.join("images"),
            auth: root.join("auth.json"),
        }
    }
}

/// Flags of `sandboxd agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The unix socket to serve ttrpc on.
    #[arg(long, default_value = SOCKET)]
    pub socket: PathBuf,
    /// Put every directory of the agent under this one instead of the VM's paths (the
    /// container share directory becomes `<root>/kata/shared/containers`).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Registry credentials (`{"auths": {"host": {"auth": base64(user:password)}}}`).
    #[arg(long)]
    pub auth_file: Option<PathBuf>,
    /// Image registries to reach over plain HTTP (`host:port`; repeatable). For registries
    /// on a test network.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
}

/// Starts serving on `socket` with `agent`; the returned server stops when dropped or shut
/// down.
pub(crate) async fn serve(
    socket: &Path,
    agent: Arc<Agent>,
) -> Result<ttrpc::r#async::Server, Error> {
    let serve_err = |e: ttrpc::Error| Error::Serve {
        socket: socket.display().to_string(),
        detail: e.to_string(),
    };
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let _ = std::fs::remove_file(socket);
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .map_err(serve_err)?
        .register_service(rpc::services(agent));
    server.start().await.map_err(serve_err)?;
    Ok(server)
}

/// Runs the agent until `shutdown`: serves the socket, reaps processes, and on shutdown
/// stops every container.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), Error> {
    let mut paths = args.root.as_deref().map(Paths::under).unwrap_or_default();
    if let Some(a) = &args.auth_file {
        paths.auth = a.clone();
    }
    process::become_subreaper()?;
    let agent = Agent::new(paths, args.insecure_registries.clone())?;
    let reaper = tokio::spawn(process::reap(agent.exits()));
    let mut server = serve(&args.socket, agent.clone()).await?;
    tracing::info!(socket = %args.socket.display(), "kata agent API serving");
    shutdown.cancelled().await;
    let _ = server.shutdown().await;
    agent.shutdown().await;
    reaper.abort();
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}
