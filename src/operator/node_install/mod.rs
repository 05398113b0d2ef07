//! `sandboxd operator node-install`: the privileged per-node installer. It follows its
//! Node's `node-install` label, edits the host's runtime configuration (under a host root
//! such as `/host`), restarts the runtime through systemd, and reports on its Node.

pub mod containerd;
pub mod crio;
pub mod files;
pub mod kata_config;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::files::{
    host_path, read_opt, remove_empty_dirs, remove_owned, write_atomic, write_owned,
};
use self::systemd::ServiceManager;
use crate::api::names::*;
use crate::k8s::apply;

/// Where the installer keeps what it needs to undo its work exactly.
pub(crate) const STATE_FILE: &str = "/etc/sandboxd/node-install.state";
/// How long a failed install or uninstall waits before it is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// Errors of the node installer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KataConfig asks for kata's shim and the node has none.
    #[error(
        "kata shim containerd-shim-kata-v2 not found in /opt/kata/bin, /usr/local/bin or /usr/bin: \
         install Kata Containers (kata-deploy or the distribution package) first, or set the \
         KataConfig's spec.shim to `sandboxd` (or `auto`)"
    )]
    ShimMissing,
    /// The node runs a container runtime the installer does not configure.
    #[error("unsupported container runtime {0:?} (containerd and CRI-O are supported)")]
    UnsupportedRuntime(String),
    /// A host file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A host config file is not valid TOML.
    #[error("parsing {path}: {reason}")]
    Parse {
        /// The file (host path).
        path: String,
        /// Why.
        reason: String,
    },
    /// A file at a path sandboxd writes exists and was not written by sandboxd.
    #[error("{0} exists and is not managed by sandboxd; refusing to overwrite it")]
    NotOurs(PathBuf),
    /// systemd refused or could not be reached.
    #[error("restarting {unit} through systemd: {reason}")]
    Systemd {
        /// The unit.
        unit: String,
        /// Why.
        reason: String,
    },
    /// Reporting to the API server failed.
    #[error(transparent)]
    Report(Box<apply::Error>),
    /// Watching the Node failed.
    #[error("watching node {node}: {reason}")]
    Watch {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
}

impl From<apply::Error> for Error {
    fn from(e: apply::Error) -> Self {
        Error::Report(Box::new(e))
    }
}

impl Error {
    /// A short, stable label for metrics.
    #[cfg(test)]
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::ShimMissing => "shim_missing",
            Error::UnsupportedRuntime(_) => "unsupported_runtime",
            Error::Io { .. } => "io",
            Error::Parse { .. } => "parse",
            Error::NotOurs(_) => "not_ours",
            Error::Systemd { .. } => "systemd",
            Error::Report(_) => "report",
            Error::Watch { .. } => "watch",
        }
    }
}

/// Which containerd shim serves `kata-remote` on a node (the KataConfig's `spec.shim`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ShimChoice {
    /// kata's shim where the node has one (OpenShift, kata-deploy), else sandboxd's.
    #[default]
    Auto,
    /// kata's shim; a node without it fails to install with the reason.
    Kata,
    /// sandboxd's shim (`containerd-shim-sandboxd-v2`), copied onto the node.
    Sandboxd,
}

impl ShimChoice {
    /// From the KataConfig's `spec.shim` (an unknown value is `auto`; the CRD's enum
    /// rejects it first).
    pub(crate) fn from_spec(s: &str) -> Self {
        match s {
            "kata" => ShimChoice::Kata,
            "sandboxd" => ShimChoice::Sandboxd,
            _ => ShimChoice::Auto,
        }
    }

    /// As `spec.shim` and `KATA_SHIM` spell it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ShimChoice::Auto => "auto",
            ShimChoice::Kata => "kata",
            ShimChoice::Sandboxd => "sandboxd",
        }
    }
}

