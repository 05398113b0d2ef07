//! The pod one shim serves: its sandbox (the VM, through CAA, and the agent in it), its
//! containers and their processes. Every task method is one `do_*` here; the agent calls
//! follow kata's shim for a remote hypervisor (DESIGN §12):
//!
//! - sandbox Create: CreateVM (the nine annotations, the pod's netns) → StartVM → Health
//!   until it answers → CreateSandbox (hostname, the shm storage) → GetGuestDetails →
//!   CopyFile of the sandbox's files → CreateContainer of the pause (guest pull of `pause`);
//! - app container Create: CopyFile of every bind mount (then watched) → CreateContainer
//!   with the `image_guest_pull` storage of its image; Start: StartContainer, then
//!   ReadStdout/ReadStderr, WriteStdin, and WaitProcess (no deadline; GetOOMEvent for the
//!   whole sandbox);
//! - Kill → SignalProcess; Delete → RemoveContainer → RemoveStaleVirtiofsShareMounts; the
//!   sandbox's Delete → DestroySandbox → StopVM.
//!
//! A closed agent connection ends every long poll: each running process is reported exited
//! with 255, as kata does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use protobuf::MessageField;
use protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::boot::{self, CONTAINER_TYPE, VmRecord};
use super::config::{self, Config};
use super::events::Publisher;
use super::share;
use super::stdio::{self, Paths};
use super::vm::{self, AgentClient, ctx};
use super::{Error, io};
use crate::protocol::{agent, oci};

/// The annotation naming an app container's image.
pub(crate) const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// The image the sandbox (pause) container asks for; the agent provides the pause itself.
pub(crate) const PAUSE_IMAGE: &str = "pause";
/// How long a process's output may keep coming after it exited before the exit is
/// reported (kata drains for about half a second; a background child holding the pipe
/// must not hold the exit back).
const DRAIN: Duration = Duration::from_secs(2);
/// The exit status of a process SIGKILLed (what an OOM kill looks like).
const OOM_KILLED_STATUS: u32 = 128 + 9;
/// How long a SIGKILLed container's exit waits for its OOM event to be published first.
const OOM_WAIT: Duration = Duration::from_secs(1);

/// Now as a protobuf timestamp.
pub(crate) fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Exit {
    /// Its exit status (128 + signal when killed).
    pub(crate) status: u32,
    /// When.
    pub(crate) at: Timestamp,
}

/// A process: a container's init or an exec.
pub(crate) struct Process {
    /// The container.
    pub(crate) cid: String,
    /// containerd's exec id ("" for the init).
    pub(crate) exec_id: String,
    stdio: Paths,
    /// An exec's process spec (sent at Start).
    exec_spec: Option<oci::Process>,
    started: Mutex<bool>,
    exit: watch::Sender<Option<Exit>>,
    close_stdin: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Process {
    fn new(cid: &str, exec_id: &str, stdio: Paths, exec_spec: Option<oci::Process>) -> Arc<Self> {
        Arc::new(Self {
            cid: cid.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            started: Mutex::new(false),
            exit: watch::channel(None).0,
            close_stdin: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// The exec id the agent knows the process by (the container id for the init).
    fn agent_exec_id(&self) -> String {
        if self.exec_id.is_empty() {
            self.cid.clone()
        } else {
            self.exec_id.clone()
        }
    }

    fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    fn status(&self) -> Status {
        if self.exited().is_some() {
            Status::STOPPED
        } else if *self.started.lock().unwrap_or_else(|e| e.into_inner()) {
            Status::RUNNING
        } else {
            Status::CREATED
        }
    }

    fn abort_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// A container of the pod.
pub(crate) struct Container {
    /// Its id.
    pub(crate) id: String,
    bundle: String,
    /// The sandbox (pause) container.
    pub(crate) is_sandbox: bool,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>, Error> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "process {exec_id} of container {} not found",
                    self.id
                ))
            })
    }
}

