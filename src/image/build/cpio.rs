//! The initramfs archive: "newc" cpio (`070701`), as the kernel unpacks it.
//!
//! Entries are written in the order given with inode numbers counted from 1, uid/gid 0 and
//! mtime 0, so the same entries give the same bytes.

/// File type and permission bits of an entry.
pub(crate) mod mode {
    /// Directory.
    pub(crate) const DIR: u32 = 0o040000;
    /// Regular file.
    pub(crate) const FILE: u32 = 0o100000;
    /// Character device.
    pub(crate) const CHAR: u32 = 0o020000;
    /// Symbolic link.
    pub(crate) const SYMLINK: u32 = 0o120000;
}

/// One archive member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Path without a leading `/` (`init`, `lib/modules/vxlan.ko`).
    pub(crate) path: String,
    /// Type and permission bits (`mode::FILE | 0o755`).
    pub(crate) mode: u32,
    /// Device number (major, minor) of a device node.
    pub(crate) rdev: (u32, u32),
    /// File contents, or the target of a symbolic link.
    pub(crate) data: Vec<u8>,
}

impl Entry {
    /// A directory.
    pub(crate) fn dir(path: &str) -> Self {
        Self {
            path: path.into(),
            mode: mode::DIR | 0o755,
            rdev: (0, 0),
            data: Vec::new(),
        }
    }

    /// A regular file with permission bits `perm`.
    pub(crate) fn file(path: &str, perm: u32, data: Vec<u8>) -> Self {
        Self {
            path: path.into(),
            mode: mode::FILE | perm,
            rdev: (0, 0),
            data,
        }
    }

    /// A symbolic link to `target`.
    pub(crate) fn symlink(path: &str, target: &str) -> Self {
        Self {
            path: path.into(),
            mode: mode::SYMLINK | 0o777,
            rdev: (0, 0),
            data: target.as_bytes().to_vec(),
        }
    }

    /// A character device node.
    pub(crate) fn char_dev(path: &str, perm: u32, major: u32, minor: u32) -> Self {
        Self {
            path: path.into(),
            mode: mode::CHAR | perm,
            rdev: (major, minor),
            data: Vec::new(),
        }
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, e: &Entry) {
    let nlink = if e.mode & 0o170000 == mode::DIR { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        e.data.len() as u32,
        0, // devmajor
        0, // devminor
        e.rdev.0,
        e.rdev.1,
        e.path.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(e.path.as_bytes());
    out.push(0);
    pad4(out);
}

/// Writes `entries` followed by the `TRAILER!!!` record.
pub(crate) fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.data.len() + 128).sum());
    for (i, e) in entries.iter().enumerate() {
        header(&mut out, i as u32 + 1, e);
        out.extend_from_slice(&e.data);
        pad4(&mut out);
    }
    header(
        &mut out,
        0,
        &Entry {
            path: "TRAILER!!!".into(),
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        },
    );
    out
}

/// Reads an archive back (tests): the entries before the trailer.
#[cfg(test)]
pub(crate) fn read(mut buf: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        if buf.len() < 110 || &buf[..6] != b"070701" {
            return Err(format!("no newc header at offset {offset}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| e.to_string())
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        if namesize == 0 || buf.len() < name_end {
            return Err(format!("truncated name at offset {offset}"));
        }
        let path = String::from_utf8(buf[110..name_end - 1].to_vec()).map_err(|e| e.to_string())?;
        let data_start = name_end.div_ceil(4) * 4;
        let data_end = data_start + size;
        if buf.len() < data_end {
            return Err(format!("truncated data of {path}"));
        }
        if path == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(Entry {
            path,
            mode,
            rdev,
            data: buf[data_start..data_end].to_vec(),
        });
        let next = data_end.div_ceil(4) * 4;
        offset += next.min(buf.len());
        buf = &buf[next.min(buf.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_reads_back_with_types_modes_and_contents() {
        let entries = vec![
            Entry::dir("dev"),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::file("init", 0o755, b"\x7fELF-static".to_vec()),
            Entry::file("etc/x", 0o644, vec![1, 2, 3]),
        ];
        let bytes = write(&entries);
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(read(&bytes).unwrap(), entries);
    }

    #[test]
    fn the_same_entries_give_the_same_bytes_and_headers_are_newc() {
        let e = vec![Entry::file("a", 0o644, b"hello".to_vec())];
        assert_eq!(write(&e), write(&e));
        let b = write(&e);
        // ino 1, mode 0100644, namesize 2 ("a\0"), size 5.
        assert_eq!(&b[6..14], b"00000001");
        assert_eq!(&b[14..22], b"000081A4");
        assert_eq!(&b[54..62], b"00000005");
        assert_eq!(&b[94..102], b"00000002");
        // Name padded so the data starts 4-aligned: 110 + 2 -> 112.
        assert_eq!(&b[112..117], b"hello");
        assert!(read(&b[..50]).is_err());
    }
}
