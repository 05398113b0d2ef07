//! The peer-pod sequence the kata shim drives, as one function over any connection to an
//! agent: create the sandbox and its pause container, run a container whose output is read
//! back and whose stdin is written, exec into a second one with stdin, see a seccomp denial,
//! kill it, read exit codes, see an OOM kill reported (where the VM has the memory
//! controller), remove, destroy.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use protobuf::MessageField;
use protobuf::well_known_types::empty::Empty;
use sandboxd::protocol::agent::*;
use sandboxd::protocol::oci;
use tokio::io::{AsyncRead, AsyncWrite};

use super::client::Wire;

/// Where a container's root comes from.
#[derive(Clone, Debug)]
pub enum Rootfs {
    /// A directory already in the agent's file system (kata without guest pull).
    Path(String),
    /// An image reference pulled by the agent (`image_guest_pull`).
    Image(String),
}

/// What differs between the places the sequence runs.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The agent's container base directory (kata's `/run/kata-containers`).
    pub base: String,
    /// The rootfs of the app containers.
    pub rootfs: Rootfs,
    /// Cgroups path prefix of the containers (`/<prefix>/<cid>`).
    pub cgroup_prefix: String,
    /// The VM has the memory controller: an OOM kill is provoked and must be reported.
    pub oom: bool,
    /// Run the pause container (the agent binary is static, so it runs in an empty rootfs).
    pub pause: bool,
}

/// containerd's default capability set.
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn mount(dest: &str, kind: &str, source: &str, opts: &[&str]) -> oci::Mount {
    oci::Mount {
        destination: dest.into(),
        type_: kind.into(),
        source: source.into(),
        options: opts.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A spec as containerd's CRI plugin writes it for a busybox container.
pub fn spec(setup: &Setup, cid: &str, args: &[&str], sandbox: bool) -> oci::Spec {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|s| s.to_string()).collect();
    p.Env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    p.Cwd = "/".into();
    p.User = MessageField::some(oci::User::new());
    let caps: Vec<String> = CAPS.iter().map(|s| s.to_string()).collect();
    p.Capabilities = MessageField::some(oci::LinuxCapabilities {
        Bounding: caps.clone(),
        Effective: caps.clone(),
        Permitted: caps,
        ..Default::default()
    });
    p.Rlimits = vec![oci::POSIXRlimit {
        Type: "RLIMIT_NOFILE".into(),
        Hard: 1024,
        Soft: 1024,
        ..Default::default()
    }];
    let mut s = oci::Spec::new();
    s.Version = "1.1.0".into();
    s.Process = MessageField::some(p);
    s.Root = MessageField::some(oci::Root {
        Path: match &setup.rootfs {
            Rootfs::Path(p) if !sandbox => p.clone(),
            _ => format!("{}/{cid}/rootfs", setup.base),
        },
        Readonly: sandbox,
        ..Default::default()
    });
    s.Mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ];
    let kind = if sandbox { "sandbox" } else { "container" };
    s.Annotations = HashMap::from([
        (
            "io.kubernetes.cri.container-type".to_string(),
            kind.to_string(),
        ),
        (
            "io.kubernetes.cri.sandbox-id".to_string(),
            "sb-seq".to_string(),
        ),
    ]);
    let linux = s.Linux.mut_or_insert_default();
    linux.CgroupsPath = format!("/{}/{cid}", setup.cgroup_prefix);
    for t in ["pid", "ipc", "uts", "mount", "network"] {
        linux.Namespaces.push(oci::LinuxNamespace {
            Type: t.into(),
            ..Default::default()
        });
    }
    linux.MaskedPaths = vec![
        "/proc/kcore".into(),
        "/proc/keys".into(),
        "/sys/firmware".into(),
    ];
    linux.ReadonlyPaths = vec!["/proc/sys".into(), "/proc/sysrq-trigger".into()];
    s
}

