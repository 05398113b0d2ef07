//! Finding the NoCloud seed: a block device whose FAT or ISO 9660 volume label is `cidata`,
//! mounted read-only at `/media/cidata`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// Where the seed is mounted (the forwarder's default `--seed` lives there).
pub(crate) const MOUNT_POINT: &str = "/media/cidata";

/// File system of a labelled volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fs {
    /// FAT (`vfat`).
    Vfat,
    /// ISO 9660 (`iso9660`).
    Iso9660,
}

impl Fs {
    fn kind(self) -> &'static str {
        match self {
            Fs::Vfat => "vfat",
            Fs::Iso9660 => "iso9660",
        }
    }
}

/// The ISO 9660 volume identifier in the primary volume descriptor (sector 16).
pub(crate) fn iso_label(pvd: &[u8]) -> Option<String> {
    if pvd.len() < 72 || pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    Some(String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string())
}

/// The label and file system of the volume on `dev`, if it has one we know.
pub(crate) fn label(dev: &Path) -> Option<(String, Fs)> {
    let mut f = std::fs::File::open(dev).ok()?;
    let mut boot = vec![0u8; 512];
    f.read_exact(&mut boot).ok()?;
    if let Some(l) = crate::image::build::fat::boot_sector_label(&boot) {
        return Some((l, Fs::Vfat));
    }
    let mut pvd = vec![0u8; 2048];
    f.seek(SeekFrom::Start(16 * 2048)).ok()?;
    f.read_exact(&mut pvd).ok()?;
    iso_label(&pvd).map(|l| (l, Fs::Iso9660))
}

/// Looks for a `cidata` volume among the block devices and mounts it; returns the device.
pub(crate) fn find_and_mount() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .collect();
    names.sort();
    for n in names {
        let dev = format!("/dev/{n}");
        let Some((l, fs)) = label(Path::new(&dev)) else {
            continue;
        };
        if !l.eq_ignore_ascii_case("cidata") {
            continue;
        }
        let _ = std::fs::create_dir_all(MOUNT_POINT);
        match mount(
            Some(dev.as_str()),
            MOUNT_POINT,
            Some(fs.kind()),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            Ok(()) => return Some(dev),
            Err(e) => super::log(&format!("mounting the seed {dev} ({}): {e}", fs.kind())),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_labels_are_read_from_fat_and_iso_volumes() {
        let disk = crate::image::build::fat::nocloud_seed(&[("user-data", b"x")]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seed.img");
        std::fs::write(&p, &disk).unwrap();
        assert_eq!(label(&p), Some(("cidata".into(), Fs::Vfat)));

        let mut iso = vec![0u8; 17 * 2048];
        let pvd = &mut iso[16 * 2048..];
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[40..72].copy_from_slice(format!("{:<32}", "CIDATA").as_bytes());
        let q = dir.path().join("seed.iso");
        std::fs::write(&q, &iso).unwrap();
        assert_eq!(label(&q), Some(("CIDATA".into(), Fs::Iso9660)));
        std::fs::write(&q, vec![0u8; 40000]).unwrap();
        assert_eq!(label(&q), None);
    }
}
