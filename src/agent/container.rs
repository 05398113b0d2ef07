//! Containers with youki's `libcontainer`: the shim's OCI spec (kata's protobuf form) turned
//! into a bundle's `config.json`, created (its init process waiting for start), started,
//! signalled and deleted; exec processes through libcontainer's tenant builder.
//!
//! What the VM changes in the spec, as kata's agent does: hooks go (they name host paths);
//! the seccomp profile is compiled here ([`super::seccomp`]) and installed by this module's
//! executor right before `execve`, because libcontainer without libseccomp ignores it;
//! namespaces are the sandbox's (ipc, uts and, with `sandbox_pidns`, pid are the pause
//! container's; a network namespace path that does not exist in the VM means the VM's own);
//! a systemd-style cgroups path becomes a cgroupfs path under `/sandboxd`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use libcontainer::container::Container as Lc;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use serde_json::{Map, Value, json};

use super::Error;
use super::seccomp::Filter;
use crate::protocol::oci;

/// What the agent adds to the shim's spec for the VM.
#[derive(Clone, Debug, Default)]
pub(crate) struct Placement {
    /// The rootfs (a mounted image, the pause rootfs or the shim's path).
    pub rootfs: PathBuf,
    /// `/proc/<pid>/ns` of the sandbox's pause process (shared ipc, uts, pid).
    pub sandbox_ns: Option<PathBuf>,
    /// Join the sandbox's pid namespace.
    pub sandbox_pidns: bool,
}

fn nz_i64(v: i64) -> Value {
    if v == 0 { Value::Null } else { json!(v) }
}

