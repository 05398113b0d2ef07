//! `sandboxd` as PID 1 of the pod VM (it runs these duties when it is PID 1 or started as
//! `/init`): mount `/proc`, `/sys`, `/dev`, `/run`, `/tmp` and the cgroup2 hierarchy, load
//! the kernel modules listed in the initramfs, bring up the primary NIC with DHCP, report
//! "Ready" to Azure's WireServer on Azure, fetch the forwarder config (NoCloud seed labelled
//! `cidata`, else IMDS `userData`), then run and supervise the forwarder and the agent
//! (`sandboxd agent`, or an upstream kata-agent when the image has one, its
//! confidential-data-hub first), reap orphans, log to the console, and power off cleanly on
//! SIGTERM, SIGUSR2, SIGINT (Ctrl-Alt-Del), SIGPWR or the ACPI power button.
//!
//! First of all it puts the root on a tmpfs mount of its own ([`switch_root`]): the
//! initramfs root (the kernel's rootfs) cannot be `pivot_root`ed away, and containers need a
//! real `pivot_root` (a chroot would be weaker). When the kernel unpacked the initramfs into
//! a tmpfs (no `root=` on its command line, the pod VM's case) that tmpfs is bind-mounted
//! onto `/` in place; a ramfs initramfs is copied into a new tmpfs and init starts again
//! from there.

pub(crate) mod dhcp;
pub(crate) mod seed;
pub(crate) mod wireserver;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Printed on the console once the forwarder accepts connections.
pub const READY_MARKER: &str = "pod VM ready: forwarder listening";
/// Printed on the console when init stops the services to power off (each gets SIGTERM and a
/// grace period; a clean stop is logged as `<service> stopped`).
pub const STOPPING_MARKER: &str = "powering off: SIGTERM to the services";
/// Where init leaves the fetched user data for the forwarder.
pub(crate) const USER_DATA: &str = "/run/peerpod/user-data";
/// kata-agent's configuration, written by init.
pub(crate) const AGENT_CONFIG: &str = "/run/peerpod/agent-config.toml";
/// kata-agent in the image.
pub(crate) const KATA_AGENT: &str = "/usr/bin/kata-agent";
/// kata-agent's command line when the image sets one (`image build --kata-agent-arg`): one
/// argument a line.
pub const KATA_AGENT_ARGS: &str = "/etc/sandboxd/kata-agent.args";

/// kata-agent's arguments: those of the image's [`KATA_AGENT_ARGS`] file (`file`) when there is
/// one, else `--config` [`AGENT_CONFIG`].
pub(crate) fn kata_agent_args(file: Option<&str>) -> Vec<String> {
    match file {
        Some(text) => text
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => vec!["--config".into(), AGENT_CONFIG.into()],
    }
}
/// confidential-data-hub in the image (with an upstream kata-agent; started before it).
pub(crate) const CDH: &str = "/usr/local/bin/confidential-data-hub";
/// Printed on the console once the root is a tmpfs mount of its own ([`switch_root`]).
pub const ROOT_SWITCHED_MARKER: &str = "root on a tmpfs mount of its own";
/// Set in init's environment once the root is a tmpfs copy ([`switch_root`]).
pub(crate) const SWITCHED_ROOT_ENV: &str = "SANDBOXD_ROOT_SWITCHED";
/// Printed on the console once the agent accepts connections on its socket.
pub const AGENT_READY_MARKER: &str = "agent ready on /run/kata-containers/agent.sock";
/// Printed on the console as the first thing `/init` does.
pub const INIT_ENTERED_MARKER: &str = "/init entered";

/// Azure's chassis asset tag (DMI), how a VM knows it runs on Azure.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

/// Whether this process is to run the init duties: started as `/init`, or PID 1 with no
/// command line (how a kernel starts init). Every container of a sandboxd pod is PID 1 of its
/// own PID namespace too, started with a subcommand (`/sandboxd operator ...`): that is not
/// init.
pub fn should_run() -> bool {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    is_init(std::process::id(), &args)
}

fn is_init(pid: u32, args: &[std::ffi::OsString]) -> bool {
    args.first().is_some_and(|a| a == "/init") || (pid == 1 && args.len() <= 1)
}

