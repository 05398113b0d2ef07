//! What Azure needs of an uploaded disk: a fixed VHD (raw data plus a 512-byte footer,
//! read with [`vhd`]) whose virtual size is a whole number of MiB, and the plan of which
//! byte ranges to send (the non-zero ones: a page blob reads zeros wherever nothing was
//! written).

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use crate::image::build::vhd;

/// The page size of page blobs; every write is aligned to it.
pub(crate) const PAGE: u64 = 512;
/// The largest Put Page body.
pub(crate) const MAX_PUT: u64 = 4 << 20;
/// Zero gaps shorter than this between two non-zero runs are sent rather than skipped:
/// one request for 64 KiB of zeros costs less than a second round trip.
pub(crate) const MERGE_GAP: u64 = 64 << 10;
/// Azure's alignment of a VHD's virtual size.
pub(crate) const MIB: u64 = 1 << 20;

/// Problems with the VHD file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VhdError {
    /// Reading it failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not something Azure accepts.
    #[error("{path} is not an Azure-ready fixed VHD: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// What the scan of a VHD found.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// File size (virtual size + footer), the page blob's size.
    pub(crate) size: u64,
    /// Ranges to write, page-aligned, each at most [`MAX_PUT`], in order.
    pub(crate) ranges: Vec<Range<u64>>,
    /// SHA-256 of the whole file, hex: identifies the content of a half-uploaded blob.
    pub(crate) sha256: String,
}

impl Plan {
    /// Bytes the ranges cover.
    pub(crate) fn data_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// Reads `path` once: checks it is an Azure-ready fixed VHD, finds its non-zero pages and
/// hashes it.
pub(crate) fn scan(path: &Path) -> Result<Plan, VhdError> {
    let p = path.display().to_string();
    let io = |source| VhdError::Io {
        path: p.clone(),
        source,
    };
    let invalid = |reason: String| VhdError::Invalid {
        path: p.clone(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size < PAGE * 2 || !size.is_multiple_of(PAGE) {
        return Err(invalid(format!(
            "its size {size} is not a multiple of 512 bytes (a fixed VHD is 512-byte sectors plus a 512-byte footer)"
        )));
    }
    let mut tail = [0u8; 512];
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut tail, size - PAGE).map_err(io)?;
    }
    let footer = vhd::read_footer(&tail).map_err(invalid)?;
    if footer.size + PAGE != size {
        return Err(invalid(format!(
            "the footer says {} bytes of data but the file holds {}",
            footer.size,
            size - PAGE
        )));
    }
    if !footer.size.is_multiple_of(MIB) {
        return Err(invalid(format!(
            "its virtual size {} is not a whole number of MiB, which Azure requires",
            footer.size
        )));
    }
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        for (i, page) in buf[..n].chunks(PAGE as usize).enumerate() {
            if page.iter().any(|b| *b != 0) {
                let start = offset + i as u64 * PAGE;
                match runs.last_mut() {
                    Some(r) if r.end == start => r.end = start + PAGE,
                    _ => runs.push(start..start + PAGE),
                }
            }
        }
        offset += n as u64;
    }
    let sha256 = hasher
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Plan {
        size,
        ranges: split(merge(runs, MERGE_GAP), MAX_PUT),
        sha256,
    })
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Joins runs separated by less than `gap` bytes.
pub(crate) fn merge(runs: Vec<Range<u64>>, gap: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(last) if r.start.saturating_sub(last.end) < gap => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Cuts ranges into pieces of at most `max` bytes.
pub(crate) fn split(ranges: Vec<Range<u64>>, max: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            let e = (s + max).min(r.end);
            out.push(s..e);
            s = e;
        }
    }
    out
}

/// The planned ranges that `present` (the blob's page ranges, any order) does not fully cover.
pub(crate) fn missing(planned: &[Range<u64>], present: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut have: Vec<Range<u64>> = present.to_vec();
    have.sort_by_key(|r| r.start);
    let have = merge(have, 1);
    planned
        .iter()
        .filter(|p| !have.iter().any(|h| h.start <= p.start && p.end <= h.end))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_vhd(dir: &Path, data: &[u8]) -> std::path::PathBuf {
        let p = dir.join("d.vhd");
        let mut all = data.to_vec();
        all.extend_from_slice(&vhd::footer(data.len() as u64, [7; 16], 0));
        std::fs::write(&p, all).unwrap();
        p
    }

    #[test]
    fn the_plan_covers_exactly_the_non_zero_pages_with_small_gaps_merged() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 2 * MIB as usize];
        data[0] = 1; // page 0
        data[1024] = 1; // page 2: gap of one page, merged
        data[MIB as usize + 5] = 9; // far away: its own range
        let p = write_vhd(dir.path(), &data);
        let plan = scan(&p).unwrap();
        let size = 2 * MIB + PAGE;
        assert_eq!(plan.size, size);
        assert_eq!(
            plan.ranges,
            vec![0..1536, MIB..MIB + 512, 2 * MIB..2 * MIB + 512]
        );
        assert_eq!(plan.sha256.len(), 64);
    }

    #[test]
    fn large_runs_are_split_at_four_mib() {
        assert_eq!(
            split(std::iter::once(0..(9 << 20)).collect(), MAX_PUT),
            vec![0..(4 << 20), (4 << 20)..(8 << 20), (8 << 20)..(9 << 20)]
        );
    }

    #[test]
    fn missing_ranges_are_those_not_fully_covered() {
        let planned = vec![0..512, 1024..2048, 4096..8192];
        // Adjacent present ranges count as one.
        let present = vec![4096..6144, 6144..8192, 0..512, 1024..1536];
        assert_eq!(missing(&planned, &present), vec![1024..2048]);
    }

    #[test]
    fn files_azure_would_refuse_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.vhd");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        assert!(
            scan(&p)
                .unwrap_err()
                .to_string()
                .contains("multiple of 512")
        );
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(scan(&p).unwrap_err().to_string().contains("conectix"));
        let p = write_vhd(dir.path(), &vec![0u8; 3 * 512]);
        assert!(scan(&p).unwrap_err().to_string().contains("MiB"));
    }
}