fn nz_u64(v: u64) -> Value {
    if v == 0 { Value::Null } else { json!(v) }
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            for x in m.values_mut() {
                strip_nulls(x);
            }
            m.retain(|_, x| !matches!(x, Value::Object(o) if o.is_empty()));
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The `PATH` a process gets when neither its spec nor its image names one (Docker's and
/// containerd's default): libcontainer refuses to start a process without `PATH`, where
/// runc and kata's agent start one whose command is an absolute path.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `env` with [`DEFAULT_PATH`] added when it has no `PATH`.
pub fn env_with_path(env: &[String]) -> Vec<String> {
    let mut out = env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        out.push(DEFAULT_PATH.into());
    }
    out
}

/// The OCI `process` object of a kata `Process`.
pub(crate) fn process_json(p: &oci::Process) -> Value {
    let user = p.User.as_ref();
    let caps = p.Capabilities.as_ref();
    let mut v = json!({
        "terminal": p.Terminal,
        "consoleSize": p.ConsoleSize.as_ref().filter(|b| b.Height > 0 || b.Width > 0)
            .map(|b| json!({"height": b.Height, "width": b.Width})),
        "user": {
            "uid": user.map(|u| u.UID).unwrap_or(0),
            "gid": user.map(|u| u.GID).unwrap_or(0),
            "additionalGids": user.map(|u| u.AdditionalGids.clone()).filter(|g| !g.is_empty()),
        },
        "args": p.Args,
        "env": env_with_path(&p.Env),
        "cwd": if p.Cwd.is_empty() { "/" } else { p.Cwd.as_str() },
        "capabilities": caps.map(|c| json!({
            "bounding": c.Bounding, "effective": c.Effective, "inheritable": c.Inheritable,
            "permitted": c.Permitted, "ambient": c.Ambient,
        })),
        "rlimits": p.Rlimits.iter().map(|r| json!({"type": r.Type, "hard": r.Hard, "soft": r.Soft}))
            .collect::<Vec<_>>(),
        "noNewPrivileges": p.NoNewPrivileges,
        "oomScoreAdj": if p.OOMScoreAdj != 0 { json!(p.OOMScoreAdj) } else { Value::Null },
    });
    strip_nulls(&mut v);
    v
}

fn resources_json(r: &oci::LinuxResources) -> Value {
    let mut v = json!({
        "devices": r.Devices.iter().map(|d| json!({
            "allow": d.Allow,
            "type": if d.Type.is_empty() { Value::Null } else { json!(d.Type) },
            "major": if d.Major < 0 { Value::Null } else { json!(d.Major) },
            "minor": if d.Minor < 0 { Value::Null } else { json!(d.Minor) },
            "access": if d.Access.is_empty() { Value::Null } else { json!(d.Access) },
        })).collect::<Vec<_>>(),
        "memory": r.Memory.as_ref().map(|m| json!({
            "limit": nz_i64(m.Limit),
            "reservation": nz_i64(m.Reservation),
            "swap": nz_i64(m.Swap),
            "swappiness": if m.Swappiness > 100 { Value::Null } else { nz_u64(m.Swappiness) },
            "disableOOMKiller": m.DisableOOMKiller.then_some(true),
        })),
        "cpu": r.CPU.as_ref().map(|c| json!({
            "shares": nz_u64(c.Shares),
            "quota": nz_i64(c.Quota),
            "period": nz_u64(c.Period),
            "cpus": if c.Cpus.is_empty() { Value::Null } else { json!(c.Cpus) },
            "mems": if c.Mems.is_empty() { Value::Null } else { json!(c.Mems) },
        })),
        "pids": r.Pids.as_ref().filter(|p| p.Limit != 0).map(|p| json!({"limit": p.Limit})),
        "hugepageLimits": r.HugepageLimits.iter()
            .map(|h| json!({"pageSize": h.Pagesize, "limit": h.Limit})).collect::<Vec<_>>(),
    });
    strip_nulls(&mut v);
    v
}

/// A cgroups path libcontainer takes without systemd: the shim's cgroupfs path, or one under
/// `/sandboxd` for a systemd-style `slice:prefix:name` or an empty path.
pub(crate) fn cgroups_path(spec_path: &str, cid: &str) -> String {
    if spec_path.starts_with('/') && !spec_path.contains(':') {
        spec_path.to_string()
    } else {
        format!("/sandboxd/{cid}")
    }
}

/// The bundle `config.json` for `spec` as the VM runs it, and its seccomp profile (left out
/// of the file: this module installs it).
pub(crate) fn config_json(
    cid: &str,
    spec: &oci::Spec,
    place: &Placement,
) -> Result<(Value, Option<oci::LinuxSeccomp>), Error> {
    let process = spec.Process.as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!("container {cid}: the spec has no process"))
    })?;
    let linux = spec.Linux.clone().unwrap_or_default();
    let mut namespaces = Vec::new();
    for ns in &linux.Namespaces {
        let shared = |kind: &str| place.sandbox_ns.as_ref().map(|d| d.join(kind));
        let path: Option<PathBuf> = match ns.Type.as_str() {
            "ipc" => shared("ipc"),
            "uts" => shared("uts"),
            "pid" if place.sandbox_pidns => shared("pid"),
            "pid" => None,
            "network" if ns.Path.is_empty() => None,
            // A host path (or none at all in the VM): the VM's own network.
            "network" if !Path::new(&ns.Path).exists() => continue,
            "network" => Some(ns.Path.clone().into()),
            _ => (!ns.Path.is_empty()).then(|| ns.Path.clone().into()),
        };
        let mut n = Map::new();
        n.insert("type".into(), json!(ns.Type));
        if let Some(p) = path {
            n.insert("path".into(), json!(p));
        }
        namespaces.push(Value::Object(n));
    }
    let mounts: Vec<Value> = spec
        .Mounts
        .iter()
        .map(|m| {
            let mut o = json!({"destination": m.destination, "options": m.options});
            if !m.source.is_empty() {
                o["source"] = json!(m.source);
            }
            if !m.type_.is_empty() {
                o["type"] = json!(m.type_);
            }
            o
        })
        .collect();
    let mut linux_json = json!({
        "uidMappings": linux.UIDMappings.iter().map(|m| json!({"containerID": m.ContainerID, "hostID": m.HostID, "size": m.Size})).collect::<Vec<_>>(),
        "gidMappings": linux.GIDMappings.iter().map(|m| json!({"containerID": m.ContainerID, "hostID": m.HostID, "size": m.Size})).collect::<Vec<_>>(),
        "sysctl": linux.Sysctl,
        "resources": linux.Resources.as_ref().map(resources_json),
        "cgroupsPath": cgroups_path(&linux.CgroupsPath, cid),
        "namespaces": namespaces,
        "devices": linux.Devices.iter().map(|d| json!({
            "path": d.Path, "type": d.Type, "major": d.Major, "minor": d.Minor,
            "fileMode": d.FileMode, "uid": d.UID, "gid": d.GID,
        })).collect::<Vec<_>>(),
        "rootfsPropagation": if linux.RootfsPropagation.is_empty() { Value::Null } else { json!(linux.RootfsPropagation) },
        "maskedPaths": linux.MaskedPaths,
        "readonlyPaths": linux.ReadonlyPaths,
    });
    strip_nulls(&mut linux_json);
    let mut config = json!({
        "ociVersion": if spec.Version.is_empty() { "1.0.2" } else { spec.Version.as_str() },
        "process": process_json(process),
        "root": {"path": place.rootfs, "readonly": spec.Root.as_ref().is_some_and(|r| r.Readonly)},
        // An empty hostname would set one: none keeps the sandbox's.
        "hostname": (!spec.Hostname.is_empty()).then_some(spec.Hostname.as_str()),
        "mounts": mounts,
        "annotations": spec.Annotations,
        "linux": linux_json,
    });
    strip_nulls(&mut config);
    Ok((config, linux.Seccomp.into_option()))
}

