//! Peer pods on the real node, end to end, with nothing but sandboxd: the guide's steps
//! install sandboxd from `deploy/`; the node installer puts sandboxd's shim on the node (it
//! has no kata shim); CAA (its Azure provider) creates VMs through the ARM test server,
//! whose VMs are the pod VM image this repository builds, booted under qemu (TCG here) with
//! their NIC in the node's network namespace; `sandboxd agent` in each VM pulls the pod's
//! image from a registry on the test network (Debian's `docker-registry`, TLS with a test
//! CA the image trusts; the node's containerd trusts it through its hosts directory).
//!
//! [`guide`] is the one end-to-end run (one install for every assertion, to keep CI's time
//! down); [`bench_pod_start`] (`make bench-podstart`) reuses its world.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sandboxd::pki::{Ca, Usage};
use serde_json::json;

use super::{
    KATA_CONFIG, NS, SUB, azure_configmap, azure_secret, ctl_ok, image, kataconfig_create, phase,
    pod_events, print_pod_logs, sandboxd,
};
use crate::agent::registry::Registry;
use crate::harness::node::{REAL_NODE_LABEL, TestNode};
use crate::harness::process::{Process, free_port};
use crate::harness::{Env, eventually};

/// Address range of the VMs' tap links in the node's network namespace.
const VM_SUBNET: &str = "10.251.0.0";
/// Memory of each pod VM (MiB): what the OOM case fills.
const VM_MEMORY_MIB: &str = "1024";

/// Why the peer-pod tests cannot run here (printed as a skip).
pub fn skip_reason() -> Option<String> {
    crate::agent::registry::skip_reason()
        .or_else(|| {
            (!Path::new(crate::agent::host::BUSYBOX).exists()).then(|| {
                format!(
                    "{} missing (Debian busybox-static; scripts/bootstrap.sh)",
                    crate::agent::host::BUSYBOX
                )
            })
        })
        .or_else(|| crate::image::boot::skip_reason(crate::image::inputs_skip()))
        .or_else(|| {
            (!crate::harness::which("script"))
                .then(|| "script missing (util-linux): kubectl exec -t needs a terminal".into())
        })
}

/// The ARM test server as a process whose VMs boot the pod VM image under qemu, their taps
/// in the node's network namespace.
pub struct ArmWithVms {
    process: Process,
    addr: std::net::SocketAddr,
    pub(super) vms: PathBuf,
    image_id: String,
    _dir: tempfile::TempDir,
}

