//! `sandboxd ctl vm list`: peer-pod VMs from the PeerPod records, cluster-wide (the seed's
//! "get VMs" step without the cloud console). `vm create|delete`: a `crictl`-style
//! debugging tool run on a node that talks to that node's CAA hypervisor socket exactly as
//! the kata shim does (CreateVM + StartVM, StopVM).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use super::{Ctx, output};
use crate::api::names::{HYPERVISOR_SOCKET, annotations};
use crate::api::peerpod::PeerPod;
use crate::k8s::apply::is_not_found;
use crate::protocol::{hypervisor, hypervisor_ttrpc};

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The PeerPod API is missing.
    #[error("the PeerPod API is not installed: run `sandboxd ctl install` first")]
    NotInstalled,
    /// The API server refused.
    #[error("listing PeerPods: {0}")]
    Api(#[source] kube::Error),
    /// `--pod` is not `NAMESPACE/NAME`.
    #[error("--pod must be NAMESPACE/NAME, got {0:?}")]
    PodRef(String),
    /// The hypervisor socket cannot be reached.
    #[error(
        "cannot reach the CAA hypervisor socket {socket}: {reason} (is `sandboxd caa` running on this node? pass its socket with --socket)"
    )]
    Connect {
        /// The socket path.
        socket: String,
        /// Why.
        reason: String,
    },
    /// CAA answered a call with an error.
    #[error("{call} failed: {reason}")]
    Call {
        /// CreateVM, StartVM or StopVM.
        call: &'static str,
        /// CAA's message.
        reason: String,
    },
}

/// `ctl vm ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// List peer-pod VMs in every namespace.
    List,
    /// Create and start the VM of a pod through this node's CAA socket (as the kata shim).
    Create(CreateArgs),
    /// Stop and delete the VM of a sandbox through this node's CAA socket (as the kata shim).
    Delete(DeleteArgs),
    /// Print the serial console log of a pod's VM (Azure boot diagnostics): for a VM that
    /// never reached its forwarder.
    Console(ConsoleArgs),
}

/// Flags of `ctl vm console`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConsoleArgs {
    /// The pod, as `NAME` (in `--pod-namespace`) or `NAMESPACE/NAME`.
    pub(crate) pod: String,
    /// Namespace of the pod when `POD` has none.
    #[arg(long, default_value = "default")]
    pub(crate) pod_namespace: String,
    /// Azure endpoints.
    #[command(flatten)]
    pub(crate) endpoints: super::azure_arm::EndpointArgs,
}

/// Flags of `ctl vm create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The pod the VM is for, as `NAMESPACE/NAME` (it must exist: CAA records its uid).
    #[arg(long)]
    pub(crate) pod: String,
    /// The sandbox id (the shim uses the pod sandbox's container id).
    #[arg(long)]
    pub(crate) sandbox_id: String,
    /// The CAA hypervisor socket of this node.
    #[arg(long, default_value = HYPERVISOR_SOCKET)]
    pub(crate) socket: PathBuf,
    /// vCPUs for the automatic instance size (`default_vcpus` annotation).
    #[arg(long)]
    pub(crate) vcpus: Option<u32>,
    /// Memory in MiB for the automatic instance size (`default_memory` annotation).
    #[arg(long)]
    pub(crate) memory: Option<u32>,
    /// Instance size (`machine_type` annotation); must be one of `AZURE_INSTANCE_SIZES`.
    #[arg(long)]
    pub(crate) machine_type: Option<String>,
    /// The pod's network namespace (as CNI made it); empty: no pod network is tunnelled.
    #[arg(long)]
    pub(crate) netns: Option<PathBuf>,
    /// Seconds to wait for StartVM.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout: u64,
}

/// Flags of `ctl vm delete`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    /// The sandbox id given to `vm create` (or by the shim).
    #[arg(long)]
    pub(crate) sandbox_id: String,
    /// The CAA hypervisor socket of this node.
    #[arg(long, default_value = HYPERVISOR_SOCKET)]
    pub(crate) socket: PathBuf,
    /// Seconds to wait for StopVM.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout: u64,
}

/// The CreateVM request the kata shim would send for these flags.
pub(crate) fn create_request(a: &CreateArgs) -> Result<hypervisor::CreateVMRequest, Error> {
    let (ns, name) = a
        .pod
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| Error::PodRef(a.pod.clone()))?;
    let mut r = hypervisor::CreateVMRequest::new();
    r.id = a.sandbox_id.clone();
    let mut put = |k: &str, v: String| {
        r.annotations.insert(k.to_string(), v);
    };
    put(annotations::SANDBOX_NAME, name.to_string());
    put(annotations::SANDBOX_NAMESPACE, ns.to_string());
    // The shim always sends these, "0" meaning unset.
    put(annotations::DEFAULT_VCPUS, a.vcpus.unwrap_or(0).to_string());
    put(
        annotations::DEFAULT_MEMORY,
        a.memory.unwrap_or(0).to_string(),
    );
    put(annotations::DEFAULT_GPUS, "0".to_string());
    if let Some(m) = &a.machine_type {
        put(annotations::MACHINE_TYPE, m.clone());
    }
    r.networkNamespacePath = a
        .netns
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Ok(r)
}

