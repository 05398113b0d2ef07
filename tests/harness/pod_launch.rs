//! A container of a real Pod object, run as a local process the way the kubelet and a
//! container runtime would run it: what tests start is derived from what the API server
//! holds (a DaemonSet the operator created, the Pod its controller made, admission's
//! additions), never from a hand-written copy of its environment.
//!
//! - [`NodeHost`]: a fake node's host file system (a directory; hostPath `P` is `<root>/P`),
//!   its IPs, and, as the kubelet, the pod status it reports (`hostIP`, `hostIPs`, the pod IPs
//!   of a `hostNetwork` pod).
//! - [`resolve`]: the container's process environment as the kubelet computes it: `envFrom`
//!   (Secrets, ConfigMaps, prefixes, optional), `env` (values with `$(VAR)` expansion,
//!   downward-API `fieldRef`s resolved from the Pod object, `secretKeyRef`,
//!   `configMapKeyRef`), the Kubernetes service variables, the image's `Env`, `Entrypoint`
//!   and `User` (from `scripts/oci-image.sh`, which builds the image), `command`/`args`, and
//!   every volume mount (hostPath, Secret, ConfigMap, projected service account token /
//!   ConfigMap / downward API, emptyDir) materialised under the node's root.
//! - [`Container`]: starts it (root only) in its own mount namespace, chrooted into an empty
//!   tmpfs that holds only the image's files (the binary, the CA bundle) and the pod's
//!   mounts with their propagation, as the resolved user. The test binary's `sandboxd` is
//!   dynamically linked, so `/usr` (and the `lib`, `bin` links of a merged-`/usr` host) is
//!   mounted read-only too; the shipped image has no `/usr`. The process stays in the host's
//!   PID namespace (tests read PIDs it records) and network namespace; a test that models the
//!   node's network in a namespace adds `SANDBOXD_NODE_NETNS` (the stand-in for `hostNetwork`)
//!   through [`Container::start`]'s extra environment.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container as ContainerSpec, Node, ObjectFieldSelector, Pod, Secret, ServiceAccount,
    Volume,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::control_plane::ControlPlane;
use super::process::{Process, run_dir};

/// The image's configuration, as `scripts/oci-image.sh` writes it.
#[derive(Clone, Debug)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Env` as `KEY=VALUE`.
    pub env: Vec<(String, String)>,
    /// `User` (uid, gid).
    pub user: (u32, u32),
}

impl ImageConfig {
    /// Reads the image configuration out of the script that builds the image.
    pub fn shipped() -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oci-image.sh");
        let text = std::fs::read_to_string(&script)?;
        let line = |key: &str| -> Result<&str> {
            text.lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .map(|v| v.trim().trim_end_matches(','))
                .with_context(|| format!("{key} in {}", script.display()))
        };
        let strings = |v: &str| -> Result<Vec<String>> {
            serde_json::from_str::<Vec<String>>(v)
                .with_context(|| format!("parsing {v} from {}", script.display()))
        };
        let user = line("User")?.trim_matches('"');
        let (u, g) = user.split_once(':').unwrap_or((user, user));
        Ok(Self {
            entrypoint: strings(line("Entrypoint")?)?,
            env: strings(line("Env")?)?
                .into_iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
                .collect(),
            user: (u.parse()?, g.parse()?),
        })
    }
}

/// A fake node's host: its root directory (hostPath `P` lives at `<root>/P`), name and IPs.
pub struct NodeHost {
    /// The node's name.
    pub name: String,
    /// Its file system root.
    pub root: PathBuf,
    /// Its InternalIPs, in order (the first is `status.hostIP`).
    pub ips: Vec<IpAddr>,
}

impl NodeHost {
    /// A host root under the run directory, made a shared mount point (root only) so mounts
    /// made below it later (network namespaces) reach containers that mount parts of it
    /// with `HostToContainer` propagation, as on a real node.
    pub fn new(name: &str, short: &str, ips: Vec<IpAddr>) -> Result<Self> {
        let root = run_dir().join(short);
        std::fs::create_dir_all(&root)?;
        sh(&format!(
            "mount --bind {r} {r} && mount --make-rshared {r}",
            r = quote(&root.display().to_string())
        ))?;
        Ok(Self {
            name: name.into(),
            root,
            ips,
        })
    }