/// Everything that decides what the installer writes. Its hash is reported in
/// [`ANN_CONFIG`], so the operator knows when a node runs an older configuration.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct InstallConfig {
    /// Format of this structure (bump when the written files change).
    pub(crate) format: u32,
    /// The KataConfig's `logLevel`.
    pub(crate) log_level: String,
    /// The runtime handler.
    pub(crate) runtime_class: String,
    /// The remote hypervisor socket.
    pub(crate) hypervisor_socket: String,
    /// Which shim serves the handler.
    pub(crate) shim: ShimChoice,
    /// The binary copied as sandboxd's shim (default: this running executable).
    #[serde(skip)]
    pub(crate) shim_source: Option<PathBuf>,
}

impl InstallConfig {
    /// The configuration for a `logLevel`.
    pub fn new(log_level: &str) -> Self {
        Self {
            // 2: the remote configuration as upstream's, guest pull, the shim's name form.
            format: 2,
            log_level: log_level.to_string(),
            runtime_class: RUNTIME_CLASS.to_string(),
            hypervisor_socket: HYPERVISOR_SOCKET.to_string(),
            shim: ShimChoice::Auto,
            shim_source: None,
        }
    }

    /// The same with another shim choice.
    pub(crate) fn with_shim(mut self, shim: ShimChoice) -> Self {
        self.shim = shim;
        self
    }

    /// The content hash reported in [`ANN_CONFIG`].
    pub fn hash(&self) -> String {
        apply::content_hash(self)
    }
}

/// The container runtime of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Runtime {
    /// containerd, with the kubelet-reported version (`containerd://2.0.0`).
    Containerd(String),
    /// CRI-O.
    Crio,
}

impl Runtime {
    /// From the Node's `status.nodeInfo.containerRuntimeVersion`.
    pub(crate) fn from_node_info(version: &str) -> Result<Self, Error> {
        if version.starts_with("containerd://") {
            Ok(Runtime::Containerd(version.to_string()))
        } else if version.starts_with("cri-o://") {
            Ok(Runtime::Crio)
        } else {
            Err(Error::UnsupportedRuntime(version.to_string()))
        }
    }

    fn unit(&self) -> &'static str {
        match self {
            Runtime::Containerd(_) => containerd::UNIT,
            Runtime::Crio => crio::UNIT,
        }
    }
}

/// What the installer remembers between install and uninstall.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct State {
    /// Directories it created (host paths, outermost first).
    created_dirs: Vec<String>,
    /// The main containerd config before (None: it did not exist) and after the edit.
    containerd_main: Option<(Option<String>, String)>,
    /// The shim link sandboxd made ([`containerd::SHIM_LINK`]) and its target.
    #[serde(default)]
    shim_link: Option<String>,
    /// sandboxd's shim was copied to [`kata_config::SANDBOXD_SHIM`].
    #[serde(default)]
    sandboxd_shim: bool,
}

fn load_state(root: &Path) -> Result<State, Error> {
    let path = host_path(root, STATE_FILE);
    Ok(read_opt(&path)?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default())
}

fn rel(root: &Path, p: &Path) -> String {
    format!("/{}", p.strip_prefix(root).unwrap_or(p).display())
}