/// Capabilities a process gets only to install its seccomp filter (without
/// `no_new_privileges` that takes CAP_SYS_ADMIN; dropping it again from the bounding set
/// takes CAP_SETPCAP), dropped right after, before `execve`. runc installs the filter before
/// it drops capabilities for the same reason.
pub(crate) const TRANSIENT_CAPS: &[&str] = &["CAP_SYS_ADMIN", "CAP_SETPCAP"];

/// Adds to the OCI `process` object what installing `filter` needs; answers the capabilities
/// to drop after.
pub(crate) fn grant_for_seccomp(process: &mut Value) -> Vec<String> {
    if process["noNewPrivileges"].as_bool() == Some(true) {
        return Vec::new();
    }
    let mut added = Vec::new();
    for cap in TRANSIENT_CAPS {
        let mut missing = false;
        for set in ["bounding", "effective", "permitted"] {
            let list = &mut process["capabilities"][set];
            if !list.is_array() {
                *list = json!([]);
            }
            let a = list.as_array_mut().expect("made an array");
            if !a.iter().any(|c| c == cap) {
                a.push(json!(cap));
                missing = true;
            }
        }
        if missing {
            added.push(cap.to_string());
        }
    }
    added
}

/// Runs the container's process: installs the seccomp filter, drops what was granted only
/// for that, then `execve`s as libcontainer's default executor does.
#[derive(Clone)]
pub(crate) struct SeccompExecutor {
    filter: Option<Filter>,
    transient: Vec<String>,
}

fn drop_caps(names: &[String]) -> Result<(), String> {
    use caps::{CapSet, Capability};
    let caps: Vec<Capability> = names
        .iter()
        .map(|n| n.parse::<Capability>().map_err(|e| format!("{n}: {e}")))
        .collect::<Result<_, _>>()?;
    // The bounding set first: that takes CAP_SETPCAP, which goes with the rest after.
    for c in &caps {
        caps::drop(None, CapSet::Bounding, *c).map_err(|e| format!("bounding {c}: {e}"))?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        for c in &caps {
            caps::drop(None, set, *c).map_err(|e| format!("{set:?} {c}: {e}"))?;
        }
    }
    Ok(())
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        if let Some(f) = &self.filter {
            f.install()
                .map_err(|e| ExecutorError::Other(format!("installing the seccomp filter: {e}")))?;
        }
        drop_caps(&self.transient).map_err(|e| {
            ExecutorError::Other(format!(
                "dropping the capabilities granted for seccomp: {e}"
            ))
        })?;
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(
        &self,
        spec: &libcontainer::oci_spec::runtime::Spec,
    ) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

/// The child's stdio: pipes, or a console socket that receives the terminal master.
pub(crate) enum ChildIo {
    /// stdin, stdout, stderr of the process.
    Pipes(super::process::ChildStdio),
    /// libcontainer's console socket path.
    Console(PathBuf),
}

fn lc_err(id: &str) -> impl Fn(libcontainer::error::LibcontainerError) -> Error + '_ {
    move |e| Error::Container {
        id: id.to_string(),
        detail: describe(&e),
    }
}

/// libcontainer's error with its sources (its top-level message alone is opaque).
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn builder(
    cid: &str,
    state: &Path,
    filter: Option<Filter>,
    transient: Vec<String>,
    io: ChildIo,
) -> Result<ContainerBuilder, Error> {
    let mut b = ContainerBuilder::new(cid.to_string(), SyscallType::Linux)
        .with_root_path(state)
        .map_err(lc_err(cid))?
        .with_executor(SeccompExecutor { filter, transient });
    match io {
        ChildIo::Pipes((i, o, e)) => {
            b = b.with_stdin(i).with_stdout(o).with_stderr(e);
        }
        ChildIo::Console(p) => b = b.with_console_socket(Some(p)),
    }
    Ok(b)
}

/// Creates the container from `bundle` (its init waits for [`start`]); answers it and its
/// init pid.
pub(crate) fn create(
    cid: &str,
    bundle: &Path,
    state: &Path,
    filter: Option<Filter>,
    transient: Vec<String>,
    io: ChildIo,
) -> Result<(Lc, i32), Error> {
    std::fs::create_dir_all(state).map_err(super::io(format!("creating {}", state.display())))?;
    let c = builder(cid, state, filter, transient, io)?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(lc_err(cid))?;
    let pid = c
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| Error::Container {
            id: cid.into(),
            detail: "created without a pid".into(),
        })?;
    Ok((c, pid))
}

/// Starts a created container.
pub(crate) fn start(c: &mut Lc) -> Result<(), Error> {
    let id = c.id().to_string();
    c.start().map_err(lc_err(&id))
}

