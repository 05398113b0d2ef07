//! The cloud-api-adaptor DaemonSet `peerpodconfig-ctrl-caa-daemon` as a pure function of
//! the PeerPodConfig, the image and the hash of the user's configuration.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;

use super::plan::ConfigInputs;
use crate::api::names::{
    CAA_DAEMONSET, CAA_SERVICE_ACCOUNT, CAA_SOCKET, LABEL_MANAGED_BY, MANAGED_BY, PEERPOD_DIR,
    RELAY_CONTROL_SOCKET, RELAY_DAEMONSET, RELAY_SERVICE_ACCOUNT, SSH_KEY_SECRET, SSH_PUBLIC_KEY,
};

/// Pod-template annotation: hash of the secret, the configmap and the ssh public key. A real
/// change of any of them changes it and rolls the pods; no change never touches them.
pub const CONFIG_HASH_ANNOTATION: &str = "peerpods.sandboxd.io/config-hash";

/// The hash over what the CAA reads: the secret and configmap data and the ssh public key.
pub(crate) fn config_hash(inputs: &ConfigInputs) -> String {
    let ssh = inputs
        .ssh
        .as_ref()
        .and_then(|m| m.get(SSH_PUBLIC_KEY))
        .map(|s| s.trim().to_string());
    crate::k8s::apply::content_hash(&(&inputs.secret, &inputs.configmap, ssh))
}

/// What the cluster offers the CAA pod, decided once from the API server's version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Whether the downward API offers `status.hostIPs` (Kubernetes 1.29 and later; 1.28
    /// has it behind a feature gate that is off by default, and rejects the field without).
    pub host_ips: bool,
}

impl Cluster {
    /// From the API server's `major`/`minor` version (`minor` may carry a `+`).
    pub(crate) fn from_version(major: &str, minor: &str) -> Self {
        let num = |s: &str| {
            s.trim_end_matches('+')
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
                .ok()
        };
        let host_ips = matches!((num(major), num(minor)), (Some(ma), Some(mi)) if ma > 1 || (ma == 1 && mi >= 29));
        Self { host_ips }
    }
}

/// The CAA container's environment beyond `envFrom`: the node's name and IP(s) and the pod's
/// namespace from the downward API (the pod tunnel's worker end is the node IP; CAA keeps
/// its certificates in a Secret of its namespace), where the SSH key is mounted, and the
/// operator's proxy variables.
fn env(cluster: Cluster, azure: &crate::cloud::azure::EndpointArgs) -> Vec<serde_json::Value> {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}});
    let mut env = vec![
        field("NODE_NAME", "spec.nodeName"),
        field("NODE_IP", "status.hostIP"),
    ];
    if cluster.host_ips {
        env.push(field("NODE_IPS", "status.hostIPs"));
    }
    env.push(field("POD_NAMESPACE", "metadata.namespace"));
    env.push(json!({"name": "CAA_SSH_PUBLIC_KEY", "value": format!("/etc/sandboxd/ssh-key/{SSH_PUBLIC_KEY}")}));
    // The node agent relay holds the shim's hypervisor socket and the agent sockets; CAA
    // serves behind it.
    env.push(json!({"name": "CAA_SOCKET", "value": CAA_SOCKET}));
    env.push(json!({"name": "CAA_RELAY_SOCKET", "value": RELAY_CONTROL_SOCKET}));
    // Behind a cluster-wide proxy: ARM and Entra ID calls go through it.
    env.extend(azure.proxy_env_entries());
    env
}

