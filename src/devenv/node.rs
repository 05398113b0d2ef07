//! `sandboxd dev node`: a real Kubernetes node for tests and `make demo` — kubelet,
//! containerd 2.x with runc and the CNI plugins, kube-proxy — joined to a control plane
//! started by `dev control-plane` or the test harness (the binaries come from
//! `scripts/node.sh` and Debian).
//!
//! The node is a machine of its own on this host, so what it runs sees a node's paths and
//! nothing it does touches the host:
//! - **its own network namespace**: `eth0` (a veth whose other end joins the control plane's
//!   bridge, see [`super::network`]) with the node IP, the pods' CNI bridge `cni0`, and the
//!   Service CIDR routed into a port-less bridge (`svc0`, a dead end even before kube-proxy
//!   has its rules). There is no default route: nothing the node or a pod dials can leave
//!   this machine, and `ip_forward`, iptables and every port are the node's own.
//! - **its own mount namespace**: `/etc` and `/opt` are overlays of the host's with the
//!   changes kept in the node's directory (the node installer edits the node's
//!   `/etc/containerd/config.toml`, not the host's), `/run`, `/var/lib` and `/var/log` are
//!   the node's own. `/etc/resolv.conf` names no server: nothing resolves.
//! - the kubelet is named by its IP (`--hostname-override`, `--node-ip`), uses cgroupfs
//!   under its own cgroup root (this host has cgroup v1 and no systemd: `failCgroupV1: false`),
//!   low eviction thresholds and no image garbage collection.
//! - containerd's sandbox image is the `pause` image `scripts/node.sh` builds, imported
//!   before the kubelet starts: nothing is pulled from a registry. `--image BASE=ARCHIVE`
//!   imports more (an oci-archive whose reference names are tags, such as `make image`'s).
//! - the node's system bus runs Debian's `dbus-daemon` with the SYSTEMD STAND-IN
//!   ([`super::systemd`]): `RestartUnit("containerd.service")` restarts this node's containerd.
//! - the control plane runs without the node lifecycle controller, so this process removes
//!   the `node.kubernetes.io/not-ready` taint once the kubelet reports Ready.
//!
//! The kubelet changes a few kernel settings of the host (`kernel.panic`, ...): they are
//! restored on the way out, as are the host routes. Every process the node started, pods
//! included, is stopped; the namespaces go with them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::control_plane::{self as cp, UserAuth};
use super::network::HostNetwork;
use super::{Error, io};
use crate::pki::{Ca, Usage};

/// The unit the systemd stand-in restarts.
pub(crate) const CONTAINERD_UNIT: &str = "containerd.service";
/// The taint `dev node --idle-taint` registers the node with.
pub const IDLE_TAINT_KEY: &str = "sandboxd.dev/idle-node";
/// The kernel settings the kubelet changes (restored when the node stops).
const KUBELET_SYSCTLS: [&str; 6] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// The file in the node directory that records the kernel settings before the node.
pub(crate) const SYSCTLS_FILE: &str = "sysctls.orig";
/// The file in the node directory that holds the node's mount namespace (`mnt:[inode]`).
pub(crate) const MNTNS_FILE: &str = "node.mntns";
/// The file in the node directory that holds the pid of the namespaces' holder.
pub const HOLDER_FILE: &str = "holder.pid";
/// Written when the node is Ready: the node's name.
pub const READY_FILE: &str = "ready";
/// Registry hosts of the node's containerd (`<host:port>/hosts.toml`): tests put the test
/// registry's plain-HTTP address there.
pub const REGISTRY_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// Flags of `dev node`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The control plane's directory (`ca.crt`, `ca.key`, `network.slot`,
    /// `components.kubeconfig`), as `dev control-plane --dir` or the test harness wrote it.
    #[arg(long)]
    pub(crate) control_plane_dir: PathBuf,
    /// The node's directory: configuration, logs and the node's `/etc` and `/opt` changes,
    /// `/run`, `/var/lib` and `/var/log`.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// The directory `scripts/node.sh` printed (kubelet, kube-proxy, containerd, ...).
    #[arg(long, env = "SANDBOXD_NODE_BIN")]
    pub(crate) bin: PathBuf,
    /// An image to import before the kubelet starts: `BASE=ARCHIVE` (an oci-archive; its
    /// reference names become `BASE:<name>`). Repeatable.
    #[arg(long = "image")]
    pub(crate) images: Vec<String>,
    /// Register the node with the `sandboxd.dev/idle-node=true:NoSchedule` taint (tests:
    /// only the tests that use the node remove it).
    #[arg(long)]
    pub(crate) idle_taint: bool,
    /// Labels the kubelet registers the node with (`KEY=VALUE`, repeatable).
    #[arg(long = "label")]
    pub(crate) labels: Vec<String>,
}