/// Configures the runtime under `root`. Idempotent: a second run changes nothing and
/// restarts nothing. Returns whether anything changed.
///
/// The runtime is restarted only when its own configuration changed (the drop-in, the
/// import in its main file, the shim's name link): a new shim binary or kata configuration
/// (an upgrade) is read by the next shim containerd starts, and a restart would end every
/// `kubectl exec`, `attach` and `port-forward` session open on the node.
pub(crate) async fn install(
    root: &Path,
    runtime: &Runtime,
    cfg: &InstallConfig,
    services: &impl ServiceManager,
) -> Result<bool, Error> {
    let kata = kata_config::find_shim(root);
    let shim = match (cfg.shim, kata, runtime) {
        (ShimChoice::Kata | ShimChoice::Auto, Some(k), _) => k,
        // sandboxd's shim serves containerd's CRI (its annotations, its FIFOs).
        (ShimChoice::Sandboxd, _, Runtime::Crio) => {
            return Err(Error::UnsupportedRuntime(
                "cri-o with sandboxd's shim (it serves containerd; use kata's shim)".into(),
            ));
        }
        (ShimChoice::Kata, None, _) | (ShimChoice::Auto, None, Runtime::Crio) => {
            return Err(Error::ShimMissing);
        }
        (ShimChoice::Sandboxd, _, _) | (ShimChoice::Auto, None, _) => kata_config::SANDBOXD_SHIM,
    };
    let mut state = load_state(root)?;
    let mut created: Vec<PathBuf> = Vec::new();
    let mut changed = false;
    let mut restart = false;
    if shim == kata_config::SANDBOXD_SHIM {
        let src = match &cfg.shim_source {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|source| Error::Io {
                path: "/proc/self/exe".into(),
                source,
            })?,
        };
        let (c, dirs) = files::copy_executable(&src, &host_path(root, shim))?;
        changed |= c;
        created.extend(dirs);
        state.sandboxd_shim = true;
    } else if state.sandboxd_shim {
        // The choice moved to kata's shim: sandboxd's copy goes.
        let _ = std::fs::remove_file(host_path(root, kata_config::SANDBOXD_SHIM));
        state.sandboxd_shim = false;
        changed = true;
    }
    let pull = match runtime {
        Runtime::Containerd(_) => kata_config::GuestPull::Kata,
        Runtime::Crio => kata_config::GuestPull::Runtime,
    };
    let (c, dirs) = write_owned(
        &host_path(root, kata_config::KATA_CONFIG),
        &kata_config::render(cfg, pull),
    )?;
    changed |= c;
    created.extend(dirs);
    match runtime {
        Runtime::Containerd(version) => {
            let main_path = host_path(root, containerd::MAIN_CONFIG);
            let main = read_opt(&main_path)?;
            let v = containerd::config_version(main.as_deref(), version)?;
            let (c, dirs) = write_owned(
                &host_path(root, containerd::DROPIN),
                &containerd::dropin(v, shim),
            )?;
            changed |= c;
            restart |= c;
            created.extend(dirs);
            // The name form of the shim, for containerd 1.6 only, which resolves the shim by
            // its runtime_type name on PATH; 1.7 and later run `runtime_path`, and /usr may be
            // read-only on their nodes. A link an earlier install made goes when it is no
            // longer needed (the runtime was upgraded).
            if containerd::needs_shim_link(version) {
                let previous: Vec<&str> = state.shim_link.iter().map(String::as_str).collect();
                match files::link(&host_path(root, containerd::SHIM_LINK), shim, &previous)? {
                    files::Link::Present => {}
                    files::Link::Created(dirs) => {
                        created.extend(dirs);
                        state.shim_link = Some(shim.to_string());
                        changed = true;
                        restart = true;
                    }
                    files::Link::Foreign => {
                        return Err(Error::NotOurs(host_path(root, containerd::SHIM_LINK)));
                    }
                }
            } else if let Some(target) = state.shim_link.take() {
                let c = files::unlink(&host_path(root, containerd::SHIM_LINK), &target)?;
                changed |= c;
                restart |= c;
            }
            let imported = match &main {
                Some(text) => containerd::imports_dropin(text)?,
                None => false,
            };
            if !imported {
                let new = containerd::add_import(main.as_deref(), v)?;
                created.extend(write_atomic(&main_path, &new)?);
                if state.containerd_main.is_none() {
                    state.containerd_main = Some((main.clone(), new.clone()));
                } else if let Some((_, after)) = state.containerd_main.as_mut() {
                    *after = new;
                }
                changed = true;
                restart = true;
            }
        }
        Runtime::Crio => {
            let (c, dirs) = write_owned(&host_path(root, crio::DROPIN), &crio::dropin(shim))?;
            changed |= c;
            restart |= c;
            created.extend(dirs);
        }
    }
    for d in &created {
        let d = rel(root, d);
        if !state.created_dirs.contains(&d) {
            state.created_dirs.push(d);
        }
    }
    let state_path = host_path(root, STATE_FILE);
    let body = serde_json::to_string_pretty(&state).unwrap_or_default();
    if read_opt(&state_path)?.as_deref() != Some(body.as_str()) {
        write_atomic(&state_path, &body)?;
    }
    if restart {
        services.restart(runtime.unit()).await?;
    }
    Ok(changed)
}

