//! The ttrpc services: each method is a few lines delegating to a `do_*` function.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;

use super::crashpoint;
use super::state::{self, Record};
use super::writer::{Key, Pending, Writer};
use super::{Args, Error};
use crate::api::names::annotations;
use crate::api::peerpod::{PeerPodStatus, phases};
use crate::cloud::sizes::{self, SizeRequest};
use crate::cloud::{Provider, Vm, VmSize, VmSpec, VmState, tags, vm_name};
use crate::config::PeerPodsConfig;
use crate::protocol::{hypervisor, hypervisor_ttrpc, methods, podvminfo, podvminfo_ttrpc};

/// The CAA of one node.
pub(crate) struct Caa {
    pub(crate) client: Client,
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) config: PeerPodsConfig,
    pub(crate) args: Args,
    ssh_key: Option<String>,
    pub(crate) cluster_id: String,
    sizes: Vec<VmSize>,
    default_size: String,
    image_id: String,
    /// Images a pod may ask for besides `image_id` (`AZURE_IMAGE_IDS`).
    image_ids: Vec<String>,
    sandboxes: Mutex<HashMap<String, Record>>,
    /// Sandboxes CreateVM remembered whose record StartVM has not written yet.
    unrecorded: Mutex<HashSet<String>>,
    /// Instance ids of the VMs this process started or found running, by sandbox id.
    started: Mutex<HashMap<String, String>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Background writes of progress and releases.
    writer: Writer,
    /// The pods of this node, as a watch sees them.
    pods: super::pods::NodePods,
    pub(crate) datapath: super::datapath::Datapath,
}

