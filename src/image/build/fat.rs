//! FAT file systems written in memory with the `fatfs` crate: the EFI system partition of the
//! image and NoCloud seed disks (label `cidata`) for local VMs.
//!
//! Built without a clock: every timestamp is the FAT epoch (1980-01-01), so the same files
//! give the same bytes.

use std::io::{Cursor, Write};

/// Bytes per cluster of the ESP: 512-byte clusters keep FAT32 (what UEFI expects of an ESP)
/// possible from 33 MiB on.
const ESP_CLUSTER: u32 = 512;
/// Smallest ESP: FAT32 needs at least 65525 clusters.
pub(crate) const MIN_ESP: u64 = 36 << 20;

fn io(e: std::io::Error) -> String {
    e.to_string()
}

/// Writes `files` (path with `/` separators, contents) into `fs`, creating directories.
fn populate<T: fatfs::ReadWriteSeek>(
    fs: &fatfs::FileSystem<T>,
    files: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let root = fs.root_dir();
    for (path, data) in files {
        let mut dir = root.clone();
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let name = parts.pop().ok_or("empty path")?;
        for p in parts {
            dir = match dir.open_dir(p) {
                Ok(d) => d,
                Err(_) => dir.create_dir(p).map_err(io)?,
            };
        }
        let mut f = dir.create_file(name).map_err(io)?;
        f.truncate().map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.flush().map_err(io)?;
    }
    Ok(())
}

/// A FAT32 EFI system partition of `size` bytes holding `files`.
pub(crate) fn esp(
    size: u64,
    volume_id: u32,
    files: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, String> {
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(ESP_CLUSTER)
            .volume_id(volume_id)
            .volume_label(*b"ESP        "),
    )
    .map_err(|e| format!("formatting the ESP: {e}"))?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())
            .map_err(|e| format!("opening the ESP: {e}"))?;
        populate(&fs, files).map_err(|e| format!("writing the ESP: {e}"))?;
        fs.unmount().map_err(io)?;
    }
    Ok(disk.into_inner())
}

/// A NoCloud seed disk: a whole-disk FAT file system labelled `cidata` holding `user-data`,
/// `meta-data` and any other files given.
pub fn nocloud_seed(files: &[(&str, &[u8])]) -> Result<Vec<u8>, String> {
    let size = files.iter().map(|(_, d)| d.len() as u64).sum::<u64>() + (2 << 20);
    let size = size.div_ceil(1 << 20) << 20;
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_id(0x5eed_0001)
            .volume_label(*b"cidata     "),
    )
    .map_err(|e| format!("formatting the seed: {e}"))?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(io)?;
        let owned: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(p, d)| (p.to_string(), d.to_vec()))
            .collect();
        populate(&fs, &owned)?;
        fs.unmount().map_err(io)?;
    }
    Ok(disk.into_inner())
}

/// Reads one file from a FAT image (tests and checks).
pub fn read_file(image: &[u8], path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut disk = Cursor::new(image.to_vec());
    let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(io)?;
    let mut f = fs.root_dir().open_file(path).map_err(io)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(io)?;
    Ok(out)
}

/// The volume label in a FAT boot sector (FAT12/16 or FAT32 layout), trimmed.
pub(crate) fn boot_sector_label(sector: &[u8]) -> Option<String> {
    if sector.len() < 512 || sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    // FAT32 keeps the extended boot signature (0x29) at 66, FAT12/16 at 38.
    let at = if sector[66] == 0x29 && &sector[82..87] == b"FAT32" {
        71
    } else if sector[38] == 0x29 {
        43
    } else {
        return None;
    };
    let label = String::from_utf8_lossy(&sector[at..at + 11])
        .trim_end()
        .to_string();
    Some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_esp_is_fat32_holds_nested_files_and_is_reproducible() {
        let files = vec![
            ("EFI/BOOT/BOOTX64.EFI".to_string(), vec![0x4d, 0x5a, 1, 2]),
            ("loader/entries/a.conf".to_string(), b"title a\n".to_vec()),
        ];
        let a = esp(MIN_ESP, 7, &files).unwrap();
        assert_eq!(a, esp(MIN_ESP, 7, &files).unwrap());
        assert_eq!(&a[82..87], b"FAT32");
        assert_eq!(
            read_file(&a, "EFI/BOOT/BOOTX64.EFI").unwrap(),
            vec![0x4d, 0x5a, 1, 2]
        );
        assert_eq!(boot_sector_label(&a[..512]).as_deref(), Some("ESP"));
    }

    #[test]
    fn a_seed_disk_is_labelled_cidata_and_carries_user_data() {
        let d = nocloud_seed(&[
            ("user-data", b"#cloud-config\n"),
            ("meta-data", b"instance-id: x\n"),
        ])
        .unwrap();
        assert_eq!(boot_sector_label(&d[..512]).as_deref(), Some("cidata"));
        assert_eq!(read_file(&d, "user-data").unwrap(), b"#cloud-config\n");
    }
}
