//! The periodic sweep: VMs carrying this cluster's and node's tags that no PeerPod
//! references are deleted once they stayed unreferenced for the grace period.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Caa;
use super::state;

/// One sweep; `seen` remembers since when each unreferenced VM was seen. Returns the VMs
/// deleted.
pub(crate) async fn sweep_once(
    caa: &Caa,
    grace: Duration,
    seen: &mut HashMap<String, Instant>,
) -> Vec<String> {
    let vms = match caa.provider.list_owned(&caa.owner_tags()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "sweep: listing VMs failed");
            return Vec::new();
        }
    };
    let peerpods = match state::of_node(&caa.client, &caa.args.node_name).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "sweep: listing PeerPods failed");
            return Vec::new();
        }
    };
    // Records being deleted lost their pod (the garbage collector deletes them with it)
    // without a StopVM reaching this CAA, or a StopVM marked them and was cut short: their
    // VMs go now, then the records. Those a call or a background write of this CAA is
    // finishing are left to it.
    for p in peerpods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
    {
        let r = state::Record::from_peerpod(p);
        if caa.handling(&r) {
            continue;
        }
        if let Err(e) = caa.forget(&r).await {
            tracing::warn!(vm = %r.vm_name, error = %e, "sweep: deleting the VM of a deleted PeerPod failed");
        }
    }
    let records: HashSet<String> = peerpods.into_iter().map(|p| p.spec.vm_name).collect();
    let now = Instant::now();
    let mut deleted = Vec::new();
    let unreferenced: HashSet<String> = vms
        .into_iter()
        .map(|v| v.name)
        .filter(|n| !records.contains(n))
        .collect();
    seen.retain(|n, _| unreferenced.contains(n));
    for name in unreferenced {
        let since = *seen.entry(name.clone()).or_insert(now);
        if now.duration_since(since) >= grace {
            match caa.provider.delete(&name).await {
                Ok(()) => {
                    tracing::info!(vm = %name, "sweep: deleted a VM no PeerPod references");
                    seen.remove(&name);
                    deleted.push(name);
                }
                Err(e) => tracing::warn!(vm = %name, error = %e, "sweep: delete failed"),
            }
        }
    }
    deleted
}

/// Sweeps every `every` until cancelled.
pub(crate) async fn run(caa: Arc<Caa>, every: Duration, grace: Duration, stop: CancellationToken) {
    let mut seen = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let deleted = sweep_once(&caa, grace, &mut seen).await;
        super::metrics::METRICS.swept(deleted.len());
    }
}
