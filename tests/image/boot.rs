//! Boots the image under qemu with OVMF (KVM when usable, TCG otherwise) and a NoCloud seed
//! carrying a forwarder config; the image's kata-agent is the developer stand-in
//! (`sandboxd dev agent`, started through `--kata-agent-arg`). Sees the console marker,
//! completes an mTLS handshake with the forwarder through a user-mode port forward and sends a
//! ttrpc `grpc.Health/Check` through it that the agent answers SERVING (and is refused without
//! a client certificate), then presses the ACPI power button over QMP and sees the forwarder
//! stop on its SIGTERM and the VM power itself off.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use protobuf::Message;
use sandboxd::devenv::agent as stand_in;
use sandboxd::forwarder::config::{Config, PodNetwork};
use sandboxd::forwarder::init::{KATA_AGENT_ARGS, READY_MARKER, STOPPING_MARKER};
use sandboxd::image::build::{self, Format, fat};
use sandboxd::pki::{Ca, Usage};
use sandboxd::protocol::frame::{self, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::Case;
use crate::harness::process::{Process, free_port};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const VM_NAME: &str = "podvm-boot-test";
/// kata-agent's socket in the VM.
const AGENT_SOCKET: &str = "/run/kata-containers/agent.sock";

pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

pub fn skip_reason(inputs: Option<String>) -> Option<String> {
    inputs
        .or_else(|| {
            (!super::which("qemu-system-x86_64"))
                .then(|| "qemu-system-x86_64 not installed (Debian qemu-system-x86)".into())
        })
        .or_else(|| {
            (!Path::new(OVMF_CODE).exists()).then(|| format!("{OVMF_CODE} missing (Debian ovmf)"))
        })
        .or_else(|| {
            // A static binary built before the init duties existed cannot boot the image.
            let bin = super::static_binary()?;
            let bytes = std::fs::read(&bin).ok()?;
            let has = |m: &str| bytes.windows(m.len()).any(|w| w == m.as_bytes());
            (!has(READY_MARKER) || !has(STOPPING_MARKER) || !has(KATA_AGENT_ARGS)).then(|| {
                format!("{} predates the current init duties: rebuild it (`make build`)", bin.display())
            })
        })
        .or_else(|| {
            super::static_binary().is_none().then(|| {
                "no static sandboxd (target/x86_64-unknown-linux-musl/dist/sandboxd or SANDBOXD_STATIC_BINARY): run `make build`".into()
            })
        })
}

pub fn case(inputs: Option<String>) -> Case {
    Case::plain(
        "image::boots_under_qemu_ovmf_answers_agent_health_over_mtls_on_15150_and_powers_off_on_request",
        |_| boot(),
    )
    .skip_if(skip_reason(inputs))
}

pub fn forwarder_config(ca: &Ca) -> Result<Config> {
    let year = time::Duration::days(365);
    let server = ca.issue(VM_NAME, &[], &[VM_NAME], Usage::Server, year)?;
    Ok(Config {
        pod_network: PodNetwork {
            podip: "10.244.1.5/24".into(),
            pod_hw_addr: "0a:58:0a:f4:01:05".into(),
            interface: "eth0".into(),
            worker_node_ip: "10.0.2.2".into(),
            tunnel_type: "vxlan".into(),
            mtu: 1450,
            vxlan_port: 4789,
            vxlan_id: 555001,
            routes: vec![],
            neighbors: vec![],
        },
        pod_namespace: "default".into(),
        pod_name: "boot-test".into(),
        tls_server_key: server.key_pem,
        tls_server_cert: server.cert_pem,
        tls_client_ca: ca.cert_pem(),
    })
}

pub fn wait_for_console(
    qemu: &mut Process,
    console: &Path,
    needle: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        qemu.check_running()
            .with_context(|| format!("console:\n{}", tail(&text, 40)))?;
        let own = std::fs::read_to_string(qemu.log_path()).unwrap_or_default();
        if own.contains("KVM internal error") {
            bail!(
                "KVM internal error (qemu log {})",
                qemu.log_path().display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "no {needle:?} on the console in {timeout:?}; console:\n{}",
                tail(&text, 60)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `system_powerdown` over QMP: the ACPI power button.
pub fn press_power_button(qmp: &Path) -> Result<()> {
    let s = std::os::unix::net::UnixStream::connect(qmp)
        .with_context(|| format!("connecting to QMP at {}", qmp.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line)?;
    ensure!(line.contains("QMP"), "no QMP greeting: {line}");
    for cmd in ["qmp_capabilities", "system_powerdown"] {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}")?;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if line.contains("\"return\"") {
                break;
            }
            ensure!(!line.contains("\"error\""), "QMP {cmd}: {line}");
            ensure!(!line.is_empty(), "QMP closed during {cmd}");
        }
    }
    Ok(())
}

pub async fn tls_handshake(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from(VM_NAME.to_string())?;
    Ok(tokio::time::timeout(
        Duration::from_secs(20),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")??)
}

/// One ttrpc `grpc.Health/Check` over `stream`: the answer's serving status.
async fn health_check<S>(stream: &mut S) -> Result<u64>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = ttrpc::proto::Request::new();
    req.service = stand_in::HEALTH_SERVICE.into();
    req.method = "Check".into();
    req.payload = stand_in::check_request("");
    req.timeout_nano = 10_000_000_000;
    let sent = Frame {
        stream_id: 1,
        kind: frame::TYPE_REQUEST,
        flags: 0,
        payload: req.write_to_bytes()?,
    };
    frame::write_frame(stream, &sent).await?;
    let got = tokio::time::timeout(Duration::from_secs(20), frame::read_frame(stream))
        .await
        .context("no answer to grpc.Health/Check in 20s")??
        .context("the forwarder closed the connection without answering")?;
    ensure!(
        got.kind == frame::TYPE_RESPONSE && got.stream_id == 1,
        "unexpected frame {got:?}"
    );
    let resp = ttrpc::proto::Response::parse_from_bytes(&got.payload)?;
    ensure!(
        resp.status.code() == ttrpc::Code::OK,
        "grpc.Health/Check: {:?}",
        resp.status
    );
    stand_in::health_status(&resp.payload).context("undecodable HealthCheckResponse")
}

/// The image of this test: the shared build's inputs, with the static sandboxd also as
/// kata-agent, started as the developer stand-in on kata-agent's socket.
async fn build_image(out: &Path) -> Result<build::Built> {
    let i = super::inputs().await?;
    let sandboxd = super::static_binary().context("no static sandboxd")?;
    let mut a = super::args(&i, out, &sandboxd);
    a.format = vec![Format::Qcow2];
    a.kata_agent = Some(sandboxd);
    a.kata_agent_args = ["dev", "agent", "--socket", AGENT_SOCKET]
        .map(String::from)
        .to_vec();
    Ok(tokio::task::spawn_blocking(move || build::build(&a)).await??)
}

async fn boot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let built = build_image(dir.path()).await?;
    let ca = Ca::new("boot-test-ca", time::Duration::days(365))?;
    let cfg = forwarder_config(&ca)?;
    let user_data = cfg.to_user_data();
    let meta = format!("instance-id: {VM_NAME}\nlocal-hostname: {VM_NAME}\n");
    let seed = fat::nocloud_seed(&[
        ("user-data", user_data.as_bytes()),
        ("meta-data", meta.as_bytes()),
    ])
    .map_err(anyhow::Error::msg)?;
    let seed_path = dir.path().join("seed.img");
    std::fs::write(&seed_path, seed)?;
    let vars = dir.path().join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars)?;
    let port = free_port();
    // Kept with the harness logs.
    let console = crate::harness::process::run_dir().join(format!("podvm-console-{port}.log"));
    let qmp = dir.path().join("qmp.sock");
    let disk = super::output(&built, Format::Qcow2)?;
    let p = |p: &Path| p.display().to_string();
    let args = |accel: &str| -> Vec<String> {
        [
            "-machine",
            &format!("q35,accel={accel}"),
            // qemu's default CPU model: `host` trips over MSRs nested KVM does not offer.
            "-m",
            "1024",
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
            &format!("if=virtio,format=qcow2,snapshot=on,file={}", p(disk)),
            "-drive",
            &format!("if=virtio,format=raw,readonly=on,file={}", p(&seed_path)),
            "-netdev",
            &format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:15150"),
            "-device",
            "virtio-net-pci,netdev=n0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // KVM when /dev/kvm opens and actually runs the firmware (nested KVM may not);
    // software emulation otherwise.
    let mut accels = vec!["tcg"];
    if kvm_usable() {
        accels.insert(0, "kvm");
    }
    let mut booted = None;
    let mut start = Instant::now();
    for accel in accels {
        std::fs::copy(OVMF_VARS, &vars)?;
        let _ = std::fs::remove_file(&console);
        start = Instant::now();
        let mut qemu = Process::start(
            &format!("qemu-podvm-{accel}-{port}"),
            Path::new("qemu-system-x86_64"),
            &args(accel),
            &[],
        )?;
        let console_c = console.clone();
        let timeout = Duration::from_secs(if accel == "kvm" { 120 } else { 220 });
        let (qemu, result) = tokio::task::spawn_blocking(move || {
            let r = wait_for_console(&mut qemu, &console_c, READY_MARKER, timeout);
            (qemu, r)
        })
        .await?;
        match result {
            Ok(()) => {
                booted = Some((accel, qemu));
                break;
            }
            Err(e) if accel == "kvm" => {
                eprintln!("image boot: KVM failed here ({e:#}); using TCG");
                drop(qemu);
            }
            Err(e) => return Err(e),
        }
    }
    let (accel, mut qemu) = booted.context("no accelerator booted the image")?;
    let boot_seconds = start.elapsed().as_secs_f64();

    // The forwarder's certificate verifies for the VM name against the CA, with our client
    // certificate presented.
    let client = ca.issue("caa", &[], &[], Usage::Client, time::Duration::days(1))?;
    let mtls =
        sandboxd::forwarder::tls::client_config(&ca.cert_pem(), &client.cert_pem, &client.key_pem)?;
    let mut stream = tls_handshake(port, mtls.clone())
        .await
        .context("mTLS handshake with the forwarder")?;
    let (_, conn) = stream.get_ref();
    ensure!(conn.peer_certificates().is_some_and(|c| !c.is_empty()));

    // A ttrpc health call on that connection reaches kata-agent (the stand-in) through the
    // forwarder's relay. The agent may still be starting: retried on fresh connections.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match health_check(&mut stream).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("image boot: health check not answered yet ({e:#}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                stream = tls_handshake(port, mtls.clone()).await?;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "grpc.Health/Check through the forwarder; console:\n{}",
                    tail(&std::fs::read_to_string(&console).unwrap_or_default(), 40)
                )));
            }
        }
    };
    ensure!(
        status == stand_in::SERVING,
        "kata-agent answered health status {status}, not SERVING"
    );
    stream.shutdown().await.ok();

    // Without a client certificate the forwarder refuses the connection.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c?)?;
    }
    let anon = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let refused = match tls_handshake(port, anon).await {
        Err(_) => true,
        Ok(mut s) => {
            // TLS 1.3: the server's alert arrives after the client's side of the handshake.
            let _ = s.write_all(&[0u8; 10]).await;
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
                Ok(Err(_)) | Ok(Ok(0))
            )
        }
    };
    ensure!(
        refused,
        "the forwarder accepted a client without a certificate"
    );

    let qmp_c = qmp.clone();
    let console_c = console.clone();
    let off_start = Instant::now();
    tokio::task::spawn_blocking(move || -> Result<()> {
        press_power_button(&qmp_c)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while qemu.check_running().is_ok() {
            if Instant::now() >= deadline {
                bail!(
                    "the VM did not power off within 60s; console:\n{}",
                    tail(&std::fs::read_to_string(&console_c).unwrap_or_default(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })
    .await??;
    let text = std::fs::read_to_string(&console)?;
    ensure!(
        text.contains(&format!(
            "sandboxd-init: kata-agent dev agent --socket {AGENT_SOCKET}"
        )),
        "init did not start kata-agent with the image's arguments:\n{}",
        tail(&text, 30)
    );
    ensure!(
        text.contains("power button pressed") && text.contains("sandboxd-init: power off"),
        "no clean power-off on the console:\n{}",
        tail(&text, 30)
    );
    // The forwarder took its SIGTERM and exited by itself (not killed at the end of the grace).
    ensure!(
        text.contains("sandboxd-init: forwarder stopped"),
        "the forwarder did not stop on SIGTERM:\n{}",
        tail(&text, 30)
    );
    let init_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sandboxd-init:"))
        .collect();
    eprintln!(
        "image boot: console (init lines):\n{}",
        tail(&init_lines.join("\n"), 12)
    );
    // Everything from the power button on: how the services stopped.
    if let Some(at) = text.find("power button pressed") {
        eprintln!(
            "image boot: console from the power button:\n{}",
            &text[at..]
        );
    }
    eprintln!(
        "image boot: {} to the forwarder marker in {boot_seconds:.1}s, power off {:.1}s after the ACPI power button",
        accel,
        off_start.elapsed().as_secs_f64()
    );
    Ok(())
}
