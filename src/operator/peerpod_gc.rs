//! The operator-side PeerPod garbage collector: the backstop for what a node's CAA cannot do
//! because it is down or its node is gone.
//!
//! - A `PeerPod` being deleted (its pod is gone, so the garbage collector deleted the record)
//!   that still carries `peer.pod/finalizer` after a grace period was not handled by its
//!   CAA: the VM is deleted, confirmed gone, then the finalizer is removed.
//! - A VM carrying this cluster's tag whose node tag names a node that no longer exists (and
//!   stayed missing for a grace period) is deleted.
//!
//! Cloud credentials come from `peer-pods-cm` and `peer-pods-secret` in the operator
//! namespace, read by name on each pass (no cache of Secrets) and validated by
//! [`crate::config`]; the provider is rebuilt only when their content changes. Without the
//! ConfigMap (peer pods not configured) a pass does nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::names::{CLOUD_SECRET, CONFIG_MAP};
use crate::api::peerpod::{FINALIZER, PeerPod};
use crate::cloud::{Provider, tags};
use crate::config::{CloudProvider, CloudSecret, PeerPodsConfig};
use crate::k8s::apply;

/// Errors of one pass.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The API server failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// `peer-pods-cm` or `peer-pods-secret` is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The cloud failed.
    #[error(transparent)]
    Cloud(#[from] crate::cloud::Error),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Config(e) => e.metric_label(),
            Error::Cloud(e) => e.metric_label(),
        }
    }
}

/// Settings of the collector.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace of `peer-pods-cm` and `peer-pods-secret` (the operator namespace).
    pub namespace: String,
    /// How long a deleted PeerPod is left to its CAA before the operator deletes its VM.
    pub grace: Duration,
    /// How long a VM's node must stay missing before the VM is deleted.
    pub node_grace: Duration,
    /// Time between passes.
    pub every: Duration,
    /// Fastest LRO polling interval.
    pub min_poll: Duration,
    /// The operator's `--azure-cloud` and development endpoint flags (command line only;
    /// `peer-pods-cm` names at most the cloud).
    pub azure: crate::cloud::azure::EndpointArgs,
}

impl Options {
    /// Production settings for `namespace`: 2 min grace, a pass every 30 s.
    pub(crate) fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            grace: Duration::from_secs(120),
            node_grace: Duration::from_secs(120),
            every: Duration::from_secs(30),
            min_poll: Duration::from_secs(1),
            azure: Default::default(),
        }
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// PeerPods (`namespace/name`) whose VM was deleted and finalizer removed.
    pub(crate) released: Vec<String>,
    /// VMs deleted because their node no longer exists.
    pub(crate) node_vms_deleted: Vec<String>,
}

/// The collector's state between passes.
pub(crate) struct Collector {
    client: Client,
    opts: Options,
    provider: Option<(u64, Arc<dyn Provider>)>,
    cluster_id: Option<String>,
    deleting_since: HashMap<String, Instant>,
    orphan_since: HashMap<String, Instant>,
}

fn fingerprint(map: &BTreeMap<String, String>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    map.hash(&mut h);
    h.finish()
}

/// Builds the provider `map` (ConfigMap and Secret keys) describes; `None` for clouds the
/// collector cannot drive.
pub(crate) fn provider_from_map(
    map: &BTreeMap<String, String>,
    azure: &crate::cloud::azure::EndpointArgs,
    min_poll: Duration,
) -> Result<Option<Arc<dyn Provider>>, Error> {
    let cfg = PeerPodsConfig::from_map(map)?;
    match cfg.cloud_provider {
        CloudProvider::Azure => {
            let secret = CloudSecret::from_map(map)?;
            let Some(az) = cfg.azure else {
                return Ok(None);
            };
            let endpoints = azure.resolve(Some(cfg.azure_cloud));
            let p = crate::cloud::azure::AzureProvider::new(
                &secret.subscription_id,
                &secret.credentials,
                az,
                endpoints,
                crate::cloud::azure::Manners::default(),
                crate::cloud::azure::Polling {
                    min_interval: min_poll,
                    ..Default::default()
                },
            )?;
            Ok(Some(Arc::new(p)))
        }
        CloudProvider::Local => Ok(None),
    }
}

