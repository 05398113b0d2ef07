//! The ttrpc services: each method is a few lines delegating to a `do_*` function.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::Api;

use super::crashpoint;
use super::state::{self, Record};
use super::{Args, Error};
use crate::api::peerpod::{PeerPodStatus, phases};
use crate::cloud::sizes::{self, SizeRequest};
use crate::cloud::{Provider, VmSize, VmSpec, tags, vm_name};
use crate::config::PeerPodsConfig;
use crate::protocol::{annotations, hypervisor, hypervisor_ttrpc, podvminfo, podvminfo_ttrpc};

/// The CAA of one node.
pub struct Caa {
    pub(crate) client: Client,
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) config: PeerPodsConfig,
    pub(crate) args: Args,
    ssh_key: Option<String>,
    pub(crate) cluster_id: String,
    sizes: Vec<VmSize>,
    default_size: String,
    image_id: String,
    sandboxes: Mutex<HashMap<String, Record>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) datapath: super::datapath::Datapath,
}

impl Caa {
    /// Reads the cluster id and the allowed sizes, and reconciles the node's records.
    pub async fn start(
        client: Client,
        provider: Arc<dyn Provider>,
        config: PeerPodsConfig,
        args: Args,
        ssh_key: Option<String>,
    ) -> Result<Arc<Self>, Error> {
        let ns: Api<Namespace> = Api::all(client.clone());
        let cluster_id = ns
            .get("kube-system")
            .await?
            .metadata
            .uid
            .unwrap_or_default();
        let az = config.azure.clone();
        let (names, default_size, image_id) = match &az {
            Some(a) => (
                a.instance_sizes.clone(),
                a.instance_size.clone(),
                a.image_id.clone().unwrap_or_default(),
            ),
            None => (Vec::new(), String::new(), String::new()),
        };
        if az.is_some() && image_id.is_empty() {
            return Err(Error::InvalidRequest(
                "AZURE_IMAGE_ID is empty: the pod VM image job has not recorded an image yet"
                    .into(),
            ));
        }
        let sizes = provider.sizes(&names).await?;
        let datapath = super::datapath::Datapath::new(&client).await;
        let caa = Arc::new(Self {
            client,
            provider,
            config,
            args,
            ssh_key,
            cluster_id,
            sizes,
            default_size,
            image_id,
            sandboxes: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            datapath,
        });
        caa.reconcile().await?;
        Ok(caa)
    }

    fn node(&self) -> &str {
        &self.args.node_name
    }

    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn remembered(&self, id: &str) -> Option<Record> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    async fn record_of(&self, id: &str) -> Result<Option<Record>, Error> {
        if let Some(r) = self.remembered(id) {
            return Ok(Some(r));
        }
        Ok(state::of_sandbox(&self.client, self.node(), id)
            .await?
            .map(|p| Record::from_peerpod(&p)))
    }

    /// Ownership tags over the user's `TAGS`.
    fn tags_of(&self, r: &Record) -> BTreeMap<String, String> {
        let mut t: BTreeMap<String, String> = self.config.tags.iter().cloned().collect();
        for (k, v) in self.owner_tags() {
            t.insert(k, v);
        }
        t.insert(tags::POD_NAMESPACE.into(), r.namespace.clone());
        t.insert(tags::POD_NAME.into(), r.pod_name.clone());
        t.insert(tags::POD_UID.into(), r.pod_uid.clone());
        t.insert(tags::SANDBOX.into(), r.sandbox_id.clone());
        t
    }

