//! `sandboxd dev kubelet`: a KUBELET STAND-IN for demos, not a kubelet. No kubelet runs in
//! the demo environment, so this process plays the parts of one node that peer pods need:
//!
//! - registers the Node (Ready, with capacity) and runs the node installer's protocol on a
//!   scratch host root (the runtime restart is only recorded);
//! - for each `kata-remote` pod bound to the node: makes the pod network namespace the way a
//!   CNI bridge plugin does (a veth on `br0` of `--node-netns`), calls the CAA hypervisor API
//!   exactly as the kata shim would (CreateVM, StartVM), runs the kata-agent stand-in and a
//!   tiny HTTP "container" in the local pod VM (`--local-vm-dir`) and marks the pod Running
//!   with its pod IP;
//! - on deletion: StopVM, removes the namespace, then finishes the deletion;
//! - other pods bound to the node (DaemonSet/Deployment pods of components the demo runs as
//!   local processes) are marked Running without starting anything.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::io;
use crate::api::names::{RUNTIME_CLASS, annotations};
use crate::cloud::net::{self, Netlink};
use crate::ctl::vm::{CreateArgs, DeleteArgs};
const BRIDGE: &str = "br0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// Flags of `dev kubelet`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node to register and serve.
    #[arg(long)]
    pub(crate) node: String,
    /// The CAA hypervisor socket of this node.
    #[arg(long, default_value = crate::api::names::HYPERVISOR_SOCKET)]
    pub(crate) socket: PathBuf,
    /// Scratch state: the installer's host root and the pod network namespaces.
    #[arg(long)]
    pub(crate) state_dir: PathBuf,
    /// The node's network namespace with bridge `br0` at 10.77.0.1/24 (pod IPs come from
    /// 10.77.0.0/24); without it pods get no network and CreateVM no namespace.
    #[arg(long)]
    pub(crate) node_netns: Option<PathBuf>,
    /// The local provider's VM directory: the HTTP "container" is started in each VM.
    #[arg(long)]
    pub(crate) local_vm_dir: Option<PathBuf>,
    /// Labels put on the Node (`k=v`, repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// How to reach the API server.
    #[command(flatten)]
    pub(crate) kube: crate::k8s::KubeArgs,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Default)]
struct PodState {
    netns: Option<PathBuf>,
    sandbox: Option<String>,
    deleting: bool,
}

struct Kubelet {
    client: Client,
    args: Args,
    pods: Mutex<HashMap<String, PodState>>,
    next_ip: Mutex<u8>,
}

/// Runs the stand-in until `shutdown`; VMs still running are stopped on the way out.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = args.kube.client().await?;
    register(&client, &args).await?;
    let root = args.state_dir.join("host");
    let shim = root.join("opt/kata/bin/containerd-shim-kata-v2");
    std::fs::create_dir_all(shim.parent().unwrap_or(&root)).map_err(|e| io("host root", e))?;
    std::fs::write(&shim, "#!/bin/sh\n# kubelet stand-in: placeholder shim\n")
        .map_err(|e| io("placeholder shim", e))?;
    let installer = {
        let (c, n, t) = (client.clone(), args.node.clone(), shutdown.clone());
        tokio::spawn(async move {
            let services = crate::operator::node_install::systemd::Recorded::default();
            let cfg = crate::operator::node_install::InstallConfig::new("info");
            crate::operator::node_install::follow(c, &n, &root, &cfg, &services, t).await
        })
    };
    let k = Arc::new(Kubelet {
        client: client.clone(),
        args,
        pods: Mutex::new(HashMap::new()),
        next_ip: Mutex::new(2),
    });
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", k.args.node));
    let mut stream = std::pin::pin!(watcher(api, wc).default_backoff().applied_objects());
    println!("kubelet stand-in for node {} running", k.args.node);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = stream.next() => match ev {
                Some(Ok(pod)) => {
                    let k = k.clone();
                    tokio::spawn(async move {
                        let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                        if let Err(e) = k.handle(pod).await {
                            eprintln!("kubelet stand-in: {name}: {e:#}");
                        }
                    });
                }
                Some(Err(e)) => eprintln!("kubelet stand-in: watch: {e}"),
                None => break,
            }
        }
    }
    // Stop what is still running: the demo leaves nothing behind.
    let left: Vec<PodState> = k
        .pods
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in left {
        k.teardown(&s).await;
    }
    installer.abort();
    Ok(())
}

