//! qcow2 (version 3) writer: 64 KiB clusters, only clusters holding data are stored, every
//! cluster referenced once (refcount 1), so `qemu-img check` finds nothing to repair.

const CLUSTER_BITS: u32 = 16;
const CLUSTER: usize = 1 << CLUSTER_BITS;
/// 64-bit entries per L1/L2 cluster.
const L2_ENTRIES: usize = CLUSTER / 8;
/// 16-bit refcounts per refcount block.
const REFCOUNTS_PER_BLOCK: usize = CLUSTER / 2;
/// "Copied" flag of L1/L2 entries: the cluster's refcount is exactly one.
const COPIED: u64 = 1 << 63;
const HEADER_LEN: u32 = 104;

/// Converts a raw disk into a qcow2 file with the same virtual size.
pub(crate) fn from_raw(raw: &[u8]) -> Vec<u8> {
    let size = raw.len() as u64;
    let guest_clusters = raw.len().div_ceil(CLUSTER);
    let l1_size = guest_clusters.div_ceil(L2_ENTRIES).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
    let chunk = |i: usize| &raw[i * CLUSTER..((i + 1) * CLUSTER).min(raw.len())];
    let used: Vec<bool> = (0..guest_clusters)
        .map(|i| chunk(i).iter().any(|b| *b != 0))
        .collect();
    let data = used.iter().filter(|u| **u).count();
    let l2_used: Vec<bool> = (0..l1_size)
        .map(|t| used[t * L2_ENTRIES..((t + 1) * L2_ENTRIES).min(guest_clusters)].contains(&true))
        .collect();
    let l2_tables = l2_used.iter().filter(|u| **u).count();

    // Refcount blocks cover every cluster, themselves included: iterate to a fixed point.
    let (mut rt_clusters, mut blocks) = (1usize, 1usize);
    let total = loop {
        let total = 1 + l1_clusters + rt_clusters + blocks + l2_tables + data;
        let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let r = (b * 8).div_ceil(CLUSTER);
        if b == blocks && r == rt_clusters {
            break total;
        }
        blocks = b;
        rt_clusters = r;
    };
    let l1_off = CLUSTER;
    let rt_off = l1_off + l1_clusters * CLUSTER;
    let rb_off = rt_off + rt_clusters * CLUSTER;
    let l2_off = rb_off + blocks * CLUSTER;
    let data_off = l2_off + l2_tables * CLUSTER;

    let mut out = vec![0u8; total * CLUSTER];
    let put64 =
        |out: &mut [u8], at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_be_bytes());
    let put32 =
        |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_be_bytes());
    out[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut out, 4, 3);
    put32(&mut out, 20, CLUSTER_BITS);
    put64(&mut out, 24, size);
    put32(&mut out, 36, l1_size as u32);
    put64(&mut out, 40, l1_off as u64);
    put64(&mut out, 48, rt_off as u64);
    put32(&mut out, 56, rt_clusters as u32);
    put32(&mut out, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut out, 100, HEADER_LEN);
    // Bytes 104..112 stay zero: the end-of-extensions marker.

    for b in 0..blocks {
        put64(&mut out, rt_off + 8 * b, (rb_off + b * CLUSTER) as u64);
    }
    for c in 0..total {
        let at = rb_off + 2 * c;
        out[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let mut next_l2 = l2_off;
    let mut next_data = data_off;
    for (t, has) in l2_used.iter().enumerate() {
        if !*has {
            continue;
        }
        put64(&mut out, l1_off + 8 * t, next_l2 as u64 | COPIED);
        let first = t * L2_ENTRIES;
        let last = ((t + 1) * L2_ENTRIES).min(guest_clusters);
        for (i, is_used) in used.iter().enumerate().take(last).skip(first) {
            if !*is_used {
                continue;
            }
            put64(
                &mut out,
                next_l2 + 8 * (i - first),
                next_data as u64 | COPIED,
            );
            let c = chunk(i);
            out[next_data..next_data + c.len()].copy_from_slice(c);
            next_data += CLUSTER;
        }
        next_l2 += CLUSTER;
    }
    out
}

/// Reads a qcow2 file written by [`from_raw`] back into the raw disk (tests, checks).
pub fn to_raw(q: &[u8]) -> Result<Vec<u8>, String> {
    let be64 = |at: usize| -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            q.get(at..at + 8)
                .ok_or("truncated qcow2")?
                .try_into()
                .unwrap(),
        ))
    };
    let be32 = |at: usize| -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            q.get(at..at + 4)
                .ok_or("truncated qcow2")?
                .try_into()
                .unwrap(),
        ))
    };
    if q.get(0..4) != Some(b"QFI\xfb") {
        return Err("no qcow2 magic".into());
    }
    let bits = be32(20)?;
    if bits != CLUSTER_BITS {
        return Err(format!("cluster_bits {bits} not supported"));
    }
    let size = be64(24)? as usize;
    let l1_size = be32(36)? as usize;
    let l1 = be64(40)? as usize;
    let mask = !COPIED & !((1u64 << 62) | (CLUSTER as u64 - 1));
    let mut raw = vec![0u8; size];
    for t in 0..l1_size {
        let l2 = (be64(l1 + 8 * t)? & mask) as usize;
        if l2 == 0 {
            continue;
        }
        for i in 0..L2_ENTRIES {
            let guest = (t * L2_ENTRIES + i) * CLUSTER;
            if guest >= size {
                break;
            }
            let d = (be64(l2 + 8 * i)? & mask) as usize;
            if d == 0 {
                continue;
            }
            let n = CLUSTER.min(size - guest);
            raw[guest..guest + n].copy_from_slice(q.get(d..d + n).ok_or("data outside the file")?);
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_disk_round_trips_and_stores_only_its_data() {
        let mut raw = vec![0u8; 10 << 20];
        raw[5] = 1;
        raw[(7 << 20) + 3] = 2;
        let last = raw.len() - 1;
        raw[last] = 3;
        let q = from_raw(&raw);
        // Header, L1, refcount table, one refcount block, one L2, three data clusters.
        assert_eq!(q.len(), 8 * CLUSTER);
        assert_eq!(to_raw(&q).unwrap(), raw);
        assert_eq!(from_raw(&raw), q);
    }

    #[test]
    fn every_cluster_of_the_file_has_refcount_one() {
        let raw: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let q = from_raw(&raw);
        let rt = u64::from_be_bytes(q[48..56].try_into().unwrap()) as usize;
        let rb = u64::from_be_bytes(q[rt..rt + 8].try_into().unwrap()) as usize;
        let clusters = q.len() / CLUSTER;
        for c in 0..clusters {
            assert_eq!(
                u16::from_be_bytes([q[rb + 2 * c], q[rb + 2 * c + 1]]),
                1,
                "cluster {c}"
            );
        }
        assert_eq!(
            u16::from_be_bytes([q[rb + 2 * clusters], q[rb + 2 * clusters + 1]]),
            0
        );
        assert_eq!(to_raw(&q).unwrap(), raw);
    }
}
