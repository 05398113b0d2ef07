//! `CLOUD_PROVIDER=local`: a pod "VM" is a `sandboxd forwarder` process in a fresh network
//! namespace (linked to the node by a veth pair with its own /30) and its own mount
//! namespace whose `/run` is a private directory, so VMs never share `/run/netns/podns` or
//! the agent socket. Its configuration arrives NoCloud-style (a `user-data` file).
//!
//! State lives in `<dir>/<vm name>/` (`LOCAL_VM_DIR`, default `/run/peerpod/local`):
//! `vm.json` (index, pid and start time, IP, tags), `run/` (the VM's `/run`: kata-agent's
//! socket goes to `run/kata-containers/agent.sock`, the NoCloud seed is
//! `run/cidata/user-data`, which the VM reads as `/run/cidata/user-data` whatever
//! `LOCAL_VM_DIR` is, even below the `/run` its private `/run` hides) and `forwarder.log`.
//! VMs outlive a CAA restart like cloud VMs do; delete kills the process (its namespaces
//! and veth pair go with it) and removes the directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod store;

use store::ProcessVms as _;
pub use store::start_time;

use super::net::Netlink;
use super::{Error, Provider, Vm, VmSize, VmSpec};

/// Default state directory.
pub const DEFAULT_DIR: &str = "/run/peerpod/local";
/// The NoCloud seed, relative to the VM's `/run`.
const SEED: &str = "cidata/user-data";
/// Default address range of VM links (one /30 per VM).
pub(crate) const DEFAULT_SUBNET: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 0);

/// What `vm.json` records.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LocalVm {
    /// Slot of the VM's /30.
    pub(crate) index: u32,
    /// The forwarder's pid.
    pub pid: i32,
    /// Its start time (clock ticks since boot), to never signal a recycled pid.
    pub start_time: u64,
    /// The VM's address.
    pub(crate) ip: Ipv4Addr,
    /// The node end of the veth pair.
    pub(crate) node_link: String,
    /// Tags of the VM.
    pub(crate) tags: BTreeMap<String, String>,
}

impl store::Record for LocalVm {
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

/// The local provider.
pub(crate) struct LocalProvider {
    dir: PathBuf,
    exe: PathBuf,
    subnet: Ipv4Addr,
    children: Mutex<HashMap<String, tokio::process::Child>>,
    alloc: tokio::sync::Mutex<()>,
}

fn err(op: &str, e: impl std::fmt::Display) -> Error {
    Error::Permanent(format!("local VM: {op}: {e}"))
}

impl LocalProvider {
    /// A provider keeping state in `dir`, giving VMs /30s from `subnet` (a /16), starting
    /// `exe forwarder` as VMs.
    pub(crate) fn new(dir: PathBuf, subnet: Ipv4Addr, exe: PathBuf) -> Self {
        Self {
            dir,
            exe,
            subnet,
            children: Mutex::new(HashMap::new()),
            alloc: tokio::sync::Mutex::new(()),
        }
    }