impl Caa {
    /// Reads the cluster id and the allowed sizes, and reconciles the node's records.
    pub(crate) async fn start(
        client: Client,
        provider: Arc<dyn Provider>,
        config: PeerPodsConfig,
        args: Args,
        ssh_key: Option<String>,
    ) -> Result<Arc<Self>, Error> {
        let cluster_id = crate::k8s::cluster_id(&client).await?;
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
        // The pod tunnel's worker end: without it no pod could start, so CAA does not start.
        let node_ip = super::datapath::node_ip(args.node_ip.as_deref(), args.node_ips.as_deref())
            .map_err(Error::Tunnel)?;
        super::datapath::check_node_ip(node_ip)
            .await
            .map_err(Error::Tunnel)?;
        let image_ids = az.as_ref().map(|a| a.image_ids.clone()).unwrap_or_default();
        let sizes = provider.sizes(&names).await?;
        let datapath =
            super::datapath::Datapath::new(&client, node_ip, args.relay_socket.clone()).await;
        let writer = Writer::start(client.clone());
        let pods = super::pods::NodePods::watch(&client, &args.node_name);
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
            image_ids,
            sandboxes: Mutex::new(HashMap::new()),
            unrecorded: Mutex::new(HashSet::new()),
            started: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            writer,
            pods,
            datapath,
        });
        caa.reconcile().await?;
        caa.datapath.retain().await;
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

    /// CreateVM: find the pod, choose the size, remember the sandbox, answer the agent
    /// socket path. Nothing is written yet: the record that guards the VM is written by
    /// StartVM, before any cloud call, so a shim that gives up between CreateVM and StartVM
    /// (and never calls StopVM) leaves nothing behind.
    pub(crate) async fn do_create_vm(
        &self,
        req: &hypervisor::CreateVMRequest,
    ) -> Result<String, Error> {
        if req.id.is_empty() {
            return Err(Error::InvalidRequest(
                "CreateVM without a sandbox id".into(),
            ));
        }
        let a = &req.annotations;
        let get = |k: &str| a.get(k).map(String::as_str).filter(|s| !s.is_empty());
        let Some(sandbox_name) = get(annotations::SANDBOX_NAME) else {
            return Err(Error::InvalidRequest(format!(
                "CreateVM needs the {} annotation",
                annotations::SANDBOX_NAME
            )));
        };
        let of = super::pods::parse_sandbox_name(sandbox_name).map_err(Error::InvalidRequest)?;
        let ns = match (get(annotations::SANDBOX_NAMESPACE), of.namespace.as_deref()) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::InvalidRequest(format!(
                    "the sandbox name {sandbox_name:?} names namespace {b} but {} says {a}",
                    annotations::SANDBOX_NAMESPACE
                )));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(Error::InvalidRequest(format!(
                    "CreateVM needs the {} annotation",
                    annotations::SANDBOX_NAMESPACE
                )));
            }
        };
        let name = of.name.as_str();
        let size = self.size_of(&req.id, get)?;
        let image = match (&self.config.azure, get(annotations::IMAGE)) {
            (Some(_), Some(asked)) => choose_image(asked, &self.image_id, &self.image_ids)
                .map_err(Error::InvalidRequest)?,
            _ => String::new(),
        };
        let pod_uid = self.pod_uid(ns, name, of.uid.as_deref()).await?;
        let netns = self.datapath.resolve_netns(&req.networkNamespacePath)?;
        let r = Record {
            namespace: ns.to_string(),
            pod_name: name.to_string(),
            pod_uid,
            vm_name: vm_name(name, &req.id),
            sandbox_id: req.id.clone(),
            size,
            image,
        };
        let lock = self.lock_of(&req.id);
        let _g = lock.lock().await;
        // Earlier sandboxes of this pod that never started are abandoned (the kubelet runs
        // one sandbox per pod): nothing of them was written, so they are only forgotten.
        let abandoned: Vec<String> = {
            let sandboxes = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
            let unrecorded = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
            sandboxes
                .values()
                .filter(|o| {
                    o.sandbox_id != r.sandbox_id
                        && o.namespace == r.namespace
                        && o.pod_name == r.pod_name
                        && unrecorded.contains(&o.sandbox_id)
                })
                .map(|o| o.sandbox_id.clone())
                .collect()
        };
        for old in abandoned {
            tracing::info!(sandbox = %old, pod = %format!("{ns}/{name}"), "forgetting a sandbox that never started");
            self.forget_sandbox(&old);
        }
        self.datapath.remember_netns(&req.id, netns);
        tracing::info!(sandbox = %req.id, vm = %r.vm_name, size = %r.size, pod = %format!("{ns}/{name}"), "sandbox created; its record is written at StartVM");
        self.unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone());
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone(), r);
        self.count_sandboxes();
        Ok(super::datapath::socket_path(&self.args.pods_dir, &req.id)
            .display()
            .to_string())
    }

    /// The instance size of a new sandbox. The local provider has no sizes: what a pod asks
    /// for is ignored there (a local "VM" is a namespace on the worker).
    fn size_of<'a>(
        &self,
        id: &str,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<String, Error> {
        let req = SizeRequest::from_annotations(
            get(annotations::MACHINE_TYPE),
            get(annotations::DEFAULT_VCPUS),
            get(annotations::DEFAULT_MEMORY),
        )
        .with_gpus(
            get(annotations::DEFAULT_GPUS),
            get(annotations::DEFAULT_GPU_MODEL),
        );
        if self.config.azure.is_none() {
            if req != SizeRequest::default() {
                tracing::debug!(sandbox = %id, machine_type = ?req.machine_type, vcpus = req.vcpus, memory_mib = req.memory_mib, "the local provider has no instance sizes; the requested size is ignored");
            }
            return Ok(String::new());
        }
        Ok(sizes::select(&req, &self.default_size, &self.sizes)?)
    }

    /// The uid of pod `ns/name` (the record's owner). With CRI-O the sandbox name carries
    /// the uid: a pod of that name with another uid is a newer pod, not this sandbox's.
    async fn pod_uid(&self, ns: &str, name: &str, want: Option<&str>) -> Result<String, Error> {
        let found = match self.pods.uid_of(ns, name) {
            Some(uid) if want.is_none_or(|w| w == uid) => return Ok(uid),
            _ => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                pods.get_opt(name)
                    .await?
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
            }
        };
        let Some(pod) = found else {
            return Err(Error::InvalidRequest(format!(
                "pod {ns}/{name} does not exist (or is being deleted): no VM is made for it"
            )));
        };
        let uid = pod.metadata.uid.unwrap_or_default();
        match want {
            Some(w) if w != uid => Err(Error::InvalidRequest(format!(
                "pod {ns}/{name} with uid {w} no longer exists (the pod of that name now has uid {uid})"
            ))),
            _ => Ok(uid),
        }
    }

    /// StartVM: create the VM (retrying what may pass) and wait until it is ready.
    ///
    /// One Kubernetes write stands between the shim and the cloud: the record that guards
    /// the VM, written first (nothing can leak: the VM name is deterministic and recorded
    /// before any create call). The Creating phase is written while a create that takes
    /// longer than [`CREATING_AFTER`] runs (its answer says whether the record still stands);
    /// the instance id, IP and Running phase are written in the background once the VM is
    /// ready (a restart rebuilds them from the cloud, as the VM name is deterministic).
    pub(crate) async fn do_start_vm(&self, id: &str) -> Result<(), Error> {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        let r = match self.remembered(id) {
            // Written by CreateVM, or found standing by the start-up reconcile.
            Some(r) => r,
            None => {
                let pp = state::of_sandbox(&self.client, self.node(), id)
                    .await?
                    .ok_or_else(|| Error::UnknownSandbox(id.to_string()))?;
                if pp.metadata.deletion_timestamp.is_some() {
                    return Err(being_deleted(id));
                }
                Record::from_peerpod(&pp)
            }
        };
        let key = Key::of(&r);
        let unrecorded = self
            .unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id);
        if unrecorded {
            // A release of an earlier record of this name lands first, or it would end this one.
            if !self.writer.flush(&key, self.config.proxy_timeout).await {
                return Err(Error::Pending(r.vm_name.clone()));
            }
            crashpoint::reached(crashpoint::START_BEFORE_RECORD).await;
            state::record(&self.client, &r, self.node(), self.provider.name()).await?;
            tracing::info!(sandbox = %id, vm = %r.vm_name, size = %r.size, pod = %format!("{}/{}", r.namespace, r.pod_name), "recorded PeerPod");
            self.unrecorded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            crashpoint::reached(crashpoint::START_RECORDED).await;
        } else if self.writer.holds(&key) {
            // What an earlier StartVM of this record left pending lands before Creating.
            self.writer.flush(&key, self.config.proxy_timeout).await;
        }
        let spec = VmSpec {
            name: r.vm_name.clone(),
            size: if r.size.is_empty() {
                self.default_size.clone()
            } else {
                r.size.clone()
            },
            image_id: if r.image.is_empty() {
                self.image_id.clone()
            } else {
                r.image.clone()
            },
            user_data: self.datapath.user_data(self, &r).await?,
            ssh_public_key: self.ssh_key.clone(),
            tags: self.tags_of(&r),
        };
        crashpoint::reached(crashpoint::START_BEFORE_CREATE).await;
        let deadline = Instant::now() + self.config.proxy_timeout;
        let phase = PeerPodStatus {
            phase: Some(phases::CREATING.into()),
            ..Default::default()
        };
        let create_started = Instant::now();
        let create = self.create_ready(&r, &spec, deadline);
        tokio::pin!(create);
        // A create that is ready within CREATING_AFTER goes straight to Running: a burst of
        // pods then spends the API server on the records that must precede their creates,
        // not on phases. A longer one (every real cloud create) reports Creating meanwhile.
        let result = tokio::select! {
            r = &mut create => r,
            _ = tokio::time::sleep(CREATING_AFTER) => {
                let creating = state::set_status(&self.client, &r.namespace, &r.vm_name, &phase);
                let (marked, result) = tokio::join!(creating, &mut create);
                if let Err(e) = &marked {
                    // The record stands (CreateVM wrote it); only the phase is missing.
                    tracing::warn!(vm = %r.vm_name, error = %e, "writing phase Creating failed");
                }
                match (result, &marked) {
                    // The pod went while its VM was created: the VM goes now.
                    (Ok(_), Ok(pp)) if pp.metadata.deletion_timestamp.is_some() => {
                        Err(being_deleted(id))
                    }
                    (Ok(_), Err(kube::Error::Api(s))) if s.code == 404 => Err(
                        Error::InvalidRequest(format!("the PeerPod of sandbox {id} is gone")),
                    ),
                    (result, _) => result,
                }
            }
        };
        super::metrics::METRICS.create(
            create_started.elapsed(),
            result.as_ref().err().map(Error::metric_label),
        );
        match result {
            Ok(vm) => {
                crashpoint::reached(crashpoint::START_CREATED).await;
                self.started
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_string(), vm.id.clone());
                self.writer.push(
                    key,
                    Pending::running(vm.id.clone(), vm.address().map(|ip| ip.to_string())),
                );
                tracing::info!(vm = %vm.name, ip = ?vm.address(), "VM running");
                Ok(())
            }
            Err(e) => {
                // A failed VM is deleted now; the record stays so nothing leaks if this fails.
                self.datapath.stop(&r).await;
                if let Err(d) = self.delete_vm_retrying(&spec.name).await {
                    tracing::warn!(vm = %spec.name, error = %d, "deleting a failed VM failed; the record keeps it");
                }
                self.writer.push(
                    key.clone(),
                    Pending::status(PeerPodStatus {
                        phase: Some(phases::FAILED.into()),
                        message: Some(e.to_string()),
                        ..Default::default()
                    }),
                );
                self.writer.flush(&key, Duration::from_secs(10)).await;
                Err(e)
            }
        }
    }

    /// Creates the VM, retrying what may pass, and waits until it is ready.
    async fn create_ready(
        &self,
        r: &Record,
        spec: &VmSpec,
        deadline: Instant,
    ) -> Result<Vm, Error> {
        let mut attempt = 0u32;
        let vm = loop {
            match self.provider.create(spec).await {
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    attempt += 1;
                    tracing::warn!(vm = %spec.name, attempt, error = %e, "create failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))))
                        .await;
                }
                other => break other?,
            }
        };
        let budget = deadline.saturating_duration_since(Instant::now());
        let budget = budget.max(Duration::from_secs(1));
        self.datapath.ready(self, r, &vm, budget).await.map(|()| vm)
    }

    /// StopVM: delete the VM; the record is released in the background. Succeeds when the VM
    /// is gone.
    pub(crate) async fn do_stop_vm(&self, id: &str) -> Result<(), Error> {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        if self
            .unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
        {
            // Never started: nothing was written and no VM was asked for.
            self.forget_sandbox(id);
            return Ok(());
        }
        let Some(r) = self.record_of(id).await? else {
            return Ok(());
        };
        self.delete_vm_and_record(&r).await?;
        self.forget_sandbox(id);
        Ok(())
    }

    /// StopVM bounded by `within`: the delete runs as its own task and goes on to completion
    /// when the bound passes first; the answer then says so (`Ok(Some(note))`).
    pub(crate) async fn do_stop_vm_within(
        self: &Arc<Self>,
        id: &str,
        within: Option<Duration>,
    ) -> Result<Option<String>, Error> {
        let caa = self.clone();
        let owned = id.to_string();
        let mut task = tokio::spawn(async move {
            let r = caa.do_stop_vm(&owned).await;
            if let Err(e) = &r {
                tracing::warn!(sandbox = %owned, error = %e, "StopVM failed");
            }
            r
        });
        let joined = match within {
            None => (&mut task).await,
            Some(d) => match tokio::time::timeout(d, &mut task).await {
                Ok(j) => j,
                Err(_) => {
                    tracing::info!(sandbox = %id, "StopVM's deadline is near; the VM deletion continues in the background");
                    return Ok(Some(format!(
                        "the VM of sandbox {id} is still being deleted; the deletion continues \
                         in the background and its PeerPod is released once the cloud confirms"
                    )));
                }
            },
        };
        joined
            .map_err(|e| Error::InvalidRequest(format!("StopVM of sandbox {id} stopped: {e}")))?
            .map(|()| None)
    }

    fn forget_sandbox(&self, id: &str) {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.count_sandboxes();
        self.unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.datapath.forget(id);
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Deletes the VM and releases the record of a sandbox whose pod is gone, serialised with
    /// the shim's calls for it.
    pub(crate) async fn forget(&self, r: &Record) -> Result<(), Error> {
        let lock = self.lock_of(&r.sandbox_id);
        let _g = lock.lock().await;
        self.delete_vm_and_record(r).await?;
        self.forget_sandbox(&r.sandbox_id);
        Ok(())
    }

    /// Whether this CAA is working on the record now (a call holds its sandbox, or a
    /// background write for it is pending): the sweep leaves it to that work.
    pub(crate) fn handling(&self, r: &Record) -> bool {
        self.writer.holds(&Key::of(r))
            || self
                .locks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&r.sandbox_id)
                .is_some_and(|l| l.try_lock().is_err())
    }

    /// Deletes the VM while marking the record deleted, then queues the record's release.
    ///
    /// Leak-free at every point: a record marked deleted is finished (VM deleted, then
    /// record released) by whoever sees it next (a retried StopVM, the start-up reconcile,
    /// the sweep, the operator's collector), and a record released only after the cloud said
    /// its VM is gone.
    pub(crate) async fn delete_vm_and_record(&self, r: &Record) -> Result<(), Error> {
        self.datapath.stop(r).await;
        crashpoint::reached(crashpoint::STOP_BEFORE_DELETE).await;
        let (marked, deleted) = tokio::join!(
            state::mark_deleted(&self.client, &r.namespace, &r.vm_name),
            self.delete_vm_retrying(&r.vm_name)
        );
        deleted?;
        crashpoint::reached(crashpoint::STOP_VM_DELETED).await;
        let current = match marked {
            Ok(Some(pp)) => Some(pp),
            // Already released.
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(vm = %r.vm_name, error = %e, "marking the record deleted failed; the release retries it");
                None
            }
        };
        self.writer.push(Key::of(r), Pending::release(current));
        tracing::info!(vm = %r.vm_name, "VM deleted; record being released");
        Ok(())
    }

    /// Deletes a VM, retrying what may pass; succeeds when it is already gone.
    async fn delete_vm_retrying(&self, name: &str) -> Result<(), Error> {
        let begun = Instant::now();
        let mut attempt = 0u32;
        let result = loop {
            match self.provider.delete(name).await {
                Ok(()) => break Ok(()),
                Err(e) if e.is_retryable() && attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))))
                        .await;
                }
                Err(e) => break Err(Error::from(e)),
            }
        };
        super::metrics::METRICS.delete(
            begun.elapsed(),
            result.as_ref().err().map(Error::metric_label),
        );
        result
    }

    /// Publishes how many sandboxes (peer pods holding one of the node's VM slots) this CAA
    /// handles.
    fn count_sandboxes(&self) {
        let n = self
            .sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        super::metrics::METRICS.set_pod_vms(n);
    }

    /// GetInfo: the VM id of a pod; with `wait`, until it is known.
    pub(crate) async fn do_get_info(
        &self,
        req: &podvminfo::GetInfoRequest,
    ) -> Result<String, Error> {
        // Answered from memory when this CAA started the VM.
        let known = {
            let sandboxes = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
            let started = self.started.lock().unwrap_or_else(|e| e.into_inner());
            sandboxes
                .values()
                .filter(|r| r.namespace == req.PodNamespace && r.pod_name == req.PodName)
                .find_map(|r| started.get(&r.sandbox_id).cloned())
        };
        if let Some(id) = known {
            return Ok(id);
        }
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
    pub(crate) async fn reconcile(&self) -> Result<(), Error> {
        for mut p in state::of_node(&self.client, self.node()).await? {
            let r = Record::from_peerpod(&p);
            if p.metadata.deletion_timestamp.is_some() {
                // Marked deleted (StopVM, or the pod went): the VM goes, then the record.
                tracing::info!(vm = %r.vm_name, "record being deleted; deleting its VM");
                self.delete_vm_and_record(&r).await?;
                continue;
            }
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
                self.repair(&r, &mut p).await;
                self.datapath.resume(self, &r, &p).await;
                self.sandboxes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r.sandbox_id.clone(), r);
                self.count_sandboxes();
            } else {
                tracing::info!(vm = %r.vm_name, "pod gone; deleting its VM");
                self.delete_vm_and_record(&r).await?;
            }
        }
        Ok(())
    }

    /// A live record whose VM was ready but whose instance id or IP was never written (CAA
    /// died after StartVM answered, before the background write): written now from the
    /// cloud, which knows the VM by its deterministic name.
    async fn repair(&self, r: &Record, p: &mut crate::api::peerpod::PeerPod) {
        let st = p.status.clone().unwrap_or_default();
        if (!p.spec.instance_id.is_empty() && st.vm_ip.is_some())
            || st.phase.as_deref() == Some(phases::FAILED)
        {
            return;
        }
        match self.provider.get(&r.vm_name).await {
            Ok(Some(vm)) if vm.state == VmState::Succeeded && vm.address().is_some() => {
                let ip = vm.address().map(|ip| ip.to_string());
                tracing::info!(vm = %r.vm_name, "recording the instance of a running VM");
                self.writer
                    .push(Key::of(r), Pending::running(vm.id.clone(), ip.clone()));
                self.started
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r.sandbox_id.clone(), vm.id.clone());
                p.spec.instance_id = vm.id;
                p.status = Some(PeerPodStatus {
                    phase: Some(phases::RUNNING.into()),
                    vm_ip: ip,
                    ..st
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vm = %r.vm_name, error = %e, "reading the VM of a record failed")
            }
        }
    }
}

