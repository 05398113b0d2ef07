//! `PeerPodConfig` (`confidentialcontainers.org/v1alpha1`, namespaced): where the peer-pods
//! settings live and how many peer-pod VMs each selected node may run.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::names::{CLOUD_SECRET, CONFIG_MAP, LABEL_KATA};

/// Condition: the limit was applied to the selected nodes.
pub const CONDITION_LIMIT_APPLIED: &str = "LimitApplied";
/// Condition: the cloud secret, the configmap and the ssh key secret are valid.
pub const CONDITION_CONFIG_VALID: &str = "ConfigValid";
/// Condition: the pod VM image is known (`AZURE_IMAGE_ID` set, by the user or by the image
/// Job), or why not (the Job runs, failed, or waits for a valid configuration).
pub const CONDITION_POD_VM_IMAGE_READY: &str = "PodVMImageReady";

fn default_secret() -> String {
    CLOUD_SECRET.into()
}
fn default_configmap() -> String {
    CONFIG_MAP.into()
}
fn default_limit() -> String {
    "10".into()
}
fn default_node_selector() -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_KATA.to_string(), String::new())])
}

/// Settings of peer pods: the Secret and ConfigMap the cloud-api-adaptor reads, and the
/// per-node limit of peer-pod VMs.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "confidentialcontainers.org",
    version = "v1alpha1",
    kind = "PeerPodConfig",
    plural = "peerpodconfigs",
    singular = "peerpodconfig",
    namespaced,
    status = "PeerPodConfigStatus",
    derive = "PartialEq",
    doc = "Peer-pods settings: cloud secret, configmap, per-node VM limit and the nodes it applies to.",
    printcolumn = r#"{"name":"Limit","type":"string","description":"Peer-pod VMs per node","jsonPath":".spec.limit"}"#,
    printcolumn = r#"{"name":"ConfigValid","type":"string","description":"Whether the secret and configmap are valid","jsonPath":".status.conditions[?(@.type=='ConfigValid')].status"}"#,
    printcolumn = r#"{"name":"PodVMImage","type":"string","description":"Whether the pod VM image is known","jsonPath":".status.conditions[?(@.type=='PodVMImageReady')].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerPodConfigSpec {
    /// Name of the Secret (in the operator namespace) with the cloud credentials.
    #[serde(default = "default_secret")]
    pub cloud_secret_name: String,
    /// Name of the ConfigMap (in the operator namespace) with the peer-pods settings.
    #[serde(default = "default_configmap")]
    pub config_map_name: String,
    /// Peer-pod VMs each selected node may run, a non-negative integer as a string. Every
    /// selected node advertises it as the extended resource `kata.peerpods.io/vm`. Wins over
    /// `PEERPODS_LIMIT_PER_NODE` of the configmap (empty: the configmap's). Digits only: the
    /// API server refuses `"ten"` or `"-1"`.
    #[serde(default = "default_limit")]
    #[schemars(regex(pattern = r"^([0-9]{1,9})?$"))]
    pub limit: String,
    /// The nodes that run peer pods (labels that must all match).
    #[serde(default = "default_node_selector")]
    pub node_selector: BTreeMap<String, String>,
}

impl Default for PeerPodConfigSpec {
    fn default() -> Self {
        Self {
            cloud_secret_name: default_secret(),
            config_map_name: default_configmap(),
            limit: default_limit(),
            node_selector: default_node_selector(),
        }
    }
}

/// What the operator observed.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerPodConfigStatus {
    /// `LimitApplied` (False with reason `InvalidLimit` when the limit is refused),
    /// `ConfigValid` (False naming every missing or invalid key) and `PodVMImageReady`
    /// (False while the pod VM image Job runs, or naming why it failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) observed_generation: Option<i64>,
}

/// The CRDs of this module.
pub(crate) fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![super::crd_of::<PeerPodConfig>(
        "peerpodconfigs.confidentialcontainers.org.yaml",
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_is_namespaced_with_status() {
        let crd = PeerPodConfig::crd();
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.group, "confidentialcontainers.org");
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
    }

    #[test]
    fn empty_spec_gets_the_seed_defaults() {
        let spec: PeerPodConfigSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec, PeerPodConfigSpec::default());
        assert_eq!(spec.limit, "10");
        assert_eq!(spec.cloud_secret_name, "peer-pods-secret");
        assert_eq!(spec.config_map_name, "peer-pods-cm");
        assert_eq!(
            spec.node_selector
                .get("node-role.kubernetes.io/kata-oc")
                .map(String::as_str),
            Some("")
        );
    }
}
