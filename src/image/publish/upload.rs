//! The VHD upload: a page blob of the file's size, its non-zero ranges written with bounded
//! concurrency, resumable (a blob that already holds this content, by its recorded SHA-256,
//! is asked for its page ranges and only what is missing is sent), progress on stderr.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::blob::{BlobClient, BlobError};
use super::pages::Plan;

/// Metadata key of the content hash on the blob.
pub(crate) const META_SHA256: &str = "sandboxdsha256";
/// Metadata key marking a blob sandboxd created.
pub(crate) const META_CREATED_BY: &str = "createdby";

/// What an upload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Report {
    /// Bytes sent in this run.
    pub(crate) sent_bytes: u64,
    /// Put Page requests in this run.
    pub(crate) sent_ranges: usize,
    /// Bytes that an earlier run had already written.
    pub(crate) present_bytes: u64,
    /// Zero bytes never sent.
    pub(crate) skipped_zero_bytes: u64,
    /// Whether an earlier partial upload was resumed.
    pub(crate) resumed: bool,
}

/// Upload failures.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// The Blob service refused or failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// Reading the file failed.
    #[error("reading the VHD: {0}")]
    Io(#[from] std::io::Error),
}

/// Uploads `file` (scanned as `plan`) to `container/blob`.
pub(crate) async fn upload(
    client: &BlobClient,
    container: &str,
    blob: &str,
    file: &Path,
    plan: &Plan,
    concurrency: usize,
) -> Result<Report, UploadError> {
    let mut todo: Vec<Range<u64>> = plan.ranges.clone();
    let mut resumed = false;
    match client.properties(container, blob).await? {
        Some(p)
            if p.blob_type.eq_ignore_ascii_case("PageBlob")
                && p.length == plan.size
                && p.metadata.get(META_SHA256) == Some(&plan.sha256) =>
        {
            let present = client.page_ranges(container, blob).await?;
            todo = super::pages::missing(&plan.ranges, &present);
            resumed = true;
            tracing::info!(
                blob,
                missing_ranges = todo.len(),
                planned_ranges = plan.ranges.len(),
                "resuming the upload of a blob holding this VHD"
            );
        }
        existing => {
            if existing.is_some() {
                tracing::warn!(
                    blob,
                    "a blob of that name holds other content; replacing it"
                );
            }
            let mut meta = BTreeMap::new();
            meta.insert(META_SHA256.to_string(), plan.sha256.clone());
            meta.insert(META_CREATED_BY.to_string(), "sandboxd".to_string());
            client
                .create_page_blob(container, blob, plan.size, &meta)
                .await?;
        }
    }
    let total: u64 = todo.iter().map(|r| r.end - r.start).sum();
    let present_bytes = plan.data_bytes() - total;
    let sent = Arc::new(AtomicU64::new(0));
    let progress = tokio::spawn(report_progress(sent.clone(), total, present_bytes));
    let file = Arc::new(std::fs::File::open(file)?);
    let count = todo.len();
    let mut stream = futures::stream::iter(todo.into_iter().map(|r| {
        let file = file.clone();
        let sent = sent.clone();
        async move {
            let data = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                file.read_exact_at(&mut buf, r.start).map(|_| (r, buf))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            let (r, buf) = data;
            let len = buf.len() as u64;
            client
                .put_page(container, blob, r.start, bytes::Bytes::from(buf))
                .await?;
            sent.fetch_add(len, Ordering::Relaxed);
            Ok::<(), UploadError>(())
        }
    }))
    .buffer_unordered(concurrency.max(1));
    let mut result = Ok(());
    while let Some(r) = stream.next().await {
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    drop(stream);
    progress.abort();
    result?;
    let sent_bytes = sent.load(Ordering::Relaxed);
    Ok(Report {
        sent_bytes,
        sent_ranges: count,
        present_bytes,
        skipped_zero_bytes: plan.size - plan.data_bytes(),
        resumed,
    })
}

async fn report_progress(sent: Arc<AtomicU64>, total: u64, present: u64) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let done = sent.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", (total - done.min(total)) as f64 / rate)
        } else {
            "?".into()
        };
        eprintln!(
            "upload: {:.1} of {:.1} MiB ({:.1} MiB/s, ETA {eta}){}",
            mib(done),
            mib(total),
            rate / (1u64 << 20) as f64,
            if present > 0 {
                format!(", {:.1} MiB were already there", mib(present))
            } else {
                String::new()
            }
        );
    }
}

/// Bytes as MiB.
pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}
