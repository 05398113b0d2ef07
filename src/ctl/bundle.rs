//! The OLM bundle under `deploy/olm/bundle/manifests/`, generated from the same embedded
//! manifests `sandboxd ctl install` applies (the OpenShift overlay): a ClusterServiceVersion
//! that owns the CRDs, installs the operator Deployment with the RBAC as its permissions,
//! and carries `alm-examples` and spec descriptors for the console's KataConfig form; plus
//! the CRDs themselves. A unit test keeps the checked-in files equal to this output
//! (`SANDBOXD_UPDATE_GENERATED=1 cargo test --lib ctl::bundle` rewrites them).

use serde_json::{Value, json};

use super::install::{Error, Platform, render};
use crate::api::names::DEFAULT_NAMESPACE;

/// The OLM package name.
pub(crate) const PACKAGE: &str = "sandboxd";
/// The channel.
pub(crate) const CHANNEL: &str = "stable";

/// The CSV name of this version.
pub(crate) fn csv_name() -> String {
    format!("{PACKAGE}.v{}", crate::VERSION)
}

/// The oldest Kubernetes the operator supports: 1.28 (OpenShift 4.15). Before 1.30 there is
/// no ValidatingAdmissionPolicy and the operator keeps the one-KataConfig rule with its
/// webhook; webhook `matchConditions` (beta, on by default) exist since 1.28.
pub(crate) const MIN_KUBE_VERSION: &str = "1.28.0";

/// The operator's icon (`deploy/olm/icon.svg`).
const ICON_SVG: &str = include_str!("../../deploy/olm/icon.svg");

/// The objects of the guide, as the console's examples: the KataConfig it creates (peer
/// pods on, log level info) and the PeerPodConfig the operator makes with its defaults
/// (the guide changes only `limit`); and a PeerPod record as CAA writes it (an internal
/// object: the console does not offer to create it).
fn alm_examples() -> Value {
    let ppc = crate::api::peerpodconfig::PeerPodConfigSpec::default();
    json!([
        {
            "apiVersion": "kataconfiguration.openshift.io/v1",
            "kind": "KataConfig",
            "metadata": {"name": "cluster-kataconfig"},
            "spec": {"enablePeerPods": true, "logLevel": "info"}
        },
        {
            "apiVersion": "confidentialcontainers.org/v1alpha1",
            "kind": "PeerPodConfig",
            "metadata": {
                "name": crate::api::names::PEER_POD_CONFIG,
                "namespace": DEFAULT_NAMESPACE,
            },
            "spec": ppc,
        },
        {
            "apiVersion": "confidentialcontainers.org/v1alpha1",
            "kind": "PeerPod",
            "metadata": {"name": "podvm-web-0a1b2c3d", "namespace": "default"},
            "spec": {
                "cloudProvider": "azure",
                "instanceID": "",
                "vmName": "podvm-web-0a1b2c3d",
                "nodeName": "worker-0",
                "podUID": "00000000-0000-0000-0000-000000000000",
                "sandboxId": "0a1b2c3d",
            },
        }
    ])
}

fn descriptor(path: &str, name: &str, description: &str, x: &[&str]) -> Value {
    json!({
        "path": path,
        "displayName": name,
        "description": description,
        "x-descriptors": x,
    })
}

