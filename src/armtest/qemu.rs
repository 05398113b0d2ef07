//! The ARM test server's VMs as real pod VMs: the pod VM image (`sandboxd image build`)
//! booted under qemu with OVMF (`--local-vm-image`). Each created VM is one qemu process:
//! the image's disk read-only (writes go to a throwaway snapshot), a NoCloud seed holding
//! the request's `userData` (the forwarder configuration CAA sends), and one NIC, a tap link
//! in the node's network namespace (`SANDBOXD_NODE_NETNS`, else this process's) with a /30
//! of its own. The server answers the VM's DHCP on that link, as Azure's platform does for
//! a NIC, with the NIC's address and the node end as gateway: the VM reaches the node and
//! what the node routes, nothing else. Deleting the VM stops qemu at once (as Azure's delete
//! does); the tap goes with it.
//!
//! State lives in `<dir>/<vm name>/`: `vm.json` (slot, qemu's pid and start time, address,
//! tap, tags), `seed.img`, `OVMF_VARS.fd`, `console.log` (the VM's serial console) and
//! `qemu.log`.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::dhcp;
use crate::cloud::local::store::{self, ProcessVms as _, start_time};
use crate::cloud::net::Netlink;
use crate::cloud::{Error, Provider, Vm, VmSize, VmSpec};

/// OVMF's code (read-only) and the template of its variable store (Debian `ovmf`).
pub(crate) const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// See [`OVMF_CODE`].
pub(crate) const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The qemu binary.
pub(crate) const QEMU: &str = "qemu-system-x86_64";
/// How long the server answers a VM's DHCP after it started.
const DHCP_WINDOW: Duration = Duration::from_secs(600);

/// How VMs boot (see the module documentation).
#[derive(Clone, Debug)]
pub(crate) struct QemuVms {
    /// The pod VM disk: `image build`'s qcow2, raw or VHD output.
    pub(crate) image: PathBuf,
    /// Memory of each VM in MiB (whatever size the request names: this machine is small).
    pub(crate) memory_mib: u32,
    /// vCPUs of each VM.
    pub(crate) cpus: u32,
    /// qemu's accelerator: `tcg`, or `kvm` where it runs.
    pub(crate) accel: String,
}

/// What `vm.json` records.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct Record {
    index: u32,
    pid: i32,
    start_time: u64,
    ip: Ipv4Addr,
    tap: String,
    tags: BTreeMap<String, String>,
}

impl store::Record for Record {
    fn process(&self) -> (i32, u64) {
        (self.pid, self.start_time)
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
}

/// VMs booted under qemu.
pub(crate) struct QemuProvider {
    dir: PathBuf,
    subnet: Ipv4Addr,
    config: QemuVms,
    alloc: tokio::sync::Mutex<()>,
    children: Mutex<HashMap<String, tokio::process::Child>>,
    dhcp: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

fn err(op: &str, e: impl std::fmt::Display) -> Error {
    Error::Permanent(format!("qemu VM: {op}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// qemu's name of the disk format of `image`, from its extension.
fn disk_format(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        Some("vhd") => "vpc",
        _ => "raw",
    }
}

/// The node's network namespace the VMs' taps live in (`None`: this process's).
fn node_netns() -> Option<PathBuf> {
    std::env::var_os("SANDBOXD_NODE_NETNS").map(PathBuf::from)
}

/// The last lines of a file, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl QemuProvider {
    /// VMs kept in `dir`, their links taken as /30s from `subnet` (a /16).
    pub(crate) fn new(dir: PathBuf, subnet: Ipv4Addr, config: QemuVms) -> Self {
        Self {
            dir,
            subnet,
            config,
            alloc: tokio::sync::Mutex::new(()),
            children: Mutex::new(HashMap::new()),
            dhcp: Mutex::new(HashMap::new()),
        }
    }

    fn args(&self, dir: &Path, tap: &str, mac: &str) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let c = &self.config;
        [
            "-machine".to_string(),
            format!("q35,accel={}", c.accel),
            "-m".into(),
            c.memory_mib.to_string(),
            "-smp".into(),
            c.cpus.to_string(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", p(&dir.join("console.log"))),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            format!(
                "if=pflash,format=raw,unit=1,file={}",
                p(&dir.join("OVMF_VARS.fd"))
            ),
            "-drive".into(),
            format!(
                "if=virtio,format={},snapshot=on,file={}",
                disk_format(&c.image),
                p(&c.image)
            ),
            "-drive".into(),
            format!(
                "if=virtio,format=raw,readonly=on,file={}",
                p(&dir.join("seed.img"))
            ),
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={mac}"),
        ]
        .into()
    }
}

impl store::ProcessVms for QemuProvider {
    type Record = Record;
    const SCHEME: &'static str = "qemu";

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn alloc(&self) -> &tokio::sync::Mutex<()> {
        &self.alloc
    }