fn call_ctx(timeout: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(timeout).as_nanos() as i64)
}

/// A hypervisor client on `socket`: one connection per command, as the shim does.
pub(crate) async fn connect(socket: &Path) -> Result<hypervisor_ttrpc::HypervisorClient, Error> {
    let err = |reason: String| Error::Connect {
        socket: socket.display().to_string(),
        reason,
    };
    // Probe first: ttrpc's own connect error does not say which path failed.
    tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| err(e.to_string()))?;
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(hypervisor_ttrpc::HypervisorClient::new(c))
}

fn call_err(call: &'static str) -> impl Fn(ttrpc::Error) -> Error {
    move |e| Error::Call {
        call,
        reason: match e {
            ttrpc::Error::RpcStatus(s) => s.message().to_string(),
            other => other.to_string(),
        },
    }
}

/// What `vm create` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Created {
    /// The sandbox id.
    pub(crate) sandbox_id: String,
    /// The cloud VM name.
    pub(crate) vm: String,
    /// The VM's private IP, when the PeerPod record could be read.
    pub(crate) ip: Option<String>,
    /// The agent socket CAA serves for this sandbox.
    pub(crate) agent_socket: String,
}

/// CreateVM + StartVM through `socket`; returns the VM name and agent socket.
pub(crate) async fn create(a: &CreateArgs) -> Result<Created, Error> {
    let req = create_request(a)?;
    let hv = connect(&a.socket).await?;
    let created = hv
        .create_vm(call_ctx(a.timeout), &req)
        .await
        .map_err(call_err("CreateVM"))?;
    let mut start = hypervisor::StartVMRequest::new();
    start.id = a.sandbox_id.clone();
    hv.start_vm(call_ctx(a.timeout), &start)
        .await
        .map_err(call_err("StartVM"))?;
    let name = &req.annotations[annotations::SANDBOX_NAME];
    Ok(Created {
        sandbox_id: a.sandbox_id.clone(),
        vm: crate::cloud::vm_name(name, &a.sandbox_id),
        ip: None,
        agent_socket: created.agentSocketPath,
    })
}

/// StopVM through `socket`.
pub(crate) async fn delete(a: &DeleteArgs) -> Result<(), Error> {
    let hv = connect(&a.socket).await?;
    let mut stop = hypervisor::StopVMRequest::new();
    stop.id = a.sandbox_id.clone();
    hv.stop_vm(call_ctx(a.timeout), &stop)
        .await
        .map_err(call_err("StopVM"))?;
    Ok(())
}

/// How long `vm create` waits for CAA to record the VM's IP after StartVM answered.
const IP_WAIT: Duration = Duration::from_secs(10);

