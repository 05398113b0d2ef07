//! One real node for the whole run, started by the first test that needs it: kubelet,
//! containerd, runc, the CNI plugins and kube-proxy (`sandboxd dev node`, see
//! `src/devenv/node.rs`), joined to the shared control plane, with the image from
//! `make image` imported into its containerd.
//!
//! The node registers with the `sandboxd.dev/idle-node` NoSchedule taint, so pods of other
//! tests (fake nodes, stand-ins) never land on it; a node test opens it with [`TestNode::open`]
//! for its duration.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use sandboxd::devenv::network::HostNetwork;
use sandboxd::devenv::node as dev;
use serde_json::json;

use super::process::{Process, run_dir};

/// The label the harness gives the real node (a KataConfig pool selector can name it).
pub const REAL_NODE_LABEL: &str = "sandboxd.test/real-node";

/// The running node.
pub struct TestNode {
    /// Its name (its IP).
    pub name: String,
    /// Its directory (configuration, logs, the node's own `/etc` changes and `/run`).
    pub dir: PathBuf,
    /// The host network slot it joined.
    pub net: HostNetwork,
    /// The node binaries (`scripts/node.sh`), `kubectl` among them.
    pub bin: PathBuf,
    /// The sandboxd image imported into its containerd (`localhost/sandboxd:<tag>`), when
    /// `make image` had built one.
    pub image: Option<String>,
    process: Mutex<Process>,
}

/// Where the node binaries are: `SANDBOXD_NODE_BIN`, or what `scripts/node.sh` prints (at
/// once when cached).
pub fn binaries() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("SANDBOXD_NODE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/node.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir.trim()))
}

/// The oci-archive of `make image`: `SANDBOXD_IMAGE_ARCHIVE`, else `<target>/oci/sandboxd.tar`.
pub fn image_archive() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SANDBOXD_IMAGE_ARCHIVE") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    Some(target.join("oci/sandboxd.tar")).filter(|p| p.is_file())
}

/// The reference name (`org.opencontainers.image.ref.name`) of the archive's layout, read
/// from the layout directory beside it.
fn image_tag(archive: &Path) -> Result<String> {
    let layout = archive.with_extension("");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(layout.join("index.json"))?)?;
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{} names no reference", layout.display()))
}

/// Why node tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !sandboxd::devenv::network::can_configure() {
        return Some("not root (the node needs namespaces, mounts and cgroups)".into());
    }
    for tool in ["runc", "dbus-daemon", "iptables", "nsenter", "unshare"] {
        if !super::which(tool) {
            return Some(format!("{tool} not installed (scripts/bootstrap.sh)"));
        }
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        return Some("CNI plugins not installed (scripts/bootstrap.sh)".into());
    }
    None
}

static NODE: OnceLock<std::result::Result<TestNode, String>> = OnceLock::new();
static NODE_INIT: Mutex<()> = Mutex::new(());

/// The shared node, started on first use (blocking: call outside async code, like
/// [`super::cluster`]). A failed start is remembered.
pub fn node() -> Result<&'static TestNode> {
    let _guard = NODE_INIT.lock().unwrap_or_else(|e| e.into_inner());
    let started = NODE.get_or_init(|| TestNode::start().map_err(|e| format!("{e:#}")));
    started.as_ref().map_err(|e| anyhow!("{e}"))
}

/// Stops the shared node, if it was started.
pub fn shutdown() {
    if let Some(Ok(n)) = NODE.get() {
        n.stop();
    }
}

