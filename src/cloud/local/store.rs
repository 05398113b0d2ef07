//! What the local provider and the ARM test server's qemu VMs share: a VM is a process,
//! recorded in `<dir>/<vm name>/vm.json` with its pid and start time (so a recycled pid is
//! never taken for it, nor signalled), and its tags.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cloud::{Error, Vm, VmSpec, VmState};

/// The record file in a VM's directory.
pub const RECORD: &str = "vm.json";

/// The start time of a process (field 22 of `/proc/<pid>/stat`), if it runs (zombies
/// count as gone).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the process `pid` that started at `started` still runs.
pub(crate) fn alive(pid: i32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

/// The record of VM `name`, if it has a readable one.
pub(crate) fn read<T: DeserializeOwned>(dir: &Path, name: &str) -> Option<T> {
    let text = std::fs::read_to_string(dir.join(name).join(RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the record of the VM whose directory is `vm_dir`.
pub(crate) fn write<T: Serialize>(vm_dir: &Path, record: &T) -> std::io::Result<()> {
    std::fs::write(
        vm_dir.join(RECORD),
        serde_json::to_vec(record).expect("serialises"),
    )
}

/// Every VM under `dir` with a readable record, by name.
pub(crate) fn all<T: DeserializeOwned>(dir: &Path) -> Vec<(String, T)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            read(dir, &name).map(|r| (name, r))
        })
        .collect()
}

/// Slots a VM directory may take: each is a /30 of the VMs' /16.
const SLOTS: u32 = 16000;

/// The lowest slot no VM holds.
pub(crate) fn free_slot(used: &[u32]) -> Option<u32> {
    (0..SLOTS).find(|i| !used.contains(i))
}

/// The node's and the VM's address of slot `index`'s /30 in `subnet` (a /16).
pub(crate) fn link_addresses(subnet: Ipv4Addr, index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(subnet) + index * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// Whether a VM's tags hold every one of `wanted`.
pub(crate) fn has_tags(tags: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// Waits until the process is gone or `timeout` passed.
pub(crate) async fn wait_gone(pid: i32, started: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid, started) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, `grace` to exit, then SIGKILL; nothing when the process is already gone.
pub(crate) async fn terminate(pid: i32, started: u64, grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    if !alive(pid, started) {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGTERM);
    wait_gone(pid, started, grace).await;
    if alive(pid, started) {
        let _ = kill(p, Signal::SIGKILL);
    }
}

/// Removes a VM's directory; one already gone is fine.
pub(crate) fn remove(vm_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(vm_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What every process VM's record carries.
pub(crate) trait Record: DeserializeOwned + Send {
    /// The VM process's pid and start time.
    fn process(&self) -> (i32, u64);
    /// The VM's address.
    fn ip(&self) -> Ipv4Addr;
    /// Its tags.
    fn tags(&self) -> &BTreeMap<String, String>;
}

/// A provider whose VMs are processes recorded under one directory: the provider's
/// create, get and list follow from how it starts and stops one VM.
pub(crate) trait ProcessVms: Sync {
    /// The provider's record.
    type Record: Record;
    /// The scheme of the VMs' ids (`<scheme>://<name>`).
    const SCHEME: &'static str;
    /// The directory of the records.
    fn dir(&self) -> &Path;
    /// Held while a VM is created (slot allocation).
    fn alloc(&self) -> &tokio::sync::Mutex<()>;
    /// Starts VM `spec.name`, writing its record.
    fn start(&self, spec: &VmSpec) -> impl Future<Output = Result<Vm, Error>> + Send;
    /// Stops VM `name` and removes its directory; succeeds when it is gone already.
    fn stop(&self, name: &str) -> impl Future<Output = Result<(), Error>> + Send;

    /// The record of VM `name`.
    fn record(&self, name: &str) -> Option<Self::Record> {
        read(self.dir(), name)
    }

    /// The VM of a record: running while its process is.
    fn vm_of(name: &str, r: &Self::Record) -> Vm {
        let (pid, started) = r.process();
        Vm {
            name: name.to_string(),
            id: format!("{}://{name}", Self::SCHEME),
            state: if alive(pid, started) {
                VmState::Succeeded
            } else {
                VmState::Failed
            },
            private_ip: Some(std::net::IpAddr::V4(r.ip())),
            public_ip: None,
            tags: r.tags().clone(),
        }
    }

    /// Creates VM `spec.name` once: a running one is answered as it is; a start that fails
    /// leaves nothing behind.
    fn create_once(&self, spec: &VmSpec) -> impl Future<Output = Result<Vm, Error>> + Send {
        async move {
            let _g = self.alloc().lock().await;
            if let Some(r) = self.record(&spec.name) {
                let (pid, started) = r.process();
                if alive(pid, started) {
                    return Ok(Self::vm_of(&spec.name, &r));
                }
            }
            match self.start(spec).await {
                Ok(vm) => Ok(vm),
                Err(e) => {
                    let _ = self.stop(&spec.name).await;
                    Err(e)
                }
            }
        }
    }

    /// VM `name`, if it has a record.
    fn vm(&self, name: &str) -> Option<Vm> {
        self.record(name).map(|r| Self::vm_of(name, &r))
    }

    /// Every VM carrying `tags`.
    fn owned(&self, tags: &BTreeMap<String, String>) -> Vec<Vm> {
        all::<Self::Record>(self.dir())
            .into_iter()
            .filter(|(_, r)| has_tags(r.tags(), tags))
            .map(|(n, r)| Self::vm_of(&n, &r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_back_by_name_and_unreadable_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pid) in [("a", 1), ("b", 2)] {
            let vm = dir.path().join(name);
            std::fs::create_dir_all(&vm).unwrap();
            write(&vm, &serde_json::json!({"pid": pid})).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        let mut got: Vec<(String, serde_json::Value)> = all(dir.path());
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], ("b".to_string(), serde_json::json!({"pid": 2})));
        remove(&dir.path().join("a")).unwrap();
        remove(&dir.path().join("a")).unwrap();
        assert!(read::<serde_json::Value>(dir.path(), "a").is_none());
    }

    #[test]
    fn slots_are_the_lowest_free_ones_and_each_is_its_own_slash_30() {
        assert_eq!(free_slot(&[0, 1, 3]), Some(2));
        let subnet = Ipv4Addr::new(10, 250, 0, 0);
        assert_eq!(
            link_addresses(subnet, 2),
            (Ipv4Addr::new(10, 250, 0, 9), Ipv4Addr::new(10, 250, 0, 10))
        );
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let st = start_time(pid).unwrap();
        assert!(alive(pid, st));
        assert!(!alive(pid, st + 1));
    }
}