impl ArmWithVms {
    async fn start(node: &TestNode, disk: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let vms = dir.path().join("vms");
        let addr = std::net::SocketAddr::from((node.net.host_ip, free_port()));
        let netns = node.netns()?.display().to_string();
        let args: Vec<String> = [
            "dev",
            "arm-server",
            "--addr",
            &addr.to_string(),
            "--lro-ms",
            "200",
            "--seed-subscription",
            SUB,
            "--local-vms",
            &vms.display().to_string(),
            "--local-vm-subnet",
            VM_SUBNET,
            "--local-vm-image",
            &disk.display().to_string(),
            "--local-vm-memory",
            VM_MEMORY_MIB,
            "--local-vm-accel",
            "tcg",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = Process::start(
            "arm-qemu-vms",
            Path::new(env!("CARGO_BIN_EXE_sandboxd")),
            &args,
            &[
                ("SANDBOXD_NODE_NETNS", netns.as_str()),
                ("RUST_LOG", "info"),
            ],
        )?;
        let log = process.log_path().to_path_buf();
        let image_id = eventually("the ARM test server", Duration::from_secs(30), || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .lines()
                    .find_map(|l| l.strip_prefix("AZURE_IMAGE_ID="))
                    .map(str::to_string)
                    .filter(|_| text.contains("ARM test server listening")))
            }
        })
        .await?;
        Ok(Self {
            process,
            addr,
            vms,
            image_id,
            _dir: dir,
        })
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The VMs ARM holds.
    pub(super) async fn arm_vms(&self) -> Result<Vec<serde_json::Value>> {
        let body = curl_get(&format!("http://{}/armtest/vms", self.addr)).await?;
        let v: serde_json::Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The qemu VMs' state directories.
    pub(super) fn qemu_vms(&self) -> Vec<String> {
        std::fs::read_dir(&self.vms)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last console lines of every VM (for a failure's diagnosis).
    fn consoles(&self) -> String {
        let mut out = String::new();
        for vm in self.qemu_vms() {
            for f in ["console.log", "qemu.log"] {
                let text = std::fs::read_to_string(self.vms.join(&vm).join(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "--- {vm}/{f}\n{}\n",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                ));
            }
        }
        out
    }
}

/// GET `url` with curl (the test's own HTTP client is for the API server).
async fn curl_get(url: &str) -> Result<String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-m", "5", url])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pod VM image this repository builds (`sandboxd image build` from the Debian inputs,
/// the static binary as `/init`), trusting `ca` (the test registry's) as its CA bundle.
async fn podvm_image(ca: &Ca, dir: &Path) -> Result<PathBuf> {
    let inputs = crate::image::inputs().await?;
    let sandboxd = crate::image::static_binary().context("no static sandboxd (make build)")?;
    let ca_file = dir.join("registry-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem())?;
    let mut a = crate::image::args(&inputs, dir, &sandboxd);
    a.format = vec![sandboxd::image::build::Format::Qcow2];
    a.ca_certs = ca_file;
    let built = tokio::task::spawn_blocking(move || sandboxd::image::build::build(&a)).await??;
    Ok(crate::image::output(&built, sandboxd::image::build::Format::Qcow2)?.to_path_buf())
}

/// What the peer pods need besides the cluster: the registry on the node's address with
/// busybox in it, the pod VM image, the ARM test server booting it.
pub struct World {
    pub registry: Registry,
    pub arm: ArmWithVms,
    /// The node's network namespace.
    pub netns: PathBuf,
    /// busybox in the registry.
    pub app_image: String,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(node: &TestNode) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let netns = node.netns()?;
        let ca = Ca::new("node-registry-ca", time::Duration::days(1))?;
        let ip = node.net.node_ip.to_string();
        let addr = format!("{ip}:{}", free_port());
        let cert = ca.issue(
            "registry",
            &[],
            &[ip.as_str()],
            Usage::Server,
            time::Duration::days(1),
        )?;
        let registry = Registry::start_on(
            "node-registry",
            Some(&netns),
            &addr,
            Some((ca.cert_pem(), cert.cert_pem, cert.key_pem)),
        )?;
        // The node's containerd pulls from it too (the kubelet pulls before it creates a
        // container), trusting the test CA for that host only.
        let hosts = format!("{}/{addr}", sandboxd::devenv::node::REGISTRY_HOSTS_DIR);
        node.write_file(&format!("{hosts}/ca.crt"), ca.cert_pem().as_bytes())?;
        node.write_file(
            &format!("{hosts}/hosts.toml"),
            format!(
                "server = \"https://{addr}\"\n\n[host.\"https://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{hosts}/ca.crt\"\n"
            )
            .as_bytes(),
        )?;
        let (app_image, _) = registry.push_busybox(Some(&netns), "busybox", "1", "peer-pod")?;
        let started = Instant::now();
        let disk = podvm_image(&ca, dir.path()).await?;
        eprintln!(
            "pod VM image built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        let arm = ArmWithVms::start(node, &disk).await?;
        Ok(Self {
            registry,
            arm,
            netns,
            app_image,
            _dir: dir,
        })
    }
}

pub type Body<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

/// Runs `body` with the node open and the peer-pod [`World`] up, then uninstalls sandboxd
/// whatever happened: the KataConfig's removal takes sandboxd's shim off the node and leaves
/// its containerd configuration byte for byte as it was.
pub async fn with_world(
    env: Env,
    body: impl for<'a> FnOnce(&'a Env, &'static TestNode, Client, &'a World) -> Body<'a> + Send,
) -> Result<()> {
    let node = env.node();
    let client = env.admin().await?;
    let original = node.read_file("/etc/containerd/config.toml")?;
    let open = node.open(&client).await?;
    let world = World::start(node).await;
    let result = match &world {
        Ok(w) => {
            let r = body(&env, node, client.clone(), w).await;
            if r.is_err() {
                eprintln!("ARM test server log:\n{}", w.arm.process.log_tail(30));
                eprintln!("{}", w.arm.consoles());
                let cd =
                    std::fs::read_to_string(node.logs().join("containerd.log")).unwrap_or_default();
                let shim: Vec<&str> = cd
                    .lines()
                    .filter(|l| l.contains("sandboxd") || l.contains("shim"))
                    .collect();
                eprintln!(
                    "containerd log (shim lines):\n{}",
                    shim[shim.len().saturating_sub(60)..].join("\n")
                );
                print_pod_logs(&client, NS).await;
                print_pod_logs(&client, &env.ns).await;
            }
            r
        }
        Err(e) => Err(anyhow::anyhow!("setting up the peer-pod world: {e:#}")),
    };
    // A failed run leaves its peer pods: they would (rightly) hold the KataConfig's removal.
    if let Err(e) = delete_workloads(&client, &env.ns).await {
        eprintln!("deleting the test's workloads: {e:#}");
    }
    let cleanup = super::uninstall(&env, node, &client, &original).await;
    open.close().await?;
    let shim_left = node
        .read_file(sandboxd::operator::node_install::kata_config::SANDBOXD_SHIM)
        .is_ok();
    drop(world);
    match (result, cleanup) {
        (Err(r), Err(c)) => return Err(r.context(format!("and the uninstall failed too: {c:#}"))),
        (r, c) => {
            r?;
            c?;
        }
    }
    ensure!(!shim_left, "uninstall left sandboxd's shim on the node");
    Ok(())
}

/// Deletes the Deployments and pods of `ns` and waits (a while) for the pods to go.
async fn delete_workloads(client: &Client, ns: &str) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    deployments
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    pods.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    eventually("the test's pods gone", Duration::from_secs(180), || async {
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await
}

/// `ctl install --vanilla --image IMAGE --wait`: installs, or upgrades to IMAGE. The ARM
/// test server is a development endpoint: a flag on the operator's command line, which the
/// operator hands on to the CAA and the image Jobs (never the ConfigMap).
pub(super) async fn ctl_install(env: &Env, world: &World, image: &str) -> Result<()> {
    let arm_url = world.arm.url();
    ctl_ok(
        env,
        &[
            "install",
            "--vanilla",
            "--image",
            image,
            "--wait",
            "--timeout",
            "180",
            "--dev-arm-endpoint",
            &arm_url,
        ],
    )
    .await
    .map(drop)
}

/// The guide's steps against the world's ARM test server: sandboxd installed from
/// `deploy/`, its secret, configmap and SSH key, a KataConfig selecting the node (shim
/// `auto`: sandboxd's, the node has no kata shim) until Completed, the node's containerd
/// configured and restarted by the node installer pod, the webhook and CAA ready.
pub(super) async fn install(
    env: &Env,
    node: &'static TestNode,
    client: &Client,
    world: &World,
) -> Result<()> {
    ctl_install(env, world, &image(node)?)
        .await
        .context("installing the operator from deploy/")?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ops = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=sandboxd-operator"))
        .await?;
    ensure!(
        ops.items.iter().any(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name.as_str())
                && phase(p) == "Running"
        }),
        "no operator pod Running on the node"
    );
    azure_secret(env).await?;
    azure_configmap(env, &world.arm.url(), Some(&world.arm.image_id)).await?;
    ctl_ok(env, &["ssh-key"]).await?;
    // No --shim: `auto` picks sandboxd's shim on a node without kata's.
    kataconfig_create(env).await?;
    let status = ctl_ok(env, &["status", "--watch", "--timeout", "240"])
        .await
        .with_context(|| {
            format!(
                "KataConfig never completed; node logs in {}",
                node.logs().display()
            )
        })?;
    eprintln!("ctl status:\n{status}");

    // The node installer edited the node's containerd configuration, put sandboxd's shim on
    // the node and restarted containerd through the systemd stand-in: the CRI reports the
    // kata-remote handler.
    let config = String::from_utf8(node.read_file("/etc/containerd/config.toml")?)?;
    ensure!(
        config.contains("50-sandboxd-kata-remote.toml"),
        "the node's containerd config does not import sandboxd's drop-in:\n{config}"
    );
    let shim = node.host_path(sandboxd::operator::node_install::kata_config::SANDBOXD_SHIM)?;
    let version = tokio::process::Command::new(&shim)
        .arg("-v")
        .output()
        .await
        .context("the node installer did not put sandboxd's shim on the node")?;
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    ensure!(
        version.starts_with(&format!("{}: sandboxd ", sandboxd::shim::BINARY_NAME)),
        "the shim on the node answers -v with {version:?}"
    );
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(
        "the CRI reporting the kata-remote handler",
        Duration::from_secs(60),
        || async {
            let n = nodes.get(&node.name).await?;
            let handlers: Vec<String> = n
                .status
                .and_then(|s| s.runtime_handlers)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|h| h.name)
                .collect();
            Ok(handlers.iter().any(|h| h == "kata-remote").then_some(()))
        },
    )
    .await?;
    let containerd_log =
        std::fs::read_to_string(node.logs().join("containerd.log")).unwrap_or_default();
    ensure!(
        containerd_log.matches("starting containerd").count() >= 2,
        "containerd was not restarted by the node installer"
    );
    // The webhook Deployment (registered by Service) and the CAA DaemonSet run on the node.
    eventually(
        "the webhook Deployment available",
        Duration::from_secs(120),
        || async {
            let d = deployments.get_opt("peer-pods-webhook").await?;
            Ok(d.and_then(|d| d.status)
                .and_then(|s| s.available_replicas)
                .filter(|n| *n >= 1)
                .map(|_| ()))
        },
    )
    .await?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    eventually(
        "the CAA DaemonSet ready",
        Duration::from_secs(120),
        || async {
            let ds = daemonsets.get_opt("peerpodconfig-ctrl-caa-daemon").await?;
            Ok(ds
                .and_then(|d| d.status)
                .filter(|s| s.number_ready >= 1)
                .map(|_| ()))
        },
    )
    .await?;
    Ok(())
}