impl TestNode {
    fn start() -> Result<Self> {
        let started = Instant::now();
        let cp = super::cluster()?;
        let net = cp
            .net
            .clone()
            .ok_or_else(|| anyhow!("the control plane has no host network (not root?)"))?;
        let bin = binaries()?;
        let dir = run_dir().join("node");
        std::fs::create_dir_all(&dir)?;
        let args: Vec<String> = vec![
            "dev".into(),
            "node".into(),
            format!("--control-plane-dir={}", cp.dir.display()),
            format!("--dir={}", dir.display()),
            format!("--bin={}", bin.display()),
            "--idle-taint".into(),
            format!("--label={REAL_NODE_LABEL}=true"),
            "--log-level=info".into(),
        ];
        let mut args = args;
        let image = match image_archive() {
            Some(archive) => {
                let tag = image_tag(&archive)?;
                args.push(format!("--image=localhost/sandboxd={}", archive.display()));
                Some(format!("localhost/sandboxd:{tag}"))
            }
            None => None,
        };
        let mut process = Process::start(
            "node",
            Path::new(env!("CARGO_BIN_EXE_sandboxd")),
            &args,
            &[],
        )?;
        let ready = dir.join(dev::READY_FILE);
        let deadline = Instant::now() + Duration::from_secs(180);
        while !ready.exists() {
            process
                .check_running()
                .with_context(|| format!("the node (logs in {}/logs)", dir.display()))?;
            if Instant::now() > deadline {
                bail!(
                    "the node was not ready after 180s (logs in {}/logs):\n{}",
                    dir.display(),
                    process.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let name = std::fs::read_to_string(&ready)?.trim().to_string();
        eprintln!(
            "harness: node {name} ready in {:.1}s (logs in {}/logs)",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(Self {
            name,
            dir,
            net,
            bin,
            image,
            process: Mutex::new(process),
        })
    }

    /// Stops the node (SIGTERM: it stops its pods, daemons and namespaces and restores the
    /// kernel settings and routes).
    pub fn stop(&self) {
        let mut p = self.process.lock().unwrap_or_else(|e| e.into_inner());
        p.stop(Duration::from_secs(60));
        dev::sweep(&self.dir);
    }

    /// Fails when the node process has exited.
    pub fn check_running(&self) -> Result<()> {
        self.process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_running()
    }

    /// A file as the node sees it (through its namespaces' holder), e.g.
    /// `/etc/containerd/config.toml`.
    pub fn read_file(&self, node_path: &str) -> Result<Vec<u8>> {
        let holder = std::fs::read_to_string(self.dir.join(dev::HOLDER_FILE))?;
        let path = format!("/proc/{}/root{node_path}", holder.trim());
        std::fs::read(&path).with_context(|| format!("reading {node_path} on the node"))
    }

    /// The node's network namespace (`/proc/<holder>/ns/net`).
    pub fn netns(&self) -> Result<PathBuf> {
        let holder = std::fs::read_to_string(self.dir.join(dev::HOLDER_FILE))?;
        Ok(PathBuf::from(format!("/proc/{}/ns/net", holder.trim())))
    }

    /// The host path of `node_path` as the node sees it (through its namespaces' holder).
    pub fn host_path(&self, node_path: &str) -> Result<PathBuf> {
        let holder = std::fs::read_to_string(self.dir.join(dev::HOLDER_FILE))?;
        Ok(PathBuf::from(format!(
            "/proc/{}/root{node_path}",
            holder.trim()
        )))
    }

    /// The names in a directory as the node sees it.
    pub fn list_dir(&self, node_path: &str) -> Result<Vec<String>> {
        Ok(std::fs::read_dir(self.host_path(node_path)?)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    /// Writes a file as the node sees it (through its namespaces' holder), creating its
    /// directories, e.g. under the node's `/etc` (an overlay of the host's).
    pub fn write_file(&self, node_path: &str, content: &[u8]) -> Result<()> {
        let holder = std::fs::read_to_string(self.dir.join(dev::HOLDER_FILE))?;
        let path = PathBuf::from(format!("/proc/{}/root{node_path}", holder.trim()));
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&path, content).with_context(|| format!("writing {node_path} on the node"))
    }

    /// The node's logs directory (one file per daemon).
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Lets the scheduler place pods on the node (removes the idle taint) until the guard
    /// is closed. The fake nodes earlier tests left (Ready, but no kubelet runs their pods)
    /// get a NoSchedule taint meanwhile, so what a node test deploys lands on the real node,
    /// as on a cluster of real nodes. Node tests run alone, so no other test sees this.
    pub async fn open(&'static self, client: &Client) -> Result<OpenNode> {
        self.check_running()?;
        let nodes: Api<Node> = Api::all(client.clone());
        let fake = nodes
            .list(&ListParams::default().labels("sandboxd.test/fake-node=true"))
            .await?;
        for n in &fake.items {
            set_taint(client, &n.name_any(), FAKE_NODE_TAINT_KEY, true).await?;
        }
        set_taint(client, &self.name, dev::IDLE_TAINT_KEY, false).await?;
        Ok(OpenNode {
            node: self,
            client: client.clone(),
        })
    }
}

/// The taint fake nodes carry while a node test runs.
const FAKE_NODE_TAINT_KEY: &str = "sandboxd.test/not-a-real-node";

/// The node open for one test; [`OpenNode::close`] puts the idle taint back.
pub struct OpenNode {
    /// The node.
    pub node: &'static TestNode,
    client: Client,
}

impl OpenNode {
    /// Puts the idle taint back and takes the fake nodes' taint away.
    pub async fn close(self) -> Result<()> {
        set_taint(&self.client, &self.node.name, dev::IDLE_TAINT_KEY, true).await?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let fake = nodes
            .list(&ListParams::default().labels("sandboxd.test/fake-node=true"))
            .await?;
        for n in &fake.items {
            // A fake node its test deleted meanwhile is fine.
            let _ = set_taint(&self.client, &n.name_any(), FAKE_NODE_TAINT_KEY, false).await;
        }
        Ok(())
    }
}

async fn set_taint(client: &Client, name: &str, key: &str, on: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for _ in 0..20 {
        let n = nodes.get(name).await?;
        let mut taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let has = taints.iter().any(|t| t.key == key);
        if has == on {
            return Ok(());
        }
        if on {
            taints.push(serde_json::from_value(json!({
                "key": key, "value": "true", "effect": "NoSchedule"
            }))?);
        } else {
            taints.retain(|t| t.key != key);
        }
        let patch = json!({"metadata": {"resourceVersion": n.metadata.resource_version},
                           "spec": {"taints": taints}});
        match nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("could not change the taints of node {name}")
}