impl Collector {
    /// A collector acting with `client`.
    pub(crate) fn new(client: Client, opts: Options) -> Self {
        Self {
            client,
            opts,
            provider: None,
            cluster_id: None,
            deleting_since: HashMap::new(),
            orphan_since: HashMap::new(),
        }
    }

    /// The provider the current `peer-pods-cm`/`peer-pods-secret` describe, rebuilt only
    /// when they changed; `None` when peer pods are not configured.
    async fn provider(&mut self) -> Result<Option<Arc<dyn Provider>>, Error> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.opts.namespace);
        let Some(cm) = cms.get_opt(CONFIG_MAP).await? else {
            self.provider = None;
            return Ok(None);
        };
        let mut map: BTreeMap<String, String> = cm.data.unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.opts.namespace);
        if let Some(s) = secrets.get_opt(CLOUD_SECRET).await? {
            for (k, v) in s.data.unwrap_or_default() {
                map.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            for (k, v) in s.string_data.unwrap_or_default() {
                map.insert(k, v);
            }
        }
        let fp = fingerprint(&map);
        if let Some((old, p)) = &self.provider
            && *old == fp
        {
            return Ok(Some(p.clone()));
        }
        let p = provider_from_map(&map, &self.opts.azure, self.opts.min_poll)?;
        self.provider = p.clone().map(|p| (fp, p));
        Ok(p)
    }

    async fn cluster_id(&mut self) -> Result<String, Error> {
        if let Some(id) = &self.cluster_id {
            return Ok(id.clone());
        }
        let id = crate::k8s::cluster_id(&self.client).await?;
        self.cluster_id = Some(id.clone());
        Ok(id)
    }

    /// One pass over deleted PeerPods and VMs of missing nodes.
    pub(crate) async fn pass(&mut self) -> Result<Report, Error> {
        let Some(provider) = self.provider().await? else {
            self.deleting_since.clear();
            self.orphan_since.clear();
            return Ok(Report::default());
        };
        let mut report = Report::default();
        self.release_deleted(&provider, &mut report).await?;
        self.sweep_missing_nodes(&provider, &mut report).await?;
        Ok(report)
    }

    async fn release_deleted(
        &mut self,
        provider: &Arc<dyn Provider>,
        report: &mut Report,
    ) -> Result<(), Error> {
        let all: Api<PeerPod> = Api::all(self.client.clone());
        let now = Instant::now();
        let stuck: Vec<PeerPod> = all
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_some()
                    && p.finalizers().iter().any(|f| f == FINALIZER)
                    && p.spec.cloud_provider == provider.name()
            })
            .collect();
        let keys: HashSet<String> = stuck.iter().filter_map(|p| p.uid()).collect();
        self.deleting_since.retain(|k, _| keys.contains(k));
        for p in stuck {
            let key = p.uid().unwrap_or_default();
            let since = *self.deleting_since.entry(key.clone()).or_insert(now);
            if now.duration_since(since) < self.opts.grace {
                continue;
            }
            let ns = p.namespace().unwrap_or_default();
            let vm = p.spec.vm_name.clone();
            let what = format!("{ns}/{}", p.name_any());
            if let Err(e) = provider.delete(&vm).await {
                tracing::warn!(peerpod = %what, vm = %vm, error = %e, "deleting the VM of a deleted PeerPod failed");
                continue;
            }
            // Confirm the VM is gone before the record that names it goes.
            if provider.get(&vm).await?.is_some() {
                tracing::warn!(peerpod = %what, vm = %vm, "VM still listed after its delete; keeping the finalizer");
                continue;
            }
            let api = Api::namespaced(self.client.clone(), &ns);
            apply::remove_finalizer(&api, &p, FINALIZER)
                .await
                .map_err(kube::Error::from)?;
            tracing::info!(peerpod = %what, vm = %vm, node = %p.spec.node_name, "CAA did not handle a deleted PeerPod; deleted its VM and removed the finalizer");
            self.deleting_since.remove(&key);
            report.released.push(what);
        }
        Ok(())
    }

    async fn sweep_missing_nodes(
        &mut self,
        provider: &Arc<dyn Provider>,
        report: &mut Report,
    ) -> Result<(), Error> {
        let cluster = self.cluster_id().await?;
        if cluster.is_empty() {
            return Ok(());
        }
        let vms = provider
            .list_owned(&BTreeMap::from([(tags::CLUSTER.to_string(), cluster)]))
            .await?;
        let nodes: HashSet<String> = Api::<Node>::all(self.client.clone())
            .list_metadata(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| n.name_any())
            .collect();
        let now = Instant::now();
        let orphans: Vec<(String, String)> = vms
            .into_iter()
            .filter_map(|v| {
                let node = v.tags.get(tags::NODE).cloned().unwrap_or_default();
                (!node.is_empty() && !nodes.contains(&node)).then_some((v.name, node))
            })
            .collect();
        let names: HashSet<&String> = orphans.iter().map(|(n, _)| n).collect();
        self.orphan_since.retain(|k, _| names.contains(k));
        for (vm, node) in &orphans {
            let since = *self.orphan_since.entry(vm.clone()).or_insert(now);
            if now.duration_since(since) < self.opts.node_grace {
                continue;
            }
            match provider.delete(vm).await {
                Ok(()) => {
                    tracing::info!(vm = %vm, node = %node, "deleted a VM whose node no longer exists");
                    self.orphan_since.remove(vm);
                    report.node_vms_deleted.push(vm.clone());
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, node = %node, error = %e, "deleting a VM of a missing node failed")
                }
            }
        }
        Ok(())
    }
}