/// The node agent relay DaemonSet `peerpodconfig-ctrl-caa-relay` ([`crate::caa::noderelay`]):
/// on the CAA's nodes, `OnDelete` (no template change restarts it: its pods hold every
/// running peer pod's agent connection), no ConfigMap or Secret, no API access, on the
/// node's network (it dials the pod VMs), root only to own the sockets in `/run/peerpod`.
pub fn relay_daemonset(
    namespace: &str,
    image: &str,
    node_selector: &BTreeMap<String, String>,
    owner: OwnerReference,
) -> DaemonSet {
    let labels = json!({"app": RELAY_DAEMONSET, LABEL_MANAGED_BY: MANAGED_BY});
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": RELAY_DAEMONSET,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": {"matchLabels": {"app": RELAY_DAEMONSET}},
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": RELAY_SERVICE_ACCOUNT,
                    "automountServiceAccountToken": false,
                    "hostNetwork": true,
                    "nodeSelector": node_selector,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "agent-relay",
                        "image": image,
                        "args": ["caa-relay"],
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsGroup": 0,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                            // On SELinux hosts a confined container may not make sockets in
                            // the host's /run/peerpod that the shim (unconfined) connects to.
                            "seLinuxOptions": {"type": "spc_t"},
                        },
                        "volumeMounts": [
                            {"name": "pods-dir", "mountPath": PEERPOD_DIR},
                        ],
                    }],
                    "volumes": [
                        {"name": "pods-dir", "hostPath": {"path": PEERPOD_DIR, "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    }))
    .expect("the relay DaemonSet is a valid DaemonSet");
    crate::k8s::apply::stamp_hash(&mut ds);
    ds
}

/// The desired DaemonSet, hash-stamped (see [`crate::k8s::apply::stamp_hash`]).
#[allow(clippy::too_many_arguments)]
pub fn daemonset(
    namespace: &str,
    image: &str,
    secret: &str,
    configmap: &str,
    node_selector: &BTreeMap<String, String>,
    config_hash: &str,
    owner: OwnerReference,
    cluster: Cluster,
    azure: &crate::cloud::azure::EndpointArgs,
) -> DaemonSet {
    let args: Vec<String> = std::iter::once("caa".to_string())
        .chain(azure.to_args())
        .collect();
    let labels = json!({"app": CAA_DAEMONSET, LABEL_MANAGED_BY: MANAGED_BY});
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": CAA_DAEMONSET,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": {"matchLabels": {"app": CAA_DAEMONSET}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": {
                    "serviceAccountName": CAA_SERVICE_ACCOUNT,
                    "hostNetwork": true,
                    "nodeSelector": node_selector,
                    "containers": [{
                        "name": "cloud-api-adaptor",
                        "image": image,
                        "args": args,
                        // Root: the image's user (65532) would hold no capability, so the pod
                        // tunnel (netlink, network namespaces) and the host's /run/peerpod
                        // would be out of reach even in a privileged container.
                        "securityContext": {"privileged": true, "runAsUser": 0, "runAsGroup": 0},
                        "envFrom": [
                            {"secretRef": {"name": secret}},
                            {"configMapRef": {"name": configmap}},
                        ],
                        "env": env(cluster, azure),
                        // Scraped by the PodMonitor of deploy/monitoring (hostNetwork: the
                        // node's port).
                        "ports": [{"name": "metrics", "containerPort": crate::caa::METRICS_PORT, "protocol": "TCP"}],
                        "volumeMounts": [
                            {"name": "pods-dir", "mountPath": PEERPOD_DIR, "mountPropagation": "HostToContainer"},
                            {"name": "netns", "mountPath": "/run/netns", "mountPropagation": "HostToContainer"},
                            {"name": "ssh", "mountPath": "/etc/sandboxd/ssh-key", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "pods-dir", "hostPath": {"path": PEERPOD_DIR, "type": "DirectoryOrCreate"}},
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
            Cluster { host_ips: true },
            &Default::default(),
        );
        let t = ds.spec.as_ref().unwrap().template.clone();
        assert_eq!(
            t.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION],
            "h1"
        );
        let pod = t.spec.unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(CAA_SERVICE_ACCOUNT)
        );
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
            Cluster { host_ips: true },
            &Default::default(),
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
            Cluster { host_ips: true },
            &Default::default(),
        );
        assert!(crate::k8s::apply::hash_matches(Some(&ds), &same));
    }

    #[test]
    fn caa_carries_the_operators_proxy_variables_over_the_configmaps() {
        let azure = crate::cloud::azure::EndpointArgs {
            proxy_env: vec![("HTTPS_PROXY".into(), "http://proxy.example:3128".into())],
            ..Default::default()
        };
        let ds = daemonset(
            "ns",
            "img",
            "s",
            "cm",
            &BTreeMap::new(),
            "h",
            OwnerReference::default(),
            Cluster::default(),
            &azure,
        );
        // `env` wins over `envFrom` (peer-pods-cm) for the same name.
        let env = ds.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert!(
            env.iter().any(|e| e.name == "HTTPS_PROXY"
                && e.value.as_deref() == Some("http://proxy.example:3128")),
            "{env:?}"
        );
    }

    #[test]
    fn the_operators_development_endpoint_flags_reach_the_caa_command_line_only() {
        let sel = BTreeMap::new();
        let azure = crate::cloud::azure::EndpointArgs::development("http://10.0.0.1:8080/");
        let ds = daemonset(
            "ns",
            "img",
            "s",
            "cm",
            &sel,
            "h",
            OwnerReference::default(),
            Cluster::default(),
            &azure,
        );
        let c = ds.spec.unwrap().template.spec.unwrap().containers[0].clone();
        assert_eq!(
            c.args.unwrap(),
            ["caa", "--dev-arm-endpoint", "http://10.0.0.1:8080/"]
        );
        let plain = daemonset(
            "ns",
            "img",
            "s",
            "cm",
            &sel,
            "h",
            OwnerReference::default(),
            Cluster::default(),
            &Default::default(),
        );
        let c = plain.spec.unwrap().template.spec.unwrap().containers[0].clone();
        assert_eq!(c.args.unwrap(), ["caa"]);
    }

    #[test]
    fn caa_gets_node_ip_ips_and_namespace_from_the_downward_api_and_runs_as_root() {
        let sel = BTreeMap::from([("kata".to_string(), String::new())]);
        let env_of = |cluster| {
            let ds = daemonset(
                "ns",
                "img",
                "s",
                "cm",
                &sel,
                "h",
                OwnerReference::default(),
                cluster,
                &Default::default(),
            );
            let c = ds.spec.unwrap().template.spec.unwrap().containers[0].clone();
            assert_eq!(c.security_context.as_ref().unwrap().run_as_user, Some(0));
            c.env
                .unwrap()
                .into_iter()
                .map(|e| {
                    let v = e
                        .value_from
                        .and_then(|v| v.field_ref)
                        .map(|f| format!("fieldRef:{}", f.field_path))
                        .or(e.value)
                        .unwrap_or_default();
                    (e.name, v)
                })
                .collect::<Vec<_>>()
        };
        let with = env_of(Cluster { host_ips: true });
        let want = |extra: bool| {
            let mut v = vec![
                (
                    "NODE_NAME".to_string(),
                    "fieldRef:spec.nodeName".to_string(),
                ),
                ("NODE_IP".into(), "fieldRef:status.hostIP".into()),
            ];
            if extra {
                v.push(("NODE_IPS".into(), "fieldRef:status.hostIPs".into()));
            }
            v.push(("POD_NAMESPACE".into(), "fieldRef:metadata.namespace".into()));
            v.push((
                "CAA_SSH_PUBLIC_KEY".into(),
                "/etc/sandboxd/ssh-key/id_rsa.pub".into(),
            ));
            v.push(("CAA_SOCKET".into(), CAA_SOCKET.into()));
            v.push(("CAA_RELAY_SOCKET".into(), RELAY_CONTROL_SOCKET.into()));
            v
        };
        assert_eq!(with, want(true));
        assert_eq!(env_of(Cluster { host_ips: false }), want(false));
    }

    #[test]
    fn the_relay_is_never_rolled_reads_no_user_config_and_has_no_api_access() {
        let sel = BTreeMap::from([("kata".to_string(), String::new())]);
        let ds = relay_daemonset("ns", "img", &sel, OwnerReference::default());
        let spec = ds.spec.clone().unwrap();
        assert_eq!(
            spec.update_strategy.unwrap().type_.as_deref(),
            Some("OnDelete")
        );
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.node_selector, Some(sel.clone()));
        let c = &pod.containers[0];
        assert!(c.env_from.is_none() && c.env.is_none());
        assert_eq!(c.args.as_deref(), Some(&["caa-relay".to_string()][..]));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        // The same on every call: the operator never rewrites it without a change.
        let again = relay_daemonset("ns", "img", &sel, OwnerReference::default());
        assert!(crate::k8s::apply::hash_matches(Some(&ds), &again));
    }

    #[test]
    fn host_ips_are_offered_from_kubernetes_1_29() {
        assert!(!Cluster::from_version("1", "28").host_ips);
        assert!(Cluster::from_version("1", "29").host_ips);
        assert!(Cluster::from_version("1", "30+").host_ips);
        assert!(Cluster::from_version("1", "36").host_ips);
        assert!(!Cluster::from_version("", "").host_ips);
    }
}
