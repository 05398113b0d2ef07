//! A container's bind mounts in a pod VM that shares no file system with the node, as kata's
//! shim handles them for a remote hypervisor:
//!
//! - `/dev/shm` becomes the sandbox's shm (an `ephemeral` storage made by CreateSandbox);
//! - a disk-backed emptyDir becomes a `local` storage in the VM, shared by the pod's
//!   containers;
//! - every other file or directory (hosts, hostname, resolv.conf, the termination log,
//!   ConfigMap, Secret, projected and downward-API volumes, service account tokens) is copied
//!   with `CopyFile` to `/run/kata-containers/shared/containers/<cid>-<16 hex>-<name>` and the
//!   mount's source points there. Kubernetes volumes that change (ConfigMaps, Secrets,
//!   projected tokens) are watched and what changed is copied again.
//!
//! `CopyFile` carries at most 1 MiB per call; `file_mode` is the file's `st_mode` (type bits
//! included: directories 0o40xxx with no data, symlinks 0o120777 with the target as data),
//! `dir_mode` the parents' mode as Go's `FileMode` (`ModeDir | 0750`), as kata sends them.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Error;
use super::vm::{AgentClient, ctx};
use crate::protocol::agent::{CopyFileRequest, Storage};
use crate::protocol::oci;

/// Where copied files land in the VM.
pub(crate) const GUEST_SHARED: &str = "/run/kata-containers/shared/containers";
/// The sandbox's shm in the VM (CreateSandbox's `ephemeral` storage).
pub(crate) const SANDBOX_SHM: &str = "/run/kata-containers/sandbox/shm";
/// Where disk-backed emptyDirs live in the VM.
pub(crate) const LOCAL_BASE: &str = "/run/kata-containers/sandbox/local";
/// Largest `CopyFile` payload.
pub(crate) const CHUNK: usize = 1 << 20;
/// Go's `os.ModeDir`.
const GO_MODE_DIR: u32 = 1 << 31;
/// The parents' mode kata sends (`ModeDir | 0750`).
pub(crate) const DIR_MODE: u32 = GO_MODE_DIR | 0o750;

/// Volume kinds whose content Kubernetes updates in place.
const WATCHED: [&str; 4] = [
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];

/// A host file or directory copied into the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Copy {
    /// On the node.
    pub(crate) host: PathBuf,
    /// In the VM.
    pub(crate) guest: String,
    /// Kubernetes may change it: watch it.
    pub(crate) watch: bool,
}

/// What a container's mounts need.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Storages for CreateContainer.
    pub(crate) storages: Vec<Storage>,
    /// Files to copy before CreateContainer.
    pub(crate) copies: Vec<Copy>,
}

fn is_bind(m: &oci::Mount) -> bool {
    m.type_ == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind")
}

fn under(p: &str, dir: &str) -> bool {
    p == dir || p.starts_with(&format!("{dir}/"))
}

/// The sandbox's shm storage for CreateSandbox (`size` bytes).
pub(crate) fn shm_storage(size: u64) -> Storage {
    Storage {
        driver: "ephemeral".into(),
        source: "shm".into(),
        fstype: "tmpfs".into(),
        options: vec![
            "noexec".into(),
            "nosuid".into(),
            "nodev".into(),
            "mode=1777".into(),
            format!("size={size}"),
        ],
        mount_point: SANDBOX_SHM.into(),
        ..Default::default()
    }
}

/// The size of the sandbox's `/dev/shm` from its spec (containerd's default 64 MiB).
pub(crate) fn shm_size(spec: &oci::Spec) -> u64 {
    spec.Mounts
        .iter()
        .find(|m| m.destination == "/dev/shm")
        .and_then(|m| {
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("size=").map(parse_size))
        })
        .flatten()
        .unwrap_or(64 << 20)
}

fn parse_size(s: &str) -> Option<u64> {
    let (n, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().ok().map(|v| v * mult)
}

/// Rewrites `mounts` of container `cid` for the VM and says what to copy and mount first.
/// `token` makes each copied name unique (kata: 8 random bytes in hex).
pub(crate) fn plan(
    cid: &str,
    mounts: &mut [oci::Mount],
    mut token: impl FnMut() -> String,
) -> Plan {
    let mut plan = Plan::default();
    for m in mounts.iter_mut() {
        if !is_bind(m) {
            continue;
        }
        if m.destination == "/dev/shm" {
            m.source = SANDBOX_SHM.into();
            m.type_ = "bind".into();
            m.options = vec!["rbind".into()];
            continue;
        }
        let src = m.source.clone();
        if ["/proc", "/sys"].iter().any(|d| under(&m.destination, d))
            || ["/dev", "/proc", "/sys"].iter().any(|d| under(&src, d))
        {
            continue;
        }
        if src.contains("kubernetes.io~empty-dir") {
            let name = Path::new(&src)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "volume".into());
            let mount_point = format!("{LOCAL_BASE}/{name}");
            if !plan.storages.iter().any(|s| s.mount_point == mount_point) {
                plan.storages.push(Storage {
                    driver: "local".into(),
                    source: "local".into(),
                    fstype: "local".into(),
                    options: vec!["mode=0777".into()],
                    mount_point: mount_point.clone(),
                    ..Default::default()
                });
            }
            m.source = mount_point;
            continue;
        }
        let base = Path::new(&m.destination)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let guest = format!("{GUEST_SHARED}/{cid}-{}-{base}", token());
        plan.copies.push(Copy {
            host: PathBuf::from(&src),
            guest: guest.clone(),
            watch: WATCHED.iter().any(|w| src.contains(w)),
        });
        m.source = guest;
    }
    plan
}