    /// The host path of host-absolute `abs`.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Sets the node's InternalIPs to [`NodeHost::ips`] (what its kubelet reports).
    pub async fn report_addresses(&self, client: &Client) -> Result<()> {
        let addrs: Vec<_> = self
            .ips
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        Api::<Node>::all(client.clone())
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": addrs}})),
            )
            .await?;
        Ok(())
    }

    /// As the kubelet: the pod is Running on this node; `hostIP`/`hostIPs` are the node's
    /// InternalIPs as the Node reports them, and a `hostNetwork` pod's IPs are the same.
    pub async fn run_pod(&self, client: &Client, pod: &Pod) -> Result<Pod> {
        let node = Api::<Node>::all(client.clone()).get(&self.name).await?;
        let ips: Vec<String> = node
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        ensure!(!ips.is_empty(), "node {} reports no InternalIP", self.name);
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let listed: Vec<_> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let mut status = json!({
            "phase": "Running",
            "hostIP": ips[0],
            "hostIPs": listed,
            "conditions": [{"type": "Ready", "status": "True"}],
        });
        if host_network {
            status["podIP"] = json!(ips[0]);
            status["podIPs"] = json!(listed);
        }
        let ns = pod.namespace().unwrap_or_default();
        Ok(Api::<Pod>::namespaced(client.clone(), &ns)
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?)
    }
}

impl Drop for NodeHost {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "umount -R -l {}",
            quote(&self.root.display().to_string())
        ));
    }
}

/// The Pod the DaemonSet controller made for `node`, once scheduled there.
pub async fn daemonset_pod(client: &Client, ds: &DaemonSet, node: &str) -> Result<Pod> {
    let ns = ds.namespace().unwrap_or_default();
    let selector = ds
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    super::eventually(
        &format!("the DaemonSet's pod on node {node}"),
        Duration::from_secs(60),
        || {
            let (pods, selector) = (pods.clone(), selector.clone());
            async move {
                Ok(pods
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .into_iter()
                    .find(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                    }))
            }
        },
    )
    .await
}

/// Where a mount comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// `None`: private.
    Private,
    /// `HostToContainer`: slave.
    HostToContainer,
    /// `Bidirectional`: shared.
    Bidirectional,
}

/// One mount of the container.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Where the container sees it.
    pub target: String,
    /// The host path mounted there.
    pub source: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Mount propagation.
    pub propagation: Propagation,
}

/// What the container runs.
#[derive(Clone, Debug)]
pub struct Launch {
    /// `argv`: entrypoint/command and args.
    pub argv: Vec<String>,
    /// The process environment, in the order a runtime would set it.
    pub env: Vec<(String, String)>,
    /// Mounts, in the order of the container's `volumeMounts`.
    pub mounts: Vec<Mount>,
    /// uid and gid.
    pub user: (u32, u32),
    /// The pod runs in the host's network namespace.
    pub host_network: bool,
}

impl Launch {
    /// The value of `key` in the environment.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The host path behind container path `path` (through the mount with the longest
    /// matching target).
    pub fn host_path(&self, path: &str) -> Option<PathBuf> {
        self.mounts
            .iter()
            .filter_map(|m| {
                let rest = Path::new(path).strip_prefix(&m.target).ok()?;
                Some((m.target.len(), m.source.join(rest)))
            })
            .max_by_key(|(n, _)| *n)
            .map(|(_, p)| p)
    }
}

/// Expands `$(VAR)` references from `vars` as the kubelet does: `$$` is a literal `$`, an
/// unknown reference stays as written.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&s[i..i + 3 + end]),
                }
                i += 3 + end;
                continue;
            }
        }
        let c = s[i..].chars().next().unwrap_or('\0');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// A downward-API field of `pod`, as the kubelet formats it for environment variables.
