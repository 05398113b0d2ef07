//! The agent on this host, in a throwaway mount, pid, uts, ipc and network namespace with
//! the host's cgroup2 hierarchy mounted at `/sys/fs/cgroup` (the host is cgroup v1: that
//! hierarchy has no controllers, so resource limits and the OOM case run only in the VM).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::sequence::{self, Rootfs, Setup};
use crate::harness::Case;
use crate::harness::process::{Process, free_port};

/// Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The host's cgroup2 hierarchy: `/sys/fs/cgroup` itself or its `unified` mount.
fn cgroup2() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, mounts, cgroups)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!(
            "{BUSYBOX} missing (Debian busybox-static; scripts/bootstrap.sh installs it)"
        ));
    }
    if !which("unshare") {
        return Some("unshare missing (util-linux)".into());
    }
    if cgroup2().is_none() {
        return Some("no cgroup2 hierarchy mounted".into());
    }
    None
}

pub fn cases() -> Vec<Case> {
    vec![
        Case::plain(
            "agent::on_the_host_runs_pause_and_busybox_containers_with_stdio_exec_seccomp_kill_and_leaves_nothing",
            |_| run(),
        )
        .skip_if(skip_reason()),
        Case::plain(
            "agent::on_the_host_pulls_from_a_registry_with_and_without_auth_and_names_each_pull_failure",
            |_| pulls(),
        )
        .skip_if(skip_reason().or_else(super::registry::skip_reason)),
    ]
}

/// The busybox applets the tests' containers use.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "mkdir", "ps", "grep", "hostname", "true", "tty", "ls", "nc",
    "stty",
];

/// A busybox root file system: the static binary and its applet links.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    Ok(())
}

/// The sandboxd the agent runs from: the static build when there is one that has the agent
/// (its pause runs in an empty rootfs), else this build's; and whether it is static.
pub fn agent_binary() -> (PathBuf, bool) {
    let marker = sandboxd::forwarder::init::AGENT_READY_MARKER;
    if let Some(p) = crate::image::static_binary()
        && std::fs::read(&p).is_ok_and(|b| b.windows(marker.len()).any(|w| w == marker.as_bytes()))
    {
        return (p, true);
    }
    (PathBuf::from(env!("CARGO_BIN_EXE_sandboxd")), false)
}

/// Children of `pid` (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out
}

/// The agent in its namespaces.
pub struct HostAgent {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub process: Process,
    pub cgroup_prefix: String,
    cgroup_root: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostAgent {
    pub async fn start(name: &str, extra: &[String]) -> Result<Self> {
        Self::start_in(name, extra, None).await
    }

    /// The agent in the mount and network namespaces of process `inside.0` (a local pod VM's
    /// forwarder) serving its `/run/kata-containers/agent.sock`, seen here at `inside.1`; or,
    /// without `inside`, in a network namespace of its own with a socket in a scratch
    /// directory. Either way in mount, pid, uts and ipc namespaces of its own.
    pub async fn start_in(
        name: &str,
        extra: &[String],
        inside: Option<(i32, PathBuf)>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("agent");
        let (socket, socket_here) = match &inside {
            Some((_, here)) => (PathBuf::from(sandboxd::agent::SOCKET), here.clone()),
            None => (dir.path().join("agent.sock"), dir.path().join("agent.sock")),
        };
        let cg = cgroup2().context("no cgroup2")?;
        let (bin, _) = agent_binary();
        let mut agent = format!(
            "{} --log-level debug agent --root {} --socket {}",
            bin.display(),
            root.display(),
            socket.display()
        );
        for e in extra {
            agent.push(' ');
            agent.push_str(e);
        }
        let mount_cg = if cg == Path::new("/sys/fs/cgroup") {
            String::new()
        } else {
            format!("mount --bind {} /sys/fs/cgroup; ", cg.display())
        };
        // sh stays PID 1 of the namespace (the agent must not run the pod VM init duties)
        // and hands SIGTERM on to the agent.
        // A pod VM whose process runs chrooted (the local provider inside the CAA container)
        // has its private /run under that root: the agent's /run is that one too.
        let vm_run = match &inside {
            Some((pid, _)) => {
                let root = std::fs::read_link(format!("/proc/{pid}/root"))
                    .with_context(|| format!("the root of process {pid}"))?;
                if root == Path::new("/") {
                    String::new()
                } else {
                    format!("mount --rbind {}/run /run; ", root.display())
                }
            }
            None => String::new(),
        };
        let script = format!(
            "set -e; mount --make-rprivate /; {vm_run}{mount_cg}ip link set lo up 2>/dev/null || true; \
             trap 'kill -TERM $p; wait $p' TERM; {agent} & p=$!; wait $p"
        );
        let mut args: Vec<String> = Vec::new();
        let program = match &inside {
            Some((pid, _)) => {
                args.extend([
                    "--target".into(),
                    pid.to_string(),
                    "--mount".into(),
                    "--net".into(),
                    "--".into(),
                    "unshare".into(),
                ]);
                "nsenter"
            }
            None => {
                args.push("--net".into());
                "unshare"
            }
        };
        args.extend(
            [
                "--mount",
                "--pid",
                "--uts",
                "--ipc",
                "--mount-proc",
                "--fork",
                "--kill-child=SIGTERM",
                "--",
                "sh",
                "-c",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.push(script);
        let process = Process::start(name, Path::new(program), &args, &[])?;
        let mut a = Self {
            root,
            socket: socket_here,
            process,
            cgroup_prefix: format!("sandboxd-test-{:08x}", fastrand::u32(..)),
            cgroup_root: cg,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::UnixStream::connect(&a.socket).await.is_err() {
            a.process.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent did not listen in 20s:\n{}",
                    a.process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(a)
    }

    /// The agent's pid (in this pid namespace): the child of the namespace's sh.
    pub fn agent_pid(&self) -> Option<u32> {
        let sh = children(self.process.pid()).into_iter().next()?;
        children(sh).into_iter().next()
    }

    /// What the agent left behind: its child processes, mounts under its root, cgroups.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(pid) = self.agent_pid() {
            for c in children(pid) {
                let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                left.push(format!("process {c} ({})", comm.trim()));
            }
            let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap_or_default();
            for l in mounts.lines() {
                if let Some(p) = l.split_whitespace().nth(1)
                    && p.starts_with(&self.root.display().to_string())
                {
                    left.push(format!("mount {p}"));
                }
            }
        } else {
            left.push("the agent is gone".into());
        }
        let cg = self.cgroup_root.join(&self.cgroup_prefix);
        for e in std::fs::read_dir(&cg).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                left.push(format!("cgroup {}", e.path().display()));
            }
        }
        left
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(10));
        let cg = self.cgroup_root.join(&self.cgroup_prefix);
        for e in std::fs::read_dir(&cg).into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
        let _ = std::fs::remove_dir(&cg);
    }
}