/// `kubectl` against the test cluster in the test's namespace: (success, stdout, stderr).
pub(super) async fn kubectl(
    env: &Env,
    node: &TestNode,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(bool, String, String)> {
    use tokio::io::AsyncWriteExt;
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let mut cmd = tokio::process::Command::new(node.bin.join("kubectl"));
    cmd.args(["--kubeconfig", &kubeconfig, "-n", &env.ns])
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("kubectl")?;
    if let Some(input) = stdin {
        let mut si = child.stdin.take().context("stdin")?;
        si.write_all(input.as_bytes()).await?;
        drop(si);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .context("kubectl did not finish")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// containerd's task bundles on the node.
const TASKS: &str = "/run/containerd/io.containerd.runtime.v2.task/k8s.io";
/// Shim sockets on the node.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// CAA's per-pod directories on the node.
const CAA_PODS: &str = "/run/peerpod/pods";

/// What the node held before the test's peer pods (other pods' containers come and go).
pub(super) struct NodeFiles {
    sockets: BTreeSet<String>,
    caa: BTreeSet<String>,
}

impl NodeFiles {
    pub(super) fn read(node: &TestNode) -> Self {
        let set = |d: &str| node.list_dir(d).unwrap_or_default().into_iter().collect();
        Self {
            sockets: set(SHIM_SOCKETS),
            caa: set(CAA_PODS),
        }
    }
}

/// The task bundles (and the pods' network namespaces) of the containers of namespace `ns`
/// on the node, read from each bundle's OCI spec.
pub(super) fn bundles_of(node: &TestNode, ns: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut bundles, mut netns) = (BTreeSet::new(), BTreeSet::new());
    for id in node.list_dir(TASKS).unwrap_or_default() {
        let Ok(text) = node.read_file(&format!("{TASKS}/{id}/config.json")) else {
            continue;
        };
        let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        if spec["annotations"]["io.kubernetes.cri.sandbox-namespace"] != ns {
            continue;
        }
        bundles.insert(id);
        for n in spec["linux"]["namespaces"].as_array().into_iter().flatten() {
            if n["type"] == "network"
                && let Some(p) = n["path"].as_str()
            {
                netns.insert(p.to_string());
            }
        }
    }
    (bundles, netns)
}

/// Processes whose command line contains `needle` (the whole machine: the node's
/// processes are this host's).
pub(super) fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(format!("{name}: {}", cmd.trim()));
        }
    }
    out
}

