//! Counts writes to every kind of object the operator writes, by watching resourceVersions
//! (an independent observer: it sees every write, also one undone right after). The Lease
//! is left out: renewing it is the leader's only steady-state write.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Node};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::Api;
use kube::runtime::watcher;
use kube::runtime::watcher::Event as WatchEvent;
use kube::{Client, Resource, ResourceExt};
use sandboxd::api::kataconfig::KataConfig;
use sandboxd::api::names::*;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

type Fingerprint<K> = Box<dyn Fn(&K) -> Option<String> + Send>;

/// Writes seen since [`Writes::start`], as `Kind/name`, in order.
pub struct Writes {
    seen: Arc<Mutex<Vec<String>>>,
    token: CancellationToken,
}

fn rv<K: Resource>(o: &K) -> Option<String> {
    o.meta().resource_version.clone()
}

fn watch<K>(
    api: Api<K>,
    wc: watcher::Config,
    kind: &'static str,
    fingerprint: Fingerprint<K>,
    seen: Arc<Mutex<Vec<String>>>,
    token: CancellationToken,
) -> oneshot::Receiver<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut last: HashMap<String, String> = HashMap::new();
        let mut synced = false;
        let mut stream = std::pin::pin!(watcher(api, wc));
        loop {
            let ev = tokio::select! {
                _ = token.cancelled() => return,
                ev = stream.next() => ev,
            };
            let Some(Ok(ev)) = ev else {
                if ev.is_none() {
                    return;
                }
                continue;
            };
            match ev {
                WatchEvent::Init => {}
                WatchEvent::InitApply(o) => {
                    if let Some(f) = fingerprint(&o) {
                        last.insert(o.name_any(), f);
                    }
                }
                WatchEvent::InitDone => {
                    synced = true;
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                WatchEvent::Apply(o) => {
                    let Some(f) = fingerprint(&o) else { continue };
                    let name = o.name_any();
                    if synced && last.get(&name) != Some(&f) {
                        seen.lock().unwrap().push(format!("{kind}/{name}"));
                    }
                    last.insert(name, f);
                }
                WatchEvent::Delete(o) => {
                    if fingerprint(&o).is_some() && synced {
                        seen.lock()
                            .unwrap()
                            .push(format!("{kind}/{} deleted", o.name_any()));
                    }
                    last.remove(&o.name_any());
                }
            }
        }
    });
    rx
}

impl Writes {
    /// Watches KataConfigs, the fake nodes, the RuntimeClass, the installer DaemonSet (its
    /// spec and metadata; its status is the DaemonSet controller's), the admission policy and
    /// binding, and the operator's Events; returns once every watch has listed.
    pub async fn start(admin: &Client, ns: &str) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
        let t = || token.clone();
        let s = || seen.clone();
        let ready = vec![
            watch::<KataConfig>(
                Api::all(admin.clone()),
                Default::default(),
                "KataConfig",
                Box::new(rv),
                s(),
                t(),
            ),
            watch::<Node>(
                Api::all(admin.clone()),
                watcher::Config::default().labels("sandboxd.test/fake-node=true"),
                "Node",
                // The controller manager's TTL controller annotates nodes as the cluster
                // grows; everything else on a fake node's metadata is the operator's or
                // the test's.
                Box::new(|n: &Node| {
                    let mut anns = n.metadata.annotations.clone().unwrap_or_default();
                    anns.remove("node.alpha.kubernetes.io/ttl");
                    Some(format!("{:?} {anns:?}", n.metadata.labels))
                }),
                s(),
                t(),
            ),
            watch::<RuntimeClass>(
                Api::all(admin.clone()),
                by_name(RUNTIME_CLASS),
                "RuntimeClass",
                Box::new(rv),
                s(),
                t(),
            ),
            watch::<DaemonSet>(
                Api::namespaced(admin.clone(), ns),
                by_name(INSTALLER_DAEMONSET),
                "DaemonSet",
                Box::new(|d: &DaemonSet| {
                    Some(format!(
                        "{:?} {:?} {:?}",
                        d.metadata.generation, d.metadata.labels, d.metadata.annotations
                    ))
                }),
                s(),
                t(),
            ),
            watch::<ValidatingAdmissionPolicy>(
                Api::all(admin.clone()),
                by_name(KATACONFIG_SINGLETON),
                "ValidatingAdmissionPolicy",
                Box::new(|p: &ValidatingAdmissionPolicy| {
                    // Its status is the API server's type checker's.
                    Some(format!(
                        "{:?} {:?}",
                        p.metadata.generation, p.metadata.annotations
                    ))
                }),
                s(),
                t(),
            ),
            watch::<ValidatingAdmissionPolicyBinding>(
                Api::all(admin.clone()),
                by_name(KATACONFIG_SINGLETON),
                "ValidatingAdmissionPolicyBinding",
                Box::new(rv),
                s(),
                t(),
            ),
            watch::<Event>(
                Api::all(admin.clone()),
                Default::default(),
                "Event",
                Box::new(|e: &Event| {
                    (e.reporting_component.as_deref() == Some("sandboxd-operator"))
                        .then(|| rv(e))
                        .flatten()
                }),
                s(),
                t(),
            ),
        ];
        for r in ready {
            tokio::time::timeout(std::time::Duration::from_secs(30), r)
                .await
                .map_err(|_| anyhow!("a write watch did not sync"))??;
        }
        Ok(Self { seen, token })
    }

    /// The writes seen so far, and forgets them.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