async fn run() -> Result<()> {
    let a = HostAgent::start("agent-host", &[]).await?;
    let rootfs = a.root.join("busybox-rootfs");
    busybox_rootfs(&rootfs)?;
    let setup = Setup {
        base: a.root.join("kata").display().to_string(),
        rootfs: Rootfs::Path(rootfs.display().to_string()),
        cgroup_prefix: a.cgroup_prefix.clone(),
        oom: false,
        pause: agent_binary().1,
    };
    let socket = a.socket.clone();
    let r = sequence::run(&setup, || {
        let s = socket.clone();
        async move { Ok(tokio::net::UnixStream::connect(&s).await?) }
    })
    .await;
    if let Err(e) = r {
        bail!("{e:#}\nagent log:\n{}", a.process.log_tail(60));
    }
    let left = a.leftovers();
    ensure!(
        left.is_empty(),
        "left behind after DestroySandbox: {left:?}"
    );
    Ok(())
}

async fn create_with_image(
    w: &mut super::client::Wire<tokio::net::UnixStream>,
    base: &str,
    cid: &str,
    image: &str,
    args: &[&str],
) -> Result<Result<(), super::client::Status>> {
    use protobuf::Message;
    let setup = Setup {
        base: base.into(),
        rootfs: Rootfs::Image(image.into()),
        cgroup_prefix: "x".into(),
        oom: false,
        pause: false,
    };
    let spec = sequence::spec(&setup, cid, args, false);
    let req = sequence::create_request(&setup, cid, spec, false);
    Ok(w.raw(
        "/grpc.AgentService/CreateContainer",
        req.write_to_bytes()?,
        Duration::from_secs(120),
    )
    .await?
    .map(drop))
}