fn owned(crd: &Value) -> Value {
    let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
    let version = crd["spec"]["versions"][0]["name"].clone();
    let description = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut o = json!({
        "name": crd["metadata"]["name"],
        "version": version,
        "kind": kind,
        "displayName": kind,
        "description": description,
    });
    const BOOL: &str = "urn:alm:descriptor:com.tectonic.ui:booleanSwitch";
    const ADVANCED: &str = "urn:alm:descriptor:com.tectonic.ui:advanced";
    match kind {
        "KataConfig" => {
            o["specDescriptors"] = json!([
                descriptor(
                    "enablePeerPods",
                    "Enable peer pods",
                    "Run pods of the kata-remote runtime class in their own cloud VMs (public \
                     clouds, IBM Z and LinuxONE).",
                    &[BOOL]
                ),
                descriptor(
                    "logLevel",
                    "Log level",
                    "Log level of the runtime on the nodes.",
                    &[
                        "urn:alm:descriptor:com.tectonic.ui:select:trace",
                        "urn:alm:descriptor:com.tectonic.ui:select:debug",
                        "urn:alm:descriptor:com.tectonic.ui:select:info",
                        "urn:alm:descriptor:com.tectonic.ui:select:warn",
                        "urn:alm:descriptor:com.tectonic.ui:select:error",
                    ]
                ),
                descriptor(
                    "kataConfigPoolSelector",
                    "KataConfig pool selector",
                    "Only nodes matching this label selector get kata-remote (matchLabels and \
                     matchExpressions with In, NotIn, Exists, DoesNotExist). Empty: every worker.",
                    &[ADVANCED]
                ),
                descriptor(
                    "checkNodeEligibility",
                    "Check node eligibility",
                    "Only install on nodes Node Feature Discovery marked able to run Kata.",
                    &[BOOL, ADVANCED]
                ),
            ]);
            o["statusDescriptors"] = json!([
                descriptor(
                    "kataNodes.readyNodeCount",
                    "Completed nodes",
                    "Nodes with kata-remote installed.",
                    &["urn:alm:descriptor:text"]
                ),
                descriptor(
                    "kataNodes.nodeCount",
                    "Total nodes",
                    "Nodes selected for kata-remote.",
                    &["urn:alm:descriptor:text"]
                ),
                descriptor(
                    "conditions",
                    "Conditions",
                    "InProgress and its reason.",
                    &["urn:alm:descriptor:io.kubernetes.conditions"]
                ),
            ]);
        }
        "PeerPodConfig" => {
            o["specDescriptors"] = json!([
                descriptor(
                    "limit",
                    "VM limit per node",
                    "Peer-pod VMs each selected node may run.",
                    &["urn:alm:descriptor:com.tectonic.ui:text"]
                ),
                descriptor(
                    "cloudSecretName",
                    "Cloud secret",
                    "The Secret with the cloud credentials.",
                    &["urn:alm:descriptor:io.kubernetes:Secret"]
                ),
                descriptor(
                    "configMapName",
                    "ConfigMap",
                    "The ConfigMap with the peer-pods settings.",
                    &["urn:alm:descriptor:io.kubernetes:ConfigMap"]
                ),
            ]);
            o["statusDescriptors"] = json!([descriptor(
                "conditions",
                "Conditions",
                "ConfigValid and PodVMImageReady.",
                &["urn:alm:descriptor:io.kubernetes.conditions"]
            )]);
        }
        _ => {}
    }
    o
}

/// The service account a role is bound to (by the binding of the same kind family).
fn bound_account(docs: &[Value], binding_kind: &str, role: &str) -> Option<String> {
    docs.iter()
        .filter(|d| d["kind"] == binding_kind && d["roleRef"]["name"] == role)
        .flat_map(|d| d["subjects"].as_array().cloned().unwrap_or_default())
        .find(|s| s["kind"] == "ServiceAccount")
        .and_then(|s| s["name"].as_str().map(str::to_string))
}

fn permissions(docs: &[Value], role_kind: &str, binding_kind: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for role in docs.iter().filter(|d| d["kind"] == role_kind) {
        let name = role["metadata"]["name"].as_str().unwrap_or_default();
        let Some(sa) = bound_account(docs, binding_kind, name) else {
            continue;
        };
        let rules = role["rules"].as_array().cloned().unwrap_or_default();
        match out
            .iter_mut()
            .find(|p| p["serviceAccountName"] == sa.as_str())
        {
            Some(p) => {
                if let Some(r) = p["rules"].as_array_mut() {
                    r.extend(rules);
                }
            }
            None => out.push(json!({"serviceAccountName": sa, "rules": rules})),
        }
    }
    out
}

