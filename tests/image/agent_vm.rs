//! The pod VM image as `sandboxd image build` makes it by default (init starts `sandboxd
//! agent`), booted under qemu (TCG here; KVM where it runs) with user networking restricted
//! to what the test serves: the forwarder's port forwarded in, two TLS registries forwarded
//! out (one open, one behind htpasswd whose credentials travel in the VM's user data as
//! CAA sends them). The agent-protocol client drives the whole peer-pod sequence through the
//! forwarder over mTLS: images pulled in the VM, output, stdin, exec, seccomp, kill, exit
//! codes, an OOM kill reported, nothing left.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use protobuf::well_known_types::empty::Empty;
use sandboxd::forwarder::init::{AGENT_READY_MARKER, INIT_ENTERED_MARKER, READY_MARKER};
use sandboxd::image::build::{self, Format, fat};
use sandboxd::pki::{Ca, Usage};
use sandboxd::protocol::agent::*;

use super::boot::{self, OVMF_CODE, OVMF_VARS, VM_NAME};
use crate::agent::client::Wire;
use crate::agent::registry::Registry;
use crate::agent::sequence::{self, Rootfs, Setup};
use crate::harness::Case;
use crate::harness::process::{Process, free_port};

/// The registries' address as the VM sees it (qemu `guestfwd`, through a `nc` per
/// connection: a `tcp:` target carries one connection only).
const REGISTRY_IP: &str = "10.0.2.100";

pub fn case(inputs: Option<String>) -> Case {
    let skip = boot::skip_reason(inputs)
        .or_else(crate::agent::registry::skip_reason)
        .or_else(|| {
            (!Path::new(crate::agent::host::BUSYBOX).exists())
                .then(|| "busybox-static missing (scripts/bootstrap.sh installs it)".to_string())
        })
        .or_else(|| {
            let bin = super::static_binary()?;
            let bytes = std::fs::read(&bin).ok()?;
            (!bytes
                .windows(AGENT_READY_MARKER.len())
                .any(|w| w == AGENT_READY_MARKER.as_bytes()))
            .then(|| {
                format!(
                    "{} predates `sandboxd agent`: rebuild it (`make build`)",
                    bin.display()
                )
            })
        });
    Case::plain(
        "image::pod_vm_pulls_and_runs_containers_through_the_forwarder_with_stdio_exec_seccomp_oom_and_leaves_nothing",
        |_| run(),
    )
    .skip_if(skip)
}

/// Seconds of uptime on a console line `[   12.345] sandboxd-init: <needle>...`.
pub fn uptime_of(console: &str, needle: &str) -> Option<f64> {
    console
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.trim_start().strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .and_then(|v| v.trim().parse().ok())
}

