//! Storages of `CreateSandbox` and `CreateContainer`: what the agent mounts in the VM before
//! a container starts.
//!
//! - `ephemeral`: a tmpfs (the pod's `/dev/shm`, memory-backed emptyDirs) at `mount_point`;
//! - `local`: a directory (disk-backed emptyDir) at `mount_point`, mode from `mode=` option;
//! - `image_guest_pull`: the container's image, pulled in the VM ([`super::image`]) and
//!   mounted as overlayfs at `mount_point`; the sandbox (pause) container gets the pause
//!   built into sandboxd instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::{Error, sys};
use crate::protocol::agent::Storage;

/// The `image_guest_pull` driver.
pub(crate) const IMAGE_GUEST_PULL: &str = "image_guest_pull";
/// The `local` driver.
pub(crate) const LOCAL: &str = "local";
/// The `ephemeral` driver.
pub(crate) const EPHEMERAL: &str = "ephemeral";
/// Drivers this agent handles (answered in `GetGuestDetails`).
pub(crate) const DRIVERS: &[&str] = &[IMAGE_GUEST_PULL, LOCAL, EPHEMERAL];

/// Annotations that mark the sandbox (pause) container, containerd's and CRI-O's.
pub(crate) const CONTAINER_TYPE_KEYS: &[&str] = &[
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri-o.ContainerType",
];

/// Whether `annotations` mark the sandbox container.
pub(crate) fn is_sandbox(annotations: &HashMap<String, String>) -> bool {
    CONTAINER_TYPE_KEYS
        .iter()
        .any(|k| annotations.get(*k).is_some_and(|v| v == "sandbox"))
}

/// The metadata (`{"metadata": {...}}`) of an `image_guest_pull` storage's
/// `image_guest_pull=<json>` driver option.
pub(crate) fn guest_pull_metadata(s: &Storage) -> Result<HashMap<String, String>, Error> {
    #[derive(serde::Deserialize)]
    struct Volume {
        #[serde(default)]
        metadata: HashMap<String, String>,
    }
    for o in &s.driver_options {
        if let Some(json) = o.strip_prefix("image_guest_pull=") {
            let v: Volume = serde_json::from_str(json).map_err(|e| {
                Error::InvalidArgument(format!("image_guest_pull driver option: {e}"))
            })?;
            return Ok(v.metadata);
        }
    }
    Ok(HashMap::new())
}

/// Mount flags and data of `options` (`ro`, `nosuid`, ... and `key=value` data).
pub(crate) fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Mounts a tmpfs for an `ephemeral` storage.
pub(crate) fn ephemeral(s: &Storage) -> Result<PathBuf, Error> {
    let target = mount_point(s)?;
    std::fs::create_dir_all(&target)
        .map_err(super::io(format!("creating {}", target.display())))?;
    let (flags, data) = mount_options(&s.options);
    let source = if s.source.is_empty() {
        "tmpfs"
    } else {
        s.source.as_str()
    };
    mount(
        Some(source),
        &target,
        Some("tmpfs"),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(sys(format!("mounting tmpfs on {}", target.display())))?;
    Ok(target)
}

/// Makes the directory of a `local` storage.
pub(crate) fn local(s: &Storage) -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    let target = mount_point(s)?;
    std::fs::create_dir_all(&target)
        .map_err(super::io(format!("creating {}", target.display())))?;
    let mode = s
        .options
        .iter()
        .find_map(|o| o.strip_prefix("mode="))
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or(0o777);
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        .map_err(super::io(format!("chmod {}", target.display())))?;
    Ok(target)
}

/// The storage's mount point, checked to be absolute.
pub(crate) fn mount_point(s: &Storage) -> Result<PathBuf, Error> {
    let p = Path::new(&s.mount_point);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(Error::InvalidArgument(format!(
            "storage {:?}: mount point {:?} must be an absolute path without `..`",
            s.driver, s.mount_point
        )));
    }
    Ok(p.to_path_buf())
}

/// Unmounts `path` (lazily, it may be busy a moment longer); absent is fine.
pub(crate) fn unmount(path: &Path) {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "unmount failed"),
    }
}

/// Bind-mounts the running sandboxd read-only as `/pause` into `rootfs`.
pub(crate) fn pause_rootfs(rootfs: &Path) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(rootfs).map_err(super::io(format!("creating {}", rootfs.display())))?;
    let target = rootfs.join(super::pause::PATH.trim_start_matches('/'));
    std::fs::write(&target, b"").map_err(super::io(format!("creating {}", target.display())))?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(super::io("/proc/self/exe"))?;
    mount(
        Some(&exe),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!(
        "bind-mounting sandboxd on {}",
        target.display()
    )))?;
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys(format!("read-only {}", target.display())))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_container_is_known_by_either_runtimes_annotation() {
        let a = HashMap::from([("io.kubernetes.cri.container-type".into(), "sandbox".into())]);
        assert!(is_sandbox(&a));
        let b = HashMap::from([("io.kubernetes.cri-o.ContainerType".into(), "sandbox".into())]);
        assert!(is_sandbox(&b));
        let c = HashMap::from([(
            "io.kubernetes.cri.container-type".into(),
            "container".into(),
        )]);
        assert!(!is_sandbox(&c));
    }

    #[test]
    fn guest_pull_metadata_is_read_from_the_driver_option() {
        let s = Storage {
            driver: IMAGE_GUEST_PULL.into(),
            driver_options: vec![
                r#"image_guest_pull={"metadata":{"io.kubernetes.cri.container-type":"sandbox"}}"#
                    .into(),
            ],
            ..Default::default()
        };
        assert!(is_sandbox(&guest_pull_metadata(&s).unwrap()));
        let bad = Storage {
            driver_options: vec!["image_guest_pull={".into()],
            ..Default::default()
        };
        assert!(matches!(
            guest_pull_metadata(&bad),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let (f, d) = mount_options(&[
            "nosuid".into(),
            "nodev".into(),
            "mode=1777".into(),
            "size=67108864".into(),
        ]);
        assert_eq!(f, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(d, "mode=1777,size=67108864");
    }
}
