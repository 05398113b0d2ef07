//! `KataConfig` (`kataconfiguration.openshift.io/v1`, cluster scoped): which nodes get the
//! `kata-remote` runtime, and the progress of installing or removing it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of `KataConfig`.
pub const GROUP: &str = "kataconfiguration.openshift.io";
/// The only condition type of `KataConfig`: is an install, update or uninstall running?
pub(crate) const CONDITION_IN_PROGRESS: &str = "InProgress";
/// The finalizer that keeps a deleted `KataConfig` until its uninstall finished.
pub const FINALIZER: &str = "kataconfiguration.openshift.io/finalizer";

/// Reasons of the `InProgress` condition.
pub mod reasons {
    /// Nodes are getting the runtime for the first time.
    pub(crate) const INSTALLING: &str = "Installing";
    /// The set of nodes or the runtime configuration changed; nodes are following.
    pub(crate) const UPDATING: &str = "Updating";
    /// The `KataConfig` was deleted; nodes are being cleaned.
    pub(crate) const UNINSTALLING: &str = "Uninstalling";
    /// Something failed; the message names what and where.
    pub(crate) const FAILED: &str = "Failed";
    /// Uninstall waits for pods that still use the runtime; the message names them.
    pub(crate) const BLOCKED_BY_EXISTING_KATA_PODS: &str = "BlockedByExistingKataPods";
    /// The pod VM image Job runs.
    pub(crate) const POD_VM_IMAGE_JOB_RUNNING: &str = "PodVMImageJobRunning";
    /// The pod VM image Job finished.
    pub(crate) const POD_VM_IMAGE_JOB_COMPLETED: &str = "PodVMImageJobCompleted";
    /// The pod VM image Job failed.
    pub(crate) const POD_VM_IMAGE_JOB_FAILED: &str = "PodVMImageJobFailed";
}

fn default_log_level() -> String {
    "info".to_string()
}

fn default_shim() -> String {
    "auto".to_string()
}

/// Installs the `kata-remote` runtime class on the selected worker nodes. Only one
/// KataConfig may exist in a cluster.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "kataconfiguration.openshift.io",
    version = "v1",
    kind = "KataConfig",
    plural = "kataconfigs",
    singular = "kataconfig",
    status = "KataConfigStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Installs the kata-remote runtime (peer pods) on the selected worker nodes.",
    printcolumn = r#"{"name":"InProgress","type":"string","description":"Whether an install, update or uninstall is running","jsonPath":".status.conditions[?(@.type=='InProgress')].status"}"#,
    printcolumn = r#"{"name":"Completed","type":"integer","description":"Nodes with the runtime installed","jsonPath":".status.kataNodes.readyNodeCount"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","description":"Nodes selected for the runtime","jsonPath":".status.kataNodes.nodeCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KataConfigSpec {
    /// Selects the nodes that get the runtime (matchLabels and matchExpressions with In,
    /// NotIn, Exists, DoesNotExist). Empty or absent selects every worker node: on OpenShift
    /// the nodes labelled `node-role.kubernetes.io/worker`, elsewhere every node without a
    /// control-plane role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kata_config_pool_selector: Option<LabelSelector>,
    /// Only install on nodes that Node Feature Discovery marked able to run Kata
    /// (`feature.node.kubernetes.io/runtime.kata=true`).
    #[serde(default)]
    pub check_node_eligibility: bool,
    /// Log level of the runtime on the nodes: `debug` or `trace` enable the debug output of
    /// the kata runtime, agent and remote hypervisor client; `info`, `warn` and `error` keep
    /// it off.
    #[serde(default = "default_log_level")]
    #[schemars(extend("enum" = ["trace", "debug", "info", "warn", "error"]))]
    pub log_level: String,
    /// Run pods of the runtime class in their own cloud VMs (peer pods).
    #[serde(default)]
    pub enable_peer_pods: bool,
    /// Which containerd shim serves the runtime class on the nodes: `auto` (the default)
    /// uses kata's shim (`containerd-shim-kata-v2`) where the node has one, as on OpenShift
    /// or after kata-deploy, and sandboxd's own shim elsewhere; `kata` requires kata's shim
    /// (a node without it reports the install failed); `sandboxd` always uses sandboxd's
    /// shim (`containerd-shim-sandboxd-v2`, a copy of the sandboxd binary the node installer
    /// puts in `/opt/sandboxd/bin` and removes on uninstall). Changing it re-installs the
    /// nodes; running pods keep the shim they started with.
    #[serde(default = "default_shim", skip_serializing_if = "String::is_empty")]
    #[schemars(extend("enum" = ["auto", "kata", "sandboxd"]))]
    pub shim: String,
}

/// What the operator observed, rebuilt on every reconcile.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KataConfigStatus {
    /// The runtime classes this KataConfig provides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtime_classes: Vec<String>,
    /// Per-node progress of the runtime install or uninstall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kata_nodes: Option<KataNodesStatus>,
    /// `InProgress`: True while nodes install, update or uninstall (the reason says which);
    /// False with no reason when every selected node has the runtime; False with reason
    /// `Failed` when a node failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Nodes by install state. Every list is sorted by node name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KataNodesStatus {
    /// Number of nodes selected for the runtime.
    #[serde(default)]
    pub node_count: i64,
    /// Number of selected nodes with the runtime installed and current.
    #[serde(default)]
    pub ready_node_count: i64,
    /// Nodes with the runtime installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installed: Vec<String>,
    /// Nodes whose installer is working.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installing: Vec<String>,
    /// Selected nodes whose installer has not started yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_to_install: Vec<String>,
    /// Nodes whose install failed; the `InProgress` message names each reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_to_install: Vec<String>,
    /// Nodes whose installer is removing the runtime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uninstalling: Vec<String>,
    /// Nodes to be cleaned that wait (for their peer pods to end, or for their installer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_to_uninstall: Vec<String>,
    /// Nodes whose uninstall failed; the `InProgress` message names each reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) failed_to_uninstall: Vec<String>,
}

/// The CRDs of this module.
pub(crate) fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![super::crd_of::<KataConfig>(
        "kataconfigs.kataconfiguration.openshift.io.yaml",
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_is_cluster_scoped_with_status_and_the_seed_columns() {
        let crd = KataConfig::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["InProgress", "Completed", "Total", "Age"]);
    }

    #[test]
    fn seed_kataconfig_parses_with_defaults() {
        let kc: KataConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "kataconfiguration.openshift.io/v1",
            "kind": "KataConfig",
            "metadata": {"name": "example-kataconfig"},
            "spec": {"enablePeerPods": true}
        }))
        .unwrap();
        assert_eq!(kc.spec.log_level, "info");
        assert!(kc.spec.enable_peer_pods);
        assert!(kc.spec.kata_config_pool_selector.is_none());
    }
}
