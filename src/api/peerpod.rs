//! `PeerPod` and `PeerPodConfig` (`confidentialcontainers.org/v1alpha1`, namespaced).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The CRDs of this module.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    Vec::new()
}