/// Deleted peer pods left nothing: no VM in ARM, no qemu VM or process, no PeerPod, no
/// shim process, no task bundle of the test's namespace, none of its pods' network
/// namespaces (`netns`, read while they ran), no CAA pod directory and no shim socket
/// nobody serves beyond `before`.
pub(super) async fn nothing_left(
    client: &Client,
    env: &Env,
    node: &TestNode,
    world: &World,
    before: &NodeFiles,
    netns: &BTreeSet<String>,
) -> Result<()> {
    let peerpods: Api<sandboxd::api::peerpod::PeerPod> = Api::namespaced(client.clone(), &env.ns);
    eventually(
        "no VM in ARM, no qemu VM, no PeerPod",
        Duration::from_secs(120),
        || async {
            let vms = world.arm.arm_vms().await?;
            let pp = peerpods.list(&ListParams::default()).await?.items.len();
            let qemu = world.arm.qemu_vms();
            Ok((vms.is_empty() && qemu.is_empty() && pp == 0).then_some(()))
        },
    )
    .await?;
    // qemu's command line names files in its VM's directory (the ARM test server's own
    // names the directory only).
    let vm_dir = format!("{}/", world.arm.vms.display());
    eventually(
        "no shim or qemu process",
        Duration::from_secs(60),
        || async {
            let left: Vec<String> = processes_with(sandboxd::shim::BINARY_NAME)
                .into_iter()
                .chain(processes_with(&vm_dir))
                .collect();
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("still running: {left:?}"))
            }
        },
    )
    .await?;
    ensure!(!netns.is_empty(), "no pod network namespace was seen");
    eventually(
        "no bundle, netns, CAA directory or dead shim socket left",
        Duration::from_secs(60),
        || async {
            let now = NodeFiles::read(node);
            let mut left: Vec<String> = bundles_of(node, &env.ns)
                .0
                .into_iter()
                .map(|b| format!("{TASKS}/{b}"))
                .collect();
            left.extend(
                netns
                    .iter()
                    .filter(|p| node.host_path(p).is_ok_and(|h| h.exists()))
                    .cloned(),
            );
            left.extend(
                now.caa
                    .difference(&before.caa)
                    .map(|d| format!("{CAA_PODS}/{d}")),
            );
            for s in now.sockets.difference(&before.sockets) {
                let path = node.host_path(&format!("{SHIM_SOCKETS}/{s}"))?;
                if std::os::unix::net::UnixStream::connect(&path).is_err() {
                    left.push(format!("{SHIM_SOCKETS}/{s}"));
                }
            }
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("left on the node: {left:?}"))
            }
        },
    )
    .await?;
    Ok(())
}

