//! GUID partition table (UEFI spec, chapter 5): protective MBR, primary and backup headers
//! and entry arrays around the partitions.

/// Sector size of the image.
pub(crate) const SECTOR: u64 = 512;
/// Partition entries in each array (the minimum the spec requires room for).
const ENTRIES: u64 = 128;
/// Size of one entry.
const ENTRY_SIZE: u64 = 128;
/// Sectors taken by one entry array.
const ARRAY_SECTORS: u64 = ENTRIES * ENTRY_SIZE / SECTOR;

/// A GUID in its on-disk byte order (first three fields little-endian).
pub(crate) type Guid = [u8; 16];

/// Type GUID of an EFI system partition, C12A7328-F81F-11D2-BA4B-00A0C93EC93B.
pub const ESP_TYPE: Guid = guid(
    0xC12A7328,
    0xF81F,
    0x11D2,
    [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
);

/// Builds a GUID from its textual fields.
pub(crate) const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// A random-looking (version 4, RFC 4122 variant) GUID taken from 16 bytes of a digest, so
/// the same inputs give the same disk.
pub(crate) fn guid_from_digest(bytes: &[u8]) -> Guid {
    let mut g: Guid = bytes[..16].try_into().expect("16 bytes");
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// Formats a GUID in its textual form.
#[cfg(test)]
pub(crate) fn guid_string(g: &Guid) -> String {
    let a = u32::from_le_bytes(g[0..4].try_into().unwrap());
    let b = u16::from_le_bytes(g[4..6].try_into().unwrap());
    let c = u16::from_le_bytes(g[6..8].try_into().unwrap());
    let d: String = g[8..10].iter().map(|x| format!("{x:02X}")).collect();
    let e: String = g[10..16].iter().map(|x| format!("{x:02X}")).collect();
    format!("{a:08X}-{b:04X}-{c:04X}-{d}-{e}")
}

/// One partition to place on the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Type GUID.
    pub type_guid: Guid,
    /// Unique GUID.
    pub(crate) guid: Guid,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
    /// Name (UTF-16 on disk, at most 36 code units).
    pub(crate) name: String,
}

/// A parsed table (see [`parse`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The disk GUID.
    pub(crate) disk_guid: Guid,
    /// First usable sector.
    pub(crate) first_usable: u64,
    /// Last usable sector.
    pub(crate) last_usable: u64,
    /// Used entries.
    pub partitions: Vec<Partition>,
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn entry_array(parts: &[Partition]) -> Vec<u8> {
    let mut a = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    for (i, p) in parts.iter().enumerate() {
        let o = i * ENTRY_SIZE as usize;
        put(&mut a, o, &p.type_guid);
        put(&mut a, o + 16, &p.guid);
        put(&mut a, o + 32, &p.first_lba.to_le_bytes());
        put(&mut a, o + 40, &p.last_lba.to_le_bytes());
        for (j, u) in p.name.encode_utf16().take(36).enumerate() {
            put(&mut a, o + 56 + 2 * j, &u.to_le_bytes());
        }
    }
    a
}

#[allow(clippy::too_many_arguments)]
fn header(
    my_lba: u64,
    alt_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: &Guid,
    entries_lba: u64,
    entries_crc: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR as usize];
    put(&mut h, 0, b"EFI PART");
    put(&mut h, 8, &0x0001_0000u32.to_le_bytes());
    put(&mut h, 12, &92u32.to_le_bytes());
    put(&mut h, 24, &my_lba.to_le_bytes());
    put(&mut h, 32, &alt_lba.to_le_bytes());
    put(&mut h, 40, &first_usable.to_le_bytes());
    put(&mut h, 48, &last_usable.to_le_bytes());
    put(&mut h, 56, disk_guid);
    put(&mut h, 72, &entries_lba.to_le_bytes());
    put(&mut h, 80, &(ENTRIES as u32).to_le_bytes());
    put(&mut h, 84, &(ENTRY_SIZE as u32).to_le_bytes());
    put(&mut h, 88, &entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..92]);
    put(&mut h, 16, &crc.to_le_bytes());
    h
}

/// The first and last usable sector of a disk of `sectors` sectors.
pub(crate) fn usable(sectors: u64) -> (u64, u64) {
    (2 + ARRAY_SECTORS, sectors - 2 - ARRAY_SECTORS)
}

/// Writes the protective MBR, both headers and both entry arrays into `disk` (whose length,
/// a multiple of 512, is the disk size); partition contents are the caller's.
pub(crate) fn write_table(disk: &mut [u8], disk_guid: &Guid, parts: &[Partition]) {
    let sectors = disk.len() as u64 / SECTOR;
    let (first, last) = usable(sectors);
    // Protective MBR: one partition of type 0xEE covering the disk.
    let mbr = &mut disk[..SECTOR as usize];
    mbr.fill(0);
    let size = (sectors - 1).min(u32::MAX as u64) as u32;
    put(mbr, 446, &[0x00, 0x00, 0x02, 0x00, 0xEE, 0xFF, 0xFF, 0xFF]);
    put(mbr, 454, &1u32.to_le_bytes());
    put(mbr, 458, &size.to_le_bytes());
    put(mbr, 510, &[0x55, 0xAA]);

    let array = entry_array(parts);
    let crc = crc32fast::hash(&array);
    let primary = header(1, sectors - 1, first, last, disk_guid, 2, crc);
    let backup_array_lba = sectors - 1 - ARRAY_SECTORS;
    let backup = header(
        sectors - 1,
        1,
        first,
        last,
        disk_guid,
        backup_array_lba,
        crc,
    );
    let s = SECTOR as usize;
    put(disk, s, &primary);
    put(disk, 2 * s, &array);
    put(disk, backup_array_lba as usize * s, &array);
    put(disk, (sectors - 1) as usize * s, &backup);
}