/// Runs `process` (an OCI `process` object) in the running container `cid`; answers its pid.
pub(crate) fn exec(
    cid: &str,
    state: &Path,
    process_file: &Path,
    filter: Option<Filter>,
    transient: Vec<String>,
    io: ChildIo,
) -> Result<i32, Error> {
    let pid = builder(cid, state, filter, transient, io)?
        .as_tenant()
        .with_process(Some(process_file))
        .with_detach(true)
        .build()
        .map_err(lc_err(cid))?;
    Ok(pid.as_raw())
}

/// Deletes the container (its cgroup and state), killing what is left.
pub(crate) fn delete(c: &mut Lc) -> Result<(), Error> {
    let id = c.id().to_string();
    c.delete(true).map_err(lc_err(&id))
}

/// The cgroup directory of a container (under the cgroup2 mount).
pub(crate) fn cgroup_dir(config: &Value) -> PathBuf {
    let rel = config["linux"]["cgroupsPath"].as_str().unwrap_or("/");
    Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'))
}

/// A cgroup2 key-value file (`memory.events`, `memory.stat`, ...).
pub(crate) fn cgroup_kv(dir: &Path, file: &str) -> HashMap<String, u64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A cgroup2 single-value file; `max` is `u64::MAX`.
pub(crate) fn cgroup_value(dir: &Path, file: &str) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join(file)).ok()?;
    let s = s.trim();
    if s == "max" {
        Some(u64::MAX)
    } else {
        s.parse().ok()
    }
}

/// Receives the terminal master libcontainer's init sends on the console socket.
pub(crate) fn receive_console(
    listener: &std::os::unix::net::UnixListener,
) -> Result<OwnedFd, Error> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};
    listener
        .set_nonblocking(false)
        .map_err(super::io("console socket"))?;
    let (conn, _) = listener
        .accept()
        .map_err(super::io("console socket accept"))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(super::io("console socket"))?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(super::sys("receiving the terminal"))?;
    for c in msg.cmsgs().map_err(super::sys("receiving the terminal"))? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor for us (SCM_RIGHTS); nothing
            // else owns it.
            #[allow(unsafe_code)]
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    Err(Error::Io {
        what: "console socket".into(),
        source: std::io::Error::other("no terminal descriptor received"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::oci::{LinuxMemory, LinuxNamespace, LinuxResources, Process, Spec};

    #[test]
    fn a_process_without_path_gets_the_default_one_and_a_given_path_is_kept() {
        let mut p = Process::new();
        p.Args = vec!["/pause".into()];
        let env = process_json(&p)["env"].clone();
        assert_eq!(env, json!([DEFAULT_PATH]));
        p.Env = vec!["A=1".into(), "PATH=/bin".into()];
        assert_eq!(process_json(&p)["env"], json!(["A=1", "PATH=/bin"]));
    }

    #[test]
    fn zero_limits_are_unset_and_namespaces_are_the_sandboxs() {
        let mut spec = Spec::new();
        let mut p = Process::new();
        p.Args = vec!["sh".into()];
        p.Env = vec!["PATH=/bin".into()];
        spec.Process = Some(p).into();
        let linux = spec.Linux.mut_or_insert_default();
        for t in ["pid", "ipc", "uts", "mount", "network"] {
            linux.Namespaces.push(LinuxNamespace {
                Type: t.into(),
                Path: if t == "network" {
                    "/var/run/netns/cni-host-only".into()
                } else {
                    String::new()
                },
                ..Default::default()
            });
        }
        let mut r = LinuxResources::new();
        r.Memory = Some(LinuxMemory {
            Limit: 0,
            ..Default::default()
        })
        .into();
        linux.Resources = Some(r).into();
        linux.CgroupsPath = "kubepods-pod1.slice:cri-containerd:c1".into();
        let place = Placement {
            rootfs: "/r".into(),
            sandbox_ns: Some("/proc/42/ns".into()),
            sandbox_pidns: true,
        };
        let (c, seccomp) = config_json("c1", &spec, &place).unwrap();
        assert!(seccomp.is_none());
        assert_eq!(c["root"]["path"], "/r");
        assert_eq!(c["process"]["cwd"], "/");
        assert!(c["linux"]["resources"].get("memory").is_none(), "{c}");
        assert_eq!(c["linux"]["cgroupsPath"], "/sandboxd/c1");
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        let path = |t: &str| {
            ns.iter()
                .find(|n| n["type"] == t)
                .map(|n| n["path"].as_str().unwrap_or("").to_string())
        };
        assert_eq!(path("pid").as_deref(), Some("/proc/42/ns/pid"));
        assert_eq!(path("ipc").as_deref(), Some("/proc/42/ns/ipc"));
        assert_eq!(path("mount").as_deref(), Some(""));
        // The node's netns path does not exist in the VM: the VM's network.
        assert_eq!(path("network"), None);
        // libcontainer's own parser takes it.
        let _: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(c).unwrap();
    }
}