/// Everything the node writes before it starts (pure).
#[derive(Debug)]
pub(crate) struct Plan {
    /// The node's name and IP.
    pub(crate) name: String,
    /// Files to write: (path relative to the node directory, content, mode).
    pub files: Vec<(String, String, u32)>,
    /// containerd's arguments.
    pub(crate) containerd: Vec<String>,
    /// kubelet's arguments.
    pub(crate) kubelet: Vec<String>,
    /// kube-proxy's arguments.
    pub(crate) kube_proxy: Vec<String>,
    /// dbus-daemon's arguments.
    pub(crate) dbus: Vec<String>,
    /// The kubelet's cgroup root (under every cgroup v1 controller).
    pub(crate) cgroup_root: String,
}

/// The containerd configuration the node starts with (the node's `/etc/containerd/config.toml`).
pub(crate) fn containerd_config(pause_image: &str) -> String {
    let hosts = REGISTRY_HOSTS_DIR;
    format!(
        r#"# The test node's containerd (sandboxd dev node).
version = 3

[plugins.'io.containerd.cri.v1.images'.registry]
  # Registries on the test network are described here (plain HTTP); nothing else resolves.
  config_path = '{hosts}'

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  # Imported before the kubelet starts; never pulled.
  sandbox = '{pause_image}'

[plugins.'io.containerd.cri.v1.runtime']
  # runc cannot lower oom_score_adj without CAP_SYS_RESOURCE in this VM.
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['/usr/lib/cni']
  conf_dir = '/etc/cni/net.d'
"#
    )
}

/// Plans the node of `net` for the control plane at `server` with CA `ca`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan(
    dir: &Path,
    cp_dir: &Path,
    server: &str,
    ca: &Ca,
    net: &HostNetwork,
    pause_image: &str,
    idle_taint: bool,
    labels: &[String],
) -> Result<Plan, Error> {
    let pki = |e: crate::pki::Error| Error::Pki(e.to_string());
    let validity = time::Duration::days(2);
    let name = net.node_ip.to_string();
    let p = |n: &str| dir.join(n).display().to_string();
    let ca_pem = ca.cert_pem();
    let kubelet_client = ca
        .issue(
            &format!("system:node:{name}"),
            &["system:nodes"],
            &[],
            Usage::Client,
            validity,
        )
        .map_err(pki)?;
    let kubelet_serving = ca
        .issue(&name, &[], &[&name], Usage::Server, validity)
        .map_err(pki)?;
    let proxy_client = ca
        .issue("system:kube-proxy", &[], &[], Usage::Client, validity)
        .map_err(pki)?;
    // One per node process, never reused: a sweep of a dead node's cgroups can not reach
    // another node's.
    let cgroup_root = format!("/sandboxd-node{}-{}", net.slot, std::process::id());
    let taints = if idle_taint {
        format!(
            "registerWithTaints:\n- key: {IDLE_TAINT_KEY}\n  value: \"true\"\n  effect: NoSchedule\n"
        )
    } else {
        String::new()
    };
    let kubelet_config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {name}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
resolvConf: /etc/resolv.conf
evictionHard:
  memory.available: 50Mi
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# ConfigMap and Secret volumes follow changes within seconds (the default is a minute).
syncFrequency: 10s
rotateCertificates: false
serverTLSBootstrap: false
{taints}"#,
        cert = p("config/kubelet.crt"),
        key = p("config/kubelet.key"),
        ca = cp_dir.join("ca.crt").display(),
    );
    let proxy_config = format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
