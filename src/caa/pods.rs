//! The pods of this node, as one metadata watch sees them: CreateVM finds the uid of the pod
//! that will own the PeerPod here instead of reading the pod (a read less on the pod's
//! critical path). A pod the watch has not shown yet, or one being deleted, is read as before.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

/// Metadata of the pods bound to this node.
pub(crate) struct NodePods(Store<PartialObjectMeta<Pod>>);

impl NodePods {
    /// Starts watching the pods whose `spec.nodeName` is `node`.
    pub fn watch(client: &Client, node: &str) -> Self {
        let api: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "watching the pods of this node failed; CreateVM reads pods instead");
                }
            }
        });
        Self(store)
    }

    /// The uid of pod `ns/name` if the watch shows it and it is not being deleted.
    pub fn uid_of(&self, ns: &str, name: &str) -> Option<String> {
        let p = self.0.get(&ObjectRef::new(name).within(ns))?;
        if p.metadata.deletion_timestamp.is_some() {
            return None;
        }
        p.uid()
    }
}