/// The ClusterServiceVersion.
pub(crate) fn csv() -> Result<Value, Error> {
    let docs = render(Platform::Openshift, DEFAULT_NAMESPACE, None)?;
    let crds: Vec<Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(owned)
        .collect();
    let deployments: Vec<Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| {
            json!({
                "name": d["metadata"]["name"],
                "label": d["metadata"]["labels"],
                "spec": d["spec"],
            })
        })
        .collect();
    let image = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| d["spec"]["template"]["spec"]["containers"][0]["image"].clone())
        .unwrap_or(Value::Null);
    Ok(json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {
            "name": csv_name(),
            "annotations": {
                "alm-examples": serde_json::to_string_pretty(&alm_examples()).unwrap_or_default(),
                // PeerPods are CAA's records of pod VMs, not for users to create.
                "operators.operatorframework.io/internal-objects":
                    serde_json::to_string(&["peerpods.confidentialcontainers.org"]).unwrap_or_default(),
                "capabilities": "Basic Install",
                "categories": "Security",
                "containerImage": image,
                "description": "Run pods in their own cloud VMs (peer pods), the OpenShift \
                                sandboxed containers way, from one binary.",
                "operatorframework.io/suggested-namespace": DEFAULT_NAMESPACE,
                "operators.openshift.io/infrastructure-features": "[\"disconnected\"]",
            },
        },
        "spec": {
            "displayName": "sandboxd (peer pods)",
            "description": "sandboxd installs the kata-remote runtime class and runs pods of \
                            that class in their own cloud VMs (peer pods) on Azure.\n\n\
                            Create the peer-pods-secret and peer-pods-cm, the ssh-key-secret, \
                            then a KataConfig with enablePeerPods; see docs/ctl.md.",
            "version": crate::VERSION,
            "minKubeVersion": MIN_KUBE_VERSION,
            "icon": [{
                "base64data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ICON_SVG),
                "mediatype": "image/svg+xml",
            }],
            "maturity": "alpha",
            "provider": {"name": "sandboxd"},
            "keywords": ["sandboxed-containers", "kata", "peer-pods", "confidential"],
            "installModes": [
                {"type": "OwnNamespace", "supported": true},
                {"type": "SingleNamespace", "supported": false},
                {"type": "MultiNamespace", "supported": false},
                {"type": "AllNamespaces", "supported": false},
            ],
            "customresourcedefinitions": {"owned": crds},
            "install": {
                "strategy": "deployment",
                "spec": {
                    "clusterPermissions": permissions(&docs, "ClusterRole", "ClusterRoleBinding"),
                    "permissions": permissions(&docs, "Role", "RoleBinding"),
                    "deployments": deployments,
                },
            },
        },
    }))
}

