//! The agent's state — one sandbox, its containers and their processes — and the `do_*`
//! behind every implemented method. Container operations (libcontainer forks) run on the
//! agent's single runtime thread, so no other thread holds a lock while a child is cloned.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protobuf::MessageField;
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, watch};

use super::container::{self, ChildIo, Placement};
use super::image::{self, ImageConfig};
use super::process::{self, Exits, Process};
use super::seccomp::{self, Filter};
use super::{Error, Paths, files, storage};
use crate::protocol::agent::*;
use crate::protocol::oci;

/// kata's annotation naming the container's termination message file.
const TERMINATION_PATH: &str = "io.kubernetes.container.terminationMessagePath";
/// Kubernetes caps termination messages at 4 KiB (and so does kata).
const TERMINATION_MAX: usize = 4096;

/// What creating a container makes: libcontainer's handle, the config, the seccomp filter,
/// the streams, the spec's capabilities, the bundle, the mounts, whether it is the pause.
type Created = (
    libcontainer::container::Container,
    Value,
    Option<Filter>,
    process::Stdio,
    Option<Value>,
    PathBuf,
    Vec<PathBuf>,
    bool,
);

/// A container of the sandbox.
struct Container {
    lc: libcontainer::container::Container,
    bundle: PathBuf,
    config: Value,
    filter: Option<Filter>,
    /// The spec's capabilities (before any granted for seccomp).
    spec_caps: Option<Value>,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    /// Mounts made for it, unmounted at removal (last first).
    mounts: Vec<PathBuf>,
    cgroup: PathBuf,
    is_sandbox: bool,
    started: bool,
}

/// The sandbox as `CreateSandbox` made it.
struct Sandbox {
    id: String,
    mounts: Vec<PathBuf>,
}

#[derive(Default)]
struct State {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Container>,
    /// `/proc/<pid>/ns` of the running pause container.
    sandbox_ns: Option<PathBuf>,
    /// Containers being created (their image may take minutes to pull: the lock is not
    /// held meanwhile).
    creating: std::collections::HashSet<String>,
}

/// The agent.
pub(crate) struct Agent {
    paths: Paths,
    exits: Arc<Exits>,
    state: Mutex<State>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: Mutex<mpsc::UnboundedReceiver<String>>,
    policy: std::sync::Mutex<Option<String>>,
    images: image::Store,
    /// Microseconds spent in libcontainer's create and start (the benchmark's baseline).
    libcontainer_us: std::sync::atomic::AtomicU64,
}

fn check_id(what: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {id:?}: expected 1-128 of [A-Za-z0-9_.-], not starting with `.`"
        )))
    }
}

/// Whether `pid` catches `sig` (a pid namespace's init ignores what it does not catch).
fn catches(pid: i32, sig: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| sig > 0 && mask & (1 << (sig - 1)) != 0)
}

fn kill(pid: i32, sig: i32) -> Result<(), Error> {
    let s = nix::sys::signal::Signal::try_from(sig)
        .map_err(|_| Error::InvalidArgument(format!("{sig} is not a signal")))?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(super::sys(format!("kill {pid}"))(e)),
    }
}

/// The pids in a cgroup (and its children).
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    out
}