/// Seconds since boot (the kernel's own clock: no `/proc` needed, so the first lines of
/// `/init` carry it too).
fn uptime() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Logs one line on the console (stderr of PID 1 is `/dev/console`).
pub(crate) fn log(msg: &str) {
    eprintln!("[{:>9.3}] sandboxd-init: {msg}", uptime());
}

fn mount_all() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 8] = [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nodev,
            Some("nsdelegate"),
        ),
    ];
    for (src, target, fs, flags, data) in table {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fs), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => log(&format!("mounting {fs} on {target}: {e}")),
        }
    }
    for d in [
        "/run/peerpod",
        "/run/kata-containers",
        "/run/netns",
        "/media/cidata",
    ] {
        let _ = std::fs::create_dir_all(d);
    }
}

fn load_modules() {
    let list = match std::fs::read_to_string(format!("/{}", crate::image::build::MODULES_LIST)) {
        Ok(l) => l,
        Err(_) => return,
    };
    let start = Instant::now();
    let (mut loaded, mut absent) = (0, Vec::new());
    let mut failed = std::collections::BTreeSet::new();
    for line in list.lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else {
            continue;
        };
        // A module whose dependency did not load (no Hyper-V on KVM) is left out.
        if let Some(d) = words.find(|d| failed.contains(*d)) {
            failed.insert(name.to_string());
            absent.push(format!("{name} (needs {d})"));
            continue;
        }
        let path = format!("/{}/{name}.ko", crate::image::build::MODULES_DIR);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                failed.insert(name.to_string());
                log(&format!("module {name}: {e}"));
                continue;
            }
        };
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => loaded += 1,
            // Hyper-V drivers on KVM and the like: no such hardware.
            Err(nix::errno::Errno::ENODEV) => {
                failed.insert(name.to_string());
                absent.push(name.to_string());
            }
            Err(e) => {
                failed.insert(name.to_string());
                log(&format!("loading module {name}: {e}"));
            }
        }
    }
    log(&format!(
        "loaded {loaded} kernel modules in {} ms{}",
        start.elapsed().as_millis(),
        if absent.is_empty() {
            String::new()
        } else {
            format!(" (no device for {})", absent.join(", "))
        }
    ));
}