/// One entry of a copied tree, as last sent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    target: Option<PathBuf>,
}

/// The entries under `root` (relative paths; "" is the root), not following symlinks.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        let p = root.join(rel);
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            return;
        };
        let ft = md.file_type();
        let target = ft
            .is_symlink()
            .then(|| std::fs::read_link(&p).ok())
            .flatten();
        out.insert(
            rel.to_path_buf(),
            Seen {
                mode: md.mode(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                target,
            },
        );
        if ft.is_dir() {
            let Ok(rd) = std::fs::read_dir(&p) else {
                return;
            };
            let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn guest_path(guest: &str, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        guest.to_string()
    } else {
        format!("{guest}/{}", rel.display())
    }
}

/// Sends one entry (a file in chunks, a directory, a symlink). Sockets, devices and FIFOs
/// are skipped.
async fn send(agent: &AgentClient, host: &Path, guest: &str) -> Result<(), Error> {
    let md = std::fs::symlink_metadata(host)
        .map_err(super::io(format!("reading {}", host.display())))?;
    let ft = md.file_type();
    let base = CopyFileRequest {
        path: guest.to_string(),
        file_mode: md.mode(),
        dir_mode: DIR_MODE,
        uid: md.uid() as i32,
        gid: md.gid() as i32,
        ..Default::default()
    };
    let call = |req: CopyFileRequest| async move {
        agent
            .api()
            .copy_file(ctx(Duration::from_secs(60)), &req)
            .await
            .map_err(super::vm::agent_error("CopyFile"))
            .map(|_| ())
    };
    if ft.is_dir() {
        return call(base).await;
    }
    if ft.is_symlink() {
        let target = std::fs::read_link(host)
            .map_err(super::io(format!("reading the link {}", host.display())))?;
        let mut req = base;
        req.data = target.as_os_str().as_encoded_bytes().to_vec();
        req.file_size = req.data.len() as i64;
        return call(req).await;
    }
    if !ft.is_file() {
        return Ok(());
    }
    let data = std::fs::read(host).map_err(super::io(format!("reading {}", host.display())))?;
    let size = data.len() as i64;
    if data.is_empty() {
        let mut req = base;
        req.file_size = 0;
        return call(req).await;
    }
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let mut req = base.clone();
        req.file_size = size;
        req.offset = (i * CHUNK) as i64;
        req.data = chunk.to_vec();
        call(req).await?;
    }
    Ok(())
}

/// Copies `c` into the VM (a whole tree for a directory); returns what was sent, for
/// [`resend_changes`].
pub(crate) async fn copy(agent: &AgentClient, c: &Copy) -> Result<CopyState, Error> {
    let snap = snapshot(&c.host);
    if snap.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "mount source {} does not exist",
            c.host.display()
        )));
    }
    for rel in snap.keys() {
        send(agent, &c.host.join(rel), &guest_path(&c.guest, rel)).await?;
    }
    Ok(CopyState {
        copy: c.clone(),
        seen: snap,
    })
}

/// A copied tree and what was sent of it.
#[derive(Clone, Debug)]
pub(crate) struct CopyState {
    /// The copy.
    pub(crate) copy: Copy,
    seen: BTreeMap<PathBuf, Seen>,
}

/// Sends what changed under `state`'s host path since the last time (new or changed files,
/// directories and links; parents before children). Returns how many entries were sent.
pub(crate) async fn resend_changes(
    agent: &AgentClient,
    state: &mut CopyState,
) -> Result<usize, Error> {
    let now = snapshot(&state.copy.host);
    let mut sent = 0;
    for (rel, seen) in &now {
        if state.seen.get(rel) == Some(seen) {
            continue;
        }
        send(
            agent,
            &state.copy.host.join(rel),
            &guest_path(&state.copy.guest, rel),
        )
        .await?;
        sent += 1;
    }
    state.seen = now;
    Ok(sent)
}