/// A seccomp profile that allows everything but `mkdir`/`mkdirat` (EACCES).
pub fn deny_mkdir() -> oci::LinuxSeccomp {
    let mut rule = oci::LinuxSyscall::new();
    rule.Names = vec!["mkdir".into(), "mkdirat".into()];
    rule.Action = "SCMP_ACT_ERRNO".into();
    rule.set_errnoret(13);
    oci::LinuxSeccomp {
        DefaultAction: "SCMP_ACT_ALLOW".into(),
        Architectures: vec!["SCMP_ARCH_X86_64".into()],
        Syscalls: vec![rule],
        ..Default::default()
    }
}

pub fn create_request(
    setup: &Setup,
    cid: &str,
    mut spec: oci::Spec,
    sandbox: bool,
) -> CreateContainerRequest {
    let mut r = CreateContainerRequest::new();
    r.container_id = cid.into();
    r.exec_id = cid.into();
    r.sandbox_pidns = !sandbox;
    let image = match (&setup.rootfs, sandbox) {
        (_, true) => Some("registry.k8s.io/pause:3.10".to_string()),
        (Rootfs::Image(i), false) => Some(i.clone()),
        (Rootfs::Path(_), false) => None,
    };
    if let Some(image) = image {
        let kind = if sandbox { "sandbox" } else { "container" };
        let meta = serde_json::json!({"metadata": {"io.kubernetes.cri.container-type": kind}});
        r.storages.push(Storage {
            driver: "image_guest_pull".into(),
            driver_options: vec![format!("image_guest_pull={meta}")],
            source: image,
            fstype: "overlay".into(),
            mount_point: format!("{}/{cid}/rootfs", setup.base),
            ..Default::default()
        });
        spec.Root.mut_or_insert_default().Path = format!("{}/{cid}/rootfs", setup.base);
    }
    r.OCI = MessageField::some(spec);
    r
}

const A: &str = "/grpc.AgentService";

