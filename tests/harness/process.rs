//! Child processes of the test run that never outlive it.
//!
//! Every process is started from one supervisor thread that lives as long as the test
//! binary, through `setpriv --pdeathsig KILL`, so the kernel kills it when the test binary
//! dies for any reason (panic, SIGKILL, timeout). Each run records its children under
//! `$TMPDIR/sandboxd-test/run-<pid>`; a later run sweeps directories of dead runs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

type SpawnRequest = (Command, Sender<std::io::Result<Child>>);

static SUPERVISOR: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();
static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();

fn base_dir() -> PathBuf {
    std::env::temp_dir().join("sandboxd-test")
}

/// This run's scratch directory (created on first use, after sweeping dead runs).
pub fn run_dir() -> &'static Path {
    RUN_DIR.get_or_init(|| {
        sweep_dead_runs();
        let dir = base_dir().join(format!("run-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating the test run directory");
        dir
    })
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills what dead runs left behind and removes their directories.
fn sweep_dead_runs() {
    let Ok(entries) = fs::read_dir(base_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let dir = entry.path();
        if let Ok(pids) = fs::read_to_string(dir.join("pids")) {
            for child in pids.lines().filter_map(|l| l.split_whitespace().next()) {
                let Ok(child) = child.parse::<i32>() else {
                    continue;
                };
                // Only a process that still runs from that run's directory is ours.
                let cmdline = fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                    eprintln!("harness: killing process {child} left by dead test run {pid}");
                    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
                }
            }
        }
        // A node that could not stop by itself: its pods, cgroups and kernel settings.
        sandboxd::devenv::node::sweep(&dir.join("node"));
        let _ = fs::remove_dir_all(&dir);
    }
}

fn supervisor() -> &'static Mutex<Sender<SpawnRequest>> {
    SUPERVISOR.get_or_init(|| {
        let (tx, rx) = channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("process-supervisor".into())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread that is the
                // parent of every child, for PDEATHSIG) lasts as long as the process.
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the process supervisor");
        Mutex::new(tx)
    })
}

/// A running child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, logging stdout and stderr to `<run dir>/<name>.log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let log = run_dir().join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let (tx, rx) = channel();
        supervisor()
            .lock()
            .unwrap()
            .send((cmd, tx))
            .map_err(|_| anyhow!("process supervisor is gone"))?;
        let child = rx
            .recv()
            .map_err(|_| anyhow!("process supervisor is gone"))?
            .with_context(|| format!("starting {name} ({}) through setpriv", program.display()))?;
        let mut pids = OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir().join("pids"))?;
        writeln!(pids, "{} {name}", child.id())?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its output, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            return Err(anyhow!(
                "{} exited ({status}); last output:\n{}",
                self.name,
                self.log_tail(30)
            ));
        }
        Ok(())
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A free TCP port for a test process to listen on. Taken below the kernel's ephemeral
/// range (`ip_local_port_range`), so a listener another test binds to port 0, or an
/// outgoing connection, cannot take it between this check and the process's own bind.
/// Each test binary starts at its own offset (by pid) and never hands a port out twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPAN: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if ephemeral_low > SPAN + 1024 {
        let low = ephemeral_low - SPAN;
        let offset = std::process::id().wrapping_mul(7919) % SPAN;
        for _ in 0..SPAN {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (low + (offset + n) % SPAN) as u16;
            if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}
