//! The shim's command line as containerd runs it (Go `flag` syntax: `-name value`,
//! `-name=value`, `--name value`, boolean `-debug`), and its three forms:
//!
//! - `start` (working directory = the container's bundle): find or start the pod's shim
//!   daemon and print its socket address. containerd calls it for the sandbox (pause)
//!   container; an app container whose `io.kubernetes.cri.sandbox-id` names a running shim
//!   gets that shim's address (containerd 2.x reuses the sandbox's shim by itself).
//! - `delete`: clean up after a shim that is gone (containerd calls it when the daemon died):
//!   prints a `DeleteResponse` (exit 137) and, for a sandbox, asks CAA to delete its VM so
//!   a crashed shim never leaks one.
//! - no action: the daemon serving the task API on its socket until containerd shuts it down.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use protobuf::Message;

use super::{Error, io};

/// containerd's state directory for shim sockets (the runc shim's too).
pub(crate) const SOCKET_DIR: &str = "/run/containerd/s";
/// The file in a sandbox's bundle that records the CAA socket the VM was created through
/// (read by `delete` when the daemon is gone).
pub(crate) const VM_RECORD: &str = "sandboxd-shim.json";
/// The annotation naming a container's kind (`sandbox` or `container`).
pub(crate) const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The annotation naming a container's pod sandbox.
pub(crate) const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// containerd's arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags {
    /// containerd namespace (`k8s.io` for CRI).
    pub(crate) namespace: String,
    /// containerd's gRPC socket (its ttrpc socket is this plus `.ttrpc`).
    pub(crate) address: String,
    /// The containerd binary (for `publish`; events go over ttrpc instead).
    pub(crate) publish_binary: String,
    /// The container id.
    pub(crate) id: String,
    /// The bundle (`delete` gets it as a flag; `start` runs in it).
    pub(crate) bundle: Option<PathBuf>,
    /// Debug logging.
    pub(crate) debug: bool,
    /// The socket the daemon serves (sandboxd's own flag between `start` and the daemon).
    pub(crate) socket: Option<PathBuf>,
    /// `start`, `delete`, or none (the daemon).
    pub(crate) action: Option<String>,
    /// `-v`: print the version.
    pub(crate) version: bool,
    /// `-info`: containerd's `RuntimeInfo` on stdout.
    pub(crate) info: bool,
}

impl Flags {
    /// Parses containerd's arguments.
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut f = Flags::default();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            if !a.starts_with('-') || a == "-" {
                if f.action.is_some() {
                    return Err(format!("unexpected argument {a:?}"));
                }
                f.action = Some(a.clone());
                continue;
            }
            let name = a.trim_start_matches('-');
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            let mut value = |flag: &str| -> Result<String, String> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("flag -{flag} needs a value")),
                }
            };
            match name {
                "namespace" => f.namespace = value(name)?,
                "address" => f.address = value(name)?,
                "publish-binary" => f.publish_binary = value(name)?,
                "id" => f.id = value(name)?,
                "bundle" => f.bundle = Some(PathBuf::from(value(name)?)),
                "socket" => f.socket = Some(PathBuf::from(value(name)?)),
                "debug" => f.debug = inline.as_deref().is_none_or(|v| v != "false"),
                "v" | "version" => f.version = true,
                "info" => f.info = true,
                other => return Err(format!("unknown flag -{other}")),
            }
        }
        if let Some(a) = &f.action
            && a != "start"
            && a != "delete"
        {
            return Err(format!("unknown action {a:?} (start or delete)"));
        }
        Ok(f)
    }

    /// The arguments that start the daemon for `socket` (the same flags, no action).
    pub(crate) fn daemon_args(&self, socket: &Path) -> Vec<String> {
        let mut v = vec![
            "-namespace".to_string(),
            self.namespace.clone(),
            "-address".into(),
            self.address.clone(),
            "-publish-binary".into(),
            self.publish_binary.clone(),
            "-id".into(),
            self.id.clone(),
            "-socket".into(),
            socket.display().to_string(),
        ];
        if self.debug {
            v.push("-debug".into());
        }
        v
    }
}

/// The socket of the shim serving `group` (the pod's sandbox id) in `namespace` of the
/// containerd at `address`: a digest of the three under [`SOCKET_DIR`], as containerd's own
/// shims name theirs (a unix socket path must stay short).
pub(crate) fn socket_path(address: &str, namespace: &str, group: &str) -> PathBuf {
    let joined = Path::new(address).join(namespace).join(group);
    let d = ring::digest::digest(&ring::digest::SHA256, joined.as_os_str().as_encoded_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(hex)
}

/// The pod a container belongs to: its sandbox id for an app container, its own id for
/// the sandbox container (and for anything without CRI annotations).
pub(crate) fn group_of(id: &str, spec: &serde_json::Value) -> String {
    let ann = &spec["annotations"];
    let kind = ann[CONTAINER_TYPE].as_str().unwrap_or("");
    match ann[SANDBOX_ID].as_str() {
        Some(s) if kind == "container" && !s.is_empty() => s.to_string(),
        _ => id.to_string(),
    }
}

/// Reads a bundle's `config.json`.
pub(crate) fn read_spec(bundle: &Path) -> Result<serde_json::Value, Error> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
}

