//! containerd's OCI runtime spec (the bundle's `config.json`, an exec's process, an update's
//! resources: JSON) as the agent protocol's protobuf `Spec`, and the changes kata's shim
//! makes before sending it to a pod VM ([`constrain`]).

use std::collections::HashMap;

use protobuf::MessageField;
use serde_json::Value;

use crate::protocol::oci;

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn u32_(v: &Value) -> u32 {
    v.as_u64().unwrap_or(0) as u32
}

fn u64_(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn i64_(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_u64().map(|u| u as i64))
        .unwrap_or(0)
}

fn map(v: &Value) -> HashMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| x.as_str().map(|x| (k.clone(), x.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn each<T>(v: &Value, f: impl Fn(&Value) -> T) -> Vec<T> {
    v.as_array()
        .map(|a| a.iter().map(f).collect())
        .unwrap_or_default()
}

fn some<T: Default>(v: &Value, f: impl FnOnce(&Value) -> T) -> MessageField<T> {
    if v.is_null() {
        MessageField::none()
    } else {
        MessageField::some(f(v))
    }
}

/// A runtime-spec `process`.
pub(crate) fn process(p: &Value) -> oci::Process {
    oci::Process {
        Terminal: p["terminal"].as_bool().unwrap_or(false),
        ConsoleSize: some(&p["consoleSize"], |b| oci::Box {
            Height: u32_(&b["height"]),
            Width: u32_(&b["width"]),
            ..Default::default()
        }),
        User: MessageField::some(oci::User {
            UID: u32_(&p["user"]["uid"]),
            GID: u32_(&p["user"]["gid"]),
            AdditionalGids: each(&p["user"]["additionalGids"], u32_),
            Username: s(&p["user"]["username"]),
            ..Default::default()
        }),
        Args: strings(&p["args"]),
        Env: strings(&p["env"]),
        Cwd: s(&p["cwd"]),
        Capabilities: some(&p["capabilities"], |c| oci::LinuxCapabilities {
            Bounding: strings(&c["bounding"]),
            Effective: strings(&c["effective"]),
            Inheritable: strings(&c["inheritable"]),
            Permitted: strings(&c["permitted"]),
            Ambient: strings(&c["ambient"]),
            ..Default::default()
        }),
        Rlimits: each(&p["rlimits"], |r| oci::POSIXRlimit {
            Type: s(&r["type"]),
            Hard: u64_(&r["hard"]),
            Soft: u64_(&r["soft"]),
            ..Default::default()
        }),
        NoNewPrivileges: p["noNewPrivileges"].as_bool().unwrap_or(false),
        ApparmorProfile: s(&p["apparmorProfile"]),
        OOMScoreAdj: i64_(&p["oomScoreAdj"]),
        SelinuxLabel: s(&p["selinuxLabel"]),
        ..Default::default()
    }
}

/// A runtime-spec `linux.resources`.
pub(crate) fn resources(r: &Value) -> oci::LinuxResources {
    let throttle = |v: &Value| {
        each(v, |t| oci::LinuxThrottleDevice {
            Major: i64_(&t["major"]),
            Minor: i64_(&t["minor"]),
            Rate: u64_(&t["rate"]),
            ..Default::default()
        })
    };
    oci::LinuxResources {
        Devices: each(&r["devices"], |d| oci::LinuxDeviceCgroup {
            Allow: d["allow"].as_bool().unwrap_or(false),
            Type: s(&d["type"]),
            Major: d["major"].as_i64().unwrap_or(-1),
            Minor: d["minor"].as_i64().unwrap_or(-1),
            Access: s(&d["access"]),
            ..Default::default()
        }),
        Memory: some(&r["memory"], |m| oci::LinuxMemory {
            Limit: i64_(&m["limit"]),
            Reservation: i64_(&m["reservation"]),
            Swap: i64_(&m["swap"]),
            Kernel: i64_(&m["kernel"]),
            KernelTCP: i64_(&m["kernelTCP"]),
            Swappiness: u64_(&m["swappiness"]),
            DisableOOMKiller: m["disableOOMKiller"].as_bool().unwrap_or(false),
            ..Default::default()
        }),
        CPU: some(&r["cpu"], |c| oci::LinuxCPU {
            Shares: u64_(&c["shares"]),
            Quota: i64_(&c["quota"]),
            Period: u64_(&c["period"]),
            RealtimeRuntime: i64_(&c["realtimeRuntime"]),
            RealtimePeriod: u64_(&c["realtimePeriod"]),
            Cpus: s(&c["cpus"]),
            Mems: s(&c["mems"]),
            ..Default::default()
        }),
        Pids: some(&r["pids"], |p| oci::LinuxPids {
            Limit: i64_(&p["limit"]),
            ..Default::default()
        }),
        BlockIO: some(&r["blockIO"], |b| oci::LinuxBlockIO {
            Weight: u32_(&b["weight"]),
            LeafWeight: u32_(&b["leafWeight"]),
            WeightDevice: each(&b["weightDevice"], |w| oci::LinuxWeightDevice {
                Major: i64_(&w["major"]),
                Minor: i64_(&w["minor"]),
                Weight: u32_(&w["weight"]),
                LeafWeight: u32_(&w["leafWeight"]),
                ..Default::default()
            }),
            ThrottleReadBpsDevice: throttle(&b["throttleReadBpsDevice"]),
            ThrottleWriteBpsDevice: throttle(&b["throttleWriteBpsDevice"]),
            ThrottleReadIOPSDevice: throttle(&b["throttleReadIOPSDevice"]),
            ThrottleWriteIOPSDevice: throttle(&b["throttleWriteIOPSDevice"]),
            ..Default::default()
        }),
        HugepageLimits: each(&r["hugepageLimits"], |h| oci::LinuxHugepageLimit {
            Pagesize: s(&h["pageSize"]),
            Limit: u64_(&h["limit"]),
            ..Default::default()
        }),
        Network: some(&r["network"], |n| oci::LinuxNetwork {
            ClassID: u32_(&n["classID"]),
            Priorities: each(&n["priorities"], |p| oci::LinuxInterfacePriority {
                Name: s(&p["name"]),
                Priority: u32_(&p["priority"]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn linux(l: &Value) -> oci::Linux {
    let idmap = |v: &Value| {
        each(v, |m| oci::LinuxIDMapping {
            HostID: u32_(&m["hostID"]),
            ContainerID: u32_(&m["containerID"]),
            Size: u32_(&m["size"]),
            ..Default::default()
        })
    };
    oci::Linux {
        UIDMappings: idmap(&l["uidMappings"]),
        GIDMappings: idmap(&l["gidMappings"]),
        Sysctl: map(&l["sysctl"]),
        Resources: some(&l["resources"], resources),
        CgroupsPath: s(&l["cgroupsPath"]),
        Namespaces: each(&l["namespaces"], |n| oci::LinuxNamespace {
            Type: s(&n["type"]),
            Path: s(&n["path"]),
            ..Default::default()
        }),
        Devices: each(&l["devices"], |d| oci::LinuxDevice {
            Path: s(&d["path"]),
            Type: s(&d["type"]),
            Major: i64_(&d["major"]),
            Minor: i64_(&d["minor"]),
            FileMode: u32_(&d["fileMode"]),
            UID: u32_(&d["uid"]),
            GID: u32_(&d["gid"]),
            ..Default::default()
        }),
        Seccomp: some(&l["seccomp"], |sc| oci::LinuxSeccomp {
            DefaultAction: s(&sc["defaultAction"]),
            Architectures: strings(&sc["architectures"]),
            Flags: strings(&sc["flags"]),
            Syscalls: each(&sc["syscalls"], |c| oci::LinuxSyscall {
                Names: strings(&c["names"]),
                Action: s(&c["action"]),
                ErrnoRet: c["errnoRet"]
                    .as_u64()
                    .map(|e| oci::linux_syscall::ErrnoRet::Errnoret(e as u32)),
                Args: each(&c["args"], |a| oci::LinuxSeccompArg {
                    Index: u64_(&a["index"]),
                    Value: u64_(&a["value"]),
                    ValueTwo: u64_(&a["valueTwo"]),
                    Op: s(&a["op"]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        RootfsPropagation: s(&l["rootfsPropagation"]),
        MaskedPaths: strings(&l["maskedPaths"]),
        ReadonlyPaths: strings(&l["readonlyPaths"]),
        MountLabel: s(&l["mountLabel"]),
        IntelRdt: some(&l["intelRdt"], |r| oci::LinuxIntelRdt {
            L3CacheSchema: s(&r["l3CacheSchema"]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A whole runtime spec.
pub(crate) fn spec(v: &Value) -> oci::Spec {
    oci::Spec {
        Version: s(&v["ociVersion"]),
        Process: some(&v["process"], process),
        Root: some(&v["root"], |r| oci::Root {
            Path: s(&r["path"]),
            Readonly: r["readonly"].as_bool().unwrap_or(false),
            ..Default::default()
        }),
        Hostname: s(&v["hostname"]),
        Mounts: each(&v["mounts"], |m| oci::Mount {
            destination: s(&m["destination"]),
            source: s(&m["source"]),
            type_: s(&m["type"]),
            options: strings(&m["options"]),
            ..Default::default()
        }),
        Annotations: map(&v["annotations"]),
        Linux: some(&v["linux"], linux),
        ..Default::default()
    }
}

/// Whether the container joins its sandbox's PID namespace (the pod shares its process
/// namespace: CRI gives the pid namespace the pause's path). kata then removes the entry
/// and asks the agent for the sandbox's namespace.
pub(crate) fn shares_sandbox_pidns(s: &oci::Spec) -> bool {
    s.Linux.as_ref().is_some_and(|l| {
        l.Namespaces
            .iter()
            .any(|n| n.Type == "pid" && !n.Path.is_empty())
    })
}

/// What kata's shim changes in a spec before a pod VM sees it: no hooks (they ran on the
/// host), no seccomp when the configuration disables guest seccomp, only CPU and memory
/// resources (without cpuset), no network or cgroup namespace (the VM's own network is the
/// pod's; the agent makes the cgroup namespace), every other namespace without a path (no
/// host path means anything in the VM), and no host devices.
pub(crate) fn constrain(s: &mut oci::Spec, pass_seccomp: bool) {
    s.Hooks = MessageField::none();
    if let Some(l) = s.Linux.as_mut() {
        if !pass_seccomp {
            l.Seccomp = MessageField::none();
        }
        if let Some(r) = l.Resources.as_mut() {
            r.Devices.clear();
            r.Pids = MessageField::none();
            r.BlockIO = MessageField::none();
            r.HugepageLimits.clear();
            r.Network = MessageField::none();
            if let Some(c) = r.CPU.as_mut() {
                c.Cpus.clear();
                c.Mems.clear();
            }
        }
        l.Namespaces
            .retain(|n| n.Type != "network" && n.Type != "cgroup");
        for n in l.Namespaces.iter_mut() {
            n.Path.clear();
        }
        l.Devices.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec as containerd 2.x's CRI plugin writes it for an app container (abridged).
    fn cri_spec() -> Value {
        serde_json::json!({
            "ociVersion": "1.2.0",
            "process": {
                "user": {"uid": 0, "gid": 0, "additionalGids": [0, 10]},
                "args": ["sh", "-c", "echo hi"],
                "env": ["PATH=/bin", "HOSTNAME=web"],
                "cwd": "/",
                "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                                 "permitted": ["CAP_CHOWN"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576u64, "soft": 1048576u64}],
                "noNewPrivileges": true,
                "oomScoreAdj": 1000
            },
            "root": {"path": "rootfs"},
            "hostname": "web",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/var/lib/kubelet/pods/u/etc-hosts", "options": ["rbind", "rprivate", "rw"]}
            ],
            "annotations": {"io.kubernetes.cri.container-type": "container"},
            "linux": {
                "resources": {
                    "devices": [{"allow": false, "access": "rwm"}],
                    "memory": {"limit": 67108864},
                    "cpu": {"shares": 2, "quota": 10000, "period": 100000, "cpus": "0-1"},
                    "pids": {"limit": 100}
                },
                "cgroupsPath": "/kubepods/besteffort/podu/c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "cgroup"}
                ],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                                         {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]},
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/bus"],
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
            }
        })
    }

    #[test]
    fn a_cri_spec_converts_field_by_field() {
        let s = spec(&cri_spec());
        assert_eq!(s.Version, "1.2.0");
        let p = s.Process.as_ref().unwrap();
        assert_eq!(p.Args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.User.AdditionalGids, [0, 10]);
        assert_eq!(p.Rlimits[0].Hard, 1048576);
        assert!(p.NoNewPrivileges);
        assert_eq!(p.OOMScoreAdj, 1000);
        assert_eq!(p.Capabilities.Bounding, ["CAP_CHOWN"]);
        assert_eq!(s.Hostname, "web");
        assert_eq!(s.Mounts[1].type_, "bind");
        assert_eq!(s.Mounts[1].options, ["rbind", "rprivate", "rw"]);
        let l = s.Linux.as_ref().unwrap();
        assert_eq!(l.CgroupsPath, "/kubepods/besteffort/podu/c1");
        assert_eq!(l.Resources.Memory.Limit, 67108864);
        assert_eq!(l.Resources.CPU.Quota, 10000);
        assert_eq!(l.Resources.Devices[0].Major, -1);
        assert_eq!(l.Seccomp.Syscalls.len(), 2);
        assert_eq!(
            l.Seccomp.Syscalls[1].ErrnoRet,
            Some(oci::linux_syscall::ErrnoRet::Errnoret(1))
        );
        assert_eq!(l.MaskedPaths, ["/proc/kcore"]);
        assert_eq!(
            s.Annotations["io.kubernetes.cri.container-type"],
            "container"
        );
    }

    #[test]
    fn constrain_does_what_katas_shim_does_for_a_vm() {
        let mut s = spec(&cri_spec());
        assert!(!shares_sandbox_pidns(&s));
        constrain(&mut s, false);
        let l = s.Linux.as_ref().unwrap();
        assert!(l.Seccomp.is_none());
        let kinds: Vec<&str> = l.Namespaces.iter().map(|n| n.Type.as_str()).collect();
        assert_eq!(kinds, ["pid", "ipc", "uts", "mount"]);
        assert!(l.Namespaces.iter().all(|n| n.Path.is_empty()));
        assert!(l.Resources.Devices.is_empty() && l.Resources.Pids.is_none());
        assert_eq!(l.Resources.CPU.Cpus, "");
        assert_eq!(l.Resources.Memory.Limit, 67108864);
        assert!(l.Devices.is_empty());
        let mut keep = spec(&cri_spec());
        constrain(&mut keep, true);
        assert!(keep.Linux.Seccomp.is_some());
    }

    #[test]
    fn a_shared_process_namespace_is_the_pid_namespace_with_a_path() {
        let mut v = cri_spec();
        v["linux"]["namespaces"][0]["path"] = "/proc/42/ns/pid".into();
        assert!(shares_sandbox_pidns(&spec(&v)));
    }
}
