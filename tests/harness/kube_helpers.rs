//! Kubernetes helpers for tests: namespaces, fake nodes, a kubelet stand-in, clients acting
//! as a ServiceAccount, and installing CRDs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::control_plane::{UserAuth, client_from_yaml, kubeconfig_yaml};
use super::{ControlPlane, eventually};

const PM: &str = "sandboxd-test";

/// Creates a namespace and waits for its `default` ServiceAccount (made by the controller
/// manager; the API server refuses pods before it exists).
pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"sandboxd.test/run": "true"}}
    }))?;
    api.create(&PostParams::default(), &ns).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    eventually(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || async { Ok(sas.get_opt("default").await?.map(|_| ())) },
    )
    .await
}

/// Deletes a namespace without waiting.
pub async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    api.delete(name, &DeleteParams::background()).await?;
    Ok(())
}

/// Creates a Node that the scheduler accepts: Ready, with capacity and allocatable
/// (`cpu 8`, `memory 32Gi`, `pods 110` plus `extra`), and the not-ready taint the API
/// server adds on registration removed (no node lifecycle controller runs here).
pub async fn fake_node(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let mut label_map: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    label_map.insert("kubernetes.io/hostname".into(), name.into());
    label_map.insert("kubernetes.io/os".into(), "linux".into());
    label_map.insert("sandboxd.test/fake-node".into(), "true".into());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": label_map},
    }))?;
    api.create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating node {name}"))?;
    set_node_ready(client, name, extra).await?;
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"taints": null}})),
    )
    .await?;
    Ok(api.get(name).await?)
}

/// Marks a node Ready with the default capacity plus `extra` (what a kubelet reports).
pub async fn set_node_ready(client: &Client, name: &str, extra: &[(&str, &str)]) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let mut capacity = serde_json::Map::new();
    for (k, v) in [("cpu", "8"), ("memory", "32Gi"), ("pods", "110")]
        .into_iter()
        .chain(extra.iter().copied())
    {
        capacity.insert(k.to_string(), json!(v));
    }
    let now = chrono_now();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "fake node for tests", "lastHeartbeatTime": now,
                    "lastTransitionTime": now
                }],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "nodeInfo": {
                    "architecture": "amd64", "operatingSystem": "linux",
                    "containerRuntimeVersion": "containerd://2.0.0",
                    "kubeletVersion": "v1.36.3", "kubeProxyVersion": "",
                    "bootID": "", "kernelVersion": "", "machineID": "",
                    "osImage": "fake", "systemUUID": ""
                }
            }
        })),
    )
    .await
    .with_context(|| format!("marking node {name} ready"))?;
    Ok(())
}

fn chrono_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The pod phases a test, acting as the kubelet, can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Running and Ready.
    Running,
    /// Completed successfully.
    Succeeded,
    /// Failed.
    Failed,
}

/// Acts as the kubelet for one pod: sets its phase, readiness and IP.
pub async fn set_pod_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phase: Phase,
    pod_ip: Option<&str>,
) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = api.get(name).await?;
    let now = chrono_now();
    let ready = phase == Phase::Running;
    let status_word = if ready { "True" } else { "False" };
    let containers: Vec<_> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let container_statuses: Vec<_> = containers
        .iter()
        .map(|c| {
            let state = match phase {
                Phase::Running => json!({"running": {"startedAt": now}}),
                Phase::Succeeded => json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}),
                Phase::Failed => json!({"terminated": {"exitCode": 1, "reason": "Error", "startedAt": now, "finishedAt": now}}),
            };
            json!({"name": c, "ready": ready, "restartCount": 0, "image": "fake", "imageID": "",
                   "started": ready, "state": state})
        })
        .collect();
    let mut status = json!({
        "phase": match phase { Phase::Running => "Running", Phase::Succeeded => "Succeeded", Phase::Failed => "Failed" },
        "startTime": now,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": status_word, "lastTransitionTime": now},
            {"type": "Ready", "status": status_word, "lastTransitionTime": now},
        ],
        "containerStatuses": container_statuses,
    });
    if let Some(ip) = pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .with_context(|| format!("setting pod {ns}/{name} {phase:?}"))
}

/// A client acting as ServiceAccount `ns/name` (created if missing), with a token from the
/// TokenRequest API: what the component gets when deployed with that account.
pub async fn service_account_client(cp: &ControlPlane, ns: &str, name: &str) -> Result<Client> {
    client_from_yaml(&service_account_kubeconfig(cp, ns, name).await?).await
}

/// A client of ServiceAccount `ns/name` whose token is bound to a pod on `node`, as a
/// DaemonSet pod's projected token is: the API server puts the node's name in the token
/// (`authentication.kubernetes.io/node-name`). The pod (named `<name>-<node>`, never run)
/// is created when missing.
pub async fn pod_bound_service_account_client(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    node: &str,
) -> Result<Client> {
    let admin = cp.admin_client().await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    if sas.get_opt(name).await?.is_none() {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        sas.create(&PostParams::default(), &sa).await?;
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), ns);
    let pod_name = format!("{name}-{node}");
    let pod = match pods.get_opt(&pod_name).await? {
        Some(p) => p,
        None => {
            pods.create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": pod_name},
                    "spec": {"nodeName": node, "serviceAccountName": name,
                             "containers": [{"name": "c", "image": "sandboxd:test"}]},
                }))?,
            )
            .await?
        }
    };
    let req: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                               "name": pod_name, "uid": pod.metadata.uid},
        }
    }))?;
    let token: TokenRequest = sas
        .create_subresource("token", name, &PostParams::default(), &req)
        .await
        .with_context(|| format!("requesting a pod-bound token for {ns}/{name}"))?;
    let token = token
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("TokenRequest returned no token"))?;
    client_from_yaml(&kubeconfig_yaml(
        &cp.server,
        &cp.ca_pem,
        &UserAuth::Token(token),
    ))
    .await
}

/// A kubeconfig (YAML) authenticating as ServiceAccount `ns/name` with a TokenRequest token
/// (the ServiceAccount is created when missing), for a process the test starts.
pub async fn service_account_kubeconfig(cp: &ControlPlane, ns: &str, name: &str) -> Result<String> {
    let admin = cp.admin_client().await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin, ns);
    if sas.get_opt(name).await?.is_none() {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        sas.create(&PostParams::default(), &sa).await?;
    }
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", name, &PostParams::default(), &req)
        .await
        .with_context(|| format!("requesting a token for {ns}/{name}"))?;
    let token = token
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("TokenRequest returned no token"))?;
    Ok(kubeconfig_yaml(
        &cp.server,
        &cp.ca_pem,
        &UserAuth::Token(token),
    ))
}

/// Server-side applies every CRD in a multi-document YAML file and waits until each is
/// Established.
pub async fn install_crds(client: &Client, path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let crds: Vec<CustomResourceDefinition> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in crds {
        let name = crd.name_any();
        api.patch(&name, &PatchParams::apply(PM).force(), &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in &names {
        wait_crd_established(client, name).await?;
    }
    Ok(names)
}

/// Waits until a CRD has condition Established=True.
pub async fn wait_crd_established(client: &Client, name: &str) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(
        &format!("CRD {name} Established"),
        Duration::from_secs(30),
        || async {
            let crd = api.get(name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        },
    )
    .await
}

/// A dynamic API for a group/version/kind whose plural is `plural`.
pub fn dynamic_api(
    client: &Client,
    gvk: &GroupVersionKind,
    plural: &str,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(gvk, plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// The stand-in CRD fixtures for APIs a plain API server lacks (OpenShift, OLM).
pub fn fixture_crds() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
