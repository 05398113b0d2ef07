//! Where a bundle's files go: a gzip-compressed tar archive (`support-bundle`) or a
//! directory (`must-gather`, which copies the directory off the pod).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

/// A destination for the bundle's files (paths relative to the bundle's root, `/`-separated).
pub(crate) trait Sink {
    /// Adds one file.
    fn add(&mut self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Finishes the destination (the archive's trailer, the compressor's flush).
    fn finish(&mut self) -> io::Result<()>;
}

/// A tar archive (gzip-compressed for a support bundle), its entries under one top
/// directory (or at its root when `top` is empty).
pub(crate) struct Tar<W: Write> {
    out: Option<W>,
    top: String,
    mtime: u64,
}

/// A `.tar.gz`.
pub(crate) type TarGz<W> = Tar<GzEncoder<W>>;

impl<W: Write> Tar<GzEncoder<W>> {
    /// A gzip-compressed archive written to `w`, every entry under `top/`, dated `mtime`
    /// (Unix seconds).
    pub(crate) fn new(w: W, top: &str, mtime: u64) -> Self {
        Self::plain(GzEncoder::new(w, Compression::default()), top, mtime)
    }

    /// The underlying writer, once finished.
    pub(crate) fn into_inner(mut self) -> io::Result<W> {
        let gz = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("archive already taken"))?;
        gz.finish()
    }
}

impl<W: Write> Tar<W> {
    /// An uncompressed archive written to `w`.
    pub(crate) fn plain(w: W, top: &str, mtime: u64) -> Self {
        Self {
            out: Some(w),
            top: top.trim_matches('/').to_string(),
            mtime,
        }
    }

    fn name(&self, path: &str) -> String {
        let path = path.trim_start_matches('/');
        if self.top.is_empty() {
            path.to_string()
        } else {
            format!("{}/{}", self.top, path)
        }
    }

    /// Adds a directory entry.
    pub(crate) fn add_dir(&mut self, path: &str) -> io::Result<()> {
        let name = format!("{}/", self.name(path).trim_end_matches('/'));
        let header = ustar_header(&name, 0, self.mtime, Entry::Dir)?;
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("archive finished"))?
            .write_all(&header)
    }
}

impl<W: Write> Sink for Tar<W> {
    fn add(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let name = self.name(path);
        let header = ustar_header(&name, data.len() as u64, self.mtime, Entry::File)?;
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("archive finished"))?;
        out.write_all(&header)?;
        out.write_all(data)?;
        let pad = (512 - data.len() % 512) % 512;
        out.write_all(&[0u8; 512][..pad])
    }

    fn finish(&mut self) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("archive finished"))?;
        // Two zero blocks end a tar archive.
        out.write_all(&[0u8; 1024])?;
        out.flush()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    File,
    Dir,
}

/// The 512-byte ustar header of a regular file (0644) or a directory (0755), owner root.
fn ustar_header(name: &str, size: u64, mtime: u64, entry: Entry) -> io::Result<[u8; 512]> {
    let mut h = [0u8; 512];
    let (prefix, base) = split_name(name)?;
    h[..base.len()].copy_from_slice(base.as_bytes());
    octal(
        &mut h[100..108],
        if entry == Entry::Dir { 0o755 } else { 0o644 },
    );
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[148..156].copy_from_slice(b"        ");
    h[156] = if entry == Entry::Dir { b'5' } else { b'0' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let cks = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(cks.as_bytes());
    Ok(h)
}

/// Splits a path into ustar's prefix (≤ 155 bytes) and name (≤ 100 bytes) at a `/`.
fn split_name(name: &str) -> io::Result<(&str, &str)> {
    if name.len() <= 100 {
        return Ok(("", name));
    }
    let too_long = || io::Error::other(format!("path too long for the archive: {name}"));
    // The rightmost '/' that leaves a name of at most 100 bytes and a prefix of at most 155.
    let mut split = None;
    for (i, _) in name.match_indices('/') {
        if name.len() - i - 1 <= 100 && i <= 155 {
            split = Some(i);
            break;
        }
    }
    let i = split.ok_or_else(too_long)?;
    Ok((&name[..i], &name[i + 1..]))
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

/// Files under a directory (created as needed).
pub(crate) struct Dir {
    root: PathBuf,
}

impl Dir {
    /// Files written under `root`.
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
}

impl Sink for Dir {
    fn add(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let rel = Path::new(path.trim_start_matches('/'));
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(io::Error::other(format!(
                "not a plain relative path: {path}"
            )));
        }
        let p = self.root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, data)
    }

    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A path component made safe: `/`, NUL and leading dots cannot escape the bundle's tree.
pub(crate) fn component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c == '/' || c == '\0' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches('.');
    if trimmed.is_empty() {
        "_".into()
    } else {
        trimmed.chars().take(120).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_is_a_gzip_tar_that_tar_lists_and_extracts() {
        let mut a = TarGz::new(Vec::new(), "bundle-x", 1_700_000_000);
        let long = format!("namespaces/{}/pods/p/c/logs/current.log", "n".repeat(80));
        a.add("manifest.json", b"{}\n").unwrap();
        a.add(&long, b"line\n").unwrap();
        a.add("empty", b"").unwrap();
        a.finish().unwrap();
        let bytes = a.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.tar.gz");
        std::fs::write(&file, &bytes).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&file)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bundle-x/manifest.json")).unwrap(),
            "{}\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bundle-x").join(&long)).unwrap(),
            "line\n"
        );
        assert!(dir.path().join("bundle-x/empty").exists());
    }

    #[test]
    fn directory_sink_refuses_paths_that_leave_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dir::new(dir.path());
        d.add("a/b.txt", b"x").unwrap();
        assert!(d.add("../escape", b"x").is_err());
        assert_eq!(component("../../etc"), "_.._etc");
        assert_eq!(component(""), "_");
    }
}