/// Runs the form `flags` ask for.
pub(crate) fn run(flags: Flags) -> ExitCode {
    if flags.version {
        println!("{}: sandboxd {}", super::BINARY_NAME, crate::VERSION);
        return ExitCode::SUCCESS;
    }
    if flags.info {
        // containerd writes a `RuntimeRequest` on stdin; nothing in it changes the answer.
        drain_stdin();
        use std::io::Write;
        return match std::io::stdout().write_all(&runtime_info()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let result = match flags.action.as_deref() {
        Some("start") => start(&flags).map(|addr| {
            print!("{addr}");
        }),
        Some("delete") => delete(&flags).map(|resp| {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&resp);
        }),
        _ => daemon(flags),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime name `-info` reports (containerd's shims report `io.containerd.<name>.v2`).
pub(crate) const RUNTIME_NAME: &str = "io.containerd.sandboxd.v2";

/// `-info`'s answer: containerd's `RuntimeInfo` (`api/types/introspection.proto`: 1 `name`,
/// 2 `version` = `RuntimeVersion{1 version, 2 revision}`), encoded by hand: no options, no
/// OCI features (the VM's agent, not this shim, runs the containers), no annotations.
pub(crate) fn runtime_info() -> Vec<u8> {
    let mut version = Vec::new();
    let mut info = Vec::new();
    {
        let mut os = protobuf::CodedOutputStream::vec(&mut version);
        let _ = os.write_string(1, crate::VERSION);
        let _ = os.flush();
    }
    {
        let mut os = protobuf::CodedOutputStream::vec(&mut info);
        let _ = os.write_string(1, RUNTIME_NAME);
        let _ = os.write_bytes(2, &version);
        let _ = os.flush();
    }
    info
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))
}

fn connectable(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// `start`: the address of the pod's shim daemon, started if none runs.
pub(crate) fn start(flags: &Flags) -> Result<String, Error> {
    let bundle = std::env::current_dir().map_err(io("reading the working directory"))?;
    // containerd writes the runtime options on stdin; the daemon gets them again in Create.
    drain_stdin();
    let spec = read_spec(&bundle)?;
    let group = group_of(&flags.id, &spec);
    let socket = socket_path(&flags.address, &flags.namespace, &group);
    let address = format!("unix://{}", socket.display());
    if !connectable(&socket) {
        if group != flags.id {
            return Err(Error::FailedPrecondition(format!(
                "container {}: the shim of its sandbox {group} is not running",
                flags.id
            )));
        }
        spawn_daemon(flags, &bundle, &socket)?;
    }
    std::fs::write(bundle.join("address"), &address)
        .map_err(io("writing the bundle's address file"))?;
    Ok(address)
}

fn drain_stdin() {
    use std::io::Read;
    use std::os::fd::AsFd;
    // Only when stdin is a pipe or file (a terminal would block).
    let stdin = std::io::stdin();
    if nix::unistd::isatty(stdin.as_fd()).unwrap_or(false) {
        return;
    }
    let mut buf = Vec::new();
    let _ = stdin.lock().take(1 << 20).read_to_end(&mut buf);
}

fn spawn_daemon(flags: &Flags, bundle: &Path, socket: &Path) -> Result<(), Error> {
    let exe = std::env::current_exe().map_err(io("finding the shim binary"))?;
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let _ = std::fs::remove_file(socket);
    // containerd opened `log` (a FIFO) in the bundle for the shim's log lines.
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(bundle.join("log"))
        .ok();
    let stderr = match log {
        Some(f) => std::process::Stdio::from(f),
        None => std::process::Stdio::null(),
    };
    let mut cmd = std::process::Command::new(exe);
    // Started under the shim's name, whatever name started us.
    {
        use std::os::unix::process::CommandExt;
        cmd.arg0(super::BINARY_NAME);
        // Its own process group: a signal to containerd's group does not reach it.
        cmd.process_group(0);
    }
    cmd.args(flags.daemon_args(socket))
        .current_dir(bundle)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    let mut child = cmd.spawn().map_err(io("starting the shim daemon"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if connectable(socket) {
            std::fs::write(bundle.join("shim.pid"), child.id().to_string())
                .map_err(io("writing shim.pid"))?;
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::FailedPrecondition(format!(
                "the shim daemon exited at start ({status}); its log is containerd's"
            )));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(Error::FailedPrecondition(
                "the shim daemon did not listen within 20 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a sandbox's bundle records about its VM (for `delete` after a crash).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct VmRecord {
    /// CAA's hypervisor socket.
    pub(crate) hypervisor_socket: String,
}

/// `delete`: the response containerd expects from a shim that is gone, after deleting the
/// sandbox's VM through CAA (a VM must never outlive its shim's pod).
pub(crate) fn delete(flags: &Flags) -> Result<Vec<u8>, Error> {
    let bundle = match &flags.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(io("reading the working directory"))?,
    };
    drain_stdin();
    if let Ok(text) = std::fs::read(bundle.join(VM_RECORD))
        && let Ok(rec) = serde_json::from_slice::<VmRecord>(&text)
    {
        let id = flags.id.clone();
        let stopped = runtime().and_then(|rt| {
            rt.block_on(super::vm::stop_vm(
                Path::new(&rec.hypervisor_socket),
                &id,
                Duration::from_secs(60),
            ))
        });
        if let Err(e) = stopped {
            eprintln!("warning: deleting the VM of sandbox {id}: {e}");
        }
    }
    let socket = socket_path(&flags.address, &flags.namespace, &flags.id);
    let _ = std::fs::remove_file(socket);
    let mut r = containerd_shim_protos::api::DeleteResponse::new();
    r.exit_status = 128 + libc::SIGKILL as u32;
    r.exited_at = protobuf::MessageField::some(super::pod::now());
    r.write_to_bytes()
        .map_err(|e| Error::InvalidArgument(format!("encoding the delete response: {e}")))
}

/// The daemon: serves the task API on `-socket` until containerd shuts it down.
fn daemon(flags: Flags) -> Result<(), Error> {
    let level = if flags.debug { "debug" } else { "info" };
    let log = crate::telemetry::LogArgs {
        log_format: crate::telemetry::LogFormat::Text,
        log_level: Some(std::env::var("SANDBOXD_LOG_LEVEL").unwrap_or_else(|_| level.into())),
    };
    let _ = crate::telemetry::init_logging(&log);
    let socket = flags
        .socket
        .clone()
        .ok_or_else(|| Error::InvalidArgument("the daemon needs -socket".into()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    rt.block_on(super::task::serve(flags, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn containerds_start_command_line_parses_in_go_flag_syntax() {
        let f = Flags::parse(&s(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ]))
        .unwrap();
        assert_eq!(f.namespace, "k8s.io");
        assert_eq!(f.address, "/run/containerd/containerd.sock");
        assert_eq!(f.id, "abc");
        assert!(f.debug);
        assert_eq!(f.action.as_deref(), Some("start"));
        let d = Flags::parse(&s(&[
            "--namespace=k8s.io",
            "-bundle=/b",
            "-id",
            "x",
            "delete",
        ]))
        .unwrap();
        assert_eq!(d.bundle.as_deref(), Some(Path::new("/b")));
        assert_eq!(d.action.as_deref(), Some("delete"));
        assert!(Flags::parse(&s(&["-id"])).is_err());
        assert!(Flags::parse(&s(&["-bogus", "1"])).is_err());
        assert!(Flags::parse(&s(&["stop"])).is_err());
    }

    #[test]
    fn the_daemon_gets_the_same_flags_without_the_action() {
        let f = Flags::parse(&s(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/a",
            "-publish-binary",
            "/c",
            "-id",
            "abc",
            "start",
        ]))
        .unwrap();
        let d = Flags::parse(&f.daemon_args(Path::new("/run/containerd/s/x"))).unwrap();
        assert_eq!(d.action, None);
        assert_eq!(d.id, "abc");
        assert_eq!(d.socket.as_deref(), Some(Path::new("/run/containerd/s/x")));
    }

    #[test]
    fn info_answers_containerds_runtime_info_with_name_and_version() {
        let b = runtime_info();
        let mut is = protobuf::CodedInputStream::from_bytes(&b);
        assert_eq!(is.read_raw_varint32().unwrap(), 1 << 3 | 2);
        assert_eq!(is.read_string().unwrap(), RUNTIME_NAME);
        assert_eq!(is.read_raw_varint32().unwrap(), 2 << 3 | 2);
        let inner = is.read_bytes().unwrap();
        let mut v = protobuf::CodedInputStream::from_bytes(&inner);
        assert_eq!(v.read_raw_varint32().unwrap(), 1 << 3 | 2);
        assert_eq!(v.read_string().unwrap(), crate::VERSION);
        assert!(is.eof().unwrap());
    }

    #[test]
    fn app_containers_share_their_sandboxs_socket() {
        let sandbox = serde_json::json!({"annotations": {
            CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}});
        let app = serde_json::json!({"annotations": {
            CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}});
        assert_eq!(group_of("pod1", &sandbox), "pod1");
        assert_eq!(group_of("c1", &app), "pod1");
        assert_eq!(group_of("x", &serde_json::json!({})), "x");
        let a = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1");
        assert_eq!(
            a,
            socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1")
        );
        assert_ne!(
            a,
            socket_path("/run/containerd/containerd.sock", "default", "pod1")
        );
        assert!(a.starts_with(SOCKET_DIR));
        // A unix socket path holds at most 107 bytes.
        assert!(a.as_os_str().len() < 108);
    }
}