/// The guide on the real node, with pods that run: limit 2; a 3-replica `kata-remote`
/// Deployment (busybox from the test registry, a ConfigMap volume, a server on 8080): two
/// pods admitted by the webhook, scheduled with `kata.peerpods.io/vm` and Running in their
/// own qemu pod VMs, the third Pending. `kubectl logs` shows the container's output;
/// `kubectl exec` runs with stdin and with a terminal; a ConfigMap change reaches the file
/// in the VM; a ClusterIP Service reaches the container from the host (kube-proxy, the
/// pod's network namespace, the VXLAN tunnel to the VM). A crashing container is restarted
/// by the kubelet with its exit code and restart count, and a container that fills its VM's
/// memory is reported `OOMKilled`. Deleting the pods leaves no VM, PeerPod, network
/// namespace, process or file. `ctl doctor` and `ctl status` run against it.
pub async fn guide(env: Env) -> Result<()> {
    with_world(env, |env, node, client, world| {
        Box::pin(async move {
            let t = Instant::now();
            install(env, node, &client, world).await?;
            eprintln!("installed in {:.0}s", t.elapsed().as_secs_f64());
            let t = Instant::now();
            web(env, node, &client, world).await?;
            eprintln!(
                "Deployment, logs, exec, ConfigMap, Service, delete: {:.0}s",
                t.elapsed().as_secs_f64()
            );
            let t = Instant::now();
            crash_and_oom(env, node, &client, world).await?;
            eprintln!("crash and OOM: {:.0}s", t.elapsed().as_secs_f64());
            Ok(())
        })
    })
    .await
}

async fn running_pods(pods: &Api<Pod>, selector: &str) -> Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| phase(p) == "Running")
        .collect())
}