/// The pod's sandbox: the VM and the agent in it.
pub(crate) struct Sandbox {
    /// The sandbox id (the pause container's id).
    pub(crate) id: String,
    /// The kata configuration.
    pub(crate) config: Config,
    /// The agent connection.
    pub(crate) agent: AgentClient,
    hypervisor: PathBuf,
    bundle: PathBuf,
    oom: Mutex<Option<JoinHandle<()>>>,
    /// Containers whose OOM kill was published and whose exit was not yet reported.
    ooms: watch::Sender<std::collections::HashSet<String>>,
}

/// The pod one shim serves.
pub(crate) struct Pod {
    publisher: Publisher,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Cancelled when containerd shuts the shim down.
    pub(crate) shutdown: CancellationToken,
    /// Serialises sandbox creation and teardown.
    lifecycle: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn token() -> String {
    format!("{:016x}", fastrand::u64(..))
}

fn pid() -> u32 {
    std::process::id()
}

fn network_namespace(spec: &serde_json::Value) -> String {
    spec["linux"]["namespaces"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|n| n["type"] == "network")
                .and_then(|n| n["path"].as_str())
        })
        .unwrap_or_default()
        .to_string()
}

/// The storage that pulls `image` in the VM and mounts it as the container's root.
pub(crate) fn guest_pull_storage(
    cid: &str,
    image: &str,
    annotations: &HashMap<String, String>,
) -> agent::Storage {
    let meta = serde_json::json!({ "metadata": annotations });
    agent::Storage {
        driver: "image_guest_pull".into(),
        driver_options: vec![format!("image_guest_pull={meta}")],
        source: image.to_string(),
        fstype: "overlay".into(),
        mount_point: rootfs_in_vm(cid),
        ..Default::default()
    }
}

/// A container's root in the VM.
pub(crate) fn rootfs_in_vm(cid: &str) -> String {
    format!("/run/kata-containers/{cid}/rootfs")
}