pub fn field_of(pod: &Pod, sel: &ObjectFieldSelector) -> Result<String> {
    let path = sel.field_path.as_str();
    let status = pod.status.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let keyed = |prefix: &str, map: &BTreeMap<String, String>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(map.get(key).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels", pod.labels()) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations", pod.annotations()) {
        return Ok(v);
    }
    let joined = |ips: Option<Vec<String>>| ips.unwrap_or_default().join(",");
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.hostIP" => status.host_ip.unwrap_or_default(),
        "status.hostIPs" => joined(
            status
                .host_ips
                .map(|v| v.into_iter().map(|i| i.ip).collect()),
        ),
        "status.podIP" => status.pod_ip.unwrap_or_default(),
        "status.podIPs" => joined(
            status
                .pod_ips
                .map(|v| v.into_iter().map(|i| i.ip).collect()),
        ),
        other => bail!("downward API field {other} is not one the kubelet offers to env"),
    })
}

fn data_of_secret(s: Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in s.string_data.unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    out
}

fn data_of_configmap(c: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in c.binary_data.unwrap_or_default() {
        out.insert(k, v.0);
    }
    out
}

/// Reads a Secret or ConfigMap's data; `None` when it is missing.
async fn source_data(
    client: &Client,
    ns: &str,
    secret: bool,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    Ok(if secret {
        Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(data_of_secret)
    } else {
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(data_of_configmap)
    })
}