clusterCIDR: {pod_cidr}
hostnameOverride: {name}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# Leave the kernel's conntrack settings alone (some are not per network namespace).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = p("config/kube-proxy.kubeconfig"),
        pod_cidr = net.pod_cidr,
    );
    let cni = json!({
        "cniVersion": "1.0.0",
        "name": "sandboxd-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    let files = vec![
        (
            "etc.upper/containerd/config.toml".into(),
            containerd_config(pause_image),
            0o644,
        ),
        (
            "etc.upper/cni/net.d/10-sandboxd-node.conflist".into(),
            serde_json::to_string_pretty(&cni).unwrap_or_default(),
            0o644,
        ),
        (
            "etc.upper/resolv.conf".into(),
            "# sandboxd test node: no name server, nothing resolves off this machine.\n".into(),
            0o644,
        ),
        ("config/kubelet.yaml".into(), kubelet_config, 0o644),
        ("config/kube-proxy.yaml".into(), proxy_config, 0o644),
        ("config/kubelet.crt".into(), kubelet_serving.cert_pem, 0o644),
        ("config/kubelet.key".into(), kubelet_serving.key_pem, 0o600),
        (
            "config/kubelet.kubeconfig".into(),
            cp::kubeconfig_yaml(server, &ca_pem, UserAuth::Cert(&kubelet_client)),
            0o600,
        ),
        (
            "config/kube-proxy.kubeconfig".into(),
            cp::kubeconfig_yaml(server, &ca_pem, UserAuth::Cert(&proxy_client)),
            0o600,
        ),
        (
            "config/dbus.conf".into(),
            super::systemd::bus_config("/run/dbus/system_bus_socket"),
            0o644,
        ),
    ];
    let mut kubelet = vec![
        format!("--config={}", p("config/kubelet.yaml")),
        format!("--kubeconfig={}", p("config/kubelet.kubeconfig")),
        format!("--hostname-override={name}"),
        format!("--node-ip={name}"),
        "--v=1".into(),
    ];
    if !labels.is_empty() {
        kubelet.push(format!("--node-labels={}", labels.join(",")));
    }
    Ok(Plan {
        containerd: vec![
            "--config=/etc/containerd/config.toml".into(),
            "--log-level=info".into(),
        ],
        kubelet,
        kube_proxy: vec![
            format!("--config={}", p("config/kube-proxy.yaml")),
            "--v=1".into(),
        ],
        dbus: vec![
            format!("--config-file={}", p("config/dbus.conf")),
            "--nofork".into(),
            "--nopidfile".into(),
            "--nosyslog".into(),
        ],
        name,
        files,
        cgroup_root,
    })
}

/// The script the namespaces' holder runs: the node's mounts, then it waits forever.
const HOLDER_SCRIPT: &str = r#"set -eu
S=$1
mount --bind "$S/run" /run
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$S/etc.upper,workdir=$S/etc.work" /etc
mount -t overlay overlay -o "lowerdir=/opt,upperdir=$S/opt.upper,workdir=$S/opt.work" /opt
mount --bind "$S/var-lib" /var/lib
mount --bind "$S/var-log" /var/log
mount --make-rshared /
ip link set lo up
: > "$S/holder.ready"
exec sleep infinity
"#;

fn log_file(dir: &Path, name: &str) -> Result<(Stdio, Stdio), Error> {
    // Appended: a restarted daemon keeps its earlier output.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))
        .map_err(|e| io(&format!("{name} log"), e))?;
    let g = f.try_clone().map_err(|e| io("log", e))?;
    Ok((f.into(), g.into()))
}

/// A process in the node's namespaces, killed with its parent (`setpriv --pdeathsig`).
fn spawn_in(
    dir: &Path,
    holder: u32,
    bin: &Path,
    name: &str,
    program: &str,
    args: &[String],
) -> Result<Child, Error> {
    let (out, err) = log_file(dir, name)?;
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.display()
    );
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", "nsenter", "--target"])
        .arg(holder.to_string())
        .args(["--mount", "--net", "--"])
        .arg(program)
        .args(args)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Process {
            name: name.into(),
            reason: e.to_string(),
        })
}