/// Every generated file of the bundle, as (path under `deploy/olm/bundle/`, content).
pub(crate) fn files() -> Result<Vec<(String, String)>, Error> {
    let header = "# Generated from deploy/ by `src/ctl/bundle.rs`; do not edit \
                  (SANDBOXD_UPDATE_GENERATED=1 cargo test --lib ctl::bundle).\n";
    let csv = serde_saphyr::to_string(&csv()?).map_err(|e| Error::Manifest(e.to_string()))?;
    let mut out = vec![(
        format!("manifests/{PACKAGE}.clusterserviceversion.yaml"),
        format!("{header}{csv}"),
    )];
    for (file, crd) in crate::api::all_crds() {
        out.push((format!("manifests/{file}"), crate::api::crd_yaml(&crd)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_bundle_matches_the_generator() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/olm/bundle");
        let update = std::env::var_os("SANDBOXD_UPDATE_GENERATED").is_some();
        let mut stale = Vec::new();
        for (path, want) in files().unwrap() {
            let path = dir.join(path);
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            if std::fs::read_to_string(&path).unwrap_or_default() != want {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "the OLM bundle differs from deploy/: {stale:?}; run \
             `SANDBOXD_UPDATE_GENERATED=1 cargo test --lib ctl::bundle` and review the diff"
        );
    }

    #[test]
    fn subscription_and_annotations_name_this_package_and_channel() {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(include_str!("../../deploy/olm/subscription.yaml"))
                .unwrap();
        let sub = docs.iter().find(|d| d["kind"] == "Subscription").unwrap();
        assert_eq!(sub["spec"]["name"], PACKAGE);
        assert_eq!(sub["spec"]["channel"], CHANNEL);
        assert_eq!(sub["spec"]["startingCSV"], csv_name().as_str());
        let catalogs: Vec<Value> =
            serde_saphyr::from_multiple(include_str!("../../deploy/olm/catalog-source.yaml"))
                .unwrap();
        assert_eq!(sub["spec"]["source"], catalogs[0]["metadata"]["name"]);
        assert_eq!(
            sub["spec"]["sourceNamespace"],
            catalogs[0]["metadata"]["namespace"]
        );
        let og = docs.iter().find(|d| d["kind"] == "OperatorGroup").unwrap();
        assert_eq!(og["spec"]["targetNamespaces"], json!([DEFAULT_NAMESPACE]));
        let annotations: Value = serde_saphyr::from_str(include_str!(
            "../../deploy/olm/bundle/metadata/annotations.yaml"
        ))
        .unwrap();
        let a = &annotations["annotations"];
        assert_eq!(
            a["operators.operatorframework.io.bundle.package.v1"],
            PACKAGE
        );
        assert_eq!(
            a["operators.operatorframework.io.bundle.channels.v1"],
            CHANNEL
        );
        assert_eq!(
            a["operators.operatorframework.io.bundle.channel.default.v1"],
            CHANNEL
        );
    }

    #[test]
    fn csv_owns_every_crd_and_binds_rbac_to_service_accounts() {
        let csv = csv().unwrap();
        let owned = csv["spec"]["customresourcedefinitions"]["owned"]
            .as_array()
            .unwrap();
        assert_eq!(owned.len(), crate::api::all_crds().len());
        let strategy = &csv["spec"]["install"]["spec"];
        let accounts: Vec<&str> = strategy["clusterPermissions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["serviceAccountName"].as_str().unwrap())
            .collect();
        assert!(accounts.contains(&"sandboxd-operator"), "{accounts:?}");
        assert!(accounts.contains(&"sandboxd-caa"), "{accounts:?}");
        assert_eq!(
            strategy["deployments"][0]["spec"]["template"]["spec"]["containers"][0]["args"],
            json!(["operator", "--platform=openshift"])
        );
        let modes = csv["spec"]["installModes"].as_array().unwrap();
        assert!(
            modes
                .iter()
                .any(|m| m["type"] == "OwnNamespace" && m["supported"] == true)
        );
        let example: Value = serde_json::from_str(
            csv["metadata"]["annotations"]["alm-examples"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(example[0]["spec"]["enablePeerPods"], true);
        assert_eq!(csv["spec"]["minKubeVersion"], MIN_KUBE_VERSION);
        assert_eq!(csv["spec"]["icon"][0]["mediatype"], "image/svg+xml");
    }

    /// OLM's loader decodes only the first YAML document of each manifest: it must be the
    /// object, not an empty document before it.
    #[test]
    fn every_bundle_manifest_is_read_as_its_object_by_a_first_document_decoder() {
        for (path, text) in files().unwrap() {
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
            assert_eq!(docs.len(), 1, "{path}: one document, found {}", docs.len());
            let first: Value = serde_saphyr::from_str(&text)
                .unwrap_or_else(|e| panic!("{path}: the first document is not an object: {e}"));
            assert!(
                first["kind"].is_string(),
                "{path}: first document has no kind"
            );
            assert!(
                !text.lines().any(|l| l.trim() == "---"),
                "{path}: a document separator"
            );
        }
    }

    /// The console's examples are the guide's objects and pass the CRDs' schemas' shape.
    #[test]
    fn alm_examples_are_the_guides_kataconfig_and_the_default_peerpodconfig() {
        let ex = alm_examples();
        assert_eq!(ex[0]["metadata"]["name"], "cluster-kataconfig");
        assert_eq!(
            ex[0]["spec"],
            json!({"enablePeerPods": true, "logLevel": "info"})
        );
        assert_eq!(ex[1]["kind"], "PeerPodConfig");
        assert_eq!(ex[1]["metadata"]["name"], "peerpodconfig-openshift");
        assert_eq!(ex[1]["spec"]["limit"], "10");
        assert_eq!(ex[1]["spec"]["cloudSecretName"], "peer-pods-secret");
        assert_eq!(ex[1]["spec"]["configMapName"], "peer-pods-cm");
    }
}