/// Watches the copies of a container until the task is aborted: every `interval`, what
/// changed is copied again.
pub(crate) fn watch(
    agent: AgentClient,
    cid: String,
    mut states: Vec<CopyState>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        states.retain(|s| s.copy.watch);
        if states.is_empty() {
            return;
        }
        loop {
            tokio::time::sleep(interval).await;
            for s in states.iter_mut() {
                match resend_changes(&agent, s).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        cid,
                        volume = %s.copy.host.display(),
                        entries = n,
                        "volume changed; copied again into the VM"
                    ),
                    Err(e) => {
                        tracing::warn!(cid, volume = %s.copy.host.display(), error = %e, "copying a changed volume")
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(dest: &str, kind: &str, src: &str) -> oci::Mount {
        oci::Mount {
            destination: dest.into(),
            type_: kind.into(),
            source: src.into(),
            options: vec!["rbind".into(), "rprivate".into(), "ro".into()],
            ..Default::default()
        }
    }

    #[test]
    fn mounts_become_copies_storages_and_the_sandbox_shm() {
        let pod = "/var/lib/kubelet/pods/u/volumes";
        let mut mounts = vec![
            oci::Mount {
                destination: "/proc".into(),
                type_: "proc".into(),
                source: "proc".into(),
                ..Default::default()
            },
            m("/etc/hosts", "bind", "/var/lib/kubelet/pods/u/etc-hosts"),
            m(
                "/dev/shm",
                "bind",
                "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/s/shm",
            ),
            m(
                "/config",
                "bind",
                &format!("{pod}/kubernetes.io~configmap/cfg"),
            ),
            m(
                "/var/run/secrets/kubernetes.io/serviceaccount",
                "bind",
                &format!("{pod}/kubernetes.io~projected/kube-api-access-x"),
            ),
            m(
                "/cache",
                "bind",
                &format!("{pod}/kubernetes.io~empty-dir/cache"),
            ),
            m(
                "/dev/termination-log",
                "bind",
                "/var/lib/kubelet/pods/u/containers/c/0a1b",
            ),
            m("/dev/fuse", "bind", "/dev/fuse"),
        ];
        let mut n = 0;
        let plan = plan("c1", &mut mounts, || {
            n += 1;
            format!("{n:016x}")
        });
        assert_eq!(mounts[0].source, "proc");
        assert_eq!(
            mounts[1].source,
            "/run/kata-containers/shared/containers/c1-0000000000000001-hosts"
        );
        assert_eq!(mounts[1].options, ["rbind", "rprivate", "ro"]);
        assert_eq!(mounts[2].source, SANDBOX_SHM);
        assert!(mounts[3].source.ends_with("-config"));
        assert_eq!(mounts[5].source, "/run/kata-containers/sandbox/local/cache");
        assert!(mounts[6].source.ends_with("-termination-log"));
        assert_eq!(mounts[7].source, "/dev/fuse");
        let watched: Vec<bool> = plan.copies.iter().map(|c| c.watch).collect();
        assert_eq!(watched, [false, true, true, false]);
        assert_eq!(plan.storages.len(), 1);
        assert_eq!(plan.storages[0].driver, "local");
    }

    #[test]
    fn the_shm_size_comes_from_the_sandbox_spec() {
        let mut s = oci::Spec::new();
        assert_eq!(shm_size(&s), 64 << 20);
        let mut shm = m("/dev/shm", "bind", "/x/shm");
        shm.options.push("size=128m".into());
        s.Mounts.push(shm);
        assert_eq!(shm_size(&s), 128 << 20);
        assert_eq!(
            shm_storage(67108864).options.last().unwrap(),
            "size=67108864"
        );
        assert_eq!(DIR_MODE, 2147484136);
    }

    #[test]
    fn a_configmap_swap_shows_as_changed_entries() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir(root.join("..2024_01")).unwrap();
        std::fs::write(root.join("..2024_01/key"), "v1").unwrap();
        std::os::unix::fs::symlink("..2024_01", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", root.join("key")).unwrap();
        let before = snapshot(root);
        assert_eq!(before.len(), 5);
        assert!(before[Path::new("..data")].target.is_some());
        std::fs::create_dir(root.join("..2024_02")).unwrap();
        std::fs::write(root.join("..2024_02/key"), "v2").unwrap();
        std::fs::remove_file(root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..2024_02", root.join("..data")).unwrap();
        let after = snapshot(root);
        let changed: Vec<&PathBuf> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        let names: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        assert!(names.contains(&"..2024_02".to_string()), "{names:?}");
        assert!(names.contains(&"..2024_02/key".to_string()), "{names:?}");
        assert!(names.contains(&"..data".to_string()), "{names:?}");
        assert!(!names.contains(&"key".to_string()), "{names:?}");
    }
}