async fn pulls() -> Result<()> {
    use protobuf::well_known_types::empty::Empty;
    use sandboxd::protocol::agent::*;
    let (pa, pb) = (free_port(), free_port());
    let dir = tempfile::tempdir()?;
    let auth_file = dir.path().join("auth.json");
    let a = HostAgent::start(
        "agent-host-pull",
        &[
            format!("--insecure-registry 127.0.0.1:{pa} --insecure-registry 127.0.0.1:{pb}"),
            format!("--auth-file {}", auth_file.display()),
        ],
    )
    .await?;
    let netns = PathBuf::from(format!(
        "/proc/{}/ns/net",
        a.agent_pid().context("no agent pid")?
    ));
    let open = super::registry::Registry::start("registry-open", Some(&netns), None, pa)?;
    let closed = super::registry::Registry::start(
        "registry-auth",
        Some(&netns),
        Some(("puller", "s3cret")),
        pb,
    )?;
    let (busybox, _) = open.push_busybox(Some(&netns), "busybox", "1", "open")?;
    let (private, _) = closed.push_busybox(Some(&netns), "private/busybox", "1", "closed")?;
    let (corrupt, layer) = open.push_busybox(Some(&netns), "corrupt", "1", "corrupt")?;
    open.corrupt_blob(&layer)?;

    // The whole sequence with the image pulled in the agent.
    let base = a.root.join("kata").display().to_string();
    let setup = Setup {
        base: base.clone(),
        rootfs: Rootfs::Image(busybox.clone()),
        cgroup_prefix: a.cgroup_prefix.clone(),
        oom: false,
        pause: agent_binary().1,
    };
    let socket = a.socket.clone();
    let connect = || {
        let s = socket.clone();
        async move { Ok(tokio::net::UnixStream::connect(&s).await?) }
    };
    if let Err(e) = sequence::run(&setup, connect).await {
        bail!("{e:#}\nagent log:\n{}", a.process.log_tail(60));
    }

    // Each failure is the container's clear error.
    let mut w = super::client::Wire::new(connect().await?);
    let _: Empty = w
        .ok(
            "/grpc.AgentService/CreateSandbox",
            &CreateSandboxRequest {
                sandbox_id: "sb2".into(),
                ..Default::default()
            },
        )
        .await?;
    let cases = [
        (
            format!("127.0.0.1:{pa}/busybox:no-such-tag"),
            "no such image or tag",
        ),
        ("Not A Reference//".to_string(), "invalid image reference"),
        (private.clone(), "refused the credentials"),
        (corrupt.clone(), "digest mismatch"),
    ];
    for (i, (image, want)) in cases.iter().enumerate() {
        match create_with_image(&mut w, &base, &format!("bad{i}"), image, &["true"]).await? {
            Ok(()) => bail!("{image}: created, expected an error containing {want:?}"),
            Err(s) => ensure!(
                s.message.contains(want) && s.message.contains(image.as_str()),
                "{image}: {:?} {:?}, expected {want:?}",
                s.code,
                s.message
            ),
        }
    }
    // With the pull secret in the VM, the private image is pulled.
    std::fs::write(&auth_file, serde_json::json!({"auths": {format!("127.0.0.1:{pb}"): {"auth": base64_encode("puller:s3cret")}}}).to_string())?;
    if let Err(s) =
        create_with_image(&mut w, &base, "private", &private, &["cat", "/etc/marker"]).await?
    {
        bail!(
            "pulling {private} with credentials: {s:?}\nagent log:\n{}",
            a.process.log_tail(40)
        );
    }
    let marker = super::sequence::start_and_read_first(&mut w, "private", 100).await?;
    ensure!(
        marker == b"closed",
        "the private image's marker: {:?}",
        String::from_utf8_lossy(&marker)
    );
    // A tag pushed again is pulled again (the agent asks the registry for the tag's digest
    // each time); the same tag unchanged runs what was pulled, and asking costs one request
    // to a registry that needs no credentials (no `/v2/` probe before it).
    let (moving, _) = open.push_busybox(Some(&netns), "moving", "1", "first")?;
    for (cid, push, want) in [
        ("moving1", None, &b"first"[..]),
        ("moving2", Some("second"), &b"second"[..]),
        ("moving3", None, &b"second"[..]),
    ] {
        if let Some(m) = push {
            open.push_busybox(Some(&netns), "moving", "1", m)?;
        }
        let before = open.requests().len();
        if let Err(s) =
            create_with_image(&mut w, &base, cid, &moving, &["cat", "/etc/marker"]).await?
        {
            bail!("{cid}: {s:?}\nagent log:\n{}", a.process.log_tail(40));
        }
        let got = super::sequence::start_and_read_first(&mut w, cid, 100).await?;
        ensure!(
            got == want,
            "{cid} of {moving}: marker {:?}, expected {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        );
        if cid == "moving3" {
            let asked = open.requests().split_off(before);
            ensure!(
                asked == ["HEAD /v2/moving/manifests/1"],
                "checking the unchanged tag {moving} took these registry requests: {asked:?}"
            );
        }
    }
    let _: Empty = w
        .ok(
            "/grpc.AgentService/DestroySandbox",
            &DestroySandboxRequest::new(),
        )
        .await?;
    let left = a.leftovers();
    ensure!(
        left.is_empty(),
        "left behind after DestroySandbox: {left:?}"
    );
    Ok(())
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