async fn register(client: &Client, args: &Args) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(args.node));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert("node-role.kubernetes.io/worker".into(), json!(""));
    for (k, v) in &args.labels {
        labels.insert(k.clone(), json!(v));
    }
    let node: Node =
        serde_json::from_value(json!({"metadata": {"name": args.node, "labels": labels}}))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let now = now();
    api.patch_status(
        &args.node,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletStandIn",
                "message": "sandboxd dev kubelet (a stand-in)", "lastHeartbeatTime": now,
                "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": {"containerRuntimeVersion": "containerd://2.0.0",
                "kubeletVersion": "stand-in", "operatingSystem": "linux", "architecture": "amd64",
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                "osImage": "", "kubeProxyVersion": ""},
        }})),
    )
    .await?;
    api.patch(
        &args.node,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"taints": null}})),
    )
    .await?;
    Ok(())
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The sandbox id the stand-in uses for a pod (the shim uses the sandbox container id).
pub fn sandbox_id(uid: &str) -> String {
    uid.chars().filter(|c| c.is_ascii_hexdigit()).collect()
}

impl Kubelet {
    async fn handle(&self, pod: Pod) -> anyhow::Result<()> {
        let uid = pod.uid().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            let state = {
                let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
                match pods.get_mut(&uid) {
                    Some(s) if s.deleting => return Ok(()),
                    Some(s) => {
                        s.deleting = true;
                        Some(PodState {
                            netns: s.netns.clone(),
                            sandbox: s.sandbox.clone(),
                            deleting: true,
                        })
                    }
                    None => None,
                }
            };
            if let Some(s) = &state {
                self.teardown(s).await;
            }
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let _ = api.delete(&pod.name_any(), &dp).await;
            self.pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
            return Ok(());
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            if pods.contains_key(&uid) || phase == "Running" {
                return Ok(());
            }
            pods.insert(uid.clone(), PodState::default());
        }
        let kata = pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.as_deref())
            == Some(RUNTIME_CLASS);
        let ip = if kata {
            Some(self.start_vm(&pod, &uid).await?)
        } else {
            None
        };
        set_running(&self.client, &pod, ip).await?;
        Ok(())
    }

    async fn start_vm(&self, pod: &Pod, uid: &str) -> anyhow::Result<Ipv4Addr> {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let ip = {
            let mut n = self.next_ip.lock().unwrap_or_else(|e| e.into_inner());
            let ip = Ipv4Addr::new(10, 77, 0, *n);
            *n = n.wrapping_add(1).max(2);
            ip
        };
        let netns = match &self.args.node_netns {
            Some(node) => {
                let path = self
                    .args
                    .state_dir
                    .join("netns")
                    .join(&uid[..8.min(uid.len())]);
                cni_add(node, &path, ip, &uid[..6.min(uid.len())]).await?;
                Some(path)
            }
            None => None,
        };
        let id = sandbox_id(uid);
        if let Some(s) = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(uid)
        {
            s.netns = netns.clone();
            s.sandbox = Some(id.clone());
        }
        let a = pod.annotations();
        let num = |k: &str| {
            a.get(k)
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|v| *v > 0)
        };
        if let Some(dir) = &self.args.local_vm_dir {
            // CAA answers StartVM once the VM's kata agent answers (readiness `agent`): the
            // local pod VM gets the agent stand-in.
            tokio::spawn(agent_in_local_vm(
                dir.join(crate::cloud::vm_name(&name, &id)),
            ));
        }
        println!(
            "kubelet stand-in: {ns}/{name}: CreateVM + StartVM (as the kata shim) on {}",
            self.args.socket.display()
        );
        let created = crate::ctl::vm::create(&CreateArgs {
            pod: format!("{ns}/{name}"),
            sandbox_id: id.clone(),
            socket: self.args.socket.clone(),
            vcpus: num(annotations::DEFAULT_VCPUS),
            memory: num(annotations::DEFAULT_MEMORY),
            machine_type: a.get(annotations::MACHINE_TYPE).cloned(),
            netns,
            timeout: 120,
        })
        .await?;
        if let Some(dir) = &self.args.local_vm_dir {
            serve_in_vm(&dir.join(&created.vm), ip, &name)?;
        }
        println!(
            "kubelet stand-in: {ns}/{name}: VM {} running, pod IP {ip}",
            created.vm
        );
        Ok(ip)
    }

    async fn teardown(&self, s: &PodState) {
        if let Some(id) = &s.sandbox {
            let r = crate::ctl::vm::delete(&DeleteArgs {
                sandbox_id: id.clone(),
                socket: self.args.socket.clone(),
                timeout: 120,
            })
            .await;
            match r {
                Ok(()) => println!("kubelet stand-in: StopVM {id}: VM deleted"),
                Err(e) => eprintln!("kubelet stand-in: StopVM {id}: {e}"),
            }
        }
        if let Some(p) = &s.netns {
            net::remove_named_netns(p);
        }
    }
}

