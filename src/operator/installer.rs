//! The node installer DaemonSet (pure): the same image running `sandboxd operator
//! node-install` on every node labelled for install or uninstall.

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Resource;
use serde_json::json;

use crate::api::kataconfig::KataConfig;
use crate::api::names::*;
use crate::k8s::apply::stamp_hash;

/// What the DaemonSet needs besides its owner.
#[derive(Clone, Debug)]
pub(crate) struct InstallerSpec<'a> {
    /// The operator namespace.
    pub(crate) namespace: &'a str,
    /// The sandboxd image.
    pub(crate) image: &'a str,
    /// The KataConfig's `logLevel`.
    pub(crate) log_level: &'a str,
    /// The KataConfig's `shim`.
    pub(crate) shim: &'a str,
}

/// The DaemonSet, hash-stamped so an unchanged one is never re-applied.
pub(crate) fn desired(owner: &KataConfig, spec: &InstallerSpec<'_>) -> DaemonSet {
    let owner_ref = owner.controller_owner_ref(&());
    let app = json!({"app.kubernetes.io/name": INSTALLER_DAEMONSET});
    let host = |name: &str, path: &str| json!({"name": name, "hostPath": {"path": path, "type": "Directory"}});
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": INSTALLER_DAEMONSET,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": INSTALLER_DAEMONSET, LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": owner_ref.into_iter().collect::<Vec<_>>(),
        },
        "spec": {
            "selector": {"matchLabels": app},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": app},
                "spec": {
                    "serviceAccountName": INSTALLER_SERVICE_ACCOUNT,
                    "automountServiceAccountToken": true,
                    "terminationGracePeriodSeconds": 30,
                    "tolerations": [{"operator": "Exists"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{
                            "key": LABEL_NODE_INSTALL, "operator": "In", "values": [INSTALL, UNINSTALL]
                        }]}]
                    }}},
                    "containers": [{
                        "name": "node-install",
                        "image": spec.image,
                        "args": ["operator", "node-install"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "KATA_LOG_LEVEL", "value": spec.log_level},
                            {"name": "KATA_SHIM", "value": spec.shim},
                        ],
                        // root: the image's user (65532) gets no capabilities from
                        // `privileged` and cannot write the host's /etc.
                        "securityContext": {"privileged": true, "runAsUser": 0},
                        "resources": {"requests": {"cpu": "10m", "memory": "24Mi"},
                                      "limits": {"memory": "64Mi"}},
                        "volumeMounts": [
                            {"name": "host-etc", "mountPath": "/host/etc"},
                            // Writable: sandboxd's shim goes to /opt/sandboxd/bin.
                            {"name": "host-opt", "mountPath": "/host/opt"},
                            {"name": "host-usr", "mountPath": "/host/usr", "readOnly": true},
                            {"name": "host-dbus", "mountPath": "/host/run/dbus"},
                        ],
                    }],
                    "volumes": [
                        host("host-etc", "/etc"),
                        host("host-opt", "/opt"),
                        host("host-usr", "/usr"),
                        host("host-dbus", "/run/dbus"),
                    ],
                }
            }
        }
    }))
    .expect("a static DaemonSet always deserialises");
    stamp_hash(&mut ds);
    ds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installer_runs_the_same_image_and_follows_log_level() {
        let kc = KataConfig::new("k", Default::default());
        let spec = InstallerSpec {
            namespace: "ns",
            image: "sandboxd:latest",
            log_level: "info",
            shim: "auto",
        };
        let a = desired(&kc, &spec);
        let c = &a
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        assert_eq!(c.image.as_deref(), Some("sandboxd:latest"));
        assert_eq!(c.args.as_ref().unwrap(), &["operator", "node-install"]);
        // It edits root-owned host files: root, not the image's non-root user.
        assert_eq!(
            c.security_context.as_ref().and_then(|s| s.run_as_user),
            Some(0)
        );
        let b = desired(
            &kc,
            &InstallerSpec {
                log_level: "debug",
                ..spec.clone()
            },
        );
        assert_ne!(
            a.metadata.annotations.as_ref().unwrap()[crate::k8s::apply::HASH_ANNOTATION],
            b.metadata.annotations.as_ref().unwrap()[crate::k8s::apply::HASH_ANNOTATION]
        );
        // The shim choice reaches the installer, and its change rolls it out.
        let env = c.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "KATA_SHIM" && e.value.as_deref() == Some("auto"))
        );
        let s = desired(
            &kc,
            &InstallerSpec {
                shim: "sandboxd",
                ..spec.clone()
            },
        );
        assert_ne!(
            a.metadata.annotations.as_ref().unwrap()[crate::k8s::apply::HASH_ANNOTATION],
            s.metadata.annotations.as_ref().unwrap()[crate::k8s::apply::HASH_ANNOTATION]
        );
        assert!(crate::k8s::apply::hash_matches(
            Some(&desired(&kc, &spec)),
            &a
        ));
    }
}