/// Resolves container `container` of `pod` (running on `host`) into a process launch.
pub async fn resolve(
    client: &Client,
    cp: &ControlPlane,
    pod: &Pod,
    container: &str,
    host: &NodeHost,
    image: &ImageConfig,
) -> Result<Launch> {
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().context("pod without spec")?;
    let c: ContainerSpec = spec
        .containers
        .iter()
        .find(|c| c.name == container)
        .cloned()
        .with_context(|| format!("no container {container} in pod {}", pod.name_any()))?;

    // The Kubernetes service variables (kubelet); the service's endpoint here is the API
    // server itself (kube-proxy would DNAT the ClusterIP to it).
    let url = url::Url::parse(&cp.server)?;
    let (host_s, port) = (
        url.host_str().context("API server host")?.to_string(),
        url.port().context("API server port")?.to_string(),
    );
    let service_env = vec![
        ("KUBERNETES_SERVICE_HOST".to_string(), host_s.clone()),
        ("KUBERNETES_SERVICE_PORT".to_string(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_string(), port.clone()),
        (
            "KUBERNETES_PORT".to_string(),
            format!("tcp://{host_s}:{port}"),
        ),
    ];
    let mut env: Vec<(String, String)> = Vec::new();
    let mut vars: BTreeMap<String, String> = service_env.iter().cloned().collect();
    fn set(
        env: &mut Vec<(String, String)>,
        vars: &mut BTreeMap<String, String>,
        k: String,
        v: String,
    ) {
        vars.insert(k.clone(), v.clone());
        env.retain(|(x, _)| *x != k);
        env.push((k, v));
    }
    for from in c.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (secret, name, optional) = match (&from.secret_ref, &from.config_map_ref) {
            (Some(s), _) => (true, s.name.clone(), s.optional.unwrap_or(false)),
            (None, Some(m)) => (false, m.name.clone(), m.optional.unwrap_or(false)),
            (None, None) => continue,
        };
        match source_data(client, &ns, secret, &name).await? {
            Some(data) => {
                for (k, v) in data {
                    let key = format!("{prefix}{k}");
                    if key.is_empty() || key.contains('=') {
                        continue;
                    }
                    set(
                        &mut env,
                        &mut vars,
                        key,
                        String::from_utf8_lossy(&v).to_string(),
                    );
                }
            }
            None if optional => {}
            None => bail!(
                "CreateContainerConfigError: {} {name} of envFrom not found",
                if secret { "secret" } else { "configmap" }
            ),
        }
    }
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(v, &vars),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field_of(pod, f)?
                } else if let Some(k) = &from.secret_key_ref {
                    let data = source_data(client, &ns, true, &k.name).await?;
                    match data.and_then(|d| d.get(&k.key).cloned()) {
                        Some(v) => String::from_utf8_lossy(&v).to_string(),
                        None if k.optional.unwrap_or(false) => continue,
                        None => bail!("secret {}/{} key {} not found", ns, k.name, k.key),
                    }
                } else if let Some(k) = &from.config_map_key_ref {
                    let data = source_data(client, &ns, false, &k.name).await?;
                    match data.and_then(|d| d.get(&k.key).cloned()) {
                        Some(v) => String::from_utf8_lossy(&v).to_string(),
                        None if k.optional.unwrap_or(false) => continue,
                        None => bail!("configmap {}/{} key {} not found", ns, k.name, k.key),
                    }
                } else {
                    bail!("env {}: resourceFieldRef is not supported here", e.name)
                }
            }
            (None, None) => String::new(),
        };
        set(&mut env, &mut vars, e.name.clone(), value);
    }
    for (k, v) in service_env {
        if !env.iter().any(|(x, _)| *x == k) {
            env.push((k, v));
        }
    }
    // The runtime: the image's Env under the container's, HOSTNAME (the node's name for a
    // hostNetwork pod).
    let host_network = spec.host_network.unwrap_or(false);
    let mut full: Vec<(String, String)> = image
        .env
        .iter()
        .filter(|(k, _)| !env.iter().any(|(x, _)| x == k))
        .cloned()
        .collect();
    full.push((
        "HOSTNAME".into(),
        if host_network {
            host.name.clone()
        } else {
            pod.name_any()
        },
    ));
    full.extend(env);

    let expand_all =
        |v: Vec<String>| -> Vec<String> { v.iter().map(|s| expand(s, &vars)).collect() };
    let argv = match (&c.command, &c.args) {
        (Some(cmd), args) => {
            let mut a = expand_all(cmd.clone());
            a.extend(expand_all(args.clone().unwrap_or_default()));
            a
        }
        (None, args) => {
            let mut a = image.entrypoint.clone();
            a.extend(expand_all(args.clone().unwrap_or_default()));
            a
        }
    };

    let volumes: BTreeMap<String, Volume> = spec
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let pod_dir = host.path(&format!(
        "/var/lib/kubelet/pods/{}/volumes",
        pod.uid().unwrap_or_default()
    ));
    let mut mounts = Vec::new();
    for vm in c.volume_mounts.clone().unwrap_or_default() {
        let v = volumes
            .get(&vm.name)
            .with_context(|| format!("volumeMount {} names no volume", vm.name))?;
        let source = volume_source(client, pod, &ns, v, &pod_dir, host).await?;
        let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => source.join(sub),
            None => source,
        };
        mounts.push(Mount {
            target: vm.mount_path.clone(),
            source,
            read_only: vm.read_only.unwrap_or(false),
            propagation: match vm.mount_propagation.as_deref() {
                Some("HostToContainer") => Propagation::HostToContainer,
                Some("Bidirectional") => Propagation::Bidirectional,
                _ => Propagation::Private,
            },
        });
    }
    let sc = c.security_context.clone().unwrap_or_default();
    let psc = spec.security_context.clone().unwrap_or_default();
    let uid = sc
        .run_as_user
        .or(psc.run_as_user)
        .map_or(image.user.0, |u| u as u32);
    let gid = sc
        .run_as_group
        .or(psc.run_as_group)
        .map_or(image.user.1, |g| g as u32);
    Ok(Launch {
        argv,
        env: full,
        mounts,
        user: (uid, gid),
        host_network,
    })
}

fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    for (path, data) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `items` of a Secret/ConfigMap volume (all keys without them).
fn pick(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    match items {
        None => Ok(data),
        Some(items) => items
            .into_iter()
            .map(|i| {
                data.get(&i.key)
                    .cloned()
                    .map(|d| (i.path.clone(), d))
                    .with_context(|| format!("key {} not found", i.key))
            })
            .collect(),
    }
}