async fn read_all<S: AsyncRead + AsyncWrite + Unpin>(
    w: &mut Wire<S>,
    method: &str,
    cid: &str,
    eid: &str,
) -> Result<String> {
    let mut out = Vec::new();
    loop {
        let r: ReadStreamResponse = w
            .ok(
                &format!("{A}/{method}"),
                &ReadStreamRequest {
                    container_id: cid.into(),
                    exec_id: eid.into(),
                    len: 32768,
                    ..Default::default()
                },
            )
            .await?;
        if r.data.is_empty() {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend(r.data);
    }
}

/// Starts container `cid` and reads its first stdout (at most `len` bytes): what the
/// private-image cases check for their marker.
pub async fn start_and_read_first<S: AsyncRead + AsyncWrite + Unpin>(
    w: &mut Wire<S>,
    cid: &str,
    len: u32,
) -> Result<Vec<u8>> {
    let _: Empty = w
        .ok(
            &format!("{A}/StartContainer"),
            &StartContainerRequest {
                container_id: cid.into(),
                ..Default::default()
            },
        )
        .await?;
    let r: ReadStreamResponse = w
        .ok(
            &format!("{A}/ReadStdout"),
            &ReadStreamRequest {
                container_id: cid.into(),
                len,
                ..Default::default()
            },
        )
        .await?;
    Ok(r.data)
}

/// Runs the sequence; `connect` opens a new connection to the agent (one per concurrent
/// long poll, as the shim holds them).
pub async fn run<S, F, Fut>(setup: &Setup, connect: F) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S>>,
{
    let mut w = Wire::new(connect().await?);
    let health: sandboxd::protocol::health::HealthCheckResponse = w
        .ok(
            "/grpc.Health/Check",
            &sandboxd::protocol::health::CheckRequest::new(),
        )
        .await?;
    ensure!(
        health.status.value() == 1,
        "health status {:?}",
        health.status
    );
    let shm = Storage {
        driver: "ephemeral".into(),
        source: "shm".into(),
        fstype: "tmpfs".into(),
        options: vec![
            "noexec".into(),
            "nosuid".into(),
            "nodev".into(),
            "mode=1777".into(),
            "size=67108864".into(),
        ],
        mount_point: format!("{}/sandbox/shm", setup.base),
        ..Default::default()
    };
    let _: Empty = w
        .ok(
            &format!("{A}/CreateSandbox"),
            &CreateSandboxRequest {
                hostname: "seq-pod".into(),
                sandbox_id: "sb-seq".into(),
                storages: vec![shm],
                sandbox_pidns: false,
                ..Default::default()
            },
        )
        .await?;
    let _: GuestDetailsResponse = w
        .ok(
            &format!("{A}/GetGuestDetails"),
            &GuestDetailsRequest {
                mem_block_size: true,
                mem_hotplug_probe: true,
                ..Default::default()
            },
        )
        .await?;

    // The OOM long poll, on its own connection, as the shim holds it.
    let oom_conn = connect().await?;
    let oom = tokio::spawn(async move {
        let mut w = Wire::new(oom_conn);
        w.ok_within::<OOMEvent>(
            &format!("{A}/GetOOMEvent"),
            &GetOOMEventRequest::new(),
            Duration::from_secs(3600),
        )
        .await
    });

    // The pause container, from the pause built into sandboxd.
    if setup.pause {
        let t = std::time::Instant::now();
        let _: Empty = w
            .ok(
                &format!("{A}/CreateContainer"),
                &create_request(
                    setup,
                    "pause",
                    spec(setup, "pause", &["/pause"], true),
                    true,
                ),
            )
            .await?;
        let _: Empty = w
            .ok(
                &format!("{A}/StartContainer"),
                &StartContainerRequest {
                    container_id: "pause".into(),
                    ..Default::default()
                },
            )
            .await?;
        eprintln!(
            "agent sequence: pause container running in {:.2}s",
            t.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "agent sequence: no pause container (the agent binary is not static; the static build runs it)"
        );
    }

    // c1: output on both streams, then a line from stdin, exit code 3.
    let t = std::time::Instant::now();
    let c1 = spec(
        setup,
        "c1",
        &[
            "sh",
            "-c",
            "echo hello-out; echo hello-err >&2; hostname; read line; echo got:$line; exit 3",
        ],
        false,
    );
    let _: Empty = w
        .ok(
            &format!("{A}/CreateContainer"),
            &create_request(setup, "c1", c1, false),
        )
        .await?;
    let _: Empty = w
        .ok(
            &format!("{A}/StartContainer"),
            &StartContainerRequest {
                container_id: "c1".into(),
                ..Default::default()
            },
        )
        .await?;
    eprintln!(
        "agent sequence: first app container running in {:.2}s ({:?})",
        t.elapsed().as_secs_f64(),
        setup.rootfs
    );
    let wr: WriteStreamResponse = w
        .ok(
            &format!("{A}/WriteStdin"),
            &WriteStreamRequest {
                container_id: "c1".into(),
                exec_id: "c1".into(),
                data: b"ping\n".to_vec(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(wr.len == 5, "WriteStdin wrote {}", wr.len);
    let _: Empty = w
        .ok(
            &format!("{A}/CloseStdin"),
            &CloseStdinRequest {
                container_id: "c1".into(),
                exec_id: "c1".into(),
                ..Default::default()
            },
        )
        .await?;
    let out = read_all(&mut w, "ReadStdout", "c1", "c1").await?;
    ensure!(
        out == "hello-out\nseq-pod\ngot:ping\n",
        "c1 stdout: {out:?}"
    );
    let err = read_all(&mut w, "ReadStderr", "c1", "c1").await?;
    ensure!(err == "hello-err\n", "c1 stderr: {err:?}");
    let st: WaitProcessResponse = w
        .ok(
            &format!("{A}/WaitProcess"),
            &WaitProcessRequest {
                container_id: "c1".into(),
                exec_id: "c1".into(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(st.status == 3, "c1 exit status {}", st.status);

    // c2: a long-running container with a seccomp profile; exec into it.
    let mut c2 = spec(setup, "c2", &["sleep", "1000"], false);
    c2.Linux.mut_or_insert_default().Seccomp = MessageField::some(deny_mkdir());
    let _: Empty = w
        .ok(
            &format!("{A}/CreateContainer"),
            &create_request(setup, "c2", c2, false),
        )
        .await?;
    let _: Empty = w
        .ok(
            &format!("{A}/StartContainer"),
            &StartContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await?;
    let mut p = oci::Process::new();
    p.Args = vec![
        "sh".into(),
        "-c".into(),
        "cat; echo done; ps -o pid,comm | grep -c sleep".into(),
    ];
    p.Env = vec!["PATH=/bin".into()];
    p.Cwd = "/".into();
    let _: Empty = w
        .ok(
            &format!("{A}/ExecProcess"),
            &ExecProcessRequest {
                container_id: "c2".into(),
                exec_id: "e1".into(),
                process: MessageField::some(p),
                ..Default::default()
            },
        )
        .await?;
    let _: WriteStreamResponse = w
        .ok(
            &format!("{A}/WriteStdin"),
            &WriteStreamRequest {
                container_id: "c2".into(),
                exec_id: "e1".into(),
                data: b"abc\n".to_vec(),
                ..Default::default()
            },
        )
        .await?;
    let _: Empty = w
        .ok(
            &format!("{A}/CloseStdin"),
            &CloseStdinRequest {
                container_id: "c2".into(),
                exec_id: "e1".into(),
                ..Default::default()
            },
        )
        .await?;
    let out = read_all(&mut w, "ReadStdout", "c2", "e1").await?;
    ensure!(out == "abc\ndone\n1\n", "exec stdout: {out:?}");
    let st: WaitProcessResponse = w
        .ok(
            &format!("{A}/WaitProcess"),
            &WaitProcessRequest {
                container_id: "c2".into(),
                exec_id: "e1".into(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(st.status == 0, "exec exit status {}", st.status);
    // The profile denies mkdir in the container: the syscall fails with its errno.
    let mut p = oci::Process::new();
    p.Args = vec!["mkdir".into(), "/tmp/denied".into()];
    p.Env = vec!["PATH=/bin".into()];
    p.Cwd = "/".into();
    let _: Empty = w
        .ok(
            &format!("{A}/ExecProcess"),
            &ExecProcessRequest {
                container_id: "c2".into(),
                exec_id: "e2".into(),
                process: MessageField::some(p),
                ..Default::default()
            },
        )
        .await?;
    let err = read_all(&mut w, "ReadStderr", "c2", "e2").await?;
    let st: WaitProcessResponse = w
        .ok(
            &format!("{A}/WaitProcess"),
            &WaitProcessRequest {
                container_id: "c2".into(),
                exec_id: "e2".into(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(
        st.status != 0 && err.contains("Permission denied"),
        "mkdir under the seccomp profile: status {} stderr {err:?}",
        st.status
    );
    // A terminal, as `kubectl exec -it` gets it: resized, typed into, read back.
    let mut p = oci::Process::new();
    p.Terminal = true;
    p.Args = vec![
        "sh".into(),
        "-c".into(),
        "read line; echo size:$(stty size) line:$line; tty".into(),
    ];
    p.Env = vec!["PATH=/bin".into(), "TERM=xterm".into()];
    p.Cwd = "/".into();
    let _: Empty = w
        .ok(
            &format!("{A}/ExecProcess"),
            &ExecProcessRequest {
                container_id: "c2".into(),
                exec_id: "e3".into(),
                process: MessageField::some(p),
                ..Default::default()
            },
        )
        .await?;
    let _: Empty = w
        .ok(
            &format!("{A}/TtyWinResize"),
            &TtyWinResizeRequest {
                container_id: "c2".into(),
                exec_id: "e3".into(),
                row: 33,
                column: 77,
                ..Default::default()
            },
        )
        .await?;
    let _: WriteStreamResponse = w
        .ok(
            &format!("{A}/WriteStdin"),
            &WriteStreamRequest {
                container_id: "c2".into(),
                exec_id: "e3".into(),
                data: b"typed\n".to_vec(),
                ..Default::default()
            },
        )
        .await?;
    let out = read_all(&mut w, "ReadStdout", "c2", "e3").await?;
    ensure!(
        out.contains("size:33 77 line:typed") && out.contains("/dev/pts/"),
        "terminal exec output: {out:?}"
    );
    let st: WaitProcessResponse = w
        .ok(
            &format!("{A}/WaitProcess"),
            &WaitProcessRequest {
                container_id: "c2".into(),
                exec_id: "e3".into(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(st.status == 0, "terminal exec exit status {}", st.status);
    let stats: StatsContainerResponse = w
        .ok(
            &format!("{A}/StatsContainer"),
            &StatsContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(
        stats.cgroup_stats.pids_stats.current >= 1 || !setup.oom,
        "c2 pids: {:?}",
        stats.cgroup_stats.pids_stats
    );
    // Kill: SIGTERM to an init that ignores it becomes SIGKILL.
    let _: Empty = w
        .ok(
            &format!("{A}/SignalProcess"),
            &SignalProcessRequest {
                container_id: "c2".into(),
                exec_id: String::new(),
                signal: 15,
                ..Default::default()
            },
        )
        .await?;
    let st: WaitProcessResponse = w
        .ok(
            &format!("{A}/WaitProcess"),
            &WaitProcessRequest {
                container_id: "c2".into(),
                exec_id: String::new(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(st.status == 137, "c2 killed: exit status {}", st.status);

    if setup.oom {
        let mut c3 = spec(
            setup,
            "c3",
            &["sh", "-c", "x=a; while true; do x=$x$x; done"],
            false,
        );
        c3.Linux.mut_or_insert_default().Resources = MessageField::some(oci::LinuxResources {
            Memory: MessageField::some(oci::LinuxMemory {
                Limit: 16 << 20,
                Swap: 16 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let _: Empty = w
            .ok(
                &format!("{A}/CreateContainer"),
                &create_request(setup, "c3", c3, false),
            )
            .await?;
        let _: Empty = w
            .ok(
                &format!("{A}/StartContainer"),
                &StartContainerRequest {
                    container_id: "c3".into(),
                    ..Default::default()
                },
            )
            .await?;
        let st: WaitProcessResponse = w
            .ok_within(
                &format!("{A}/WaitProcess"),
                &WaitProcessRequest {
                    container_id: "c3".into(),
                    exec_id: "c3".into(),
                    ..Default::default()
                },
                Duration::from_secs(120),
            )
            .await?;
        ensure!(
            st.status == 137,
            "the OOM-killed container's exit status {}",
            st.status
        );
        let ev = tokio::time::timeout(Duration::from_secs(10), oom)
            .await
            .context("no OOM event within 10s of the exit")???;
        ensure!(ev.container_id == "c3", "OOM event for {}", ev.container_id);
        let _: Empty = w
            .ok(
                &format!("{A}/RemoveContainer"),
                &RemoveContainerRequest {
                    container_id: "c3".into(),
                    ..Default::default()
                },
            )
            .await?;
    } else {
        eprintln!(
            "agent sequence: OOM case skipped here (no memory controller in this cgroup2 hierarchy; it runs in the pod VM)"
        );
        oom.abort();
    }

    for c in ["c1", "c2"]
        .into_iter()
        .chain(setup.pause.then_some("pause"))
    {
        let _: Empty = w
            .ok(
                &format!("{A}/RemoveContainer"),
                &RemoveContainerRequest {
                    container_id: c.into(),
                    timeout: 10,
                    ..Default::default()
                },
            )
            .await?;
    }
    let s = w
        .err(
            &format!("{A}/ReadStdout"),
            &ReadStreamRequest {
                container_id: "c1".into(),
                len: 10,
                ..Default::default()
            },
        )
        .await?;
    ensure!(
        s.code == ttrpc::Code::NOT_FOUND,
        "a removed container: {s:?}"
    );
    let _: Empty = w
        .ok(
            &format!("{A}/RemoveStaleVirtiofsShareMounts"),
            &RemoveStaleVirtiofsShareMountsRequest::new(),
        )
        .await?;
    let _: Empty = w
        .ok(
            &format!("{A}/DestroySandbox"),
            &DestroySandboxRequest::new(),
        )
        .await?;
    // Nothing left: no container, no mount under the container base, no child process.
    let m: Metrics = w
        .ok(&format!("{A}/GetMetrics"), &GetMetricsRequest::new())
        .await?;
    for gauge in [
        "sandboxd_agent_containers 0",
        "sandboxd_agent_mounts 0",
        "sandboxd_agent_child_processes 0",
    ] {
        ensure!(
            m.metrics.lines().any(|l| l == gauge),
            "after DestroySandbox, expected {gauge:?}:\n{}",
            m.metrics
        );
    }
    Ok(())
}