    async fn start(&self, spec: &VmSpec) -> Result<Vm, Error> {
        let user_data = spec
            .user_data
            .as_deref()
            .ok_or_else(|| err("create", "a pod VM needs user data (the forwarder config)"))?;
        let dir = self.dir.join(&spec.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| err("creating its directory", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        let meta = format!("instance-id: {0}\nlocal-hostname: {0}\n", spec.name);
        let seed = crate::image::build::fat::nocloud_seed(&[
            ("user-data", user_data.as_bytes()),
            ("meta-data", meta.as_bytes()),
        ])
        .map_err(|e| err("making the NoCloud seed", e))?;
        std::fs::write(dir.join("seed.img"), seed).map_err(|e| err("writing the seed", e))?;
        std::fs::copy(OVMF_VARS, dir.join("OVMF_VARS.fd"))
            .map_err(|e| err(&format!("copying {OVMF_VARS} (Debian ovmf)"), e))?;
        let used: Vec<u32> = store::all::<Record>(&self.dir)
            .into_iter()
            .map(|(_, r)| r.index)
            .collect();
        let index =
            store::free_slot(&used).ok_or_else(|| Error::Quota("no free VM slots".into()))?;
        let (node_ip, vm_ip) = store::link_addresses(self.subnet, index);
        let tap = format!("sbxq{index}");
        let mac = format!("52:54:00:5b:{:02x}:{:02x}", index >> 8, index & 0xff);
        let log =
            std::fs::File::create(dir.join("qemu.log")).map_err(|e| err("creating qemu.log", e))?;
        let log2 = log.try_clone().map_err(|e| err("creating qemu.log", e))?;
        let args = self.args(&dir, &tap, &mac);
        // qemu opens the tap in its own namespace: run it in the node's.
        let mut cmd = match node_netns() {
            Some(ns) => {
                let mut c = tokio::process::Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("--").arg(QEMU);
                c
            }
            None => tokio::process::Command::new(QEMU),
        };
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| err(&format!("starting {QEMU} (Debian qemu-system-x86)"), e))?;
        let pid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| err("starting qemu", "no pid"))?;
        lock(&self.children).insert(spec.name.clone(), child);
        let st = start_time(pid).ok_or_else(|| {
            err(
                "starting qemu",
                format!("it exited at once: {}", tail(&dir.join("qemu.log"), 5)),
            )
        })?;
        let rec = Record {
            index,
            pid,
            start_time: st,
            ip: vm_ip,
            tap: tap.clone(),
            tags: spec.tags.clone(),
        };
        store::write(&dir, &rec).map_err(|e| err("writing vm.json", e))?;
        // The tap exists once qemu has opened it.
        let node = Netlink::node().await.map_err(|e| err("netlink", e))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let link = loop {
            if let Some(i) = node.index_of(&tap).await.map_err(|e| err("netlink", e))? {
                break i;
            }
            if start_time(pid) != Some(st) {
                return Err(err(
                    "starting qemu",
                    format!("it exited: {}", tail(&dir.join("qemu.log"), 10)),
                ));
            }
            if Instant::now() > deadline {
                return Err(err("starting qemu", format!("no tap {tap} after 20 s")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        node.add_addr(link, node_ip, 30)
            .await
            .map_err(|e| err("addressing the tap", e))?;
        node.up(link).await.map_err(|e| err("tap up", e))?;
        let sock =
            dhcp::server_socket(&tap, node_netns().as_deref()).map_err(|e| err("DHCP", e))?;
        let sock = tokio::net::UdpSocket::from_std(sock).map_err(|e| err("DHCP", e))?;
        let grant = dhcp::Grant {
            address: vm_ip,
            prefix: 30,
            router: Some(node_ip),
            server: node_ip,
            lease_seconds: 86400,
        };
        let name = spec.name.clone();
        let served = tokio::spawn(async move {
            match tokio::time::timeout(DHCP_WINDOW, dhcp::serve(sock, grant)).await {
                Ok(Ok(())) => {
                    tracing::info!(vm = %name, ip = %vm_ip, "DHCP: the VM holds its address")
                }
                Ok(Err(e)) => tracing::warn!(vm = %name, error = %e, "DHCP"),
                Err(_) => tracing::warn!(vm = %name, "DHCP: the VM asked for no address in time"),
            }
        });
        if let Some(old) = lock(&self.dhcp).insert(spec.name.clone(), served) {
            old.abort();
        }
        tracing::info!(vm = %spec.name, pid, ip = %vm_ip, %tap, accel = %self.config.accel, "pod VM booting under qemu");
        Ok(Self::vm_of(&spec.name, &rec))
    }

    async fn stop(&self, name: &str) -> Result<(), Error> {
        if let Some(t) = lock(&self.dhcp).remove(name) {
            t.abort();
        }
        let child = lock(&self.children).remove(name);
        if let Some(r) = self.record(name) {
            store::terminate(r.pid, r.start_time, Duration::from_secs(5)).await;
        }
        if let Some(mut c) = child {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        store::remove(&self.dir.join(name)).map_err(|e| err("removing its directory", e))
    }
}

#[async_trait::async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn sizes(&self, names: &[String]) -> Result<Vec<VmSize>, Error> {
        Ok(names
            .iter()
            .map(|n| VmSize {
                name: n.clone(),
                vcpus: self.config.cpus,
                memory_mib: u64::from(self.config.memory_mib),
                gpus: 0,
            })
            .collect())
    }

    async fn create(&self, spec: &VmSpec) -> Result<Vm, Error> {
        self.create_once(spec).await
    }

    async fn get(&self, name: &str) -> Result<Option<Vm>, Error> {
        Ok(self.vm(name))
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        self.stop(name).await
    }

    async fn list_owned(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Vm>, Error> {
        Ok(self.owned(tags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_boots_the_image_read_only_from_the_seed_and_a_tap() {
        let p = QemuProvider::new(
            "/vms".into(),
            Ipv4Addr::new(10, 251, 0, 0),
            QemuVms {
                image: "/img/podvm.qcow2".into(),
                memory_mib: 768,
                cpus: 1,
                accel: "tcg".into(),
            },
        );
        let a = p.args(Path::new("/vms/podvm-a"), "sbxq3", "52:54:00:5b:00:03");
        let joined = a.join(" ");
        assert!(joined.contains("q35,accel=tcg"), "{joined}");
        assert!(joined.contains("-m 768"), "{joined}");
        assert!(joined.contains("if=virtio,format=qcow2,snapshot=on,file=/img/podvm.qcow2"));
        assert!(joined.contains("if=virtio,format=raw,readonly=on,file=/vms/podvm-a/seed.img"));
        assert!(joined.contains("tap,id=n0,ifname=sbxq3,script=no,downscript=no"));
        assert!(joined.contains("mac=52:54:00:5b:00:03"));
        assert!(!joined.contains("user,"), "no user-mode network: {joined}");
        assert_eq!(disk_format(Path::new("x.vhd")), "vpc");
        assert_eq!(disk_format(Path::new("x.img")), "raw");
    }
}