/// Undoes [`install`]: removes sandboxd's files, restores the main containerd config
/// (byte for byte when nobody edited it since), removes the directories it created, and
/// restarts the runtime if anything changed. Returns whether anything changed.
pub(crate) async fn uninstall(
    root: &Path,
    runtime: &Runtime,
    services: &impl ServiceManager,
) -> Result<bool, Error> {
    let state = load_state(root)?;
    let mut changed = remove_owned(&host_path(root, kata_config::KATA_CONFIG))?;
    changed |= remove_owned(&host_path(root, containerd::DROPIN))?;
    changed |= remove_owned(&host_path(root, crio::DROPIN))?;
    if let Some(target) = &state.shim_link {
        changed |= files::unlink(&host_path(root, containerd::SHIM_LINK), target)?;
    }
    if state.sandboxd_shim {
        let p = host_path(root, kata_config::SANDBOXD_SHIM);
        match std::fs::remove_file(&p) {
            Ok(()) => changed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Io { path: p, source }),
        }
    }
    let main_path = host_path(root, containerd::MAIN_CONFIG);
    if let Some(current) = read_opt(&main_path)? {
        match &state.containerd_main {
            Some((original, after)) if *after == current => {
                match original {
                    Some(orig) => {
                        write_atomic(&main_path, orig)?;
                    }
                    None => {
                        std::fs::remove_file(&main_path).map_err(|source| Error::Io {
                            path: main_path.clone(),
                            source,
                        })?;
                    }
                }
                changed = true;
            }
            _ => {
                let cleaned = containerd::remove_import(&current)?;
                if cleaned != current {
                    write_atomic(&main_path, &cleaned)?;
                    changed = true;
                }
            }
        }
    }
    let state_path = host_path(root, STATE_FILE);
    if state_path.exists() {
        std::fs::remove_file(&state_path).map_err(|source| Error::Io {
            path: state_path.clone(),
            source,
        })?;
    }
    let dirs: Vec<PathBuf> = state
        .created_dirs
        .iter()
        .map(|d| host_path(root, d))
        .collect();
    remove_empty_dirs(&dirs);
    let _ = std::fs::remove_dir(host_path(root, kata_config::KATA_CONFIG_DIR));
    if changed {
        services.restart(runtime.unit()).await?;
    }
    Ok(changed)
}

/// Flags of `sandboxd operator node-install`.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// The node this installer runs on.
    #[arg(long, env = "NODE_NAME")]
    pub(crate) node_name: String,
    /// Where the host's file system is mounted.
    #[arg(long, env = "SANDBOXD_HOST_ROOT", default_value = "/host")]
    pub(crate) host_root: PathBuf,
    /// The KataConfig's logLevel (the operator sets it).
    #[arg(long, env = "KATA_LOG_LEVEL", default_value = "info")]
    pub(crate) log_level: String,
    /// Which shim serves `kata-remote` (the KataConfig's `spec.shim`; the operator sets it).
    #[arg(long, env = "KATA_SHIM", value_enum, default_value = "auto")]
    pub(crate) shim: ShimChoice,
    /// The host's D-Bus system bus socket, relative to the host root.
    #[arg(long, default_value = "/run/dbus/system_bus_socket")]
    pub(crate) dbus_socket: String,
    /// How to reach the API server.
    #[command(flatten)]
    pub(crate) kube: crate::k8s::KubeArgs,
}