/// How long a create runs before its record shows phase Creating.
const CREATING_AFTER: Duration = Duration::from_secs(1);

fn being_deleted(id: &str) -> Error {
    // Creating its VM now could only leak it.
    Error::InvalidRequest(format!("the pod of sandbox {id} is being deleted"))
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

/// The services CAA serves, under their wire names ([`methods`]) whatever the generated
/// code calls them (ttrpc-codegen camel-cases `PodVMInfo`), and StopVM answering within the
/// client's deadline ([`StopVm`]).
fn services<T>(svc: Arc<T>, stop: Option<Box<StopVm>>) -> HashMap<String, ttrpc::r#async::Service>
where
    T: hypervisor_ttrpc::Hypervisor + podvminfo_ttrpc::PodVmInfo + Send + Sync + 'static,
{
    let mut out = HashMap::new();
    for (wire, generated) in [
        (
            methods::HYPERVISOR_SERVICE,
            hypervisor_ttrpc::create_hypervisor(svc.clone()),
        ),
        (
            methods::PODVMINFO_SERVICE,
            podvminfo_ttrpc::create_pod_vm_info(svc),
        ),
    ] {
        for (_, service) in generated {
            out.insert(wire.to_string(), service);
        }
    }
    if let (Some(stop), Some(hv)) = (stop, out.get_mut(methods::HYPERVISOR_SERVICE)) {
        hv.methods.insert("StopVM".into(), stop);
    }
    out
}

/// StopVM with the client's deadline in mind: kata's Rust shim gives it about a second,
/// after which the ttrpc server would drop the call (and with it a delete half done). The
/// delete runs as its own task; when it has not finished shortly before the deadline the
/// answer is OK with a status message saying it continues in the background (the record
/// keeps the VM until the cloud confirms it gone, so nothing leaks either way).
struct StopVm(Arc<Caa>);

/// How long before the client's deadline StopVM answers.
fn answer_within(timeout_nano: i64) -> Option<Duration> {
    if timeout_nano <= 0 {
        return None;
    }
    let deadline = Duration::from_nanos(timeout_nano as u64);
    Some(deadline.saturating_sub((deadline / 4).min(Duration::from_secs(2))))
}

#[async_trait::async_trait]
impl ttrpc::r#async::MethodHandler for StopVm {
    async fn handler(
        &self,
        ctx: ttrpc::r#async::TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        use protobuf::Message;
        let mut resp = ttrpc::Response::new();
        let status = match hypervisor::StopVMRequest::parse_from_bytes(&req.payload) {
            Err(e) => ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("undecodable StopVMRequest: {e}"),
            ),
            Ok(r) => match self
                .0
                .do_stop_vm_within(&r.id, answer_within(ctx.timeout_nano))
                .await
            {
                Ok(None) => ttrpc::get_status(ttrpc::Code::OK, ""),
                Ok(Some(note)) => ttrpc::get_status(ttrpc::Code::OK, note),
                Err(e) => match reply::<()>("StopVM", Err(e)) {
                    Err(ttrpc::Error::RpcStatus(s)) => s,
                    _ => ttrpc::get_status(ttrpc::Code::INTERNAL, "StopVM failed"),
                },
            },
        };
        if status.code() == ttrpc::Code::OK {
            resp.payload = hypervisor::StopVMResponse::new()
                .write_to_bytes()
                .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
        }
        resp.set_status(status);
        Ok(resp)
    }
}