    /// The tags every VM of this CAA carries.
    pub(crate) fn owner_tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (tags::CLUSTER.to_string(), self.cluster_id.clone()),
            (tags::NODE.to_string(), self.node().to_string()),
        ])
    }

    /// CreateVM: choose the size, record the PeerPod, answer the agent socket path.
    pub async fn do_create_vm(&self, req: &hypervisor::CreateVMRequest) -> Result<String, Error> {
        if req.id.is_empty() {
            return Err(Error::InvalidRequest(
                "CreateVM without a sandbox id".into(),
            ));
        }
        let a = &req.annotations;
        let get = |k: &str| a.get(k).map(String::as_str).filter(|s| !s.is_empty());
        let (Some(name), Some(ns)) = (
            get(annotations::SANDBOX_NAME),
            get(annotations::SANDBOX_NAMESPACE),
        ) else {
            return Err(Error::InvalidRequest(format!(
                "CreateVM needs the {} and {} annotations",
                annotations::SANDBOX_NAME,
                annotations::SANDBOX_NAMESPACE
            )));
        };
        let size = sizes::select(
            &SizeRequest::from_annotations(
                get(annotations::MACHINE_TYPE),
                get(annotations::DEFAULT_VCPUS),
                get(annotations::DEFAULT_MEMORY),
            ),
            &self.default_size,
            &self.sizes,
        )?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = pods.get(name).await?;
        let r = Record {
            namespace: ns.to_string(),
            pod_name: name.to_string(),
            pod_uid: pod.metadata.uid.unwrap_or_default(),
            vm_name: vm_name(name, &req.id),
            sandbox_id: req.id.clone(),
            size,
        };
        let lock = self.lock_of(&req.id);
        let _g = lock.lock().await;
        crashpoint::reached(crashpoint::CREATE_BEFORE_RECORD).await;
        state::record(&self.client, &r, self.node(), self.provider.name()).await?;
        tracing::info!(sandbox = %req.id, vm = %r.vm_name, size = %r.size, pod = %format!("{ns}/{name}"), "recorded PeerPod");
        crashpoint::reached(crashpoint::CREATE_RECORDED).await;
        self.datapath
            .remember_netns(&req.id, &req.networkNamespacePath);
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone(), r);
        Ok(self
            .args
            .pods_dir
            .join(&req.id)
            .join("agent.ttrpc")
            .display()
            .to_string())
    }

    /// StartVM: create the VM (retrying what may pass) and wait until it is provisioned.
    pub async fn do_start_vm(&self, id: &str) -> Result<(), Error> {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        let r = self
            .record_of(id)
            .await?
            .ok_or_else(|| Error::UnknownSandbox(id.to_string()))?;
        // Re-assert the record before any create call (a no-op when it exists).
        let pp = state::record(&self.client, &r, self.node(), self.provider.name()).await?;
        if pp.metadata.deletion_timestamp.is_some() {
            // The pod is gone: creating its VM now could only leak it.
            return Err(Error::InvalidRequest(format!(
                "the pod of sandbox {id} is being deleted"
            )));
        }
        let spec = VmSpec {
            name: r.vm_name.clone(),
            size: if r.size.is_empty() {
                self.default_size.clone()
            } else {
                r.size.clone()
            },
            image_id: self.image_id.clone(),
            user_data: self.datapath.user_data(self, &r).await?,
            ssh_public_key: self.ssh_key.clone(),
            tags: self.tags_of(&r),
        };
        let status = |phase: &str| PeerPodStatus {
            phase: Some(phase.to_string()),
            ..Default::default()
        };
        state::set_status(
            &self.client,
            &r.namespace,
            &r.vm_name,
            &status(phases::CREATING),
        )
        .await?;
        crashpoint::reached(crashpoint::START_BEFORE_CREATE).await;
        let deadline = Instant::now() + self.config.proxy_timeout;
        let mut attempt = 0u32;
        let result = loop {
            match self.provider.create(&spec).await {
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    attempt += 1;
                    tracing::warn!(vm = %spec.name, attempt, error = %e, "create failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))))
                        .await;
                }
                other => break other,
            }
        };
        let result: Result<_, Error> = match result {
            Ok(vm) => {
                let budget = deadline.saturating_duration_since(Instant::now());
                let budget = budget.max(Duration::from_secs(1));
                self.datapath
                    .ready(self, &r, &vm, budget)
                    .await
                    .map(|()| vm)
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(vm) => {
                crashpoint::reached(crashpoint::START_CREATED).await;
                state::set_instance_id(&self.client, &r.namespace, &r.vm_name, &vm.id).await?;
                crashpoint::reached(crashpoint::START_INSTANCE_RECORDED).await;
                let st = PeerPodStatus {
                    phase: Some(phases::RUNNING.into()),
                    vm_ip: vm.private_ip.map(|ip| ip.to_string()),
                    ..Default::default()
                };
                state::set_status(&self.client, &r.namespace, &r.vm_name, &st).await?;
                tracing::info!(vm = %vm.name, ip = ?vm.private_ip, "VM running");
                crashpoint::reached(crashpoint::START_RUNNING).await;
                Ok(())
            }
            Err(e) => {
                // A failed VM is deleted now; the record stays so nothing leaks if this fails.
                self.datapath.stop(&r).await;
                let _ = self.provider.delete(&spec.name).await;
                let st = PeerPodStatus {
                    phase: Some(phases::FAILED.into()),
                    message: Some(e.to_string()),
                    ..Default::default()
                };
                let _ = state::set_status(&self.client, &r.namespace, &r.vm_name, &st).await;
                Err(e)
            }
        }
    }

    /// StopVM: delete the VM, then release the record. Succeeds when both are gone.
    pub async fn do_stop_vm(&self, id: &str) -> Result<(), Error> {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        let Some(r) = self.record_of(id).await? else {
            return Ok(());
        };
        self.delete_vm_and_record(&r).await?;
        crashpoint::reached(crashpoint::STOP_RELEASED).await;
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// Deletes the VM and releases the record of a sandbox whose pod is gone, serialised with
    /// the shim's calls for it.
    pub(crate) async fn forget(&self, r: &Record) -> Result<(), Error> {
        let lock = self.lock_of(&r.sandbox_id);
        let _g = lock.lock().await;
        self.delete_vm_and_record(r).await?;
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.sandbox_id);
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.sandbox_id);
        Ok(())
    }

    pub(crate) async fn delete_vm_and_record(&self, r: &Record) -> Result<(), Error> {
        self.datapath.stop(r).await;
        let _ = state::set_status(
            &self.client,
            &r.namespace,
            &r.vm_name,
            &PeerPodStatus {
                phase: Some(phases::DELETING.into()),
                ..Default::default()
            },
        )
        .await;
        crashpoint::reached(crashpoint::STOP_BEFORE_DELETE).await;
        let mut attempt = 0u32;
        loop {
            match self.provider.delete(&r.vm_name).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() && attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))))
                        .await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        crashpoint::reached(crashpoint::STOP_VM_DELETED).await;
        state::release(&self.client, &r.namespace, &r.vm_name).await?;
        tracing::info!(vm = %r.vm_name, "VM deleted and record released");
        Ok(())
    }

    /// GetInfo: the VM id of a pod; with `wait`, until it is known.
    pub async fn do_get_info(&self, req: &podvminfo::GetInfoRequest) -> Result<String, Error> {
        let deadline = Instant::now() + self.config.proxy_timeout;
        loop {
            let found = state::of_node(&self.client, self.node())
                .await?
                .into_iter()
                .map(|p| (Record::from_peerpod(&p), p.spec.instance_id))
                .find(|(r, _)| r.namespace == req.PodNamespace && r.pod_name == req.PodName);
            match found {
                Some((_, id)) if !id.is_empty() => return Ok(id),
                _ if !req.Wait || Instant::now() >= deadline => {
                    return Err(Error::UnknownSandbox(format!(
                        "no VM for pod {}/{}",
                        req.PodNamespace, req.PodName
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Start-up reconcile: records whose pod is gone lose their VM; others are resumed.
    pub async fn reconcile(&self) -> Result<(), Error> {
        for p in state::of_node(&self.client, self.node()).await? {
            let r = Record::from_peerpod(&p);
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &r.namespace);
            let alive = match pods.get_opt(&r.pod_name).await? {
                Some(pod) => {
                    pod.metadata.uid.as_deref() == Some(r.pod_uid.as_str())
                        && pod.metadata.deletion_timestamp.is_none()
                        && !matches!(
                            pod.status.and_then(|s| s.phase).as_deref(),
                            Some("Succeeded" | "Failed")
                        )
                }
                None => false,
            };
            if alive {
                self.datapath.resume(self, &r, &p);
                self.sandboxes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r.sandbox_id.clone(), r);
            } else {
                tracing::info!(vm = %r.vm_name, "pod gone; deleting its VM");
                self.delete_vm_and_record(&r).await?;
            }
        }
        Ok(())
    }
}

struct Service(Arc<Caa>);

fn reply<T>(method: &str, r: Result<T, Error>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(method, error = %e, kind = e.metric_label(), "request failed");
        e.to_ttrpc()
    })
}

#[async_trait::async_trait]
impl hypervisor_ttrpc::Hypervisor for Service {
    async fn create_vm(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: hypervisor::CreateVMRequest,
    ) -> ttrpc::Result<hypervisor::CreateVMResponse> {
        let path = reply("CreateVM", self.0.do_create_vm(&req).await)?;
        Ok(hypervisor::CreateVMResponse {
            agentSocketPath: path,
            ..Default::default()
        })
    }

    async fn start_vm(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: hypervisor::StartVMRequest,
    ) -> ttrpc::Result<hypervisor::StartVMResponse> {
        reply("StartVM", self.0.do_start_vm(&req.id).await)?;
        Ok(hypervisor::StartVMResponse::new())
    }

    async fn stop_vm(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: hypervisor::StopVMRequest,
    ) -> ttrpc::Result<hypervisor::StopVMResponse> {
        reply("StopVM", self.0.do_stop_vm(&req.id).await)?;
        Ok(hypervisor::StopVMResponse::new())
    }

    async fn version(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: hypervisor::VersionRequest,
    ) -> ttrpc::Result<hypervisor::VersionResponse> {
        Ok(hypervisor::VersionResponse {
            version: crate::VERSION.into(),
            ..Default::default()
        })
    }
}

#[async_trait::async_trait]
impl podvminfo_ttrpc::PodVmInfo for Service {
    async fn get_info(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: podvminfo::GetInfoRequest,
    ) -> ttrpc::Result<podvminfo::GetInfoResponse> {
        let id = reply("GetInfo", self.0.do_get_info(&req).await)?;
        Ok(podvminfo::GetInfoResponse {
            VMID: id,
            ..Default::default()
        })
    }
}

/// Serves both services on `socket` (stale socket removed, mode 0600).
pub async fn serve(caa: Arc<Caa>, socket: &Path) -> Result<ttrpc::r#async::Server, Error> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: &dyn std::fmt::Display| Error::Socket(format!("{}: {e}", socket.display()));
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(&e)),
    }
    let svc = Arc::new(Service(caa));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .map_err(|e| err(&e))?
        .register_service(hypervisor_ttrpc::create_hypervisor(svc.clone()))
        .register_service(podvminfo_ttrpc::create_pod_vm_info(svc));
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(&e))?;
    server.start().await.map_err(|e| err(&e))?;
    Ok(server)
}
