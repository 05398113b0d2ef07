//! PeerPod records: written (created, or re-asserted with server-side apply; owned by the
//! pod, with the finalizer) before any create call, updated as the VM progresses, released
//! once the VM is gone.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::api::peerpod::{FINALIZER, PeerPod, PeerPodSpec, PeerPodStatus};
use crate::k8s::{FIELD_MANAGER, apply};

/// Label with the node whose CAA owns the record.
pub(crate) const LABEL_NODE: &str = "sandboxd.io/node";
/// Label with (the first 32 characters of) the sandbox id.
pub(crate) const LABEL_SANDBOX: &str = "sandboxd.io/sandbox-id";
/// Annotation with the instance size chosen at CreateVM.
pub(crate) const ANNOTATION_SIZE: &str = "sandboxd.io/instance-size";
/// Annotation with the image a pod asked for at CreateVM (absent: `AZURE_IMAGE_ID`).
pub(crate) const ANNOTATION_IMAGE: &str = "sandboxd.io/image";

/// The label value of a sandbox id.
pub(crate) fn sandbox_label(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect()
}

/// What a record says.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    /// Pod namespace (the record's namespace).
    pub(crate) namespace: String,
    /// Pod name.
    pub(crate) pod_name: String,
    /// Pod uid.
    pub(crate) pod_uid: String,
    /// VM name (the record's name).
    pub(crate) vm_name: String,
    /// Sandbox id.
    pub(crate) sandbox_id: String,
    /// Chosen instance size.
    pub(crate) size: String,
    /// The image the pod asked for; empty: the configured one.
    pub(crate) image: String,
}

impl Record {
    /// Reads a record back from a PeerPod.
    pub(crate) fn from_peerpod(p: &PeerPod) -> Self {
        Self {
            namespace: p.namespace().unwrap_or_default(),
            pod_name: p
                .owner_references()
                .first()
                .map(|o| o.name.clone())
                .unwrap_or_default(),
            pod_uid: p.spec.pod_uid.clone(),
            vm_name: p.spec.vm_name.clone(),
            sandbox_id: p.spec.sandbox_id.clone(),
            size: p
                .annotations()
                .get(ANNOTATION_SIZE)
                .cloned()
                .unwrap_or_default(),
            image: p
                .annotations()
                .get(ANNOTATION_IMAGE)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// Writes (or re-asserts) the PeerPod of `r`: idempotent.
pub(crate) async fn record(
    client: &Client,
    r: &Record,
    node: &str,
    provider: &str,
) -> Result<PeerPod, kube::Error> {
    let api: Api<PeerPod> = Api::namespaced(client.clone(), &r.namespace);
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: r.pod_name.clone(),
        uid: r.pod_uid.clone(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    };
    let mut annotations = serde_json::Map::new();
    annotations.insert(ANNOTATION_SIZE.into(), r.size.clone().into());
    if !r.image.is_empty() {
        annotations.insert(ANNOTATION_IMAGE.into(), r.image.clone().into());
    }
    let obj = json!({
        "apiVersion": "confidentialcontainers.org/v1alpha1",
        "kind": "PeerPod",
        "metadata": {
            "name": r.vm_name,
            "namespace": r.namespace,
            "labels": {LABEL_NODE: node, LABEL_SANDBOX: sandbox_label(&r.sandbox_id)},
            "annotations": annotations,
            "finalizers": [FINALIZER],
            "ownerReferences": [owner],
        },
        "spec": PeerPodSpec {
            cloud_provider: provider.to_string(),
            instance_id: String::new(),
            vm_name: r.vm_name.clone(),
            node_name: node.to_string(),
            pod_uid: r.pod_uid.clone(),
            sandbox_id: r.sandbox_id.clone(),
        },
    });
    // instanceID is written by `set_instance_id` (another field manager) once the VM exists:
    // the applied object leaves it out, so re-asserting a record never clears it and needs
    // no read first.
    let mut obj = obj;
    if let Some(spec) = obj["spec"].as_object_mut() {
        spec.remove("instanceID");
    }
    // A new record (the common case) is one plain create, which costs the API server less
    // than an apply (no field-ownership merge): that is what a burst of pods waits on. A
    // record that already stands (a retried CreateVM, a restart) is re-asserted by the apply.
    let new: PeerPod = serde_json::from_value(obj.clone()).map_err(kube::Error::SerdeError)?;
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&post, &new).await {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        created => return created,
    }
    api.patch(
        &r.vm_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
}

/// Sets the instance id (spec) of a record.
pub(crate) async fn set_instance_id(
    client: &Client,
    ns: &str,
    name: &str,
    id: &str,
) -> Result<(), kube::Error> {
    let api: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"instanceID": id}})),
    )
    .await
    .map(|_| ())
}

/// Merges `status` into the record's status; answers the record (with its deletion
/// timestamp, so a write doubles as the check that the record still stands).
pub(crate) async fn set_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: &PeerPodStatus,
) -> Result<PeerPod, kube::Error> {
    let api: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
}

/// Deletes the record and removes the finalizer; succeeds when it is already gone.
pub(crate) async fn release(client: &Client, ns: &str, name: &str) -> Result<(), kube::Error> {
    match mark_deleted(client, ns, name).await? {
        Some(current) => remove_finalizer(client, &current).await,
        None => Ok(()),
    }
}

/// Deletes the record: it stays, being deleted, while the finalizer holds it. A record being
/// deleted says "delete the VM, then release me" to whoever sees it (StopVM, the start-up
/// reconcile, the sweep, the operator's collector), so it may be marked before the VM is gone.
/// Answers the record while the finalizer holds it, `None` when it is gone.
pub(crate) async fn mark_deleted(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<PeerPod>, kube::Error> {
    let api: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        // The object while a finalizer holds it; a Status when it is already gone.
        Ok(answer) => Ok(answer.left()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the finalizer of a record being deleted, `current` being its last known state
/// ([`apply::remove_finalizer`]).
pub(crate) async fn remove_finalizer(
    client: &Client,
    current: &PeerPod,
) -> Result<(), kube::Error> {
    let api: Api<PeerPod> =
        Api::namespaced(client.clone(), &current.namespace().unwrap_or_default());
    apply::remove_finalizer(&api, current, FINALIZER).await?;
    Ok(())
}

/// Every record of `node`, in every namespace.
pub(crate) async fn of_node(client: &Client, node: &str) -> Result<Vec<PeerPod>, kube::Error> {
    let api: Api<PeerPod> = Api::all(client.clone());
    Ok(api
        .list(&ListParams::default().labels(&format!("{LABEL_NODE}={node}")))
        .await?
        .items)
}

/// The record of a sandbox id, if any.
pub(crate) async fn of_sandbox(
    client: &Client,
    node: &str,
    id: &str,
) -> Result<Option<PeerPod>, kube::Error> {
    let api: Api<PeerPod> = Api::all(client.clone());
    let sel = format!("{LABEL_NODE}={node},{LABEL_SANDBOX}={}", sandbox_label(id));
    Ok(api
        .list(&ListParams::default().labels(&sel))
        .await?
        .items
        .into_iter()
        .find(|p| p.spec.sandbox_id == id))
}
