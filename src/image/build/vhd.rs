//! Fixed VHD (Virtual Hard Disk Image Format Specification): the raw disk followed by a
//! 512-byte footer. Azure takes fixed VHDs whose virtual size is a whole number of MiB.
//! The one footer writer and reader: the image build writes VHDs with it, the publisher
//! checks what it uploads with it.

/// Size of the footer.
pub(crate) const FOOTER: usize = 512;
/// Disk type of a fixed disk.
const FIXED: u32 = 2;

/// The fields of a footer that matter to readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Creator application (4 ASCII bytes).
    pub(crate) creator_app: [u8; 4],
    /// Size of the disk in bytes (original and current).
    pub size: u64,
    /// Cylinders, heads, sectors per track.
    pub(crate) geometry: (u16, u8, u8),
    /// Disk type (2 = fixed).
    pub(crate) disk_type: u32,
    /// Unique id.
    pub(crate) unique_id: [u8; 16],
    /// Seconds since 2000-01-01.
    pub(crate) timestamp: u32,
}

/// The CHS geometry the specification derives from a size.
pub(crate) fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    total = total.min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The footer checksum: the one's complement of the byte sum with the checksum field zero.
fn checksum(f: &[u8]) -> u32 {
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| *b as u32)
        .fold(0u32, |a, b| a.wrapping_add(b));
    !sum
}

/// Encodes the footer of a fixed disk of `size` bytes.
///
/// The creator is written as `win ` (as Hyper-V writes it): readers such as qemu then take
/// the size from the footer instead of rounding it down to the CHS geometry.
pub fn footer(size: u64, unique_id: [u8; 16], timestamp: u32) -> [u8; FOOTER] {
    let mut f = [0u8; FOOTER];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
    f[24..28].copy_from_slice(&timestamp.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000A_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&FIXED.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Reads and checks a footer: cookie, checksum, version, a fixed disk without data offset.
pub(crate) fn read_footer(f: &[u8; FOOTER]) -> Result<Footer, String> {
    if &f[..8] != b"conectix" {
        return Err("no VHD footer (the last 512 bytes do not start with \"conectix\")".into());
    }
    let be32 = |o: usize| u32::from_be_bytes(f[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(f[o..o + 8].try_into().unwrap());
    if checksum(f) != be32(64) {
        return Err(format!(
            "the footer checksum is wrong (stored {:#010x}, computed {:#010x})",
            be32(64),
            checksum(f)
        ));
    }
    if be32(12) != 0x0001_0000 {
        return Err(format!("unknown VHD version {:#x}", be32(12)));
    }
    let footer = Footer {
        creator_app: f[28..32].try_into().unwrap(),
        size: be64(48),
        geometry: (u16::from_be_bytes([f[56], f[57]]), f[58], f[59]),
        disk_type: be32(60),
        unique_id: f[68..84].try_into().unwrap(),
        timestamp: be32(24),
    };
    if footer.disk_type != FIXED {
        return Err(format!(
            "disk type {} is not 2 (fixed); Azure takes fixed VHDs only",
            footer.disk_type
        ));
    }
    if be64(16) != u64::MAX {
        return Err("a fixed disk has no data offset".into());
    }
    Ok(footer)
}

/// Parses and checks the footer at the end of `file` ([`read_footer`]), and that its size
/// matches the data before it.
pub fn parse_footer(file: &[u8]) -> Result<Footer, String> {
    let Some(data) = file.len().checked_sub(FOOTER) else {
        return Err("file shorter than a VHD footer".into());
    };
    let footer = read_footer(file[data..].try_into().unwrap())?;
    if footer.size != data as u64 {
        return Err(format!(
            "footer size {} differs from the {data} data bytes",
            footer.size
        ));
    }
    Ok(footer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_footer_parses_back_and_checks_its_checksum() {
        let size = 3 << 20;
        let mut file = vec![0u8; size];
        file.extend_from_slice(&footer(size as u64, [9; 16], 42));
        let f = parse_footer(&file).unwrap();
        assert_eq!(f.size, size as u64);
        assert_eq!(f.disk_type, 2);
        assert_eq!(f.unique_id, [9; 16]);
        assert_eq!(f.timestamp, 42);
        let n = file.len();
        file[n - 300] ^= 0xff;
        assert!(parse_footer(&file).unwrap_err().contains("checksum"));
    }

    #[test]
    fn a_generated_footer_reads_back_and_a_damaged_or_dynamic_one_is_refused() {
        let f = footer(64 << 20, [1; 16], 0);
        let parsed = read_footer(&f).unwrap();
        assert_eq!(parsed.size, 64 << 20);
        assert_eq!(parsed.disk_type, 2);
        let mut bad = f;
        bad[100] ^= 1;
        assert!(read_footer(&bad).unwrap_err().contains("checksum"));
        let mut dynamic = f;
        dynamic[60..64].copy_from_slice(&3u32.to_be_bytes());
        let sum = checksum(&dynamic);
        dynamic[64..68].copy_from_slice(&sum.to_be_bytes());
        assert!(read_footer(&dynamic).unwrap_err().contains("fixed"));
    }

    #[test]
    fn the_size_must_match_the_data() {
        let mut file = vec![0u8; 1 << 20];
        file.extend_from_slice(&footer(2 << 20, [0; 16], 0));
        assert!(parse_footer(&file).unwrap_err().contains("differs"));
    }

    #[test]
    fn geometry_follows_the_specification() {
        // 127 MiB: 260096 sectors; 17 spt -> 15299 cylinders*heads, 15 heads, 1019 cylinders.
        assert_eq!(geometry(127 << 20), (1019, 15, 17));
        // Large disks cap at 65535 cylinders, 16 heads, 255 sectors.
        assert_eq!(geometry(1 << 40), (65535, 16, 255));
    }
}