    /// From `LOCAL_VM_DIR` and `LOCAL_VM_SUBNET` (the first address of a /16), running this
    /// executable (or `LOCAL_VM_FORWARDER`, another build of it, started as
    /// `<exe> forwarder ...`) as each VM.
    pub(crate) fn from_env() -> Result<Self, Error> {
        let dir = std::env::var("LOCAL_VM_DIR").unwrap_or_else(|_| DEFAULT_DIR.into());
        let subnet = match std::env::var("LOCAL_VM_SUBNET") {
            Ok(s) => s
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|e| err("LOCAL_VM_SUBNET", e))?,
            Err(_) => DEFAULT_SUBNET,
        };
        let exe = match std::env::var_os("LOCAL_VM_FORWARDER") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().map_err(|e| err("finding sandboxd", e))?,
        };
        Ok(Self::new(dir.into(), subnet, exe))
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl store::ProcessVms for LocalProvider {
    type Record = LocalVm;
    const SCHEME: &'static str = "local";

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn alloc(&self) -> &tokio::sync::Mutex<()> {
        &self.alloc
    }

    async fn start(&self, spec: &VmSpec) -> Result<Vm, Error> {
        let user_data = spec.user_data.as_deref().ok_or_else(|| {
            err(
                "create",
                "a local VM needs user data (the forwarder config)",
            )
        })?;
        let dir = self.vm_dir(&spec.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).map_err(|e| err("creating its directory", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // Inside the VM's own /run: the node's /run (where LOCAL_VM_DIR may be) is hidden
        // from the VM by it.
        std::fs::create_dir_all(dir.join("run/cidata"))
            .map_err(|e| err("creating its seed directory", e))?;
        std::fs::write(dir.join("run").join(SEED), user_data)
            .map_err(|e| err("writing user-data", e))?;
        let used: Vec<u32> = store::all::<LocalVm>(&self.dir)
            .into_iter()
            .map(|(_, v)| v.index)
            .collect();
        let index =
            store::free_slot(&used).ok_or_else(|| Error::Quota("no free local VM slots".into()))?;
        let (node_ip, vm_ip) = store::link_addresses(self.subnet, index);
        let log =
            File::create(dir.join("forwarder.log")).map_err(|e| err("creating the log", e))?;
        let log2 = log.try_clone().map_err(|e| err("creating the log", e))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("forwarder")
            .arg("--seed")
            .arg(Path::new("/run").join(SEED))
            .arg("--unshare-net")
            .arg("--private-run")
            .arg(dir.join("run"))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| err("starting the forwarder", e))?;
        let pid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| err("starting the forwarder", "no pid"))?;
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.name.clone(), child);
        // Wait until the child is in its own network namespace.
        let own = std::fs::read_link("/proc/thread-self/ns/net")
            .map_err(|e| err("reading our namespace", e))?;
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::read_link(&ns_path) {
                Ok(l) if l != own => break,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                _ => {
                    return Err(err(
                        "starting the forwarder",
                        format!(
                            "it did not enter its namespace (see {})",
                            dir.join("forwarder.log").display()
                        ),
                    ));
                }
            }
        }
        let st = store::start_time(pid)
            .ok_or_else(|| err("starting the forwarder", "it exited at once"))?;
        let node_link = format!("sbxl{index}");
        let peer = format!("sbxp{index}");
        let node = Netlink::node().await.map_err(|e| err("netlink", e))?;
        for n in [&node_link, &peer] {
            if let Some(i) = node.index_of(n).await.map_err(|e| err("netlink", e))? {
                let _ = node.delete(i).await;
            }
        }
        let rec = LocalVm {
            index,
            pid,
            start_time: st,
            ip: vm_ip,
            node_link: node_link.clone(),
            tags: spec.tags.clone(),
        };
        // Recorded before the links exist, so a failure below is cleaned up by delete.
        store::write(&dir, &rec).map_err(|e| err("writing vm.json", e))?;
        let li = node
            .add_veth(&node_link, &peer)
            .await
            .map_err(|e| err("veth", e))?;
        node.add_addr(li, node_ip, 30)
            .await
            .map_err(|e| err("veth", e))?;
        node.up(li).await.map_err(|e| err("veth", e))?;
        let pi = node
            .index_of(&peer)
            .await
            .map_err(|e| err("veth", e))?
            .ok_or_else(|| err("veth", "peer vanished"))?;
        let ns = File::open(&ns_path).map_err(|e| err("opening the VM namespace", e))?;
        node.move_to(pi, &ns).await.map_err(|e| err("veth", e))?;
        let vm = Netlink::in_netns(&ns_path)
            .await
            .map_err(|e| err("netlink", e))?;
        let pi = vm
            .index_of(&peer)
            .await
            .map_err(|e| err("veth", e))?
            .ok_or_else(|| err("veth", "peer not in the VM"))?;
        vm.configure(pi, "eth0", 1500, None)
            .await
            .map_err(|e| err("veth", e))?;
        vm.add_addr(pi, vm_ip, 30)
            .await
            .map_err(|e| err("veth", e))?;
        vm.up(pi).await.map_err(|e| err("veth", e))?;
        if let Some(lo) = vm.index_of("lo").await.map_err(|e| err("netlink", e))? {
            vm.up(lo).await.map_err(|e| err("netlink", e))?;
        }
        vm.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(node_ip), pi)
            .await
            .map_err(|e| err("default route", e))?;
        tracing::info!(vm = %spec.name, pid, ip = %vm_ip, "local VM started");
        Ok(Self::vm_of(&spec.name, &rec))
    }

    async fn stop(&self, name: &str) -> Result<(), Error> {
        let dir = self.vm_dir(name);
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(v) = self.record(name) {
            store::terminate(v.pid, v.start_time, Duration::from_secs(3)).await;
            if let Some(mut c) = child {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
            }
            store::wait_gone(v.pid, v.start_time, Duration::from_secs(5)).await;
            // The veth pair dies with the VM's namespace; remove a leftover node end.
            if let Ok(node) = Netlink::node().await
                && let Ok(Some(i)) = node.index_of(&v.node_link).await
            {
                let _ = node.delete(i).await;
            }
        }
        store::remove(&dir).map_err(|e| err("removing its directory", e))
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn sizes(&self, names: &[String]) -> Result<Vec<VmSize>, Error> {
        Ok(names
            .iter()
            .map(|n| VmSize {
                name: n.clone(),
                vcpus: 1,
                memory_mib: 1024,
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