impl Pod {
    /// A pod publishing its events through `publisher` (which knows containerd's namespace).
    pub(crate) fn new(publisher: Publisher) -> Arc<Self> {
        Arc::new(Self {
            publisher,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            lifecycle: tokio::sync::Mutex::new(()),
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, Error> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    fn sandbox(&self) -> Result<Arc<Sandbox>, Error> {
        lock(&self.sandbox)
            .clone()
            .ok_or_else(|| Error::FailedPrecondition("the pod's sandbox is not running".into()))
    }

    // --- create ------------------------------------------------------------------------

    /// `Create`: the sandbox's VM and pause container, or an app container in it.
    pub(crate) async fn do_create(
        &self,
        req: api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse, Error> {
        if lock(&self.containers).contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!("container {} exists", req.id)));
        }
        let stdio = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio.validate()?;
        let bundle = PathBuf::from(&req.bundle);
        let json = boot::read_spec(&bundle)?;
        let kind = json["annotations"][CONTAINER_TYPE].as_str().unwrap_or("");
        let is_sandbox = match kind {
            "sandbox" => true,
            "container" => false,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "container {}: no {CONTAINER_TYPE} annotation; sandboxd shim runs Kubernetes pods through containerd's CRI",
                    req.id
                )));
            }
        };
        let mut spec = super::spec::spec(&json);
        if is_sandbox {
            let _g = self.lifecycle.lock().await;
            if lock(&self.sandbox).is_some() {
                return Err(Error::AlreadyExists(format!(
                    "this shim's sandbox exists already; {} is another",
                    req.id
                )));
            }
            let path = config::path_from_options(req.options.as_ref());
            let config = Config::load(Path::new(&path))?;
            let sandbox = self
                .start_sandbox(&req.id, &bundle, &json, &spec, config)
                .await?;
            *lock(&self.sandbox) = Some(sandbox);
        }
        let sandbox = self.sandbox()?;
        let result = self
            .create_container(&sandbox, &req.id, &mut spec, is_sandbox)
            .await;
        let watcher = match result {
            Ok(w) => w,
            Err(e) => {
                if is_sandbox {
                    self.stop_sandbox(&sandbox).await;
                    *lock(&self.sandbox) = None;
                }
                return Err(e);
            }
        };
        let c = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            is_sandbox,
            init: Process::new(&req.id, "", stdio.clone(), None),
            execs: Mutex::new(HashMap::new()),
            watcher: Mutex::new(Some(watcher)),
        });
        lock(&self.containers).insert(req.id.clone(), c);
        self.publisher.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            pid: pid(),
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid: pid(),
            ..Default::default()
        })
    }

    async fn start_sandbox(
        &self,
        id: &str,
        bundle: &Path,
        json: &serde_json::Value,
        spec: &oci::Spec,
        config: Config,
    ) -> Result<Arc<Sandbox>, Error> {
        let hypervisor = PathBuf::from(&config.hypervisor_socket);
        // Recorded before the VM exists: `delete` after a crash finds it and asks CAA to
        // remove the VM.
        let rec = VmRecord {
            hypervisor_socket: config.hypervisor_socket.clone(),
        };
        std::fs::write(
            bundle.join(boot::VM_RECORD),
            serde_json::to_vec(&rec).unwrap_or_default(),
        )
        .map_err(io("recording the VM in the bundle"))?;
        let annotations = vm::create_vm_annotations(&spec.Annotations, &config);
        let netns = network_namespace(json);
        tracing::info!(sandbox = id, netns, "creating the pod VM through CAA");
        let started = async {
            let socket = vm::create_vm(
                &hypervisor,
                id,
                annotations,
                &netns,
                config.hypervisor_timeout,
            )
            .await?;
            vm::start_vm(&hypervisor, id, config.start_vm_timeout()).await?;
            let agent = AgentClient::connect(&socket, config.dial_timeout).await?;
            let req = agent::CreateSandboxRequest {
                hostname: spec.Hostname.clone(),
                storages: vec![share::shm_storage(share::shm_size(spec))],
                sandbox_id: id.to_string(),
                ..Default::default()
            };
            agent
                .api()
                .create_sandbox(ctx(Duration::from_secs(300)), &req)
                .await
                .map_err(vm::agent_error("CreateSandbox"))?;
            agent
                .api()
                .get_guest_details(ctx(Duration::from_secs(60)), &vm::guest_details_request())
                .await
                .map_err(vm::agent_error("GetGuestDetails"))?;
            Ok::<_, Error>(agent)
        }
        .await;
        let agent = match started {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(sandbox = id, error = %e, "the pod VM did not start; deleting it");
                if let Err(s) = vm::stop_vm(&hypervisor, id, Duration::from_secs(60)).await {
                    tracing::warn!(sandbox = id, error = %s, "StopVM");
                }
                let _ = std::fs::remove_file(bundle.join(boot::VM_RECORD));
                return Err(e);
            }
        };
        tracing::info!(sandbox = id, "pod VM running; agent answering");
        Ok(Arc::new(Sandbox {
            id: id.to_string(),
            config,
            agent,
            hypervisor,
            bundle: bundle.to_path_buf(),
            oom: Mutex::new(None),
            ooms: watch::channel(Default::default()).0,
        }))
    }

    /// Copies the container's files, creates it in the VM; returns its volume watcher.
    async fn create_container(
        &self,
        sandbox: &Sandbox,
        cid: &str,
        spec: &mut oci::Spec,
        is_sandbox: bool,
    ) -> Result<JoinHandle<()>, Error> {
        let plan = share::plan(cid, &mut spec.Mounts, token);
        let mut copied = Vec::new();
        for c in &plan.copies {
            match share::copy(&sandbox.agent, c).await {
                Ok(s) => copied.push(s),
                Err(Error::InvalidArgument(m)) => {
                    tracing::warn!(cid, "{m}; the mount is left out");
                    spec.Mounts.retain(|mnt| mnt.source != c.guest);
                }
                Err(e) => return Err(e),
            }
        }
        let image = if is_sandbox {
            PAUSE_IMAGE.to_string()
        } else {
            spec.Annotations.get(IMAGE_NAME).cloned().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "container {cid}: no {IMAGE_NAME} annotation (the image to pull in the VM)"
                ))
            })?
        };
        let mut storages = plan.storages;
        storages.push(guest_pull_storage(cid, &image, &spec.Annotations));
        spec.Root.mut_or_insert_default().Path = rootfs_in_vm(cid);
        let sandbox_pidns = super::spec::shares_sandbox_pidns(spec);
        super::spec::constrain(spec, !sandbox.config.disable_guest_seccomp);
        let req = agent::CreateContainerRequest {
            container_id: cid.to_string(),
            exec_id: cid.to_string(),
            storages,
            OCI: MessageField::some(spec.clone()),
            sandbox_pidns,
            ..Default::default()
        };
        sandbox
            .agent
            .api()
            .create_container(ctx(sandbox.config.create_container_timeout), &req)
            .await
            .map_err(vm::agent_error("CreateContainer"))?;
        Ok(share::watch(
            sandbox.agent.clone(),
            cid.to_string(),
            copied,
            sandbox.config.watch_interval,
        ))
    }

    // --- start, exec ---------------------------------------------------------------------

    /// `Start` of a container's init or of an exec.
    pub(crate) async fn do_start(
        &self,
        req: api::StartRequest,
    ) -> Result<api::StartResponse, Error> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if *lock(&p.started) {
            return Err(Error::FailedPrecondition(format!(
                "process {:?} of {} is started already",
                req.exec_id, req.id
            )));
        }
        let sandbox = self.sandbox()?;
        let agent = sandbox.agent.clone();
        if req.exec_id.is_empty() {
            agent
                .api()
                .start_container(
                    ctx(Duration::from_secs(60)),
                    &agent::StartContainerRequest {
                        container_id: req.id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(vm::agent_error("StartContainer"))?;
        } else {
            let process = p.exec_spec.clone().unwrap_or_default();
            agent
                .api()
                .exec_process(
                    ctx(Duration::from_secs(60)),
                    &agent::ExecProcessRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        process: MessageField::some(process),
                        ..Default::default()
                    },
                )
                .await
                .map_err(vm::agent_error("ExecProcess"))?;
        }
        *lock(&p.started) = true;
        self.watch_process(&sandbox, &p);
        if c.is_sandbox && req.exec_id.is_empty() {
            self.watch_oom(&sandbox);
        }
        if req.exec_id.is_empty() {
            self.publisher.publish(TaskStart {
                container_id: req.id.clone(),
                pid: pid(),
                ..Default::default()
            });
        } else {
            self.publisher.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: pid(),
                ..Default::default()
            });
        }
        Ok(api::StartResponse {
            pid: pid(),
            ..Default::default()
        })
    }

    /// Streams a started process's stdio and reports its exit once WaitProcess answers and
    /// its output is drained.
    fn watch_process(&self, sandbox: &Arc<Sandbox>, p: &Arc<Process>) {
        let agent = &sandbox.agent;
        let eid = p.agent_exec_id();
        let mut outputs = Vec::new();
        if !p.stdio.stdout.is_empty() {
            outputs.push(stdio::copy_out(
                agent.clone(),
                p.cid.clone(),
                eid.clone(),
                p.stdio.stdout.clone(),
                true,
            ));
        }
        if !p.stdio.stderr.is_empty() && !p.stdio.terminal {
            outputs.push(stdio::copy_out(
                agent.clone(),
                p.cid.clone(),
                eid.clone(),
                p.stdio.stderr.clone(),
                false,
            ));
        }
        let mut tasks = Vec::new();
        if !p.stdio.stdin.is_empty() {
            tasks.push(stdio::copy_in(
                agent.clone(),
                p.cid.clone(),
                eid.clone(),
                p.stdio.stdin.clone(),
                p.close_stdin.subscribe(),
            ));
        }
        let waiter = {
            let agent = agent.clone();
            let ooms = sandbox.ooms.clone();
            let p = p.clone();
            let publisher = self.publisher.clone();
            tokio::spawn(async move {
                let req = agent::WaitProcessRequest {
                    container_id: p.cid.clone(),
                    exec_id: eid,
                    ..Default::default()
                };
                let status = match agent.api().wait_process(ctx(Duration::ZERO), &req).await {
                    Ok(r) => r.status as u32,
                    Err(e) => {
                        tracing::warn!(cid = p.cid, exec = p.exec_id, error = %e, "WaitProcess failed; reporting exit 255");
                        255
                    }
                };
                // A container the VM's kernel killed for memory: the agent queues its OOM
                // event before it answers WaitProcess; containerd's CRI reports OOMKilled when
                // TaskOOM comes before TaskExit, so the exit waits (briefly) for it.
                if p.exec_id.is_empty() && status == OOM_KILLED_STATUS {
                    let mut rx = ooms.subscribe();
                    let cid = p.cid.clone();
                    let _ = tokio::time::timeout(OOM_WAIT, rx.wait_for(|s| s.contains(&cid))).await;
                    ooms.send_if_modified(|s| s.remove(&cid));
                }
                let drained = futures::future::join_all(outputs);
                if tokio::time::timeout(DRAIN, drained).await.is_err() {
                    tracing::debug!(
                        cid = p.cid,
                        "output still open after the exit; reporting it"
                    );
                }
                let exit = Exit { status, at: now() };
                p.exit.send_replace(Some(exit.clone()));
                tracing::info!(cid = p.cid, exec = p.exec_id, status, "process exited");
                publisher.publish(TaskExit {
                    container_id: p.cid.clone(),
                    id: if p.exec_id.is_empty() {
                        p.cid.clone()
                    } else {
                        p.exec_id.clone()
                    },
                    pid: pid(),
                    exit_status: status,
                    exited_at: MessageField::some(exit.at),
                    ..Default::default()
                });
            })
        };
        tasks.push(waiter);
        lock(&p.tasks).extend(tasks);
    }

    /// The sandbox's OOM events (one long poll after another) as TaskOOM.
    fn watch_oom(&self, sandbox: &Arc<Sandbox>) {
        let agent = sandbox.agent.clone();
        let publisher = self.publisher.clone();
        let ooms = sandbox.ooms.clone();
        let t = tokio::spawn(async move {
            loop {
                match agent
                    .api()
                    .get_oom_event(ctx(Duration::ZERO), &agent::GetOOMEventRequest::new())
                    .await
                {
                    Ok(e) => {
                        tracing::info!(cid = e.container_id, "OOM kill in the pod VM");
                        publisher.publish(TaskOOM {
                            container_id: e.container_id.clone(),
                            ..Default::default()
                        });
                        ooms.send_modify(|s| {
                            s.insert(e.container_id);
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "GetOOMEvent ends");
                        return;
                    }
                }
            }
        });
        if let Some(old) = lock(&sandbox.oom).replace(t) {
            old.abort();
        }
    }

    /// `Exec`: records the process; the agent runs it at Start.
    pub(crate) async fn do_exec(&self, req: api::ExecProcessRequest) -> Result<(), Error> {
        let c = self.container(&req.id)?;
        if c.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        let stdio = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio.validate()?;
        let spec: serde_json::Value = req
            .spec
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| {
                Error::InvalidArgument(format!("exec {}: process spec: {e}", req.exec_id))
            })?
            .unwrap_or_default();
        let mut process = super::spec::process(&spec);
        process.Terminal = req.terminal;
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!(
                    "exec {} exists in {}",
                    req.exec_id, req.id
                )));
            }
            execs.insert(
                req.exec_id.clone(),
                Process::new(&req.id, &req.exec_id, stdio, Some(process)),
            );
        }
        self.publisher.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    // --- state, wait, kill -----------------------------------------------------------------

    /// `State`.
    pub(crate) async fn do_state(
        &self,
        req: api::StateRequest,
    ) -> Result<api::StateResponse, Error> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: pid(),
            status: p.status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| MessageField::some(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    /// `Wait`: until the process exits.
    pub(crate) async fn do_wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse, Error> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut rx = p.exit.subscribe();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| Error::FailedPrecondition("the shim is stopping".into()))?
            .clone()
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    /// `Kill` → SignalProcess. A process that has exited answers NOT_FOUND, as containerd's
    /// own shims do (CRI treats it as done).
    pub(crate) async fn do_kill(&self, req: api::KillRequest) -> Result<(), Error> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.exited().is_some() {
            return Err(Error::NotFound(format!(
                "process {:?} of {} has already exited",
                req.exec_id, req.id
            )));
        }
        let sandbox = self.sandbox()?;
        // The init with `all` (or any init kill): the agent signals the container's whole
        // cgroup when the exec id is empty.
        let exec_id = if req.exec_id.is_empty() && req.all {
            String::new()
        } else {
            p.agent_exec_id()
        };
        sandbox
            .agent
            .api()
            .signal_process(
                ctx(Duration::from_secs(30)),
                &agent::SignalProcessRequest {
                    container_id: req.id.clone(),
                    exec_id,
                    signal: req.signal,
                    ..Default::default()
                },
            )
            .await
            .map_err(vm::agent_error("SignalProcess"))?;
        Ok(())
    }

    /// `Pids`: the processes containerd may know of (the VM's are not the node's).
    pub(crate) async fn do_pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse, Error> {
        self.container(&req.id)?;
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    /// `ResizePty` → TtyWinResize.
    pub(crate) async fn do_resize_pty(&self, req: api::ResizePtyRequest) -> Result<(), Error> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let sandbox = self.sandbox()?;
        sandbox
            .agent
            .api()
            .tty_win_resize(
                ctx(Duration::from_secs(30)),
                &agent::TtyWinResizeRequest {
                    container_id: req.id.clone(),
                    exec_id: p.agent_exec_id(),
                    row: req.height,
                    column: req.width,
                    ..Default::default()
                },
            )
            .await
            .map_err(vm::agent_error("TtyWinResize"))?;
        Ok(())
    }

    /// `CloseIO`: stdin ends once what containerd wrote is sent.
    pub(crate) async fn do_close_io(&self, req: api::CloseIORequest) -> Result<(), Error> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            p.close_stdin.send_replace(true);
        }
        Ok(())
    }

    /// `Update` → UpdateContainer (the resources, runtime-spec JSON).
    pub(crate) async fn do_update(&self, req: api::UpdateTaskRequest) -> Result<(), Error> {
        self.container(&req.id)?;
        let sandbox = self.sandbox()?;
        let json: serde_json::Value = req
            .resources
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| Error::InvalidArgument(format!("update {}: resources: {e}", req.id)))?
            .unwrap_or_default();
        let mut spec = oci::Spec::new();
        spec.Linux.mut_or_insert_default().Resources =
            MessageField::some(super::spec::resources(&json));
        super::spec::constrain(&mut spec, true);
        sandbox
            .agent
            .api()
            .update_container(
                ctx(Duration::from_secs(30)),
                &agent::UpdateContainerRequest {
                    container_id: req.id.clone(),
                    resources: spec.Linux.Resources.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(vm::agent_error("UpdateContainer"))?;
        Ok(())
    }

    /// `Stats` → StatsContainer, as containerd's cgroup v1 metrics.
    pub(crate) async fn do_stats(
        &self,
        req: api::StatsRequest,
    ) -> Result<api::StatsResponse, Error> {
        self.container(&req.id)?;
        let sandbox = self.sandbox()?;
        let r = sandbox
            .agent
            .api()
            .stats_container(
                ctx(Duration::from_secs(30)),
                &agent::StatsContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(vm::agent_error("StatsContainer"))?;
        let metrics = metrics(&r);
        let any = protobuf::well_known_types::any::Any::pack(&metrics)
            .map_err(|e| Error::InvalidArgument(format!("encoding stats: {e}")))?;
        // containerd names message types without the `type.googleapis.com/` prefix.
        let mut any = any;
        any.type_url = "io.containerd.cgroups.v1.Metrics".into();
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    // --- delete, shutdown ---------------------------------------------------------------

    /// `Delete` of an exec (forgotten) or a container (removed from the VM; the sandbox's
    /// removal destroys the sandbox and deletes the VM).
    pub(crate) async fn do_delete(
        &self,
        req: api::DeleteRequest,
    ) -> Result<api::DeleteResponse, Error> {
        let c = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.status() == Status::RUNNING {
                return Err(Error::FailedPrecondition(format!(
                    "exec {} of {} is running",
                    req.exec_id, req.id
                )));
            }
            p.abort_tasks();
            lock(&c.execs).remove(&req.exec_id);
            return Ok(delete_response(&p));
        }
        if c.init.status() == Status::RUNNING {
            return Err(Error::FailedPrecondition(format!(
                "container {} is running: kill it first",
                req.id
            )));
        }
        let sandbox = self.sandbox().ok();
        if let Some(w) = lock(&c.watcher).take() {
            w.abort();
        }
        if let Some(s) = &sandbox {
            self.remove_in_vm(s, &req.id).await;
        }
        c.init.abort_tasks();
        for (_, p) in lock(&c.execs).drain() {
            p.abort_tasks();
        }
        lock(&self.containers).remove(&req.id);
        if c.is_sandbox
            && let Some(s) = &sandbox
        {
            let _g = self.lifecycle.lock().await;
            // Containers containerd did not delete first go with the sandbox.
            let rest: Vec<Arc<Container>> =
                lock(&self.containers).drain().map(|(_, c)| c).collect();
            for r in rest {
                if let Some(w) = lock(&r.watcher).take() {
                    w.abort();
                }
                r.init.abort_tasks();
            }
            self.stop_sandbox(s).await;
            *lock(&self.sandbox) = None;
        }
        let resp = delete_response(&c.init);
        self.publisher.publish(TaskDelete {
            container_id: req.id.clone(),
            pid: resp.pid,
            exit_status: resp.exit_status,
            exited_at: resp.exited_at.clone(),
            id: req.id.clone(),
            ..Default::default()
        });
        Ok(resp)
    }

    async fn remove_in_vm(&self, s: &Sandbox, cid: &str) {
        let r = s
            .agent
            .api()
            .remove_container(
                ctx(Duration::from_secs(30)),
                &agent::RemoveContainerRequest {
                    container_id: cid.to_string(),
                    ..Default::default()
                },
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(cid, error = %e, "RemoveContainer");
        }
        let _ = s
            .agent
            .api()
            .remove_stale_virtiofs_share_mounts(
                ctx(Duration::from_secs(10)),
                &agent::RemoveStaleVirtiofsShareMountsRequest::new(),
            )
            .await;
    }

    /// DestroySandbox, then StopVM: the VM is gone when this returns (or CAA said why not).
    async fn stop_sandbox(&self, s: &Sandbox) {
        if let Some(t) = lock(&s.oom).take() {
            t.abort();
        }
        if let Err(e) = s
            .agent
            .api()
            .destroy_sandbox(
                ctx(Duration::from_secs(30)),
                &agent::DestroySandboxRequest::new(),
            )
            .await
        {
            tracing::warn!(sandbox = s.id, error = %e, "DestroySandbox");
        }
        // CAA may be restarting: StopVM is retried for two minutes, then left to `delete`
        // (the bundle's record) and CAA's own sweep.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match vm::stop_vm(&s.hypervisor, &s.id, Duration::from_secs(120)).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(s.bundle.join(boot::VM_RECORD));
                    tracing::info!(sandbox = s.id, "pod VM deleted");
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(sandbox = s.id, error = %e, "StopVM; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    tracing::warn!(sandbox = s.id, error = %e, "StopVM failed; the VM is left to CAA's sweep");
                    return;
                }
            }
        }
    }

    /// `Connect`.
    pub(crate) async fn do_connect(
        &self,
        _req: api::ConnectRequest,
    ) -> Result<api::ConnectResponse, Error> {
        Ok(api::ConnectResponse {
            shim_pid: pid(),
            task_pid: pid(),
            version: format!("sandboxd {}", crate::VERSION),
            ..Default::default()
        })
    }

    /// `Shutdown`: the shim exits once it serves no container.
    pub(crate) async fn do_shutdown(&self, _req: api::ShutdownRequest) -> Result<(), Error> {
        if !lock(&self.containers).is_empty() {
            return Ok(());
        }
        let token = self.shutdown.clone();
        tokio::spawn(async move {
            // Answer first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            token.cancel();
        });
        Ok(())
    }

    /// Deletes the VM if the sandbox is still there (the shim is being stopped).
    pub(crate) async fn teardown(&self) {
        let s = lock(&self.sandbox).take();
        if let Some(s) = s {
            self.stop_sandbox(&s).await;
        }
    }
}

