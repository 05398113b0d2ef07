//! `PeerPod` (`confidentialcontainers.org/v1alpha1`, namespaced): the record of one pod VM,
//! written before the VM is created so no VM can exist that nothing records. Owned by its
//! Pod; the finalizer keeps it until the VM is gone.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of `PeerPod`.
pub const GROUP: &str = "confidentialcontainers.org";
/// Keeps a `PeerPod` until its VM is deleted.
pub(crate) const FINALIZER: &str = "peer.pod/finalizer";

/// Phases of a pod VM.
pub mod phases {
    /// The create call is running.
    pub(crate) const CREATING: &str = "Creating";
    /// The VM is provisioned and has an IP.
    pub(crate) const RUNNING: &str = "Running";
    /// Creating the VM failed; it will be deleted.
    pub(crate) const FAILED: &str = "Failed";
}

/// One pod VM: which cloud, which VM, for which pod on which node.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "confidentialcontainers.org",
    version = "v1alpha1",
    kind = "PeerPod",
    plural = "peerpods",
    singular = "peerpod",
    namespaced,
    status = "PeerPodStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "The record of one peer pod VM, written before the VM is created.",
    printcolumn = r#"{"name":"VM","type":"string","description":"Cloud VM name","jsonPath":".spec.vmName"}"#,
    printcolumn = r#"{"name":"Node","type":"string","description":"Worker node","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","description":"VM phase","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"IP","type":"string","description":"VM private IP","jsonPath":".status.vmIP"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerPodSpec {
    /// Cloud provider that runs the VM (`azure` or `local`).
    pub cloud_provider: String,
    /// The cloud's id of the VM (ARM resource id on Azure); empty until it is known.
    #[serde(default, rename = "instanceID")]
    pub instance_id: String,
    /// The deterministic VM name (`podvm-<pod>-<first 8 of sandbox id>`).
    pub vm_name: String,
    /// The worker node whose CAA owns the VM.
    pub node_name: String,
    /// UID of the pod the VM runs.
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    /// The kata sandbox id.
    #[serde(default)]
    pub sandbox_id: String,
}

/// Observed state of a pod VM.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerPodStatus {
    /// `Pending`, `Creating`, `Running`, `Deleting` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Private IP of the VM.
    #[serde(default, rename = "vmIP", skip_serializing_if = "Option::is_none")]
    pub vm_ip: Option<String>,
    /// VXLAN id of the pod tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// Last error, if the VM failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The CRDs of this module.
pub(crate) fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![super::crd_of::<PeerPod>(
        "peerpods.confidentialcontainers.org.yaml",
    )]
}