/// Runs passes every `opts.every` until `shutdown`; failures are logged and retried on the
/// next pass.
pub async fn run(client: Client, opts: Options, shutdown: CancellationToken) {
    let every = opts.every;
    let mut c = Collector::new(client, opts);
    loop {
        match c.pass().await {
            Ok(r) if r != Report::default() => tracing::debug!(?r, "PeerPod GC pass"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, kind = e.metric_label(), "PeerPod GC pass failed")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn azure() -> BTreeMap<String, String> {
        map(&[
            ("CLOUD_PROVIDER", "azure"),
            ("AZURE_INSTANCE_SIZE", "Standard_D2as_v5"),
            (
                "AZURE_SUBNET_ID",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/worker",
            ),
            ("AZURE_REGION", "eastus"),
            ("AZURE_RESOURCE_GROUP", "rg"),
            (
                "AZURE_SUBSCRIPTION_ID",
                "11111111-2222-3333-4444-555555555555",
            ),
            ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000000c"),
            ("AZURE_TENANT_ID", "0a1b2c3d-0000-4000-8000-00000000000e"),
            ("AZURE_CLIENT_SECRET", "hunter2-secret"),
        ])
    }

    #[test]
    fn a_valid_azure_map_gives_a_provider_and_a_bad_one_names_the_key_not_the_secret() {
        assert!(
            provider_from_map(&azure(), &Default::default(), Duration::from_secs(1))
                .unwrap()
                .is_some()
        );
        let mut bad = azure();
        bad.remove("AZURE_REGION");
        let e = provider_from_map(&bad, &Default::default(), Duration::from_secs(1))
            .err()
            .expect("missing region is an error")
            .to_string();
        assert!(e.contains("AZURE_REGION"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let mut bad = azure();
        // A configmap cannot send the credentials elsewhere: the key is refused.
        bad.insert(
            "AZURE_RESOURCE_MANAGER_ENDPOINT".into(),
            "https://evil.example/".into(),
        );
        let e = provider_from_map(&bad, &Default::default(), Duration::from_secs(1))
            .err()
            .expect("bad endpoint")
            .to_string();
        assert!(e.contains("AZURE_RESOURCE_MANAGER_ENDPOINT"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_fingerprint_changes_with_any_value() {
        let a = azure();
        let mut b = azure();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.insert("AZURE_CLIENT_SECRET".into(), "rotated".into());
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }
}