/// A booted pod VM.
pub struct Vm {
    pub qemu: Process,
    pub console: std::path::PathBuf,
    pub qmp: std::path::PathBuf,
    pub port: u16,
    pub mtls: Arc<rustls::ClientConfig>,
    pub accel: &'static str,
    pub boot_seconds: f64,
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Builds the default image (with `ca` as the VM's CA bundle) and boots it with `user_data`,
    /// forwarding `registry_ports` of 127.0.0.1 to the VM as `REGISTRY_IP:<port>`.
    pub async fn boot(ca: &Ca, user_data: String, registry_ports: &[u16]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let i = super::inputs().await?;
        let sandboxd = super::static_binary().context("no static sandboxd")?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem())?;
        let mut a = super::args(&i, dir.path(), &sandboxd);
        a.format = vec![Format::Qcow2];
        a.ca_certs = ca_file;
        let built = tokio::task::spawn_blocking(move || build::build(&a)).await??;
        let meta = format!("instance-id: {VM_NAME}\nlocal-hostname: {VM_NAME}\n");
        let seed = fat::nocloud_seed(&[
            ("user-data", user_data.as_bytes()),
            ("meta-data", meta.as_bytes()),
        ])
        .map_err(anyhow::Error::msg)?;
        let seed_path = dir.path().join("seed.img");
        std::fs::write(&seed_path, seed)?;
        let vars = dir.path().join("OVMF_VARS.fd");
        let port = free_port();
        let console =
            crate::harness::process::run_dir().join(format!("podvm-agent-console-{port}.log"));
        let qmp = dir.path().join("qmp.sock");
        let disk = super::output(&built, Format::Qcow2)?.to_path_buf();
        let mut net = format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:15150");
        for p in registry_ports {
            net.push_str(&format!(
                ",guestfwd=tcp:{REGISTRY_IP}:{p}-cmd:{} nc 127.0.0.1 {p}",
                crate::agent::host::BUSYBOX
            ));
        }
        let p = |p: &Path| p.display().to_string();
        let args = |accel: &str| -> Vec<String> {
            [
                "-machine",
                &format!("q35,accel={accel}"),
                "-m",
                "2048",
                "-smp",
                "2",
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                &format!("file:{}", p(&console)),
                "-qmp",
                &format!("unix:{},server=on,wait=off", p(&qmp)),
                "-drive",
                &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", p(&vars)),
                "-drive",
                &format!("if=virtio,format=qcow2,snapshot=on,file={}", p(&disk)),
                "-drive",
                &format!("if=virtio,format=raw,readonly=on,file={}", p(&seed_path)),
                "-netdev",
                &net,
                "-device",
                "virtio-net-pci,netdev=n0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let mut accels = vec!["tcg"];
        if boot::kvm_usable() {
            accels.insert(0, "kvm");
        }
        for accel in accels {
            std::fs::copy(OVMF_VARS, &vars)?;
            let _ = std::fs::remove_file(&console);
            let start = Instant::now();
            let mut qemu = Process::start(
                &format!("qemu-podvm-agent-{accel}-{port}"),
                Path::new("qemu-system-x86_64"),
                &args(accel),
                &[],
            )?;
            let c = console.clone();
            let timeout = Duration::from_secs(if accel == "kvm" { 120 } else { 240 });
            let (qemu, r) = tokio::task::spawn_blocking(move || {
                let r = boot::wait_for_console(&mut qemu, &c, READY_MARKER, timeout);
                (qemu, r)
            })
            .await?;
            match r {
                Ok(()) => {
                    let client =
                        ca.issue("caa", &[], &[], Usage::Client, time::Duration::days(1))?;
                    let mtls = sandboxd::forwarder::tls::client_config(
                        &ca.cert_pem(),
                        &client.cert_pem,
                        &client.key_pem,
                    )?;
                    return Ok(Self {
                        qemu,
                        console,
                        qmp,
                        port,
                        mtls,
                        accel,
                        boot_seconds: start.elapsed().as_secs_f64(),
                        _dir: dir,
                    });
                }
                Err(e) if accel == "kvm" => eprintln!("pod VM: KVM failed here ({e:#}); using TCG"),
                Err(e) => return Err(e),
            }
        }
        bail!("no accelerator booted the image")
    }

    /// A new mTLS connection to the forwarder.
    pub async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        boot::tls_handshake(self.port, self.mtls.clone()).await
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Presses the power button and waits for the VM to stop.
    pub async fn power_off(mut self) -> Result<()> {
        let qmp = self.qmp.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            boot::press_power_button(&qmp)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.qemu.check_running().is_ok() {
                ensure!(
                    Instant::now() < deadline,
                    "the VM did not power off within 60s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })
        .await?
    }
}

/// Registries on 127.0.0.1 serving TLS for the VM's view of them, one open, one with auth;
/// a busybox image in each.
pub struct Registries {
    pub open: Registry,
    pub closed: Registry,
    pub image: String,
    pub private: String,
}

pub fn registries(ca: &Ca) -> Result<Registries> {
    let (pa, pb) = (free_port(), free_port());
    let tls = || -> Result<(String, String, String)> {
        let c = ca.issue(
            "registry",
            &[],
            &[REGISTRY_IP, "127.0.0.1"],
            Usage::Server,
            time::Duration::days(1),
        )?;
        Ok((ca.cert_pem(), c.cert_pem, c.key_pem))
    };
    let open = Registry::start_with("registry-vm-open", None, None, pa, Some(tls()?))?;
    let closed = Registry::start_with(
        "registry-vm-auth",
        None,
        Some(("puller", "s3cret")),
        pb,
        Some(tls()?),
    )?;
    open.push_busybox(None, "busybox", "1", "open")?;
    closed.push_busybox(None, "private/busybox", "1", "closed")?;
    Ok(Registries {
        image: format!("{REGISTRY_IP}:{pa}/busybox:1"),
        private: format!("{REGISTRY_IP}:{pb}/private/busybox:1"),
        open,
        closed,
    })
}

/// The user data: the forwarder config and the pull secret of the closed registry.
pub fn user_data(ca: &Ca, closed_port: u16) -> Result<String> {
    use base64::Engine;
    let cfg = boot::forwarder_config(ca)?;
    let auth = serde_json::json!({"auths": {format!("{REGISTRY_IP}:{closed_port}"): {"auth": base64::engine::general_purpose::STANDARD.encode("puller:s3cret")}}});
    Ok(cfg.to_user_data_with_auth(&auth.to_string()))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

async fn run() -> Result<()> {
    let ca = Ca::new("agent-vm-test-ca", time::Duration::days(1))?;
    let regs = registries(&ca)?;
    let ports = [port_of(&regs.open.addr), port_of(&regs.closed.addr)];
    let vm = Vm::boot(&ca, user_data(&ca, ports[1])?, &ports).await?;
    let console = vm.console_text();
    let handover = uptime_of(&console, INIT_ENTERED_MARKER);
    let ready = uptime_of(&console, AGENT_READY_MARKER);
    eprintln!(
        "pod VM ({}): forwarder ready {:.1}s after qemu start; /init entered at {handover:?}s, agent ready at {ready:?}s of uptime",
        vm.accel, vm.boot_seconds
    );
    ensure!(
        console.contains(sandboxd::forwarder::init::ROOT_SWITCHED_MARKER),
        "init did not move the root:\n{}",
        boot::tail(&console, 40)
    );
    let setup = Setup {
        base: "/run/kata-containers".into(),
        rootfs: Rootfs::Image(regs.image.clone()),
        cgroup_prefix: "kubepods/podseq".into(),
        oom: true,
        pause: true,
    };
    let r = sequence::run(&setup, || vm.connect()).await;
    if let Err(e) = r {
        bail!("{e:#}\nconsole:\n{}", boot::tail(&vm.console_text(), 80));
    }
    // The private image, with the credentials the user data carried.
    let mut w = Wire::new(vm.connect().await?);
    let _: Empty = w
        .ok(
            "/grpc.AgentService/CreateSandbox",
            &CreateSandboxRequest {
                sandbox_id: "sb-private".into(),
                ..Default::default()
            },
        )
        .await?;
    let setup = Setup {
        rootfs: Rootfs::Image(regs.private.clone()),
        ..setup
    };
    let spec = sequence::spec(&setup, "private", &["cat", "/etc/marker"], false);
    let _: Empty = w
        .ok(
            "/grpc.AgentService/CreateContainer",
            &sequence::create_request(&setup, "private", spec, false),
        )
        .await
        .with_context(|| format!("console:\n{}", boot::tail(&vm.console_text(), 40)))?;
    let marker = sequence::start_and_read_first(&mut w, "private", 64).await?;
    ensure!(
        marker == b"closed",
        "private image marker {:?}",
        String::from_utf8_lossy(&marker)
    );
    let _: Empty = w
        .ok(
            "/grpc.AgentService/DestroySandbox",
            &DestroySandboxRequest::new(),
        )
        .await?;
    drop(w);
    vm.power_off().await?;
    Ok(())
}