/// The VM IP CAA recorded on the PeerPod (best effort: `None` without cluster access, when
/// the record is gone, or after [`IP_WAIT`]). CAA writes it in the background right after
/// StartVM answers, so it may land a moment after the call returned.
async fn recorded_ip(ctx: &Ctx, namespace: &str, vm: &str) -> Option<String> {
    let client = ctx.client().await.ok()?;
    let api: Api<PeerPod> = Api::namespaced(client, namespace);
    let deadline = tokio::time::Instant::now() + IP_WAIT;
    loop {
        if let Some(ip) = api.get_opt(vm).await.ok()??.status.and_then(|s| s.vm_ip) {
            return Some(ip);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One row of `vm list`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VmRow {
    /// Namespace of the pod.
    pub(crate) namespace: String,
    /// The pod the VM serves (the PeerPod's owner; else the record's name).
    pub(crate) pod: String,
    /// Cloud VM name.
    pub(crate) vm: String,
    /// Worker node.
    pub(crate) node: String,
    /// VM private IP.
    pub(crate) ip: String,
    /// Age.
    pub(crate) age: String,
    /// Phase.
    pub(crate) phase: String,
}

/// The rows for these records, sorted by namespace and pod.
pub(crate) fn rows(pods: &[PeerPod]) -> Vec<VmRow> {
    let mut rows: Vec<VmRow> = pods
        .iter()
        .map(|p| {
            let status = p.status.clone().unwrap_or_default();
            VmRow {
                namespace: p.namespace().unwrap_or_default(),
                // CAA names the record after the VM and points it at the pod it serves.
                pod: p
                    .owner_references()
                    .iter()
                    .find(|o| o.kind == "Pod")
                    .map_or_else(|| p.name_any(), |o| o.name.clone()),
                vm: p.spec.vm_name.clone(),
                node: p.spec.node_name.clone(),
                ip: status.vm_ip.unwrap_or_else(|| "<none>".into()),
                age: output::age(p.metadata.creation_timestamp.as_ref()),
                phase: status.phase.unwrap_or_else(|| "Pending".into()),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    rows
}

/// Run `ctl vm ...`.
pub(crate) async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List => list(ctx).await,
        Command::Create(a) => {
            let mut created = create(&a).await?;
            let ns = a.pod.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
            created.ip = recorded_ip(ctx, ns, &created.vm).await;
            if let Some(text) = output::structured(ctx.output, &created)? {
                print!("{text}");
            } else {
                println!(
                    "VM {} started for sandbox {} (IP {}, agent socket {})",
                    created.vm,
                    created.sandbox_id,
                    created.ip.as_deref().unwrap_or("<unknown>"),
                    created.agent_socket
                );
            }
            Ok(())
        }
        Command::Delete(a) => {
            delete(&a).await?;
            println!("VM of sandbox {} stopped and deleted", a.sandbox_id);
            Ok(())
        }
        Command::Console(a) => {
            print!("{}", console(ctx, &a).await?);
            Ok(())
        }
    }
}

/// The serial log of the VM of pod `a.pod`: its newest PeerPod names the VM, `peer-pods-cm`
/// the resource group, `peer-pods-secret` (or the `AZURE_*` environment) the credentials.
async fn console(ctx: &Ctx, a: &ConsoleArgs) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use k8s_openapi::api::core::v1::ConfigMap;
    let (ns, pod) = match a.pod.split_once('/') {
        Some((ns, pod)) => (ns, pod),
        None => (a.pod_namespace.as_str(), a.pod.as_str()),
    };
    let client = ctx.client().await?;
    let api: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await.map_err(|e| {
        if is_not_found(&e) {
            Error::NotInstalled
        } else {
            Error::Api(e)
        }
    })?;
    let vm = list
        .items
        .iter()
        .filter(|p| p.owner_references().iter().any(|o| o.name == pod))
        .max_by_key(|p| p.creation_timestamp())
        .map(|p| p.spec.vm_name.clone())
        .with_context(|| format!("pod {ns}/{pod} has no peer-pod VM (no PeerPod owned by it)"))?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ctx.namespace);
    let cm = cms
        .get_opt(crate::api::names::CONFIG_MAP)
        .await?
        .and_then(|c| c.data)
        .unwrap_or_default();
    let rg = cm
        .get("AZURE_RESOURCE_GROUP")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "{} in namespace {} has no AZURE_RESOURCE_GROUP",
                crate::api::names::CONFIG_MAP,
                ctx.namespace
            )
        })?;
    let secret = super::azure_arm::credentials(&client, &ctx.namespace, None).await?;
    let endpoints = super::azure_arm::resolve_endpoints(&a.endpoints, &cm)?;
    let azure = super::azure_arm::Azure::new(&secret, &endpoints)?;
    Ok(azure.serial_log(&rg, &vm).await?)
}

async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let api: Api<PeerPod> = Api::all(client);
    let list = api.list(&ListParams::default()).await.map_err(|e| {
        if is_not_found(&e) {
            Error::NotInstalled
        } else {
            Error::Api(e)
        }
    })?;
    let rows = rows(&list.items);
    if let Some(text) = output::structured(ctx.output, &rows)? {
        print!("{text}");
        return Ok(());
    }
    if rows.is_empty() {
        println!("no peer-pod VMs");
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| vec![r.namespace, r.pod, r.vm, r.node, r.ip, r.age, r.phase])
        .collect();
    print!(
        "{}",
        output::table(
            &["NAMESPACE", "POD", "VM", "NODE", "IP", "AGE", "PHASE"],
            &table
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pod: &str) -> CreateArgs {
        CreateArgs {
            pod: pod.into(),
            sandbox_id: "0123abcd4567ef89".into(),
            socket: HYPERVISOR_SOCKET.into(),
            vcpus: None,
            memory: Some(4096),
            machine_type: Some("Standard_D2as_v5".into()),
            netns: Some("/var/run/netns/cni-1".into()),
            timeout: 10,
        }
    }

    #[test]
    fn vm_create_sends_the_annotations_the_kata_shim_sends() {
        let r = create_request(&args("team-a/web")).unwrap();
        let a = &r.annotations;
        assert_eq!(r.id, "0123abcd4567ef89");
        assert_eq!(a[annotations::SANDBOX_NAME], "web");
        assert_eq!(a[annotations::SANDBOX_NAMESPACE], "team-a");
        assert_eq!(a[annotations::DEFAULT_VCPUS], "0");
        assert_eq!(a[annotations::DEFAULT_MEMORY], "4096");
        assert_eq!(a[annotations::MACHINE_TYPE], "Standard_D2as_v5");
        assert_eq!(r.networkNamespacePath, "/var/run/netns/cni-1");
    }

    #[test]
    fn vm_create_rejects_a_pod_that_is_not_namespace_slash_name() {
        for bad in ["web", "/web", "ns/", "a/b/c"] {
            let e = create_request(&args(bad)).unwrap_err();
            assert!(matches!(e, Error::PodRef(_)), "{bad}: {e}");
        }
    }
}