fn read_header(disk: &[u8], lba: u64) -> Result<(u64, Table, u64, u32), String> {
    let s = SECTOR as usize;
    let at = lba as usize * s;
    let h = disk
        .get(at..at + s)
        .ok_or("disk too small for a GPT header")?;
    if &h[..8] != b"EFI PART" {
        return Err(format!("no GPT signature at LBA {lba}"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
    let size = u32_at(12) as usize;
    let mut copy = h[..size].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != u32_at(16) {
        return Err(format!("GPT header CRC mismatch at LBA {lba}"));
    }
    if u64_at(24) != lba {
        return Err(format!(
            "GPT header at LBA {lba} names itself LBA {}",
            u64_at(24)
        ));
    }
    let table = Table {
        disk_guid: h[56..72].try_into().unwrap(),
        first_usable: u64_at(40),
        last_usable: u64_at(48),
        partitions: Vec::new(),
    };
    Ok((u64_at(32), table, u64_at(72), u32_at(88)))
}

/// Parses and checks a disk's table: protective MBR, both headers' CRCs, both arrays' CRCs,
/// that primary and backup agree, and that partitions lie in the usable range.
pub fn parse(disk: &[u8]) -> Result<Table, String> {
    if disk.len() < 1024 || disk[510..512] != [0x55, 0xAA] || disk[450] != 0xEE {
        return Err("no protective MBR".into());
    }
    let (alt, mut table, arr_lba, arr_crc) = read_header(disk, 1)?;
    let (_, backup, barr_lba, barr_crc) = read_header(disk, alt)?;
    if alt != disk.len() as u64 / SECTOR - 1 {
        return Err("the backup header is not on the last sector".into());
    }
    if backup != table || barr_crc != arr_crc {
        return Err("primary and backup GPT headers differ".into());
    }
    let s = SECTOR as usize;
    let len = (ENTRIES * ENTRY_SIZE) as usize;
    for (lba, crc) in [(arr_lba, arr_crc), (barr_lba, barr_crc)] {
        let a = disk
            .get(lba as usize * s..lba as usize * s + len)
            .ok_or("entry array outside the disk")?;
        if crc32fast::hash(a) != crc {
            return Err(format!("entry array CRC mismatch at LBA {lba}"));
        }
    }
    let a = &disk[arr_lba as usize * s..arr_lba as usize * s + len];
    for e in a.chunks(ENTRY_SIZE as usize) {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        let p = Partition {
            type_guid: e[..16].try_into().unwrap(),
            guid: e[16..32].try_into().unwrap(),
            first_lba: u64::from_le_bytes(e[32..40].try_into().unwrap()),
            last_lba: u64::from_le_bytes(e[40..48].try_into().unwrap()),
            name: String::from_utf16_lossy(&units),
        };
        if p.first_lba < table.first_usable
            || p.last_lba > table.last_usable
            || p.first_lba > p.last_lba
        {
            return Err(format!(
                "partition {:?} lies outside the usable sectors",
                p.name
            ));
        }
        table.partitions.push(p);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> (Vec<u8>, Partition) {
        let mut d = vec![0u8; 4 << 20];
        let p = Partition {
            type_guid: ESP_TYPE,
            guid: guid_from_digest(&[7u8; 32]),
            first_lba: 2048,
            last_lba: 2048 + 2048 - 1,
            name: "EFI system partition".into(),
        };
        write_table(
            &mut d,
            &guid_from_digest(&[1u8; 32]),
            std::slice::from_ref(&p),
        );
        (d, p)
    }

    #[test]
    fn a_written_table_parses_back_with_valid_crcs_and_backup() {
        let (d, p) = disk();
        let t = parse(&d).unwrap();
        assert_eq!(t.partitions, vec![p]);
        assert_eq!(t.first_usable, 34);
        assert_eq!(t.last_usable, (4 << 20) / 512 - 34);
        assert_eq!(
            guid_string(&ESP_TYPE),
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );
        let g = guid_string(&t.disk_guid);
        assert_eq!(&g[14..15], "4", "version 4: {g}");
    }

    #[test]
    fn a_corrupted_header_or_array_is_refused() {
        let (mut d, _) = disk();
        d[512 + 60] ^= 1;
        assert!(parse(&d).unwrap_err().contains("CRC"));
        let (mut d, _) = disk();
        d[2 * 512 + 40] ^= 1;
        assert!(parse(&d).unwrap_err().contains("entry array"));
        let (mut d, _) = disk();
        let n = d.len();
        d[n - 512] = 0;
        assert!(parse(&d).is_err());
    }
}