/// Materialises volume `v` on the node and returns its host path.
async fn volume_source(
    client: &Client,
    pod: &Pod,
    ns: &str,
    v: &Volume,
    pod_dir: &Path,
    host: &NodeHost,
) -> Result<PathBuf> {
    let dir = pod_dir.join(&v.name);
    if let Some(hp) = &v.host_path {
        let p = host.path(&hp.path);
        match hp.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => std::fs::create_dir_all(&p)?,
            "Directory" => ensure!(p.is_dir(), "hostPath {} is not a directory", hp.path),
            "FileOrCreate" => {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if !p.exists() {
                    std::fs::write(&p, "")?;
                }
            }
            "File" => ensure!(p.is_file(), "hostPath {} is not a file", hp.path),
            _ => {}
        }
        return Ok(p);
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let data = match source_data(client, ns, true, &name).await? {
            Some(d) => pick(d, s.items.clone())?,
            None if s.optional.unwrap_or(false) => BTreeMap::new(),
            None => bail!("MountVolume.SetUp: secret {name} not found"),
        };
        write_files(&dir, &data, s.default_mode.unwrap_or(0o644) as u32)?;
        return Ok(dir);
    }
    if let Some(c) = &v.config_map {
        let name = c.name.clone();
        let data = match source_data(client, ns, false, &name).await? {
            Some(d) => pick(d, c.items.clone())?,
            None if c.optional.unwrap_or(false) => BTreeMap::new(),
            None => bail!("MountVolume.SetUp: configmap {name} not found"),
        };
        write_files(&dir, &data, c.default_mode.unwrap_or(0o644) as u32)?;
        return Ok(dir);
    }
    if v.empty_dir.is_some() {
        std::fs::create_dir_all(&dir)?;
        return Ok(dir);
    }
    if let Some(p) = &v.projected {
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for src in p.sources.clone().unwrap_or_default() {
            if let Some(t) = src.service_account_token {
                let sa = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into());
                let req = TokenRequest {
                    spec: Some(TokenRequestSpec {
                        audiences: Some(t.audience.clone().into_iter().collect()),
                        expiration_seconds: t.expiration_seconds,
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(pod.name_any()),
                            uid: pod.uid(),
                        }),
                    }),
                    ..Default::default()
                };
                let token: TokenRequest = Api::<ServiceAccount>::namespaced(client.clone(), ns)
                    .create_subresource("token", &sa, &PostParams::default(), &req)
                    .await
                    .with_context(|| format!("a token for service account {ns}/{sa}"))?;
                let token = token
                    .status
                    .and_then(|s| s.token)
                    .ok_or_else(|| anyhow!("TokenRequest returned no token"))?;
                files.insert(t.path.clone(), token.into_bytes());
            }
            if let Some(c) = src.config_map {
                let data = source_data(client, ns, false, &c.name)
                    .await?
                    .with_context(|| format!("configmap {} of a projected volume", c.name))?;
                files.extend(pick(data, c.items.clone())?);
            }
            if let Some(s) = src.secret {
                let data = source_data(client, ns, true, &s.name)
                    .await?
                    .with_context(|| format!("secret {} of a projected volume", s.name))?;
                files.extend(pick(data, s.items.clone())?);
            }
            if let Some(d) = src.downward_api {
                for item in d.items.unwrap_or_default() {
                    let f = item
                        .field_ref
                        .as_ref()
                        .with_context(|| format!("downward API item {}", item.path))?;
                    files.insert(item.path.clone(), field_of(pod, f)?.into_bytes());
                }
            }
        }
        write_files(&dir, &files, p.default_mode.unwrap_or(0o644) as u32)?;
        return Ok(dir);
    }
    bail!("volume {} is of a kind this harness does not run", v.name)
}

/// Single-quotes `s` for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn sh(script: &str) -> Result<()> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn tool(name: &str) -> Result<String> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p.display().to_string());
        }
    }
    bail!("{name} not found")
}

/// A container's process.
pub struct Container {
    /// The process (the launcher execs into the container's entrypoint).
    pub process: Process,
}

impl Container {
    /// Starts `launch` with `binary` as the image's entrypoint binary, plus `extra` in its
    /// environment (each a documented test-only stand-in, such as `SANDBOXD_NODE_NETNS`).
    pub fn start(
        name: &str,
        launch: &Launch,
        binary: &Path,
        extra: &[(&str, String)],
    ) -> Result<Self> {
        Self::start_in(name, launch, binary, extra, None)
    }