/// Serves both services on `socket` (stale socket removed, mode 0600).
pub(crate) async fn serve(caa: Arc<Caa>, socket: &Path) -> Result<ttrpc::r#async::Server, Error> {
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
    let stop = Box::new(StopVm(caa.clone()));
    let svc = Arc::new(Service(caa));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .map_err(|e| err(&e))?
        .register_service(services(svc, Some(stop)));
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(&e))?;
    server.start().await.map_err(|e| err(&e))?;
    Ok(server)
}

/// The image a pod asks for with the `io.katacontainers.config.hypervisor.image`
/// annotation: `AZURE_IMAGE_ID` or one of `AZURE_IMAGE_IDS` (as the configuration spells it);
/// empty for the configured image. Anything else is refused naming what is allowed.
fn choose_image(asked: &str, default: &str, allowed: &[String]) -> Result<String, String> {
    let asked = asked.trim();
    if asked.eq_ignore_ascii_case(default) {
        return Ok(String::new());
    }
    match allowed.iter().find(|a| a.eq_ignore_ascii_case(asked)) {
        Some(a) => Ok(a.clone()),
        None => Err(format!(
            "the pod asks for image {asked:?} ({}), which is not allowed: AZURE_IMAGE_ID and AZURE_IMAGE_IDS of peer-pods-cm allow {}",
            annotations::IMAGE,
            std::iter::once(default)
                .chain(allowed.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl hypervisor_ttrpc::Hypervisor for Nothing {}
    impl podvminfo_ttrpc::PodVmInfo for Nothing {}

    #[test]
    fn every_service_and_method_is_served_under_its_wire_name() {
        let served = services(Arc::new(Nothing), None);
        let mut names: Vec<String> = served
            .iter()
            .flat_map(|(svc, s)| s.methods.keys().map(move |m| format!("/{svc}/{m}")))
            .collect();
        names.sort();
        let mut want = vec![
            methods::CREATE_VM,
            methods::START_VM,
            methods::STOP_VM,
            methods::VERSION,
            methods::GET_INFO,
        ];
        want.sort();
        assert_eq!(names, want);
        assert!(served.contains_key("podvminfo.PodVMInfo"));
        assert!(!served.contains_key("podvminfo.PodVmInfo"));
    }

    #[test]
    fn stopvm_answers_a_quarter_before_short_deadlines_and_two_seconds_before_long_ones() {
        assert_eq!(answer_within(0), None);
        assert_eq!(
            answer_within(1_000_000_000),
            Some(Duration::from_millis(750))
        );
        assert_eq!(
            answer_within(600_000_000_000),
            Some(Duration::from_secs(598))
        );
    }

    #[test]
    fn a_pod_may_ask_only_for_an_allowed_image() {
        let allowed = vec![
            "/SharedGalleries/abc-shared/Images/podvm-gpu/Versions/1.0.0".to_string(),
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/debug/versions/1.0.0".to_string(),
        ];
        let default = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0";
        assert_eq!(
            super::choose_image(default, default, &allowed),
            Ok(String::new())
        );
        assert_eq!(
            super::choose_image(
                "/sharedgalleries/abc-shared/images/podvm-gpu/versions/1.0.0",
                default,
                &allowed
            ),
            Ok(allowed[0].clone())
        );
        let err = super::choose_image("/subscriptions/x/evil", default, &allowed).unwrap_err();
        assert!(
            err.contains("not allowed") && err.contains("AZURE_IMAGE_IDS"),
            "{err}"
        );
        assert!(err.contains("podvm-gpu") && err.contains("/evil"), "{err}");
    }
}