/// The kata-agent stand-in (`dev agent`) inside the local pod VM at `vm_dir`, from when the
/// VM exists until it is gone.
async fn agent_in_local_vm(vm_dir: PathBuf) {
    let rec = vm_dir.join("vm.json");
    for _ in 0..600 {
        if rec.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !rec.exists() {
        return;
    }
    match super::agent::start(&vm_dir.join("run/kata-containers/agent.sock")).await {
        Ok((server, _log)) => {
            while vm_dir.exists() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            drop(server);
        }
        Err(e) => eprintln!(
            "kubelet stand-in: the agent stand-in in {}: {e}",
            vm_dir.display()
        ),
    }
}

/// The CNI bridge plugin's part: a pod namespace at `path` with eth0 on `br0` of `node`.
async fn cni_add(node: &Path, path: &Path, ip: Ipv4Addr, tag: &str) -> anyhow::Result<()> {
    net::create_named_netns(path)?;
    let n = Netlink::in_netns(node).await?;
    let br = n
        .index_of(BRIDGE)
        .await?
        .ok_or_else(|| io("node netns", "no br0"))?;
    let (host, peer) = (format!("veth{tag}"), format!("vp{tag}"));
    let host_end = n.add_veth(&host, &peer).await?;
    n.handle
        .link()
        .set(
            rtnetlink::LinkUnspec::new_with_index(host_end)
                .controller(br)
                .build(),
        )
        .execute()
        .await?;
    n.up(host_end).await?;
    let peer_idx = n
        .index_of(&peer)
        .await?
        .ok_or_else(|| io("veth", "peer missing"))?;
    n.move_to(peer_idx, &std::fs::File::open(path)?).await?;
    let p = Netlink::in_netns(path).await?;
    let eth = p
        .index_of(&peer)
        .await?
        .ok_or_else(|| io("veth", "pod end missing"))?;
    let o = ip.octets();
    p.configure(
        eth,
        "eth0",
        1500,
        Some([0x0a, 0x58, o[0], o[1], o[2], o[3]]),
    )
    .await?;
    p.add_addr(eth, ip, 24).await?;
    p.up(eth).await?;
    if let Some(lo) = p.index_of("lo").await? {
        p.up(lo).await?;
    }
    p.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), eth)
        .await?;
    Ok(())
}

/// The "container": an HTTP server on `ip:8080` inside the local pod VM's pod namespace.
fn serve_in_vm(vm_dir: &Path, ip: Ipv4Addr, pod: &str) -> anyhow::Result<()> {
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(vm_dir.join("vm.json"))?)?;
    let pid = rec["pid"].as_i64().ok_or_else(|| io("vm.json", "no pid"))?;
    let podns = PathBuf::from(format!("/proc/{pid}/root/run/netns/podns"));
    let body = format!("hello from pod {pod}, served inside its pod VM\n");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bound = (|| -> std::io::Result<std::net::TcpListener> {
            let f = std::fs::File::open(&podns)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            std::net::TcpListener::bind((ip, 8080))
        })();
        let l = match bound {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for s in l.incoming().flatten() {
            use std::io::{Read, Write};
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| io("container", "did not start"))??;
    Ok(())
}

async fn set_running(client: &Client, pod: &Pod, ip: Option<Ipv4Addr>) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let now = now();
    let containers: Vec<_> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let statuses: Vec<_> = containers
        .iter()
        .map(|c| {
            json!({"name": c, "ready": true, "restartCount": 0, "image": "stand-in", "imageID": "",
                        "started": true, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let mut status = json!({
        "phase": "Running", "startTime": now, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
        "containerStatuses": statuses,
    });
    if let Some(ip) = ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_id_of_a_pod_is_its_uid_without_dashes() {
        assert_eq!(
            sandbox_id("8992f6a4-1872-4372-9e0e-02857c49e667"),
            "8992f6a4187243729e0e02857c49e667"
        );
    }

    #[test]
    fn node_labels_are_key_equals_value() {
        assert_eq!(
            parse_label("node-role.kubernetes.io/kata-oc="),
            Ok(("node-role.kubernetes.io/kata-oc".into(), String::new()))
        );
        assert!(parse_label("no-equals").is_err());
    }
}