/// The primary NIC: the first physical (device-backed) interface, waiting up to `wait`.
fn primary_nic(wait: Duration) -> Option<(String, [u8; 6])> {
    let deadline = Instant::now() + wait;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| Path::new(&format!("/sys/class/net/{n}/device")).exists())
            .collect();
        names.sort();
        // On Azure the accelerated-networking VF is a slave of the synthetic NIC: skip it.
        names.retain(|n| !Path::new(&format!("/sys/class/net/{n}/master")).exists());
        if let Some(n) = names.into_iter().next() {
            let mac = std::fs::read_to_string(format!("/sys/class/net/{n}/address"))
                .ok()
                .and_then(|m| crate::cloud::net::parse_mac(m.trim()));
            if let Some(mac) = mac {
                return Some((n, mac));
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn network() -> Result<(), String> {
    let (name, mac) =
        primary_nic(Duration::from_secs(20)).ok_or("no network interface appeared")?;
    let nl = crate::cloud::net::Netlink::here().map_err(|e| e.to_string())?;
    if let Some(lo) = nl.index_of("lo").await.map_err(|e| e.to_string())? {
        nl.up(lo).await.map_err(|e| e.to_string())?;
    }
    let idx = nl
        .index_of(&name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{name} vanished"))?;
    nl.up(idx).await.map_err(|e| e.to_string())?;
    let start = Instant::now();
    let lease = dhcp::acquire(&name, mac, Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())?;
    nl.add_addr(idx, lease.address, lease.prefix)
        .await
        .map_err(|e| e.to_string())?;
    // RFC 3442: with classless routes the router option is ignored.
    if lease.routes.is_empty() {
        if let Some(gw) = lease.router {
            nl.add_route(std::net::Ipv4Addr::UNSPECIFIED, 0, Some(gw), idx)
                .await
                .map_err(|e| e.to_string())?;
        }
    } else {
        for (dst, len, gw) in &lease.routes {
            let gw = (!gw.is_unspecified()).then_some(*gw);
            nl.add_route(*dst, *len, gw, idx)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let mut resolv = String::new();
    if let Some(d) = &lease.domain {
        resolv.push_str(&format!("search {d}\n"));
    }
    for s in &lease.dns {
        resolv.push_str(&format!("nameserver {s}\n"));
    }
    let _ = std::fs::write("/etc/resolv.conf", resolv);
    log(&format!(
        "{name}: {}/{} via {} (DHCP server {}, lease {}s) in {} ms",
        lease.address,
        lease.prefix,
        lease
            .router
            .map(|r| r.to_string())
            .unwrap_or_else(|| "no router".into()),
        lease.server,
        lease.lease_seconds,
        start.elapsed().as_millis()
    ));
    Ok(())
}

fn on_azure() -> bool {
    std::fs::read_to_string("/sys/class/dmi/id/chassis_asset_tag")
        .is_ok_and(|t| t.trim() == AZURE_ASSET_TAG)
}

/// Fetches the user data: NoCloud seed first, IMDS on Azure (or when no seed shows up).
async fn fetch_config(azure: bool) -> Option<String> {
    // Block devices probe asynchronously after their modules load.
    let wait = if azure { 1 } else { 10 };
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        if let Some(dev) = seed::find_and_mount() {
            let p = Path::new(seed::MOUNT_POINT).join("user-data");
            match std::fs::read_to_string(&p) {
                Ok(t) => {
                    log(&format!("config from the NoCloud seed on {dev}"));
                    return Some(t);
                }
                Err(e) => log(&format!("{}: {e}", p.display())),
            }
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let url = url::Url::parse(
        "http://169.254.169.254/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
    )
    .expect("static URL");
    let wait = if azure { 300 } else { 30 };
    match super::imds_user_data(&url, Duration::from_secs(wait)).await {
        Ok(t) => {
            log("config from IMDS userData");
            Some(t)
        }
        Err(e) => {
            log(&format!("no config: no NoCloud seed and {e}"));
            None
        }
    }
}

async fn provision() -> bool {
    if let Err(e) = network().await {
        log(&format!("network: {e}"));
    }
    let azure = on_azure();
    if azure {
        match wireserver::report_ready(wireserver::WIRESERVER, Duration::from_secs(300)).await {
            Ok(g) => log(&format!(
                "reported Ready to WireServer (incarnation {})",
                g.incarnation
            )),
            Err(e) => log(&format!("WireServer Ready report failed: {e}")),
        }
    }
    let Some(text) = fetch_config(azure).await else {
        return false;
    };
    match super::Config::from_user_data(&text) {
        Ok(c) => log(&format!(
            "forwarder config for pod {}/{}",
            c.pod_namespace, c.pod_name
        )),
        Err(e) => log(&format!("the config is invalid: {e}")),
    }
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(USER_DATA)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    if let Err(e) = written {
        log(&format!("writing {USER_DATA}: {e}"));
        return false;
    }
    // Registry credentials for the agent, when CAA sent the pod's pull secrets.
    match super::config::extra_files(&text) {
        Ok(files) => {
            for (path, data) in files {
                let w = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &data));
                match w {
                    Ok(()) => log(&format!("wrote {path} from the user data")),
                    Err(e) => log(&format!("writing {path}: {e}")),
                }
            }
        }
        Err(e) => log(&format!("user data files: {e}")),
    }
    true
}

/// A supervised child.
struct Service {
    name: &'static str,
    program: PathBuf,
    arg0: &'static str,
    args: Vec<String>,
    pid: Option<Pid>,
    restarts: u32,
    next_start: Option<Instant>,
}

/// Starts `program` with a clean signal state: nothing blocked, every disposition the default.
///
/// Init blocks the signals it takes with `sigwait`, and a blocked mask (like an ignored
/// disposition) survives `exec`: `std::process::Command` keeps both, so a child started with
/// it would never see SIGTERM and could not be stopped. `posix_spawn` resets them in the child.
pub(crate) fn spawn_clean(
    program: &Path,
    arg0: &str,
    args: &[String],
    stdout: Option<&Path>,
) -> Result<Pid, String> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
    use std::ffi::CString;
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"));
    let mut argv = vec![cstr(arg0)?];
    for a in args {
        argv.push(cstr(a)?);
    }
    let mut envp = Vec::new();
    for (k, v) in std::env::vars() {
        if k != "PATH" {
            envp.push(cstr(&format!("{k}={v}"))?);
        }
    }
    envp.push(cstr("PATH=/usr/bin:/bin:/usr/sbin:/sbin")?);
    // The console is the serial port, a terminal whose log boot diagnostics keep as text:
    // no colour codes in it (each byte also costs the VM an emulated port write).
    if std::env::var_os("NO_COLOR").is_none() {
        envp.push(cstr("NO_COLOR=1")?);
    }
    let e = |what: &str, err: nix::Error| format!("{what}: {err}");
    let mut attr = PosixSpawnAttr::init().map_err(|x| e("spawn attributes", x))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(|x| e("spawn flags", x))?;
    attr.set_sigmask(&SigSet::empty())
        .map_err(|x| e("signal mask", x))?;
    attr.set_sigdefault(&SigSet::all())
        .map_err(|x| e("signal defaults", x))?;
    let mut actions = PosixSpawnFileActions::init().map_err(|x| e("spawn file actions", x))?;
    if let Some(out) = stdout {
        use nix::fcntl::OFlag;
        actions
            .add_open(
                1,
                out,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .map_err(|x| e("redirecting stdout", x))?;
    }
    nix::spawn::posix_spawn(program, &actions, &attr, &argv, &envp).map_err(|x| x.to_string())
}

impl Service {
    fn start(&mut self) {
        self.next_start = None;
        match spawn_clean(&self.program, self.arg0, &self.args, None) {
            Ok(pid) => {
                log(&format!("started {} (pid {pid})", self.name));
                self.pid = Some(pid);
            }
            Err(e) => {
                log(&format!("starting {}: {e}", self.name));
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        self.pid = None;
        let delay = Duration::from_secs(1 << self.restarts.min(5));
        self.restarts += 1;
        log(&format!("restarting {} in {}s", self.name, delay.as_secs()));
        self.next_start = Some(Instant::now() + delay);
    }
}

fn arm_alarm(services: &[Service]) {
    let next = services.iter().filter_map(|s| s.next_start).min();
    if let Some(t) = next {
        let secs = t
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
            .ceil()
            .max(1.0);
        nix::unistd::alarm::set(secs as u32);
    }
}

/// Reaps every exited child (orphans included); services that ended get a restart.
fn reap(services: &mut [Service]) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                let (pid, how) = match st {
                    WaitStatus::Exited(pid, code) => (pid, format!("exit code {code}")),
                    WaitStatus::Signaled(pid, sig, _) => (pid, format!("signal {sig}")),
                    _ => unreachable!(),
                };
                if let Some(s) = services.iter_mut().find(|s| s.pid == Some(pid)) {
                    log(&format!("{} (pid {pid}) ended with {how}", s.name));
                    s.schedule_restart();
                }
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn power_button_watcher() {
    std::thread::spawn(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let dev = loop {
            let found = std::fs::read_dir("/sys/class/input")
                .into_iter()
                .flatten()
                .flatten()
                .find_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let name = std::fs::read_to_string(e.path().join("device/name")).ok()?;
                    (n.starts_with("event") && name.contains("Power Button"))
                        .then(|| format!("/dev/input/{n}"))
                });
            if let Some(d) = found {
                break d;
            }
            if Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let Ok(mut f) = std::fs::File::open(&dev) else {
            return;
        };
        // struct input_event on 64-bit: timeval (16), type u16, code u16, value i32.
        let mut ev = [0u8; 24];
        while f.read_exact(&mut ev).is_ok() {
            let kind = u16::from_le_bytes([ev[16], ev[17]]);
            let code = u16::from_le_bytes([ev[18], ev[19]]);
            let value = i32::from_le_bytes(ev[20..24].try_into().unwrap());
            if kind == 1 && code == 116 && value == 1 {
                log("power button pressed");
                let _ = kill(Pid::this(), Signal::SIGUSR2);
                return;
            }
        }
    });
}

fn agent_probe() {
    std::thread::spawn(|| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(600) {
            if std::os::unix::net::UnixStream::connect("/run/kata-containers/agent.sock").is_ok() {
                log(&format!("{AGENT_READY_MARKER} (uptime {:.3}s)", uptime()));
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

fn ready_probe() {
    std::thread::spawn(|| {
        let start = Instant::now();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], crate::api::names::FORWARDER_PORT));
        while start.elapsed() < Duration::from_secs(600) {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                log(&format!(
                    "{READY_MARKER} on :{} (uptime {:.1}s)",
                    crate::api::names::FORWARDER_PORT,
                    uptime()
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// How long services get to stop after SIGTERM before everything is killed.
const GRACE: Duration = Duration::from_secs(10);

fn power_off(services: &mut [Service], signals: &SigSet) -> ! {
    log(&format!("{STOPPING_MARKER} (grace {}s)", GRACE.as_secs()));
    for s in services.iter_mut() {
        s.next_start = None;
        if let Some(pid) = s.pid {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + GRACE;
    while services.iter().any(|s| s.pid.is_some()) && Instant::now() < deadline {
        nix::unistd::alarm::set(1);
        let _ = signals.wait();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) => {
                    for s in services.iter_mut().filter(|s| s.pid == Some(pid)) {
                        log(&format!("{} stopped", s.name));
                        s.pid = None;
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    // Everything left (orphans included) gets SIGKILL.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    log("power off");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Copies the tree at `from` into `to` (directories, files, symlinks, device nodes), all but
/// `skip`; answers the bytes copied.
fn copy_tree(from: &Path, to: &Path, skip: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let mut bytes = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        if src == skip {
            continue;
        }
        let dst = to.join(e.file_name());
        let meta = std::fs::symlink_metadata(&src)?;
        let t = meta.file_type();
        if t.is_dir() {
            std::fs::create_dir_all(&dst)?;
            bytes += copy_tree(&src, &dst, skip)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if t.is_file() {
            bytes += std::fs::copy(&src, &dst)?;
        } else if t.is_char_device() || t.is_block_device() {
            let kind = if t.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else {
                nix::sys::stat::SFlag::S_IFBLK
            };
            nix::sys::stat::mknod(
                &dst,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(meta.mode()),
                meta.rdev(),
            )?;
            continue;
        } else {
            continue;
        }
        if !t.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
    }
    Ok(bytes)
}

/// How [`switch_root`] left the initramfs root.
pub(crate) enum NewRoot {
    /// The initramfs was unpacked into a tmpfs: that tmpfs, bind-mounted onto `/`, is the
    /// root; nothing was copied.
    InPlace,
    /// The initramfs was a ramfs: its files (this many bytes) were copied into a new tmpfs,
    /// the ramfs emptied; init must start again from the copy.
    Copied(u64),
}

/// Puts the root on a tmpfs mount of its own (what `switch_root` is for): the kernel's
/// rootfs has no parent mount, so nothing can `pivot_root` away from it, while a mount on
/// top of it can be. The kernel unpacks the initramfs into a tmpfs when its command line
/// names no `root=`: then that tmpfs is bind-mounted onto `/` as it is (the files stay where
/// the kernel put them, no byte copied). A ramfs initramfs is copied into a new tmpfs
/// instead, and its memory freed.
pub(crate) fn switch_root() -> Result<NewRoot, String> {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    let new = Path::new("/sandboxd-root");
    std::fs::create_dir_all(new).map_err(|e| format!("creating {}: {e}", new.display()))?;
    let in_place = statfs("/").is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC);
    let copied = if in_place {
        mount(Some("/"), new, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| format!("bind-mounting / on {}: {e}", new.display()))?;
        None
    } else {
        mount(
            Some("sandboxd-root"),
            new,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )
        .map_err(|e| format!("mounting a tmpfs on {}: {e}", new.display()))?;
        let bytes = copy_tree(Path::new("/"), new, new)
            .map_err(|e| format!("copying the initramfs: {e}"))?;
        // The initramfs' files are memory: free them (everything but the new root).
        for e in std::fs::read_dir("/").map_err(|e| e.to_string())?.flatten() {
            let p = e.path();
            if p != new {
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        Some(bytes)
    };
    std::env::set_current_dir(new).map_err(|e| format!("chdir: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving the new root onto /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(match copied {
        // The bind's mount point, seen from the new root: an empty directory, no longer a
        // mount point once the mount moved.
        None => {
            let _ = std::fs::remove_dir(new);
            NewRoot::InPlace
        }
        Some(bytes) => NewRoot::Copied(bytes),
    })
}

/// Starts `/init` again from the new root (its code then comes from the tmpfs, and the
/// initramfs copy of the binary is freed); returns only on failure.
fn reexec() -> String {
    use std::ffi::CString;
    let env: Vec<CString> = std::env::vars()
        .chain([(SWITCHED_ROOT_ENV.to_string(), "1".to_string())])
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    match nix::unistd::execve(c"/init", &[c"/init"], &env) {
        Ok(never) => match never {},
        Err(e) => format!("re-executing /init: {e}"),
    }
}

/// Runs the init duties; returns only if they cannot start.
pub fn main() -> ExitCode {
    if std::process::id() == 1 && std::env::var_os(SWITCHED_ROOT_ENV).is_none() {
        log(INIT_ENTERED_MARKER);
        let start = Instant::now();
        match switch_root() {
            Ok(NewRoot::InPlace) => log(&format!(
                "{ROOT_SWITCHED_MARKER}: the initramfs' tmpfs bind-mounted onto / in {} ms",
                start.elapsed().as_millis()
            )),
            Ok(NewRoot::Copied(bytes)) => {
                log(&format!(
                    "{ROOT_SWITCHED_MARKER}: the initramfs copied into a tmpfs ({:.1} MiB in {} ms)",
                    bytes as f64 / 1048576.0,
                    start.elapsed().as_millis()
                ));
                log(&reexec());
            }
            Err(e) => log(&format!(
                "staying on the initramfs root (containers cannot pivot_root): {e}"
            )),
        }
    }
    log(&format!("sandboxd {} starting as init", crate::VERSION));
    mount_all();
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGALRM,
        Signal::SIGTERM,
        Signal::SIGUSR2,
        Signal::SIGINT,
        Signal::SIGPWR,
    ] {
        signals.add(s);
    }
    // Blocked in every thread and taken with sigwait; children start with a clean mask
    // (`spawn_clean`).
    if let Err(e) = signals.thread_block() {
        log(&format!("blocking signals: {e}"));
        return ExitCode::FAILURE;
    }
    // Ctrl-Alt-Del sends SIGINT instead of rebooting at once.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let mut services = Vec::new();
    if Path::new(KATA_AGENT).exists() {
        let _ = std::fs::write(
            AGENT_CONFIG,
            format!(
                "server_addr = \"unix://{}\"\nguest_components_procs = \"none\"\n",
                crate::api::names::AGENT_SOCKET
            ),
        );
        // Upstream agents look confidential-data-hub up once at start: it goes first.
        if Path::new(CDH).exists() {
            services.push(Service {
                name: "confidential-data-hub",
                program: CDH.into(),
                arg0: "confidential-data-hub",
                args: Vec::new(),
                pid: None,
                restarts: 0,
                next_start: None,
            });
        }
        services.push(Service {
            name: "kata-agent",
            program: KATA_AGENT.into(),
            arg0: "kata-agent",
            args: {
                let file = std::fs::read_to_string(KATA_AGENT_ARGS).ok();
                let args = kata_agent_args(file.as_deref());
                log(&format!("kata-agent {}", args.join(" ")));
                args
            },
            pid: None,
            restarts: 0,
            next_start: None,
        });
    } else {
        services.push(Service {
            name: "sandboxd agent",
            program: "/proc/self/exe".into(),
            arg0: "sandboxd",
            args: vec!["agent".into()],
            pid: None,
            restarts: 0,
            next_start: None,
        });
    }
    // The agent needs neither modules nor network to start: it goes first, the modules
    // (its overlayfs among them) load while it starts, long before a container is asked for.
    for s in services.iter_mut() {
        s.start();
    }
    agent_probe();
    load_modules();
    power_button_watcher();
    let have_config = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(provision()),
        Err(e) => {
            log(&format!("async runtime: {e}"));
            false
        }
    };
    if have_config {
        services.push(Service {
            name: "forwarder",
            program: "/proc/self/exe".into(),
            arg0: "sandboxd",
            args: vec!["forwarder".into(), "--config".into(), USER_DATA.into()],
            pid: None,
            restarts: 0,
            next_start: None,
        });
        ready_probe();
    } else {
        log("no forwarder config: the forwarder does not start");
    }
    for s in services
        .iter_mut()
        .filter(|s| s.pid.is_none() && s.next_start.is_none())
    {
        s.start();
    }
    loop {
        let sig = match signals.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        match sig {
            Signal::SIGCHLD => reap(&mut services),
            Signal::SIGALRM => {
                let now = Instant::now();
                for s in services.iter_mut() {
                    if s.next_start.is_some_and(|t| t <= now) {
                        s.start();
                    }
                }
            }
            Signal::SIGTERM | Signal::SIGUSR2 | Signal::SIGINT | Signal::SIGPWR => {
                log(&format!("{sig} received"));
                power_off(&mut services, &signals)
            }
            _ => {}
        }
        arm_alarm(&services);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_running_a_subcommand_as_pid_1_is_not_init() {
        let a = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        // Every sandboxd container on a node: PID 1 of its PID namespace, with a subcommand.
        assert!(!is_init(1, &a(&["/sandboxd", "operator"])));
        assert!(!is_init(
            1,
            &a(&["/sandboxd", "caa", "--socket", "/run/peerpod/h.sock"])
        ));
        // A pod VM: the kernel starts /init (or the image's init) with no arguments.
        assert!(is_init(1, &a(&["/init"])));
        assert!(is_init(1, &a(&["/sandboxd"])));
        assert!(is_init(42, &a(&["/init"])));
        assert!(!is_init(42, &a(&["/sandboxd"])));
    }

    #[test]
    fn kata_agent_starts_with_the_config_file_unless_the_image_sets_its_arguments() {
        assert_eq!(kata_agent_args(None), ["--config", AGENT_CONFIG]);
        assert_eq!(
            kata_agent_args(Some("dev\nagent\n--socket\n/run/a.sock\n")),
            ["dev", "agent", "--socket", "/run/a.sock"]
        );
    }

    fn status_field(status: &str, field: &str) -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:\t")))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    #[test]
    fn services_start_with_no_signal_blocked_even_though_init_blocks_them() {
        // Block what init blocks, in a thread of its own (the mask is per thread).
        std::thread::spawn(|| {
            let mut blocked = SigSet::empty();
            blocked.add(Signal::SIGTERM);
            blocked.add(Signal::SIGCHLD);
            blocked.thread_block().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("status");
            let pid = spawn_clean(
                Path::new("/bin/cat"),
                "cat",
                &["/proc/self/status".into()],
                Some(&out),
            )
            .unwrap();
            assert!(matches!(
                waitpid(pid, None).unwrap(),
                WaitStatus::Exited(_, 0)
            ));
            let status = std::fs::read_to_string(&out).unwrap();
            assert_eq!(status_field(&status, "SigBlk"), 0, "{status}");
            // SIGTERM's disposition is the default: neither ignored nor caught.
            assert_eq!(status_field(&status, "SigIgn") & (1 << 14), 0, "{status}");
            let e = spawn_clean(Path::new("/nonexistent/agent"), "agent", &[], None);
            assert!(e.is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn services_write_no_colour_codes_to_the_serial_console() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let pid = spawn_clean(
            Path::new("/bin/sh"),
            "sh",
            &["-c".into(), "echo \"NO_COLOR=$NO_COLOR PATH=$PATH\"".into()],
            Some(&out),
        )
        .unwrap();
        assert!(matches!(
            waitpid(pid, None).unwrap(),
            WaitStatus::Exited(_, 0)
        ));
        // NO_COLOR as init got it from the kernel command line, else set.
        let want = std::env::var("NO_COLOR").unwrap_or_else(|_| "1".into());
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            format!("NO_COLOR={want} PATH=/usr/bin:/bin:/usr/sbin:/sbin\n")
        );
    }
}
