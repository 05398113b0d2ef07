//! Kernel modules for the initramfs: find the requested modules in a kernel's module tree,
//! add what each `depends=` on (read from the `.modinfo` ELF section, so no `modules.dep`
//! is needed), and order them so dependencies load first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules a pod VM needs: Hyper-V (Azure) and virtio (qemu) storage and network, the
/// VXLAN tunnel, file systems of seed disks, and the ACPI power button.
pub const DEFAULT: &[&str] = &[
    "hv_vmbus",
    "hv_utils",
    "hv_storvsc",
    "hv_netvsc",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "vxlan",
    "vfat",
    "isofs",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "nls_utf8",
    "button",
    "evdev",
    // Container roots (overlayfs over image layers).
    "overlay",
];

/// A module chosen for the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Name with `_` (as `depends=` spells it).
    pub name: String,
    /// Its `.ko` file.
    pub(crate) path: PathBuf,
    /// The modules it depends on (not built in).
    pub(crate) depends: Vec<String>,
}

/// Canonical module name of a file name: `virtio-net.ko` → `virtio_net`.
pub fn name_of(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// The `.modinfo` section of an ELF64 little-endian object.
pub(crate) fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF object".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| -> Option<usize> {
        Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize)
    };
    let u64_at = |o: usize| -> Option<usize> {
        Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize)
    };
    let bad = || "malformed ELF section table".to_string();
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let shentsize = u16_at(0x3A);
    let shnum = u16_at(0x3C);
    let shstrndx = u16_at(0x3E);
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff + i * shentsize;
        Some((u32_at(h)?, u64_at(h + 24)?, u64_at(h + 32)?))
    };
    let (_, stroff, strsize) = section(shstrndx).ok_or_else(bad)?;
    let strtab = elf.get(stroff..stroff + strsize).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name, off, size) = section(i).ok_or_else(bad)?;
        let n = strtab.get(name..).ok_or_else(bad)?;
        let n = &n[..n.iter().position(|b| *b == 0).unwrap_or(n.len())];
        if n == b".modinfo" {
            let data = elf.get(off..off + size).ok_or_else(bad)?;
            return Ok(data
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let s = std::str::from_utf8(kv).ok()?;
                    let (k, v) = s.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    Err("no .modinfo section".into())
}

fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if e.file_type()?.is_dir() {
            walk(&p, out)?;
        } else if let Some(n) = e.file_name().to_str().and_then(name_of) {
            out.entry(n).or_insert(p);
        }
    }
    Ok(())
}

/// Resolves `wanted` in the module tree `dir` (`/lib/modules/<version>`): every module with
/// its dependencies, dependencies first. Modules built into the kernel (`modules.builtin`)
/// are left out; a name that is neither is an error.
pub fn resolve(dir: &Path, wanted: &[String]) -> Result<Vec<Module>, String> {
    let mut index = BTreeMap::new();
    walk(dir, &mut index).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(name_of))
        .collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut visiting = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), String> {
        let name = name.replace('-', "_");
        if done.contains(&name) || builtin.contains(&name) {
            return Ok(());
        }
        if !visiting.insert(name.clone()) {
            return Err(format!("module dependency cycle through {name}"));
        }
        let path = index
            .get(&name)
            .ok_or_else(|| format!("kernel module {name} is neither a module nor built in"))?;
        let fname = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        if !fname.ends_with(".ko") {
            return Err(format!(
                "module {name} is compressed ({fname}); unpack the kernel's modules first"
            ));
        }
        let elf = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let info = modinfo(&elf).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut depends = Vec::new();
        for (k, v) in &info {
            if k == "depends" {
                for d in v.split(',').filter(|d| !d.is_empty()) {
                    visit(d, index, builtin, done, visiting, order)?;
                    let d = d.replace('-', "_");
                    if !builtin.contains(&d) {
                        depends.push(d);
                    }
                }
            }
        }
        visiting.remove(&name);
        done.insert(name.clone());
        order.push(Module {
            name,
            path: path.clone(),
            depends,
        });
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &builtin, &mut done, &mut visiting, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 object with a `.modinfo` section.
    pub(crate) fn fake_ko(info: &str) -> Vec<u8> {
        let strtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let modinfo = info.replace(';', "\0").into_bytes();
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let str_off = elf.len();
        elf.extend_from_slice(&strtab);
        let mi_off = elf.len();
        elf.extend_from_slice(&modinfo);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3E..0x40].copy_from_slice(&2u16.to_le_bytes());
        let sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        elf.extend(sh(0, 0, 0));
        elf.extend(sh(1, mi_off, modinfo.len()));
        elf.extend(sh(10, str_off, strtab.len()));
        elf
    }

    #[test]
    fn dependencies_load_first_and_builtins_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(
            k.join("vxlan.ko"),
            fake_ko("name=vxlan;depends=udp_tunnel,ip6_udp_tunnel"),
        )
        .unwrap();
        std::fs::write(k.join("udp_tunnel.ko"), fake_ko("depends=")).unwrap();
        std::fs::write(k.join("ip6_udp_tunnel.ko"), fake_ko("depends=udp_tunnel")).unwrap();
        std::fs::write(k.join("virtio-net.ko"), fake_ko("depends=net_failover")).unwrap();
        std::fs::write(k.join("net_failover.ko"), fake_ko("depends=failover")).unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/net/core/failover.ko\n",
        )
        .unwrap();
        let got = resolve(dir.path(), &["vxlan".into(), "virtio_net".into()]).unwrap();
        let names: Vec<_> = got.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "udp_tunnel",
                "ip6_udp_tunnel",
                "vxlan",
                "net_failover",
                "virtio_net"
            ]
        );
        let e = resolve(dir.path(), &["nope".into()]).unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn modinfo_is_read_from_the_elf_section() {
        let info = modinfo(&fake_ko("license=GPL;depends=a,b;vermagic=6.1")).unwrap();
        assert!(info.contains(&("depends".into(), "a,b".into())));
        assert!(modinfo(b"not an elf").is_err());
    }
}