async fn report(
    api: &Api<Node>,
    node: &str,
    state: &str,
    message: Option<&str>,
    config: Option<&str>,
) -> Result<(), Error> {
    let mut anns = serde_json::Map::new();
    anns.insert(ANN_STATE.into(), json!(state));
    if let Some(m) = message {
        anns.insert(ANN_MESSAGE.into(), json!(m));
    }
    if let Some(c) = config {
        anns.insert(ANN_CONFIG.into(), json!(c));
    }
    let body = json!({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": node, "annotations": anns}});
    apply::apply_json(api, node, INSTALLER_FIELD_MANAGER, body).await?;
    Ok(())
}

/// Follows the Node's `node-install` label until `shutdown`, using `services` to restart
/// the runtime.
pub async fn follow(
    client: Client,
    node: &str,
    root: &Path,
    cfg: &InstallConfig,
    services: &impl ServiceManager,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let api: Api<Node> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = std::pin::pin!(watcher(api.clone(), wc).default_backoff().applied_objects());
    let hash = cfg.hash();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last: Option<Node> = None;
    let mut completed: Option<String> = None;
    loop {
        let sleep = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sleep => { retry_at = None; }
            ev = stream.next() => match ev {
                Some(Ok(n)) => last = Some(n),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the node");
                    continue;
                }
                None => return Err(Error::Watch { node: node.into(), reason: "watch ended".into() }),
            },
        }
        let Some(n) = &last else { continue };
        let desired = n.labels().get(LABEL_NODE_INSTALL).cloned();
        let state = n.annotations().get(ANN_STATE).cloned();
        let applied = n.annotations().get(ANN_CONFIG).cloned();
        let runtime_version = n
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.container_runtime_version.clone())
            .unwrap_or_default();
        let key = match desired.as_deref() {
            Some(INSTALL) => format!("{INSTALL}:{hash}"),
            Some(UNINSTALL) => UNINSTALL.to_string(),
            _ => {
                completed = None;
                continue;
            }
        };
        // Our own reports come back as watch events: act once per desired state.
        if completed.as_deref() == Some(key.as_str()) {
            continue;
        }
        if retry_at.is_some() {
            continue;
        }
        let install_wanted = desired.as_deref() == Some(INSTALL);
        if install_wanted
            && state.as_deref() == Some(STATE_INSTALLED)
            && applied.as_deref() == Some(hash.as_str())
        {
            completed = Some(key);
            continue;
        }
        if !install_wanted && matches!(state.as_deref(), None | Some(STATE_UNINSTALLED)) {
            completed = Some(key);
            continue;
        }
        let (busy, done, failed) = if install_wanted {
            (STATE_INSTALLING, STATE_INSTALLED, STATE_FAILED)
        } else {
            (
                STATE_UNINSTALLING,
                STATE_UNINSTALLED,
                STATE_UNINSTALL_FAILED,
            )
        };
        report(&api, node, busy, None, None).await?;
        let result = match Runtime::from_node_info(&runtime_version) {
            Ok(rt) if install_wanted => install(root, &rt, cfg, services).await,
            Ok(rt) => uninstall(root, &rt, services).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(changed) => {
                tracing::info!(
                    node,
                    changed,
                    state = done,
                    "node runtime configuration done"
                );
                let config = install_wanted.then_some(hash.as_str());
                report(&api, node, done, None, config).await?;
                completed = Some(key);
            }
            Err(e) => {
                tracing::warn!(node, error = %e, "node runtime configuration failed; retrying");
                report(&api, node, failed, Some(&e.to_string()), None).await?;
                retry_at = Some(tokio::time::Instant::now() + RETRY);
            }
        }
    }
}

/// Runs `sandboxd operator node-install` until SIGTERM.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.kube.client().await?;
    let shutdown = crate::shutdown::on_signals()?;
    let root = args.host_root.clone();
    let services = systemd::SystemdDbus {
        socket: host_path(&root, &args.dbus_socket),
    };
    let cfg = InstallConfig::new(&args.log_level).with_shim(args.shim);
    follow(client, &args.node_name, &root, &cfg, &services, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