/// Runs a short command in the node's namespaces and waits for it.
async fn run_in(holder: u32, bin: &Path, program: &str, args: &[&str]) -> Result<String, Error> {
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let out = Command::new("nsenter")
        .args(["--target", &holder.to_string(), "--mount", "--net", "--"])
        .arg(program)
        .args(args)
        .env("PATH", path)
        .output()
        .await
        .map_err(|e| io(&format!("running {program} on the node"), e))?;
    if !out.status.success() {
        return Err(Error::Io(format!(
            "{program} {} on the node: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_sysctls() -> BTreeMap<String, String> {
    KUBELET_SYSCTLS
        .iter()
        .filter_map(|k| {
            std::fs::read_to_string(format!("/proc/sys/{k}"))
                .ok()
                .map(|v| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

fn restore_sysctls(saved: &BTreeMap<String, String>) {
    for (k, v) in saved {
        let _ = std::fs::write(format!("/proc/sys/{k}"), v);
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup v1 hierarchies of this host (controller mount points).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir(CGROUP_ROOT)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

fn create_cgroup_root(root: &str) -> Result<(), Error> {
    for h in cgroup_hierarchies() {
        let d = h.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&d).map_err(|e| io(&format!("creating {}", d.display()), e))?;
        // A new cpuset has no CPUs and no memory nodes until it is given its parent's.
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                let _ = std::fs::write(d.join(f), v.trim());
            }
        }
    }
    Ok(())
}

/// Kills every process in the cgroup tree `root` (under each hierarchy): the node's
/// containers, whatever their namespaces.
fn join_cgroup(root: &str) -> Result<(), Error> {
    let me = std::process::id().to_string();
    for h in cgroup_hierarchies() {
        let procs = h.join(root.trim_start_matches('/')).join("cgroup.procs");
        std::fs::write(&procs, &me).map_err(|e| io(&format!("joining {}", procs.display()), e))?;
    }
    Ok(())
}

/// Moves this process back to each hierarchy's root cgroup.
fn leave_cgroup() {
    let me = std::process::id().to_string();
    for h in cgroup_hierarchies() {
        let _ = std::fs::write(h.join("cgroup.procs"), &me);
    }
}

fn kill_cgroup_tree(root: &str) -> usize {
    fn procs(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    procs(&e.path(), out);
                }
            }
        }
    }
    let mut killed = 0;
    for _ in 0..50 {
        let mut pids = Vec::new();
        for h in cgroup_hierarchies() {
            procs(&h.join(root.trim_start_matches('/')), &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        let me = std::process::id() as i32;
        pids.retain(|p| *p != me);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        killed += pids.len();
        std::thread::sleep(Duration::from_millis(100));
    }
    killed
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kills every process whose mount namespace is `mntns` (`mnt:[inode]`): the node's
/// daemons, shims and containers.
fn kill_namespace(mntns: &str) -> usize {
    let mut killed = 0;
    for _ in 0..50 {
        let pids: Vec<i32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                    .filter(|pid: &i32| {
                        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                            .map(|l| l.to_string_lossy() == mntns)
                            .unwrap_or(false)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        killed += pids.len();
        std::thread::sleep(Duration::from_millis(100));
    }
    killed
}

/// Removes what a node left in `dir` when it could not stop by itself (its process was
/// killed): every process of its cgroup tree (the node process moved itself there, so its
/// daemons, shims and containers are all in it), its cgroups, the kernel settings. (Not by
/// mount namespace: a namespace's inode number is reused once the namespace is gone.)
pub fn sweep(dir: &Path) {
    if let Ok(root) = std::fs::read_to_string(dir.join("cgroup.root")) {
        let n = kill_cgroup_tree(root.trim());
        if n > 0 {
            eprintln!("node: killed {n} processes left in {}", root.trim());
        }
        for h in cgroup_hierarchies() {
            remove_cgroup_tree(&h.join(root.trim().trim_start_matches('/')));
        }
    }
    if let Ok(text) = std::fs::read_to_string(dir.join(SYSCTLS_FILE))
        && let Ok(saved) = serde_json::from_str::<BTreeMap<String, String>>(&text)
    {
        restore_sysctls(&saved);
    }
}

fn server_of(kubeconfig: &str) -> Result<String, Error> {
    let k = kube::config::Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| Error::Io(format!("control plane kubeconfig: {e}")))?;
    k.clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .ok_or_else(|| Error::Io("control plane kubeconfig names no server".into()))
}

struct Running {
    dir: PathBuf,
    bin: PathBuf,
    plan: Plan,
    holder: Child,
    holder_pid: u32,
    mntns: String,
    net: HostNetwork,
    sysctls: BTreeMap<String, String>,
    children: Vec<(&'static str, Child)>,
    veth: String,
}

impl Running {
    fn start_child(&mut self, name: &'static str) -> Result<(), Error> {
        let (program, args) = match name {
            "containerd" => ("containerd", self.plan.containerd.clone()),
            "kubelet" => ("kubelet", self.plan.kubelet.clone()),
            "kube-proxy" => ("kube-proxy", self.plan.kube_proxy.clone()),
            "dbus-daemon" => ("dbus-daemon", self.plan.dbus.clone()),
            other => return Err(Error::Io(format!("unknown node component {other}"))),
        };
        let child = spawn_in(&self.dir, self.holder_pid, &self.bin, name, program, &args)?;
        self.children.retain(|(n, _)| *n != name);
        self.children.push((name, child));
        Ok(())
    }

    async fn stop_child(&mut self, name: &str) {
        if let Some((_, c)) = self.children.iter_mut().find(|(n, _)| *n == name) {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }

    fn exited(&mut self) -> Option<Error> {
        self.children
            .iter_mut()
            .find_map(|(name, c)| match c.try_wait() {
                Ok(Some(status)) => Some(Error::Process {
                    name: name.to_string(),
                    reason: format!("exited ({status}); see logs/{name}.log"),
                }),
                _ => None,
            })
    }

    async fn wait_socket(&mut self, path: &Path, what: &str) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            if let Some(e) = self.exited() {
                return Err(e);
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady(format!(
                    "{what}: {} never appeared",
                    path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn teardown(mut self) {
        let _ = self.net.route_into_dead_end();
        for name in ["kube-proxy", "kubelet", "containerd", "dbus-daemon"] {
            self.stop_child(name).await;
        }
        // Shims and anything else still in the node's mount namespace, the containers (each
        // in mount namespaces of its own) in the node's cgroups, then the holder.
        let ns = self.mntns.clone();
        let root = self.plan.cgroup_root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            kill_namespace(&ns);
            kill_cgroup_tree(&root);
        })
        .await;
        let _ = self.holder.start_kill();
        let _ = self.holder.wait().await;
        let _ = super::network::ip(&["link", "del", "dev", &self.veth]);
        leave_cgroup();
        for h in cgroup_hierarchies() {
            remove_cgroup_tree(&h.join(self.plan.cgroup_root.trim_start_matches('/')));
        }
        restore_sysctls(&self.sysctls);
        let _ = std::fs::remove_file(self.dir.join(READY_FILE));
        println!("node {} stopped", self.plan.name);
    }
}

/// Runs the node until `shutdown`, then stops everything it started.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !super::network::can_configure() {
        anyhow::bail!("dev node needs root (namespaces, mounts, cgroups)");
    }
    let started = Instant::now();
    let cp_dir = &args.control_plane_dir;
    let read = |n: &str| {
        std::fs::read_to_string(cp_dir.join(n)).map_err(|e| io(&format!("reading {n}"), e))
    };
    let slot: u8 = read(cp::NETWORK_SLOT)?
        .trim()
        .parse()
        .map_err(|e| Error::Io(format!("{}: {e}", cp::NETWORK_SLOT)))?;
    let net = HostNetwork::for_slot(slot);
    let ca = Ca::from_pem(&read("ca.crt")?, &read(cp::CA_KEY)?)
        .map_err(|e| Error::Pki(e.to_string()))?;
    let admin_yaml = read(cp::COMPONENTS_KUBECONFIG)?;
    let server = server_of(&admin_yaml)?;
    let pause_image = std::fs::read_to_string(args.bin.join("pause.image"))
        .map_err(|e| io("reading pause.image (run scripts/node.sh)", e))?
        .trim()
        .to_string();
    let dir = &args.dir;
    sweep(dir);
    for d in [
        "etc.upper",
        "etc.work",
        "opt.upper",
        "opt.work",
        "run/dbus",
        "var-lib",
        "var-log",
        "config",
        "logs",
    ] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| io(&format!("creating {d}"), e))?;
    }
    let plan = plan(
        dir,
        cp_dir,
        &server,
        &ca,
        &net,
        &pause_image,
        args.idle_taint,
        &args.labels,
    )?;
    for (rel, content, mode) in &plan.files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("creating a directory", e))?;
        }
        std::fs::write(&path, content).map_err(|e| io(&format!("writing {rel}"), e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| io(&format!("chmod {rel}"), e))?;
    }
    // Kernel settings the kubelet changes, recorded before it runs.
    let sysctls = read_sysctls();
    std::fs::write(
        dir.join(SYSCTLS_FILE),
        serde_json::to_string(&sysctls).unwrap_or_default(),
    )
    .map_err(|e| io("writing the kernel settings", e))?;
    std::fs::write(dir.join("cgroup.root"), &plan.cgroup_root)
        .map_err(|e| io("writing cgroup.root", e))?;
    create_cgroup_root(&plan.cgroup_root)?;
    // Everything this process starts from now on (the holder, the daemons, containerd's
    // shims) is in the node's cgroup tree.
    join_cgroup(&plan.cgroup_root)?;

    // The namespaces' holder.
    let (out, err) = log_file(dir, "holder")?;
    let holder = Command::new("setpriv")
        .args([
            "--pdeathsig",
            "KILL",
            "--",
            "unshare",
            "--mount",
            "--net",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            HOLDER_SCRIPT,
            "holder",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Process {
            name: "holder".into(),
            reason: e.to_string(),
        })?;
    let holder_pid = holder
        .id()
        .ok_or_else(|| Error::Io("the holder exited at once".into()))?;
    let mut r = Running {
        dir: dir.clone(),
        bin: args.bin.clone(),
        plan,
        holder,
        holder_pid,
        mntns: String::new(),
        net: net.clone(),
        sysctls,
        children: Vec::new(),
        veth: format!("sbxnode{slot}"),
    };
    let result = start(&mut r, &args, &admin_yaml, started, shutdown.clone()).await;
    let result = match result {
        Ok(()) => supervise(&mut r, shutdown).await,
        Err(e) => Err(e),
    };
    r.teardown().await;
    result
}

async fn start(
    r: &mut Running,
    args: &Args,
    admin_yaml: &str,
    started: Instant,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = r.dir.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("holder.ready").exists() {
        if let Ok(Some(status)) = r.holder.try_wait() {
            anyhow::bail!(
                "the node's namespaces could not be set up ({status}): {}",
                std::fs::read_to_string(dir.join("logs/holder.log")).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!("the node's namespaces were not ready after 10s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = r.holder_pid;
    r.mntns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| io("reading the node's mount namespace", e))?
        .to_string_lossy()
        .into_owned();
    std::fs::write(dir.join(MNTNS_FILE), &r.mntns).map_err(|e| io("writing node.mntns", e))?;
    std::fs::write(dir.join(HOLDER_FILE), pid.to_string())
        .map_err(|e| io("writing holder.pid", e))?;

    // Network: eth0 on the control plane's bridge, the Service CIDR into a dead end.
    let net = r.net.clone();
    let _ = super::network::ip(&["link", "del", "dev", &r.veth]);
    super::network::ip(&[
        "link",
        "add",
        &r.veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pid.to_string(),
    ])?;
    super::network::ip(&["link", "set", "dev", &r.veth, "master", &net.bridge, "up"])?;
    let bin = r.bin.clone();
    let node_cidr = format!("{}/24", net.node_ip);
    for cmd in [
        vec!["addr", "add", node_cidr.as_str(), "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
        vec!["link", "add", "svc0", "type", "bridge"],
        vec!["link", "set", "svc0", "up"],
        vec!["route", "add", net.service_cidr.as_str(), "dev", "svc0"],
    ] {
        run_in(pid, &bin, "ip", &cmd).await?;
    }

    // The node's system bus and the systemd stand-in.
    r.start_child("dbus-daemon")?;
    let bus = dir.join("run/dbus/system_bus_socket");
    r.wait_socket(&bus, "dbus-daemon").await?;

    // containerd, then the images, then the kubelet and kube-proxy.
    r.start_child("containerd")?;
    let sock = dir.join("run/containerd/containerd.sock");
    r.wait_socket(&sock, "containerd").await?;
    let ctr = r.bin.join("ctr").display().to_string();
    let address = sock.display().to_string();
    let pause = r.bin.join("pause.tar").display().to_string();
    let mut imports: Vec<(Option<String>, String)> = vec![(None, pause)];
    for spec in &args.images {
        let (base, archive) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--image {spec:?} is not BASE=ARCHIVE"))?;
        imports.push((Some(base.to_string()), archive.to_string()));
    }
    for (base, archive) in &imports {
        let mut a = vec!["--address", &address, "-n", "k8s.io", "images", "import"];
        if let Some(b) = base {
            a.extend(["--base-name", b.as_str()]);
        }
        a.push(archive);
        super::network::run(&ctr, &a)?;
    }
    let listed = super::network::run(
        &ctr,
        &["--address", &address, "-n", "k8s.io", "images", "ls", "-q"],
    )?;
    for name in listed.lines().filter(|l| !l.starts_with("sha256:")) {
        println!("node: imported {name}");
    }
    r.start_child("kubelet")?;
    r.start_child("kube-proxy")?;

    // Ready: the kubelet reports Ready; the not-ready taint goes (no node lifecycle
    // controller runs), the host routes the Service and pod CIDRs via the node.
    let kubeconfig = kube::config::Kubeconfig::from_yaml(admin_yaml)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let nodes: Api<Node> = Api::all(client);
    let name = r.plan.name.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(e) = r.exited() {
            return Err(e.into());
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if let Ok(Some(n)) = nodes.get_opt(&name).await
            && is_ready(&n)
        {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "node {name} not Ready after 120s; see {}/logs",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    remove_not_ready_taint(&nodes, &name).await?;
    net.route_via_node()?;
    std::fs::write(dir.join(READY_FILE), &name).map_err(|e| io("writing ready", e))?;
    println!(
        "node {name} ready in {:.1}s (logs in {}/logs)",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Removes `node.kubernetes.io/not-ready` (what the node lifecycle controller would do).
pub(crate) async fn remove_not_ready_taint(nodes: &Api<Node>, name: &str) -> Result<(), Error> {
    for _ in 0..20 {
        let n = nodes.get(name).await?;
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if !taints
            .iter()
            .any(|t| t.key == "node.kubernetes.io/not-ready")
        {
            return Ok(());
        }
        let keep: Vec<_> = taints
            .into_iter()
            .filter(|t| t.key != "node.kubernetes.io/not-ready")
            .collect();
        let patch = json!({"metadata": {"resourceVersion": n.metadata.resource_version},
                           "spec": {"taints": keep}});
        match nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn supervise(r: &mut Running, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let address = format!(
        "unix:path={}",
        r.dir.join("run/dbus/system_bus_socket").display()
    );
    let _bus = super::systemd::serve(&address, &[CONTAINERD_UNIT], tx).await?;
    println!("systemd stand-in serving {CONTAINERD_UNIT} on the node's system bus");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(unit) = rx.recv() => {
                if unit == CONTAINERD_UNIT {
                    println!("systemd stand-in: restarting containerd");
                    r.stop_child("containerd").await;
                    r.start_child("containerd")?;
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Some(e) = r.exited() {
                    return Err(e.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_named_by_ip_and_every_config_file_it_names_is_written() {
        let ca = Ca::new("t", time::Duration::days(1)).unwrap();
        let net = HostNetwork::for_slot(2);
        let dir = Path::new("/n");
        let plan = plan(
            dir,
            Path::new("/cp"),
            "https://10.201.2.1:6443",
            &ca,
            &net,
            "p:1",
            true,
            &[],
        )
        .unwrap();
        assert_eq!(plan.name, "10.201.2.2");
        assert!(
            plan.kubelet
                .contains(&"--hostname-override=10.201.2.2".to_string())
        );
        assert!(plan.kubelet.contains(&"--node-ip=10.201.2.2".to_string()));
        let written: Vec<String> = plan
            .files
            .iter()
            .map(|(n, _, _)| format!("/n/{n}"))
            .collect();
        for arg in plan
            .kubelet
            .iter()
            .chain(&plan.kube_proxy)
            .chain(&plan.dbus)
        {
            if let Some((_, v)) = arg.split_once('=')
                && v.starts_with("/n/")
            {
                assert!(
                    written.contains(&v.to_string()),
                    "{arg} names a file not written"
                );
            }
        }
        let kubelet = &plan
            .files
            .iter()
            .find(|f| f.0 == "config/kubelet.yaml")
            .unwrap()
            .1;
        for want in [
            "cgroupDriver: cgroupfs",
            "failCgroupV1: false",
            "failSwapOn: false",
            IDLE_TAINT_KEY,
        ] {
            assert!(kubelet.contains(want), "kubelet config lacks {want}");
        }
        let containerd = containerd_config("p:1");
        let doc: toml_edit::DocumentMut = containerd.parse().unwrap();
        let rt = &doc["plugins"]["io.containerd.cri.v1.runtime"];
        assert_eq!(rt["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(
            doc["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(),
            Some("p:1")
        );
    }
}