impl Agent {
    /// A new agent with no sandbox.
    pub(crate) fn new(paths: Paths, insecure_registries: Vec<String>) -> Result<Arc<Self>, Error> {
        for d in [&paths.base, &paths.share, &paths.state] {
            std::fs::create_dir_all(d).map_err(super::io(format!("creating {}", d.display())))?;
        }
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        let images = image::Store::new(&paths.images, &paths.auth, insecure_registries);
        Ok(Arc::new(Self {
            paths,
            exits: Arc::default(),
            state: Mutex::default(),
            oom_tx,
            oom_rx: Mutex::new(oom_rx),
            policy: std::sync::Mutex::default(),
            images,
            libcontainer_us: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The exit table the reaper fills.
    pub(crate) fn exits(&self) -> Arc<Exits> {
        self.exits.clone()
    }

    /// Watches `pid`: its status is published once the container's OOM state is read, so a
    /// caller that saw the exit finds the OOM event already queued.
    fn watch_exit(
        &self,
        cid: &str,
        pid: i32,
        cgroup: Option<PathBuf>,
    ) -> watch::Receiver<Option<i32>> {
        let mut raw = self.exits.register(pid);
        let (tx, rx) = watch::channel(None);
        let oom = self.oom_tx.clone();
        let cid = cid.to_string();
        tokio::spawn(async move {
            let status = loop {
                if let Some(s) = *raw.borrow_and_update() {
                    break s;
                }
                if raw.changed().await.is_err() {
                    break 255;
                }
            };
            if let Some(cg) = cgroup
                && container::cgroup_kv(&cg, "memory.events")
                    .get("oom_kill")
                    .copied()
                    .unwrap_or(0)
                    > 0
            {
                tracing::info!(container = %cid, "OOM kill in the container's cgroup");
                let _ = oom.send(cid.clone());
            }
            let _ = tx.send(Some(status));
        });
        rx
    }

    async fn process(&self, cid: &str, eid: &str) -> Result<Arc<Process>, Error> {
        let st = self.state.lock().await;
        let c = st
            .containers
            .get(cid)
            .ok_or_else(|| Error::NotFound(format!("container {cid} not found")))?;
        if eid.is_empty() || eid == cid {
            return Ok(c.init.clone());
        }
        c.execs
            .get(eid)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("process {eid} of container {cid} not found")))
    }

    // --- health, policy, guest -----------------------------------------------------------

    /// `grpc.Health/Check`.
    pub(crate) async fn do_check(
        &self,
        _req: crate::protocol::health::CheckRequest,
    ) -> Result<crate::protocol::health::HealthCheckResponse, Error> {
        use crate::protocol::health::{HealthCheckResponse, health_check_response::ServingStatus};
        let mut r = HealthCheckResponse::new();
        r.status = ServingStatus::SERVING.into();
        Ok(r)
    }

    /// `grpc.Health/Version`.
    pub(crate) async fn do_version(
        &self,
        _req: crate::protocol::health::CheckRequest,
    ) -> Result<crate::protocol::health::VersionCheckResponse, Error> {
        let mut r = crate::protocol::health::VersionCheckResponse::new();
        r.grpc_version = "ttrpc".into();
        r.agent_version = format!("sandboxd {}", crate::VERSION);
        Ok(r)
    }

    /// `SetPolicy`: accepted and kept; sandboxd's agent does not enforce policies yet.
    pub(crate) async fn do_set_policy(&self, req: SetPolicyRequest) -> Result<(), Error> {
        tracing::info!(
            bytes = req.policy.len(),
            "SetPolicy: policy accepted (not enforced by sandboxd agent)"
        );
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(req.policy);
        Ok(())
    }

    /// `GetGuestDetails`.
    pub(crate) async fn do_get_guest_details(
        &self,
        req: GuestDetailsRequest,
    ) -> Result<GuestDetailsResponse, Error> {
        let mut r = GuestDetailsResponse::new();
        if req.mem_block_size {
            r.mem_block_size_bytes =
                std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                    .unwrap_or(0);
        }
        if req.mem_hotplug_probe {
            r.support_mem_hotplug_probe = Path::new("/sys/devices/system/memory/probe").exists();
        }
        let d = r.agent_details.mut_or_insert_default();
        d.version = crate::VERSION.into();
        d.init_daemon = std::process::id() == 1;
        d.storage_handlers = storage::DRIVERS.iter().map(|s| s.to_string()).collect();
        d.supports_seccomp = true;
        Ok(r)
    }

    /// `GetMetrics`: the agent's own metrics in Prometheus' text format: containers, the
    /// mounts it holds under its container base, its child processes, its resident memory.
    pub(crate) async fn do_get_metrics(&self, _req: GetMetricsRequest) -> Result<Metrics, Error> {
        let containers = self.state.lock().await.containers.len();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |field: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let (rss_kib, anon_kib) = (kib("VmRSS:"), kib("RssAnon:"));
        let base = self.paths.base.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(4)
                    .is_some_and(|p| p.starts_with(&base))
            })
            .count();
        let children: usize = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .count()
            })
            .sum();
        let mut text = String::new();
        for (name, help, value) in [
            (
                "sandboxd_agent_containers",
                "Containers of the sandbox.",
                containers as u64,
            ),
            (
                "sandboxd_agent_mounts",
                "Mounts the agent holds under its container base directory.",
                mounts as u64,
            ),
            (
                "sandboxd_agent_child_processes",
                "Child processes of the agent (container processes).",
                children as u64,
            ),
            (
                "sandboxd_agent_resident_memory_bytes",
                "Resident memory of the agent (its code pages included).",
                rss_kib * 1024,
            ),
            (
                "sandboxd_agent_anonymous_memory_bytes",
                "Anonymous resident memory of the agent (heap and stacks, no code).",
                anon_kib * 1024,
            ),
            (
                "sandboxd_agent_libcontainer_microseconds_total",
                "Time spent in libcontainer creating and starting containers.",
                self.libcontainer_us
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ] {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        let mut m = Metrics::new();
        m.metrics = text;
        Ok(m)
    }

    /// `GetOOMEvent`: waits for the next OOM kill in a container of the sandbox.
    pub(crate) async fn do_get_oom_event(
        &self,
        _req: GetOOMEventRequest,
    ) -> Result<OOMEvent, Error> {
        let mut rx = self.oom_rx.lock().await;
        let id = rx
            .recv()
            .await
            .ok_or_else(|| Error::FailedPrecondition("the agent is stopping".into()))?;
        let mut e = OOMEvent::new();
        e.container_id = id;
        Ok(e)
    }

    // --- sandbox ---------------------------------------------------------------------------

    /// `CreateSandbox`: hostname, sandbox storages (the pod's shm), the share directory.
    pub(crate) async fn do_create_sandbox(&self, req: CreateSandboxRequest) -> Result<(), Error> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.sandbox {
            return Err(Error::AlreadyExists(format!(
                "sandbox {} exists already",
                s.id
            )));
        }
        if !req.hostname.is_empty()
            && let Err(e) = nix::unistd::sethostname(&req.hostname)
        {
            tracing::warn!(hostname = %req.hostname, error = %e, "sethostname");
        }
        std::fs::create_dir_all(&self.paths.share).map_err(super::io(format!(
            "creating {}",
            self.paths.share.display()
        )))?;
        let mut mounts = Vec::new();
        for s in &req.storages {
            match self.mount_storage(s, "").await {
                Ok(Some(p)) => mounts.push(p),
                Ok(None) => {}
                Err(e) => {
                    mounts
                        .iter()
                        .rev()
                        .for_each(|m: &PathBuf| storage::unmount(m));
                    return Err(e);
                }
            }
        }
        tracing::info!(sandbox = %req.sandbox_id, hostname = %req.hostname, storages = req.storages.len(), "sandbox created");
        st.sandbox = Some(Sandbox {
            id: req.sandbox_id,
            mounts,
        });
        Ok(())
    }

    /// `DestroySandbox`: every container removed, the sandbox's mounts and files gone.
    pub(crate) async fn do_destroy_sandbox(
        &self,
        _req: DestroySandboxRequest,
    ) -> Result<(), Error> {
        let ids: Vec<(bool, String)> = {
            let st = self.state.lock().await;
            st.containers
                .iter()
                .map(|(id, c)| (c.is_sandbox, id.clone()))
                .collect()
        };
        let mut ids = ids;
        // App containers first, the pause container last.
        ids.sort();
        for (_, id) in ids {
            self.remove(&id, Duration::from_secs(10)).await?;
        }
        let mut st = self.state.lock().await;
        if let Some(s) = st.sandbox.take() {
            s.mounts.iter().rev().for_each(|m| storage::unmount(m));
            tracing::info!(sandbox = %s.id, "sandbox destroyed");
        }
        st.sandbox_ns = None;
        let _ = std::fs::remove_dir_all(&self.paths.share);
        let _ = std::fs::create_dir_all(&self.paths.share);
        Ok(())
    }

    /// Stops everything (agent shutdown).
    pub(crate) async fn shutdown(&self) {
        let _ = self.do_destroy_sandbox(DestroySandboxRequest::new()).await;
    }

    /// Mounts one storage; answers what to unmount later.
    async fn mount_storage(&self, s: &Storage, cid: &str) -> Result<Option<PathBuf>, Error> {
        match s.driver.as_str() {
            storage::EPHEMERAL => storage::ephemeral(s).map(Some),
            storage::LOCAL => storage::local(s).map(|_| None),
            storage::IMAGE_GUEST_PULL => Err(Error::InvalidArgument(format!(
                "container {cid}: an image_guest_pull storage must be the container's own"
            ))),
            other => Err(Error::InvalidArgument(format!(
                "storage driver {other:?} is not supported by sandboxd agent (supported: {})",
                storage::DRIVERS.join(", ")
            ))),
        }
    }

    // --- files -----------------------------------------------------------------------------

    /// `CopyFile`.
    pub(crate) async fn do_copy_file(&self, req: CopyFileRequest) -> Result<(), Error> {
        files::copy(&self.paths.share, &req)
    }

    // --- containers -------------------------------------------------------------------------

    /// `CreateContainer`: storages, rootfs (pulled image, pause or the shim's path), bundle,
    /// seccomp, stdio, and the container created with its init waiting for `StartContainer`.
    pub(crate) async fn do_create_container(
        &self,
        req: CreateContainerRequest,
    ) -> Result<(), Error> {
        let cid = req.container_id.clone();
        check_id("container id", &cid)?;
        let start = std::time::Instant::now();
        let has_pause = {
            let mut st = self.state.lock().await;
            if st.sandbox.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "container {cid}: no sandbox (CreateSandbox first)"
                )));
            }
            if st.containers.contains_key(&cid) || !st.creating.insert(cid.clone()) {
                return Err(Error::AlreadyExists(format!(
                    "container {cid} exists already"
                )));
            }
            st.sandbox_ns.is_some() || st.containers.values().any(|c| c.is_sandbox)
        };
        let result = self.create_unlocked(&req, has_pause).await;
        let mut st = self.state.lock().await;
        st.creating.remove(&cid);
        let (lc, config, filter, stdio, spec_caps, bundle, mounts, is_sandbox) = result?;
        let pid = lc.pid().map(|p| p.as_raw()).unwrap_or(0);
        let cgroup = container::cgroup_dir(&config);
        let exit = self.watch_exit(&cid, pid, Some(cgroup.clone()));
        let init = Arc::new(Process {
            exec_id: cid.clone(),
            pid,
            stdio,
            exit,
        });
        // Debug: "container started" follows (every line of the serial console costs the VM
        // hundreds of emulated port writes).
        tracing::debug!(container = %cid, pid, sandbox = is_sandbox, ms = start.elapsed().as_millis() as u64, "container created");
        st.containers.insert(
            cid,
            Container {
                lc,
                bundle,
                config,
                filter,
                spec_caps,
                init,
                execs: HashMap::new(),
                mounts,
                cgroup,
                is_sandbox,
                started: false,
            },
        );
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    async fn create_unlocked(
        &self,
        req: &CreateContainerRequest,
        has_pause: bool,
    ) -> Result<Created, Error> {
        let cid = req.container_id.as_str();
        let spec = req
            .OCI
            .clone()
            .into_option()
            .ok_or_else(|| Error::InvalidArgument(format!("container {cid}: no OCI spec")))?;
        let bundle = self.paths.base.join(cid);
        std::fs::create_dir_all(&bundle)
            .map_err(super::io(format!("creating {}", bundle.display())))?;
        let mut mounts = Vec::new();
        let start = std::time::Instant::now();
        let prepared = self
            .prepare(cid, req, &spec, &bundle, &mut mounts, has_pause)
            .await;
        tracing::debug!(container = %cid, ms = start.elapsed().as_millis() as u64, "storages and rootfs ready");
        let created = match prepared {
            Ok((rootfs, is_sandbox, image_config)) => {
                let sandbox_ns = self.state.lock().await.sandbox_ns.clone();
                self.create(
                    cid,
                    req,
                    spec,
                    &bundle,
                    rootfs,
                    is_sandbox,
                    image_config,
                    sandbox_ns,
                )
                .map(|(lc, config, filter, stdio, caps)| {
                    (lc, config, filter, stdio, caps, is_sandbox)
                })
            }
            Err(e) => Err(e),
        };
        match created {
            Ok((lc, config, filter, stdio, caps, is_sandbox)) => {
                Ok((lc, config, filter, stdio, caps, bundle, mounts, is_sandbox))
            }
            Err(e) => {
                mounts.iter().rev().for_each(|m| storage::unmount(m));
                let _ = std::fs::remove_dir_all(&bundle);
                let _ = std::fs::remove_dir_all(self.paths.state.join(cid));
                Err(e)
            }
        }
    }

    /// Storages and rootfs of a new container: (rootfs, is the sandbox container, image config).
    async fn prepare(
        &self,
        cid: &str,
        req: &CreateContainerRequest,
        spec: &oci::Spec,
        bundle: &Path,
        mounts: &mut Vec<PathBuf>,
        has_pause: bool,
    ) -> Result<(PathBuf, bool, Option<ImageConfig>), Error> {
        let mut is_sandbox = storage::is_sandbox(&spec.Annotations);
        let mut rootfs = None;
        let mut image_config = None;
        for s in &req.storages {
            if s.driver != storage::IMAGE_GUEST_PULL {
                if let Some(p) = self.mount_storage(s, cid).await? {
                    mounts.push(p);
                }
                continue;
            }
            is_sandbox |= storage::is_sandbox(&storage::guest_pull_metadata(s)?);
            let target = if s.mount_point.is_empty() {
                bundle.join("rootfs")
            } else {
                storage::mount_point(s)?
            };
            if is_sandbox {
                mounts.push(storage::pause_rootfs(&target)?);
            } else {
                image_config = Some(self.images.mount(&s.source, &target).await?);
                mounts.push(target.clone());
            }
            rootfs = Some(target);
        }
        if is_sandbox && has_pause {
            return Err(Error::AlreadyExists(format!(
                "container {cid}: the sandbox has its pause container already"
            )));
        }
        let rootfs = match rootfs {
            Some(r) => r,
            None => {
                let p = spec
                    .Root
                    .as_ref()
                    .map(|r| r.Path.clone())
                    .unwrap_or_default();
                if p.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "container {cid}: no rootfs (no Root.Path and no image_guest_pull storage)"
                    )));
                }
                let p = PathBuf::from(p);
                if !p.is_dir() {
                    return Err(Error::InvalidArgument(format!(
                        "container {cid}: rootfs {} does not exist in the VM",
                        p.display()
                    )));
                }
                p
            }
        };
        Ok((rootfs, is_sandbox, image_config))
    }

    /// Writes the bundle and creates the container.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn create(
        &self,
        cid: &str,
        req: &CreateContainerRequest,
        mut spec: oci::Spec,
        bundle: &Path,
        rootfs: PathBuf,
        is_sandbox: bool,
        image_config: Option<ImageConfig>,
        sandbox_ns: Option<PathBuf>,
    ) -> Result<
        (
            libcontainer::container::Container,
            Value,
            Option<Filter>,
            process::Stdio,
            Option<Value>,
        ),
        Error,
    > {
        if let Some(ic) = image_config {
            let p = spec.Process.mut_or_insert_default();
            if p.Args.is_empty() {
                p.Args = ic.entrypoint.iter().chain(ic.cmd.iter()).cloned().collect();
            }
            for e in ic.env {
                let key = e.split('=').next().unwrap_or_default().to_string();
                if !p
                    .Env
                    .iter()
                    .any(|x| x.split('=').next() == Some(key.as_str()))
                {
                    p.Env.push(e);
                }
            }
            if p.Cwd.is_empty() {
                p.Cwd = ic.working_dir;
            }
        }
        if is_sandbox {
            // The agent's own pause, whatever the pause image's entrypoint names (the rootfs
            // is the agent's pause rootfs, not that image).
            spec.Process.mut_or_insert_default().Args = vec![super::pause::PATH.into()];
        }
        let place = Placement {
            rootfs,
            sandbox_ns: if is_sandbox { None } else { sandbox_ns },
            sandbox_pidns: req.sandbox_pidns && !is_sandbox,
        };
        let (mut config, seccomp_profile) = container::config_json(cid, &spec, &place)?;
        let filter = match seccomp_profile {
            Some(p) => Some(
                seccomp::compile(&p)
                    .map_err(|e| Error::InvalidArgument(format!("container {cid}: {e}")))?,
            ),
            None => None,
        };
        let spec_caps = config["process"].get("capabilities").cloned();
        let transient = if filter.is_some() {
            container::grant_for_seccomp(&mut config["process"])
        } else {
            Vec::new()
        };
        let text = serde_json::to_vec_pretty(&config).map_err(|e| Error::Container {
            id: cid.into(),
            detail: format!("encoding config.json: {e}"),
        })?;
        std::fs::write(bundle.join("config.json"), text).map_err(super::io(format!(
            "writing {}/config.json",
            bundle.display()
        )))?;
        let terminal = spec.Process.as_ref().is_some_and(|p| p.Terminal);
        let (io, stdio, console) = self.child_io(cid, "init", terminal)?;
        let t = std::time::Instant::now();
        let (lc, _pid) = container::create(
            cid,
            bundle,
            &self.paths.state,
            filter.clone(),
            transient,
            io,
        )?;
        let us = t.elapsed().as_micros() as u64;
        self.libcontainer_us
            .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(container = %cid, ms = us / 1000, "libcontainer created it");
        let stdio = match (stdio, console) {
            (Some(s), _) => s,
            (None, Some(l)) => process::terminal(container::receive_console(&l.0)?)?,
            (None, None) => unreachable!("a process has pipes or a terminal"),
        };
        Ok((lc, config, filter, stdio, spec_caps))
    }

    /// Pipes, or a console socket for a terminal.
    #[allow(clippy::type_complexity)]
    fn child_io(
        &self,
        cid: &str,
        what: &str,
        terminal: bool,
    ) -> Result<(ChildIo, Option<process::Stdio>, Option<ConsoleSocket>), Error> {
        if terminal {
            let path = console_path(&self.paths.state);
            tracing::debug!(container = %cid, process = %what, socket = %path.display(), "console socket");
            let _ = std::fs::remove_file(&path);
            let l = std::os::unix::net::UnixListener::bind(&path)
                .map_err(super::io(format!("binding {}", path.display())))?;
            Ok((
                ChildIo::Console(path.clone()),
                None,
                Some(ConsoleSocket(l, path)),
            ))
        } else {
            let (stdio, child) = process::pipes()?;
            Ok((ChildIo::Pipes(child), Some(stdio), None))
        }
    }

    /// `StartContainer`.
    pub(crate) async fn do_start_container(&self, req: StartContainerRequest) -> Result<(), Error> {
        let mut st = self.state.lock().await;
        let c = st
            .containers
            .get_mut(&req.container_id)
            .ok_or_else(|| Error::NotFound(format!("container {} not found", req.container_id)))?;
        if c.started {
            return Err(Error::FailedPrecondition(format!(
                "container {} is started already",
                req.container_id
            )));
        }
        let t = std::time::Instant::now();
        container::start(&mut c.lc)?;
        let us = t.elapsed().as_micros() as u64;
        self.libcontainer_us
            .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
        c.started = true;
        let (pid, is_sandbox) = (c.init.pid, c.is_sandbox);
        if is_sandbox {
            st.sandbox_ns = Some(PathBuf::from(format!("/proc/{pid}/ns")));
        }
        tracing::info!(container = %req.container_id, pid, sandbox = is_sandbox, ms = us / 1000, "container started");
        Ok(())
    }

    /// Kills what is left of `cid`, waits up to `timeout` for its init, deletes it.
    async fn remove(&self, cid: &str, timeout: Duration) -> Result<(), Error> {
        let (init, cgroup) = {
            let st = self.state.lock().await;
            let c = st
                .containers
                .get(cid)
                .ok_or_else(|| Error::NotFound(format!("container {cid} not found")))?;
            (c.init.clone(), c.cgroup.clone())
        };
        // Everything in its cgroup goes too: with a shared pid namespace an exec may outlive
        // the container's init.
        if !init.exited() {
            let _ = kill(init.pid, libc::SIGKILL);
        }
        for pid in cgroup_pids(&cgroup) {
            let _ = kill(pid, libc::SIGKILL);
        }
        if tokio::time::timeout(timeout, init.wait()).await.is_err() {
            return Err(Error::Container {
                id: cid.into(),
                detail: format!("its processes did not die within {timeout:?}"),
            });
        }
        let mut st = self.state.lock().await;
        let Some(mut c) = st.containers.remove(cid) else {
            return Ok(());
        };
        if let Err(e) = container::delete(&mut c.lc) {
            tracing::warn!(container = %cid, error = %e, "libcontainer delete");
        }
        let _ = std::fs::remove_dir(&c.cgroup);
        for m in c.mounts.iter().rev() {
            storage::unmount(m);
            self.images.release(m);
        }
        let _ = std::fs::remove_dir_all(&c.bundle);
        let _ = std::fs::remove_dir_all(self.paths.state.join(cid));
        if c.is_sandbox {
            st.sandbox_ns = None;
        }
        tracing::info!(container = %cid, "container removed");
        Ok(())
    }

    /// `RemoveContainer`: kills its processes (waiting up to `timeout` seconds; 0 = no limit)
    /// and removes it with its mounts and files.
    pub(crate) async fn do_remove_container(
        &self,
        req: RemoveContainerRequest,
    ) -> Result<(), Error> {
        let t = if req.timeout == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(req.timeout.into())
        };
        self.remove(&req.container_id, t).await
    }

    /// `ExecProcess`: a new process in a running container.
    pub(crate) async fn do_exec_process(&self, req: ExecProcessRequest) -> Result<(), Error> {
        let (cid, eid) = (req.container_id.clone(), req.exec_id.clone());
        check_id("exec id", &eid)?;
        let mut st = self.state.lock().await;
        let c = st
            .containers
            .get_mut(&cid)
            .ok_or_else(|| Error::NotFound(format!("container {cid} not found")))?;
        if !c.started || c.init.exited() {
            return Err(Error::FailedPrecondition(format!(
                "container {cid} is not running"
            )));
        }
        if c.execs.contains_key(&eid) {
            return Err(Error::AlreadyExists(format!(
                "process {eid} of container {cid} exists already"
            )));
        }
        let p = req
            .process
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("exec {eid}: no process")))?;
        if p.Args.is_empty() {
            return Err(Error::InvalidArgument(format!("exec {eid}: no arguments")));
        }
        let mut pj = container::process_json(p);
        // An exec keeps the container's capabilities when the request has none (less what
        // was granted to its init only to install the seccomp filter).
        if pj.get("capabilities").is_none()
            && let Some(caps) = c.spec_caps.clone()
        {
            pj["capabilities"] = caps;
        }
        let transient = if c.filter.is_some() {
            container::grant_for_seccomp(&mut pj)
        } else {
            Vec::new()
        };
        let file = self.paths.state.join(format!("{cid}-{eid}.process.json"));
        std::fs::write(&file, serde_json::to_vec(&pj).unwrap_or_default())
            .map_err(super::io(format!("writing {}", file.display())))?;
        let (io, stdio, console) = {
            let terminal = p.Terminal;
            let path = console_path(&self.paths.state);
            if terminal {
                let _ = std::fs::remove_file(&path);
                let l = std::os::unix::net::UnixListener::bind(&path)
                    .map_err(super::io(format!("binding {}", path.display())))?;
                (
                    ChildIo::Console(path.clone()),
                    None,
                    Some(ConsoleSocket(l, path)),
                )
            } else {
                let (s, child) = process::pipes()?;
                (ChildIo::Pipes(child), Some(s), None)
            }
        };
        let result = container::exec(
            &cid,
            &self.paths.state,
            &file,
            c.filter.clone(),
            transient,
            io,
        );
        let _ = std::fs::remove_file(&file);
        let pid = result?;
        let stdio = match (stdio, console) {
            (Some(s), _) => s,
            (None, Some(l)) => process::terminal(container::receive_console(&l.0)?)?,
            (None, None) => unreachable!("a process has pipes or a terminal"),
        };
        let exit = self.watch_exit(&cid, pid, None);
        let c = st.containers.get_mut(&cid).expect("held under the lock");
        c.execs.insert(
            eid.clone(),
            Arc::new(Process {
                exec_id: eid.clone(),
                pid,
                stdio,
                exit,
            }),
        );
        tracing::info!(container = %cid, exec = %eid, pid, "process started");
        Ok(())
    }

    /// `SignalProcess`: the signal to the process; with no exec id, also to every process of
    /// the container. SIGTERM to an init that does not catch it becomes SIGKILL (kata's rule:
    /// a pid namespace's init ignores it otherwise).
    pub(crate) async fn do_signal_process(&self, req: SignalProcessRequest) -> Result<(), Error> {
        let p = self.process(&req.container_id, &req.exec_id).await?;
        let mut sig = req.signal as i32;
        let is_init = req.exec_id.is_empty() || req.exec_id == req.container_id;
        if is_init && sig == libc::SIGTERM && !catches(p.pid, sig) {
            sig = libc::SIGKILL;
        }
        if !p.exited() {
            kill(p.pid, sig)?;
        }
        if req.exec_id.is_empty() {
            let cg = {
                let st = self.state.lock().await;
                st.containers
                    .get(&req.container_id)
                    .map(|c| c.cgroup.clone())
            };
            for pid in cg.map(|d| cgroup_pids(&d)).unwrap_or_default() {
                let _ = kill(pid, sig);
            }
        }
        Ok(())
    }

    /// `WaitProcess`: blocks until the process exits; an exec process is forgotten after.
    pub(crate) async fn do_wait_process(
        &self,
        req: WaitProcessRequest,
    ) -> Result<WaitProcessResponse, Error> {
        let p = self.process(&req.container_id, &req.exec_id).await?;
        let status = p.wait().await;
        if !req.exec_id.is_empty() && req.exec_id != req.container_id {
            // Its output may still be read until the pipes drain: forget it a moment later.
            let (cid, eid) = (req.container_id.clone(), req.exec_id.clone());
            let state = &self.state;
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(c) = state.lock().await.containers.get_mut(&cid)
                && c.execs.get(&eid).is_some_and(|x| Arc::ptr_eq(x, &p))
                && Arc::strong_count(&p) <= 2
            {
                c.execs.remove(&eid);
            }
        }
        let mut r = WaitProcessResponse::new();
        r.status = status;
        Ok(r)
    }

    /// `ReadStdout` / `ReadStderr`.
    pub(crate) async fn do_read_stream(
        &self,
        req: ReadStreamRequest,
        stdout: bool,
    ) -> Result<ReadStreamResponse, Error> {
        let p = self.process(&req.container_id, &req.exec_id).await?;
        let mut r = ReadStreamResponse::new();
        r.data = p.read(stdout, req.len as usize).await?;
        Ok(r)
    }

    /// `WriteStdin`.
    pub(crate) async fn do_write_stdin(
        &self,
        req: WriteStreamRequest,
    ) -> Result<WriteStreamResponse, Error> {
        let p = self.process(&req.container_id, &req.exec_id).await?;
        let mut r = WriteStreamResponse::new();
        r.len = p.write(&req.data).await? as u32;
        Ok(r)
    }

    /// `CloseStdin`.
    pub(crate) async fn do_close_stdin(&self, req: CloseStdinRequest) -> Result<(), Error> {
        self.process(&req.container_id, &req.exec_id)
            .await?
            .close_stdin()
            .await;
        Ok(())
    }

    /// `TtyWinResize`.
    pub(crate) async fn do_tty_win_resize(&self, req: TtyWinResizeRequest) -> Result<(), Error> {
        let p = self.process(&req.container_id, &req.exec_id).await?;
        let tty = p.stdio.tty.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!("process {} has no terminal", p.exec_id))
        })?;
        process::resize(tty, req.row as u16, req.column as u16)
    }

    /// `UpdateContainer`: new cgroup limits (memory, CPU, pids).
    pub(crate) async fn do_update_container(
        &self,
        req: UpdateContainerRequest,
    ) -> Result<(), Error> {
        let cg = {
            let st = self.state.lock().await;
            st.containers
                .get(&req.container_id)
                .map(|c| c.cgroup.clone())
                .ok_or_else(|| {
                    Error::NotFound(format!("container {} not found", req.container_id))
                })?
        };
        let Some(r) = req.resources.as_ref() else {
            return Ok(());
        };
        let write = |file: &str, v: String| {
            std::fs::write(cg.join(file), &v).map_err(super::io(format!(
                "writing {v} to {file} of {}",
                req.container_id
            )))
        };
        if let Some(m) = r.Memory.as_ref()
            && m.Limit != 0
        {
            write(
                "memory.max",
                if m.Limit < 0 {
                    "max".into()
                } else {
                    m.Limit.to_string()
                },
            )?;
        }
        if let Some(c) = r.CPU.as_ref() {
            if c.Quota != 0 || c.Period != 0 {
                let quota = if c.Quota <= 0 {
                    "max".to_string()
                } else {
                    c.Quota.to_string()
                };
                let period = if c.Period == 0 { 100_000 } else { c.Period };
                write("cpu.max", format!("{quota} {period}"))?;
            }
            if c.Shares != 0 {
                // runc's conversion of cgroup v1 shares to a v2 weight.
                let w = 1 + (c.Shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                write("cpu.weight", w.to_string())?;
            }
        }
        if let Some(p) = r.Pids.as_ref()
            && p.Limit != 0
        {
            write(
                "pids.max",
                if p.Limit < 0 {
                    "max".into()
                } else {
                    p.Limit.to_string()
                },
            )?;
        }
        Ok(())
    }

    /// `StatsContainer`: cgroup v2 counters.
    pub(crate) async fn do_stats_container(
        &self,
        req: StatsContainerRequest,
    ) -> Result<StatsContainerResponse, Error> {
        let cg = {
            let st = self.state.lock().await;
            st.containers
                .get(&req.container_id)
                .map(|c| c.cgroup.clone())
                .ok_or_else(|| {
                    Error::NotFound(format!("container {} not found", req.container_id))
                })?
        };
        let cpu = container::cgroup_kv(&cg, "cpu.stat");
        let mem = container::cgroup_kv(&cg, "memory.stat");
        let events = container::cgroup_kv(&cg, "memory.events");
        let mut s = CgroupStats::new();
        let u = s
            .cpu_stats
            .mut_or_insert_default()
            .cpu_usage
            .mut_or_insert_default();
        u.total_usage = cpu.get("usage_usec").copied().unwrap_or(0) * 1000;
        u.usage_in_usermode = cpu.get("user_usec").copied().unwrap_or(0) * 1000;
        u.usage_in_kernelmode = cpu.get("system_usec").copied().unwrap_or(0) * 1000;
        let t = s
            .cpu_stats
            .mut_or_insert_default()
            .throttling_data
            .mut_or_insert_default();
        t.periods = cpu.get("nr_periods").copied().unwrap_or(0);
        t.throttled_periods = cpu.get("nr_throttled").copied().unwrap_or(0);
        t.throttled_time = cpu.get("throttled_usec").copied().unwrap_or(0) * 1000;
        let m = s.memory_stats.mut_or_insert_default();
        m.cache = mem.get("file").copied().unwrap_or(0);
        m.use_hierarchy = true;
        m.usage = MessageField::some(MemoryData {
            usage: container::cgroup_value(&cg, "memory.current").unwrap_or(0),
            max_usage: container::cgroup_value(&cg, "memory.peak").unwrap_or(0),
            failcnt: events.get("max").copied().unwrap_or(0),
            limit: container::cgroup_value(&cg, "memory.max").unwrap_or(u64::MAX),
            ..Default::default()
        });
        m.stats = mem.into_iter().collect();
        let p = s.pids_stats.mut_or_insert_default();
        p.current = container::cgroup_value(&cg, "pids.current").unwrap_or(0);
        p.limit = container::cgroup_value(&cg, "pids.max")
            .map(|v| if v == u64::MAX { 0 } else { v })
            .unwrap_or(0);
        let mut r = StatsContainerResponse::new();
        r.cgroup_stats = MessageField::some(s);
        Ok(r)
    }

    /// `GetDiagnosticData("termination_log")`: the container's termination message (≤ 4 KiB).
    pub(crate) async fn do_get_diagnostic_data(
        &self,
        req: GetDiagnosticDataRequest,
    ) -> Result<GetDiagnosticDataResponse, Error> {
        if req.log_type != "termination_log" {
            return Err(Error::InvalidArgument(format!(
                "log type {:?} is not supported (termination_log is)",
                req.log_type
            )));
        }
        let source = {
            let st = self.state.lock().await;
            let c = st.containers.get(&req.container_id).ok_or_else(|| {
                Error::NotFound(format!("container {} not found", req.container_id))
            })?;
            let dest = c.config["annotations"][TERMINATION_PATH]
                .as_str()
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "container {}: no {TERMINATION_PATH} annotation",
                        req.container_id
                    ))
                })?
                .to_string();
            c.config["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["destination"] == dest.as_str())
                .and_then(|m| m["source"].as_str().map(PathBuf::from))
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "container {}: no mount for {dest}",
                        req.container_id
                    ))
                })?
        };
        let mut r = GetDiagnosticDataResponse::new();
        r.data = match std::fs::read(&source) {
            Ok(mut b) => {
                b.truncate(TERMINATION_MAX);
                String::from_utf8_lossy(&b).into_owned()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(super::io(format!("reading {}", source.display()))(e)),
        };
        Ok(r)
    }

    /// `RemoveStaleVirtiofsShareMounts`: there is no virtio-fs share in a peer pod VM: OK.
    pub(crate) async fn do_remove_stale_virtiofs_share_mounts(
        &self,
        _req: RemoveStaleVirtiofsShareMountsRequest,
    ) -> Result<(), Error> {
        Ok(())
    }
}

/// A fresh console socket path in `state`: short, as a unix socket path must be (Kubernetes'
/// container and exec ids are 64 characters each).
fn console_path(state: &Path) -> PathBuf {
    state.join(format!("console-{:016x}.sock", fastrand::u64(..)))
}

/// A console socket and its path (removed when dropped).
struct ConsoleSocket(std::os::unix::net::UnixListener, PathBuf);

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.1);
    }
}
