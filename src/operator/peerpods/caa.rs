//! The cloud-api-adaptor DaemonSet `peerpodconfig-ctrl-caa-daemon` as a pure function of
//! the PeerPodConfig, the image and the hash of the user's configuration.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;

use super::plan::ConfigInputs;
use crate::api::peerpodconfig::{SSH_KEY_SECRET, SSH_PUBLIC_KEY};

/// Name of the CAA DaemonSet.
pub const DAEMONSET: &str = "peerpodconfig-ctrl-caa-daemon";
/// Its ServiceAccount (RBAC in `deploy/caa/rbac.yaml`).
pub const SERVICE_ACCOUNT: &str = "sandboxd-caa";
/// Pod-template annotation: hash of the secret, the configmap and the ssh public key. A real
/// change of any of them changes it and rolls the pods; no change never touches them.
pub const CONFIG_HASH_ANNOTATION: &str = "peerpods.sandboxd.io/config-hash";

/// The hash over what the CAA reads: the secret and configmap data and the ssh public key.
pub fn config_hash(inputs: &ConfigInputs) -> String {
    let ssh = inputs
        .ssh
        .as_ref()
        .and_then(|m| m.get(SSH_PUBLIC_KEY))
        .map(|s| s.trim().to_string());
    crate::k8s::apply::content_hash(&(&inputs.secret, &inputs.configmap, ssh))
}

/// The desired DaemonSet, hash-stamped (see [`crate::k8s::apply::stamp_hash`]).
pub fn daemonset(
    namespace: &str,
    image: &str,
    secret: &str,
    configmap: &str,
    node_selector: &BTreeMap<String, String>,
    config_hash: &str,
    owner: OwnerReference,
) -> DaemonSet {
    let labels = json!({"app": DAEMONSET, "app.kubernetes.io/managed-by": "sandboxd"});
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": DAEMONSET,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": {"matchLabels": {"app": DAEMONSET}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "hostNetwork": true,
                    "nodeSelector": node_selector,
                    "containers": [{
                        "name": "cloud-api-adaptor",
                        "image": image,
                        "args": ["caa"],
                        "securityContext": {"privileged": true},
                        "envFrom": [
                            {"secretRef": {"name": secret}},
                            {"configMapRef": {"name": configmap}},
                        ],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "CAA_SSH_PUBLIC_KEY", "value": format!("/etc/sandboxd/ssh-key/{SSH_PUBLIC_KEY}")},
                        ],
                        "volumeMounts": [
                            {"name": "pods-dir", "mountPath": "/run/peerpod", "mountPropagation": "HostToContainer"},
                            {"name": "netns", "mountPath": "/run/netns", "mountPropagation": "HostToContainer"},
                            {"name": "ssh", "mountPath": "/etc/sandboxd/ssh-key", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "pods-dir", "hostPath": {"path": "/run/peerpod", "type": "DirectoryOrCreate"}},
                        {"name": "netns", "hostPath": {"path": "/run/netns", "type": "DirectoryOrCreate"}},
                        {"name": "ssh", "secret": {"secretName": SSH_KEY_SECRET, "items": [{"key": SSH_PUBLIC_KEY, "path": SSH_PUBLIC_KEY}]}},
                    ],
                },
            },
        },
    }))
    .expect("the CAA DaemonSet is a valid DaemonSet");
    crate::k8s::apply::stamp_hash(&mut ds);
    ds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(cm_value: &str) -> ConfigInputs {
        let m = |k: &str, v: &str| Some(BTreeMap::from([(k.to_string(), v.to_string())]));
        ConfigInputs {
            secret: ("peer-pods-secret".into(), m("AZURE_CLIENT_ID", "a")),
            configmap: ("peer-pods-cm".into(), m("VXLAN_PORT", cm_value)),
            ssh: m(SSH_PUBLIC_KEY, "ssh-ed25519 AAAA"),
        }
    }

    #[test]
    fn the_config_hash_follows_every_input_and_only_the_public_key() {
        let a = config_hash(&inputs("9000"));
        assert_eq!(a, config_hash(&inputs("9000")));
        assert_ne!(a, config_hash(&inputs("9001")));
        let mut i = inputs("9000");
        i.ssh
            .as_mut()
            .unwrap()
            .insert("id_rsa".into(), "private".into());
        assert_eq!(
            a,
            config_hash(&i),
            "the private key is not the CAA's business"
        );
    }

    #[test]
    fn the_daemonset_carries_the_hash_in_its_template_and_the_design_spec() {
        let sel = BTreeMap::from([("kata".to_string(), String::new())]);
        let ds = daemonset(
            "ns",
            "img",
            "s",
            "cm",
            &sel,
            "h1",
            OwnerReference::default(),
        );
        let t = ds.spec.as_ref().unwrap().template.clone();
        assert_eq!(
            t.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION],
            "h1"
        );
        let pod = t.spec.unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.service_account_name.as_deref(), Some(SERVICE_ACCOUNT));
        let c = &pod.containers[0];
        assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
        assert_eq!(c.env_from.as_ref().unwrap().len(), 2);
        let other = daemonset(
            "ns",
            "img",
            "s",
            "cm",
            &sel,
            "h2",
            OwnerReference::default(),
        );
        assert!(!crate::k8s::apply::hash_matches(Some(&ds), &other));
        let same = daemonset(
            "ns",
            "img",
            "s",
            "cm",
            &sel,
            "h1",
            OwnerReference::default(),
        );
        assert!(crate::k8s::apply::hash_matches(Some(&ds), &same));
    }
}