async fn web(env: &Env, node: &'static TestNode, client: &Client, world: &World) -> Result<()> {
    let before = NodeFiles::read(node);
    ctl_ok(env, &["limit", "set", "2"]).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(
        "kata.peerpods.io/vm = 2 on the node",
        Duration::from_secs(60),
        || async {
            let n = nodes.get(&node.name).await?;
            let cap = n
                .status
                .and_then(|s| s.capacity)
                .and_then(|c| c.get("kata.peerpods.io/vm").map(|q| q.0.clone()));
            Ok((cap.as_deref() == Some("2")).then_some(()))
        },
    )
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &env.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "app"}, "data": {"greeting": "hello-1"}}),
        )?,
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &env.ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "runtimeClassName": "kata-remote",
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "web",
                        "image": world.app_image,
                        "command": ["sh", "-c",
                            "echo started-in-the-pod-vm; cat /config/greeting; echo; \
                             while true; do echo served-by-$(hostname) | nc -l -p 8080; done"],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/config"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                    }],
                    "volumes": [{"name": "cfg", "configMap": {"name": "app"}}],
                },
            },
        },
    }))?;
    let t = Instant::now();
    deployments.create(&PostParams::default(), &d).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    // Two scheduled, one refused for kata.peerpods.io/vm.
    let (scheduled, pending) = eventually(
        "two pods scheduled and one Pending",
        Duration::from_secs(90),
        || async {
            let list = pods.list(&ListParams::default().labels("app=web")).await?;
            let (s, p): (Vec<Pod>, Vec<Pod>) = list
                .items
                .into_iter()
                .partition(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some());
            Ok((s.len() == 2 && p.len() == 1).then_some((s, p)))
        },
    )
    .await?;
    for p in &scheduled {
        let c = &p.spec.as_ref().context("pod spec")?.containers[0];
        let limit = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default()
            .get("kata.peerpods.io/vm")
            .map(|q| q.0.clone());
        ensure!(
            limit.as_deref() == Some("1"),
            "pod {} was not mutated by the webhook: {:?}",
            p.name_any(),
            c.resources
        );
    }
    let pending_name = pending[0].name_any();
    eventually(
        "the third pod refused for kata.peerpods.io/vm",
        Duration::from_secs(60),
        || async {
            let ev = pod_events(client, &env.ns, &pending_name).await?;
            Ok(ev
                .iter()
                .any(|e| e.starts_with("FailedScheduling") && e.contains("kata.peerpods.io/vm"))
                .then_some(()))
        },
    )
    .await?;
    // Both scheduled pods run, each in its own pod VM.
    let running = eventually(
        "two kata-remote pods Running",
        Duration::from_secs(300),
        || async {
            let r = running_pods(&pods, "app=web").await?;
            Ok((r.len() == 2).then_some(r))
        },
    )
    .await;
    let running = match running {
        Ok(r) => r,
        Err(e) => {
            let mut ev = Vec::new();
            for p in &scheduled {
                ev.extend(
                    pod_events(client, &env.ns, &p.name_any())
                        .await
                        .unwrap_or_default(),
                );
            }
            return Err(e.context(format!("pod events: {ev:#?}")));
        }
    };
    eprintln!(
        "two kata-remote pods Running {:.0}s after the Deployment's create",
        t.elapsed().as_secs_f64()
    );
    ensure!(
        world.arm.arm_vms().await?.len() == 2 && world.arm.qemu_vms().len() == 2,
        "VMs: ARM {:?}, qemu {:?}",
        world.arm.arm_vms().await?,
        world.arm.qemu_vms()
    );
    let peerpods: Api<sandboxd::api::peerpod::PeerPod> = Api::namespaced(client.clone(), &env.ns);
    ensure!(
        peerpods.list(&ListParams::default()).await?.items.len() == 2,
        "a PeerPod per pod VM"
    );
    let web = running[0].name_any();
    let (_, netns) = bundles_of(node, &env.ns);

    // kubectl logs: the container's output, read back through the shim.
    let logs = eventually(
        "the container's output in kubectl logs",
        Duration::from_secs(30),
        || async {
            let (ok, out, _) = kubectl(env, node, &["logs", &web], None).await?;
            Ok((ok && out.contains("hello-1")).then_some(out))
        },
    )
    .await?;
    ensure!(
        logs.starts_with("started-in-the-pod-vm\n"),
        "logs: {logs:?}"
    );

    // kubectl exec: with stdin, and with a terminal.
    let (ok, out, err) = kubectl(
        env,
        node,
        &[
            "exec",
            "-i",
            &web,
            "--",
            "sh",
            "-c",
            "read x; echo got-$x; hostname",
        ],
        Some("peer\n"),
    )
    .await?;
    ensure!(ok, "kubectl exec -i failed: {err}");
    ensure!(out == format!("got-peer\n{web}\n"), "exec answered {out:?}");
    let script = format!(
        "{} --kubeconfig {} -n {} exec -it {web} -- sh -c 'tty; echo exit-$?'",
        node.bin.join("kubectl").display(),
        env.cp().kubeconfig_path.display(),
        env.ns
    );
    let tty = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("script")
            .args(["-qec", &script, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .context("kubectl exec -it did not finish")??;
    let tty_out = String::from_utf8_lossy(&tty.stdout).to_string();
    ensure!(
        tty_out.contains("/dev/pts/") && tty_out.contains("exit-0"),
        "exec -t: {tty_out:?} {}",
        String::from_utf8_lossy(&tty.stderr)
    );

    // A ConfigMap change reaches the file in the VM.
    cms.patch(
        "app",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"greeting": "hello-2"}})),
    )
    .await?;
    let t = Instant::now();
    eventually(
        "the ConfigMap change in the pod VM",
        Duration::from_secs(120),
        || async {
            let (ok, out, _) = kubectl(
                env,
                node,
                &["exec", &web, "--", "cat", "/config/greeting"],
                None,
            )
            .await?;
            Ok((ok && out.trim() == "hello-2").then_some(()))
        },
    )
    .await?;
    eprintln!(
        "the ConfigMap change reached the VM in {:.0}s",
        t.elapsed().as_secs_f64()
    );

    // A Service reaches the containers: host → kube-proxy → the pod's netns → VXLAN → VM.
    let svcs: Api<Service> = Api::namespaced(client.clone(), &env.ns);
    let svc = svcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
            }))?,
        )
        .await?;
    let cluster_ip: std::net::IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("ClusterIP")?
        .parse()?;
    let names: Vec<String> = running.iter().map(|p| p.name_any()).collect();
    let body = eventually(
        "the Service answering from a pod VM",
        Duration::from_secs(60),
        || async {
            use tokio::io::AsyncReadExt;
            let r = tokio::time::timeout(Duration::from_secs(3), async {
                let mut s = tokio::net::TcpStream::connect((cluster_ip, 80)).await?;
                let mut b = String::new();
                s.read_to_string(&mut b).await?;
                Ok::<_, std::io::Error>(b)
            })
            .await;
            Ok(match r {
                Ok(Ok(b)) if b.starts_with("served-by-") => Some(b),
                _ => None,
            })
        },
    )
    .await?;
    ensure!(
        names
            .iter()
            .any(|n| body.trim() == format!("served-by-{n}")),
        "the Service answered {body:?}, not one of {names:?}"
    );

    // ctl doctor and ctl status with pods running.
    // Azure's checks against the ARM test server (and its token endpoint): nothing leaves
    // the machine, not even a name lookup of the public authority.
    let arm_url = world.arm.url();
    let (_, doctor) = sandboxd(env, &["doctor", "--dev-arm-endpoint", &arm_url]).await?;
    eprintln!("ctl doctor:\n{doctor}");
    ensure!(
        doctor.contains(&node.name) && !doctor.contains("[fail"),
        "doctor failed a check or does not mention the node:\n{doctor}"
    );
    let status = ctl_ok(env, &["status"]).await?;
    ensure!(status.contains(KATA_CONFIG), "status:\n{status}");

    // Deleting the Deployment deletes the pods and everything they had.
    deployments.delete("web", &DeleteParams::default()).await?;
    eventually("the web pods gone", Duration::from_secs(180), || async {
        let left = pods.list(&ListParams::default().labels("app=web")).await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await?;
    nothing_left(client, env, node, world, &before, &netns).await?;
    svcs.delete("web", &DeleteParams::default()).await?;
    Ok(())
}

/// The state of container `name` in `pod`.
fn container_status(p: &Pod, name: &str) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

async fn crash_and_oom(
    env: &Env,
    node: &'static TestNode,
    client: &Client,
    world: &World,
) -> Result<()> {
    let before = NodeFiles::read(node);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    // `crash` exits 3 after a line of output; `oom` grows an awk array by 128 KiB strings
    // until the VM's kernel kills it (the VM has no swap; the webhook takes container
    // limits away, the VM's size is the pod's limit).
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "crash"},
        "spec": {
            "runtimeClassName": "kata-remote",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {"name": "crash", "image": world.app_image,
                 "command": ["sh", "-c", "echo crashing; sleep 1; exit 3"]},
                {"name": "oom", "image": world.app_image,
                 "command": ["/bin/busybox", "awk",
                    "BEGIN { s = \"x\"; for (j = 0; j < 17; j++) s = s s; while (1) a[i++] = s i }"]},
            ],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let (crash, oom) = eventually(
        "the crash restarted and the OOM kill reported",
        Duration::from_secs(300),
        || async {
            let p = pods.get("crash").await?;
            let crash = container_status(&p, "crash").filter(|c| {
                c.restart_count >= 1
                    && c.last_state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .is_some()
            });
            let oom = container_status(&p, "oom").filter(|c| {
                let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                let now = c.state.as_ref().and_then(|s| s.terminated.as_ref());
                last.or(now).is_some()
            });
            Ok(crash.zip(oom))
        },
    )
    .await
    .with_context(|| format!("VM consoles:\n{}", world.arm.consoles()))?;
    let (_, netns) = bundles_of(node, &env.ns);
    let last = crash
        .last_state
        .and_then(|s| s.terminated)
        .context("no last terminated state")?;
    ensure!(
        last.exit_code == 3 && last.reason.as_deref() == Some("Error"),
        "the crash ended with {} ({:?})",
        last.exit_code,
        last.reason
    );
    let (ok, previous, err) = kubectl(
        env,
        node,
        &["logs", "crash", "-c", "crash", "--previous"],
        None,
    )
    .await?;
    ensure!(
        ok && previous.trim() == "crashing",
        "logs --previous: {previous:?} {err}"
    );
    let ended = oom
        .last_state
        .and_then(|s| s.terminated)
        .or_else(|| oom.state.and_then(|s| s.terminated))
        .context("the oom container never ended")?;
    ensure!(
        ended.reason.as_deref() == Some("OOMKilled") && ended.exit_code == 137,
        "the oom container ended with {} ({:?})",
        ended.exit_code,
        ended.reason
    );
    eprintln!(
        "crash: restart count {}, last exit {}; oom: {:?} ({}), restart count {}",
        crash.restart_count, last.exit_code, ended.reason, ended.exit_code, oom.restart_count
    );
    pods.delete("crash", &DeleteParams::default()).await?;
    eventually("the crash pod gone", Duration::from_secs(180), || async {
        Ok(pods.get_opt("crash").await?.is_none().then_some(()))
    })
    .await?;
    nothing_left(client, env, node, world, &before, &netns).await
}