fn delete_response(p: &Process) -> api::DeleteResponse {
    let exit = p.exited();
    api::DeleteResponse {
        pid: pid(),
        exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
        exited_at: MessageField::some(exit.map(|e| e.at).unwrap_or_else(now)),
        ..Default::default()
    }
}

/// The agent's cgroup statistics as containerd's cgroup v1 `Metrics`.
pub(crate) fn metrics(
    r: &agent::StatsContainerResponse,
) -> containerd_shim_protos::cgroups::metrics::Metrics {
    use containerd_shim_protos::cgroups::metrics as m;
    let mut out = m::Metrics::new();
    let Some(cg) = r.cgroup_stats.as_ref() else {
        return out;
    };
    if let Some(cpu) = cg.cpu_stats.as_ref() {
        let u = cpu.cpu_usage.clone().unwrap_or_default();
        let t = cpu.throttling_data.clone().unwrap_or_default();
        out.cpu = MessageField::some(m::CPUStat {
            usage: MessageField::some(m::CPUUsage {
                total: u.total_usage,
                kernel: u.usage_in_kernelmode,
                user: u.usage_in_usermode,
                per_cpu: u.percpu_usage.clone(),
                ..Default::default()
            }),
            throttling: MessageField::some(m::Throttle {
                periods: t.periods,
                throttled_periods: t.throttled_periods,
                throttled_time: t.throttled_time,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(mem) = cg.memory_stats.as_ref() {
        let entry = |d: &MessageField<agent::MemoryData>| {
            let d = d.clone().unwrap_or_default();
            MessageField::some(m::MemoryEntry {
                limit: d.limit,
                usage: d.usage,
                max: d.max_usage,
                failcnt: d.failcnt,
                ..Default::default()
            })
        };
        let stat = |k: &str| mem.stats.get(k).copied().unwrap_or(0);
        out.memory = MessageField::some(m::MemoryStat {
            cache: mem.cache,
            rss: stat("rss").max(stat("anon")),
            mapped_file: stat("mapped_file"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            total_inactive_file: stat("total_inactive_file").max(stat("inactive_file")),
            total_rss: stat("total_rss").max(stat("anon")),
            total_cache: stat("total_cache").max(mem.cache),
            pg_fault: stat("pgfault"),
            pg_maj_fault: stat("pgmajfault"),
            usage: entry(&mem.usage),
            swap: entry(&mem.swap_usage),
            kernel: entry(&mem.kernel_usage),
            ..Default::default()
        });
    }
    if let Some(p) = cg.pids_stats.as_ref() {
        out.pids = MessageField::some(m::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_pull_storage_is_what_katas_shim_sends() {
        let mut ann = HashMap::new();
        ann.insert(CONTAINER_TYPE.to_string(), "container".to_string());
        let s = guest_pull_storage("c1", "registry.test:5000/busybox:1", &ann);
        assert_eq!(s.driver, "image_guest_pull");
        assert_eq!(s.fstype, "overlay");
        assert_eq!(s.source, "registry.test:5000/busybox:1");
        assert_eq!(s.mount_point, "/run/kata-containers/c1/rootfs");
        let opt = s.driver_options[0]
            .strip_prefix("image_guest_pull=")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(opt).unwrap();
        assert_eq!(v["metadata"][CONTAINER_TYPE], "container");
    }

    #[test]
    fn agent_stats_become_containerds_metrics() {
        let mut r = agent::StatsContainerResponse::new();
        let cg = r.cgroup_stats.mut_or_insert_default();
        cg.memory_stats
            .mut_or_insert_default()
            .usage
            .mut_or_insert_default()
            .usage = 4096;
        cg.memory_stats
            .mut_or_insert_default()
            .stats
            .insert("inactive_file".into(), 1024);
        cg.cpu_stats
            .mut_or_insert_default()
            .cpu_usage
            .mut_or_insert_default()
            .total_usage = 77;
        cg.pids_stats.mut_or_insert_default().current = 3;
        let m = metrics(&r);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.total_inactive_file, 1024);
        assert_eq!(m.cpu.usage.total, 77);
        assert_eq!(m.pids.current, 3);
    }

    #[test]
    fn the_pod_netns_is_the_specs_network_namespace() {
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(network_namespace(&spec), "/var/run/netns/cni-1");
        assert_eq!(network_namespace(&serde_json::json!({})), "");
    }
}