    /// [`Container::start`] in the network namespace at `netns` (a `hostNetwork` pod on a
    /// node whose network is a namespace: the node's).
    pub fn start_in(
        name: &str,
        launch: &Launch,
        binary: &Path,
        extra: &[(&str, String)],
        netns: Option<&Path>,
    ) -> Result<Self> {
        let root = run_dir().join(format!("{name}.root"));
        std::fs::create_dir_all(&root)?;
        let r = quote(&root.display().to_string());
        let mount = tool("mount")?;
        let mut s = String::from("set -e\n");
        s.push_str(&format!(
            "{mount} -t tmpfs -o mode=0755 container-root {r}\n"
        ));
        for d in ["proc", "sys", "dev", "tmp", "etc/ssl/certs", "usr"] {
            s.push_str(&format!("mkdir -p {r}/{d}\n"));
        }
        s.push_str(&format!("chmod 1777 {r}/tmp\n"));
        for d in ["proc", "sys", "dev"] {
            s.push_str(&format!("{mount} --rbind /{d} {r}/{d}\n"));
        }
        // The dynamically linked test binary needs the host's libraries.
        s.push_str(&format!(
            "{mount} --rbind /usr {r}/usr\n{mount} -o remount,bind,ro {r}/usr\n"
        ));
        for l in ["lib", "lib64", "bin", "sbin"] {
            let p = Path::new("/").join(l);
            if let Ok(t) = std::fs::read_link(&p) {
                s.push_str(&format!(
                    "ln -s {} {r}/{l}\n",
                    quote(t.display().to_string().trim_start_matches('/'))
                ));
            }
        }
        let ca = "/etc/ssl/certs/ca-certificates.crt";
        if Path::new(ca).exists() {
            s.push_str(&format!("cp {ca} {r}{ca}\n"));
        }
        let entry = launch.argv.first().context("empty argv")?;
        s.push_str(&format!(
            "touch {r}{e}\n{mount} --bind {b} {r}{e}\n",
            e = quote(entry),
            b = quote(&binary.display().to_string())
        ));
        for m in &launch.mounts {
            let t = format!("{r}{}", quote(&m.target));
            if m.source.is_dir() {
                s.push_str(&format!("mkdir -p {t}\n"));
            } else {
                s.push_str(&format!("mkdir -p \"$(dirname {t})\"\ntouch {t}\n"));
            }
            s.push_str(&format!(
                "{mount} --rbind {} {t}\n",
                quote(&m.source.display().to_string())
            ));
            if m.read_only {
                s.push_str(&format!("{mount} -o remount,bind,ro {t}\n"));
            }
            s.push_str(&format!(
                "{mount} --make-{} {t}\n",
                match m.propagation {
                    Propagation::Private => "rprivate",
                    Propagation::HostToContainer => "rslave",
                    Propagation::Bidirectional => "rshared",
                }
            ));
        }
        let mut env: Vec<(String, String)> = launch.env.clone();
        for (k, v) in extra {
            env.retain(|(x, _)| x != k);
            env.push((k.to_string(), v.clone()));
        }
        let assignments: Vec<String> = env
            .iter()
            .map(|(k, v)| quote(&format!("{k}={v}")))
            .collect();
        let user = if launch.user.0 == 0 {
            String::new()
        } else {
            format!(
                "--reuid={} --regid={} --clear-groups ",
                launch.user.0, launch.user.1
            )
        };
        s.push_str(&format!(
            "exec {chroot} {r} /usr/bin/setpriv {user}--pdeathsig KILL -- /usr/bin/env -i {} {}\n",
            assignments.join(" "),
            launch
                .argv
                .iter()
                .map(|a| quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            chroot = tool("chroot")?,
        ));
        let script = root.with_extension("sh");
        std::fs::write(&script, &s)?;
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = netns {
            argv.extend([format!("--net={}", ns.display()), tool("unshare")?]);
        }
        argv.extend([
            "--mount".into(),
            "--propagation".into(),
            "slave".into(),
            "--".into(),
            tool("sh")?,
            script.display().to_string(),
        ]);
        let launcher = if netns.is_some() {
            "nsenter"
        } else {
            "unshare"
        };
        let process = Process::start(name, Path::new(&tool(launcher)?), &argv, &[])?;
        Ok(Self { process })
    }
}