/// Seconds from the pod's create (`kubectl apply`) to its Ready condition.
async fn time_to_ready(pods: &Api<Pod>, pod: Pod) -> Result<f64> {
    let name = pod.name_any();
    let t = Instant::now();
    pods.create(&PostParams::default(), &pod).await?;
    eventually("the pod Ready", Duration::from_secs(300), || async {
        let p = pods.get(&name).await?;
        let ready = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(ready.then_some(()))
    })
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

async fn delete_and_wait(pods: &Api<Pod>, name: &str, world: &World) -> Result<()> {
    pods.delete(name, &DeleteParams::default()).await?;
    eventually(
        "the pod and its VM gone",
        Duration::from_secs(180),
        || async {
            Ok(
                (pods.get_opt(name).await?.is_none() && world.arm.qemu_vms().is_empty())
                    .then_some(()),
            )
        },
    )
    .await
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds of the VM's uptime (its kernel's clock) when its forwarder listened, from the
/// console of the one qemu VM running.
fn vm_boot_seconds(world: &World) -> Option<f64> {
    let vms = world.arm.qemu_vms();
    let [vm] = vms.as_slice() else {
        return None;
    };
    let console = std::fs::read_to_string(world.arm.vms.join(vm).join("console.log")).ok()?;
    crate::image::agent_vm::uptime_of(&console, sandboxd::forwarder::init::READY_MARKER)
}

/// `make bench-podstart`: create → Ready of a `kata-remote` pod (sandboxd shim, CAA, a
/// qemu pod VM running sandboxd agent, the image pulled in the VM) against the same pod
/// with runc on the same node, with an image the node has not pulled (uncached: a new
/// image each run) and then the same image again (cached). `SANDBOXD_BENCH_RUNS` runs
/// (default 3), alternating runc and kata-remote; each run's numbers, the medians and the
/// ratios are printed, and for kata-remote the VM's own boot (kernel start → forwarder
/// listening, from its console) and what is left beyond it.
pub async fn bench_pod_start(env: Env) -> Result<()> {
    with_world(env, |env, node, client, world| {
        Box::pin(async move {
            install(env, node, &client, world).await?;
            let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
            let runs: usize = std::env::var("SANDBOXD_BENCH_RUNS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3);
            let kinds = ["runc", "kata-remote"];
            // (kind, cached) → seconds per run.
            let mut results: std::collections::BTreeMap<(usize, bool), Vec<f64>> =
                Default::default();
            // cached → (VM boot, beyond it) per kata-remote run.
            let mut boots: std::collections::BTreeMap<bool, Vec<(f64, f64)>> = Default::default();
            for run in 0..runs {
                for (k, kind) in kinds.iter().enumerate() {
                    let tag = format!("{}-{run}", kind.replace('-', ""));
                    let (image, _) =
                        world
                            .registry
                            .push_busybox(Some(&world.netns), "bench", &tag, &tag)?;
                    for cached in [false, true] {
                        let name = format!("{tag}-{}", if cached { "c" } else { "u" });
                        let mut spec = json!({
                            "containers": [{"name": "app", "image": image,
                                            "command": ["sh", "-c", "echo up; sleep 3600"]}],
                            "terminationGracePeriodSeconds": 0,
                        });
                        if *kind == "kata-remote" {
                            spec["runtimeClassName"] = json!("kata-remote");
                        } else {
                            spec["nodeSelector"] = json!({REAL_NODE_LABEL: "true"});
                        }
                        let pod: Pod = serde_json::from_value(
                            json!({"metadata": {"name": name}, "spec": spec}),
                        )?;
                        let secs = time_to_ready(&pods, pod).await?;
                        let boot = if *kind == "kata-remote" {
                            let b = vm_boot_seconds(world).context("no VM boot time")?;
                            boots.entry(cached).or_default().push((b, secs - b));
                            format!(" (VM kernel → forwarder listening {b:.2} s)")
                        } else {
                            String::new()
                        };
                        eprintln!(
                            "run {run}: {kind} {}: {secs:.2} s{boot}",
                            if cached { "cached" } else { "uncached" }
                        );
                        results.entry((k, cached)).or_default().push(secs);
                        delete_and_wait(&pods, &name, world).await?;
                    }
                }
            }
            println!("\n| pod start (create → Ready) | runs (s) | median (s) |");
            println!("|---|---|---|");
            for ((k, cached), v) in &results {
                let runs: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
                println!(
                    "| {} {} | {} | {:.2} |",
                    kinds[*k],
                    if *cached { "cached" } else { "uncached" },
                    runs.join(", "),
                    median(v)
                );
            }
            for (cached, v) in &boots {
                let which = if *cached { "cached" } else { "uncached" };
                let b: Vec<f64> = v.iter().map(|x| x.0).collect();
                let rest: Vec<f64> = v.iter().map(|x| x.1).collect();
                let f = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
                println!(
                    "| kata-remote {which}: the VM's boot (kernel → forwarder listening) | {} | {:.2} |",
                    f(&b),
                    median(&b)
                );
                println!(
                    "| kata-remote {which}: beyond that boot | {} | {:.2} |",
                    f(&rest),
                    median(&rest)
                );
            }
            for cached in [false, true] {
                let r = &results[&(0, cached)];
                let k = &results[&(1, cached)];
                let per_run: Vec<String> = r
                    .iter()
                    .zip(k)
                    .map(|(r, k)| format!("{:.1}×", k / r))
                    .collect();
                println!(
                    "| ratio kata-remote / runc, {} | {} | {:.1}× |",
                    if cached { "cached" } else { "uncached" },
                    per_run.join(", "),
                    median(k) / median(r)
                );
            }
            Ok(())
        })
    })
    .await
}
