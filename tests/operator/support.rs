//! Support for the operator suite: the operator in-process under its own ServiceAccount,
//! a stand-in for the node installer's reports, and full cleanup.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use sandboxd::api::kataconfig::{KataConfig, KataConfigSpec};
use sandboxd::api::names::*;
use sandboxd::operator::leader::LeaderConfig;
use sandboxd::operator::metrics::OperatorMetrics;
use sandboxd::operator::node_install::InstallConfig;
use sandboxd::operator::{Options, Platform};
use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, Env, eventually};

/// KataConfig is a cluster-wide singleton: tests that create one run one at a time.
static SINGLETON: Mutex<()> = Mutex::const_new(());

/// Default wait for the operator to react.
pub const WAIT: Duration = Duration::from_secs(30);

/// One test's world: clients, namespace, a label only its nodes carry.
pub struct Fixture {
    pub admin: Client,
    pub operator_client: Client,
    pub ns: String,
    /// Label key whose value `pool` selects this test's nodes.
    pub pool_key: String,
    pub suffix: String,
    pub nodes: Vec<String>,
    _guard: MutexGuard<'static, ()>,
}

/// The operator running in this process.
pub struct Running {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), sandboxd::operator::Error>>,
    pub metrics: Arc<OperatorMetrics>,
}

impl Running {
    /// Stops it (releasing its Lease) and reports how it ended.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .context("operator did not stop")??
            .map_err(|e| anyhow!("operator failed: {e}"))
    }
}

fn gvk(group: &str, version: &str, kind: &str) -> GroupVersionKind {
    GroupVersionKind::gvk(group, version, kind)
}

/// Applies `deploy/operator/rbac.yaml` for namespace `ns`, with cluster-scoped names made
/// unique by `suffix`.
pub(crate) async fn apply_rbac(admin: &Client, ns: &str, suffix: &str) -> Result<()> {
    apply_rbac_file(admin, "deploy/operator/rbac.yaml", ns, suffix).await
}

/// Applies the RBAC file `file` (relative to the repository) for namespace `ns`, with
/// cluster-scoped names made unique by `suffix`.
pub(crate) async fn apply_rbac_file(
    admin: &Client,
    file: &str,
    ns: &str,
    suffix: &str,
) -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path)?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)?;
    for mut doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let (group, version) = match doc["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .split_once('/')
        {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), "v1".to_string()),
        };
        let cluster_scoped = kind.starts_with("Cluster");
        if cluster_scoped {
            let name = format!("{}-{suffix}", doc["metadata"]["name"].as_str().unwrap());
            doc["metadata"]["name"] = json!(name);
            if kind == "ClusterRoleBinding" {
                let role = format!("{}-{suffix}", doc["roleRef"]["name"].as_str().unwrap());
                doc["roleRef"]["name"] = json!(role);
            }
        } else {
            doc["metadata"]["namespace"] = json!(ns);
        }
        if let Some(subjects) = doc.get_mut("subjects").and_then(|s| s.as_array_mut()) {
            for s in subjects {
                s["namespace"] = json!(ns);
            }
        }
        let plural = match kind.as_str() {
            "ServiceAccount" => "serviceaccounts",
            "ClusterRole" => "clusterroles",
            "ClusterRoleBinding" => "clusterrolebindings",
            "Role" => "roles",
            "RoleBinding" => "rolebindings",
            other => return Err(anyhow!("unexpected kind {other} in rbac.yaml")),
        };
        let api = harness::dynamic_api(
            admin,
            &gvk(&group, &version, &kind),
            plural,
            (!cluster_scoped).then_some(ns),
        );
        let obj: DynamicObject = serde_json::from_value(doc)?;
        let name = obj.name_any();
        api.patch(
            &name,
            &PatchParams::apply("sandboxd-test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {kind} {name}"))?;
    }
    Ok(())
}

/// Removes every KataConfig a failed earlier test may have left behind.
pub async fn clear_kataconfigs(admin: &Client) -> Result<()> {
    let api: Api<KataConfig> = Api::all(admin.clone());
    for kc in api.list(&Default::default()).await? {
        let name = kc.name_any();
        let _ = api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await;
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    eventually("no KataConfig left", WAIT, || async {
        Ok(api
            .list(&Default::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await
}

impl Fixture {
    /// Takes the singleton lock, installs the CRDs and the operator's RBAC.
    pub async fn new(env: &Env) -> Result<Self> {
        let guard = SINGLETON.lock().await;
        let admin = env.admin().await?;
        let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/crds/kataconfigs.kataconfiguration.openshift.io.yaml");
        harness::install_crds(&admin, &crd).await?;
        clear_kataconfigs(&admin).await?;
        let suffix = env.unique("x").trim_start_matches("x-").to_string();
        apply_rbac(&admin, &env.ns, &suffix).await?;
        let operator_client =
            harness::service_account_client(env.cp(), &env.ns, "sandboxd-operator").await?;
        Ok(Self {
            admin,
            operator_client,
            ns: env.ns.clone(),
            pool_key: format!("sandboxd.test/pool-{suffix}"),
            suffix,
            nodes: Vec::new(),
            _guard: guard,
        })
    }

    /// A fake node; `in_pool` gives it the selected label.
    pub async fn node(&mut self, short: &str, in_pool: bool) -> Result<String> {
        let name = format!("{short}-{}", self.suffix);
        let labels: Vec<(&str, &str)> = if in_pool {
            vec![(self.pool_key.as_str(), "kata")]
        } else {
            vec![(self.pool_key.as_str(), "no")]
        };
        harness::fake_node(&self.admin, &name, &labels, &[]).await?;
        self.nodes.push(name.clone());
        Ok(name)
    }

    /// Starts the operator under its ServiceAccount, with leader election in the test
    /// namespace, on plain Kubernetes (whatever stand-in APIs other tests installed).
    pub fn start(&self) -> Running {
        self.start_on(Platform::Kubernetes)
    }

    /// Re-applies the operator's RBAC (after a test took some of it away).
    pub async fn restore_rbac(&self) -> Result<()> {
        apply_rbac(&self.admin, &self.ns, &self.suffix).await
    }

    /// The name of a cluster-scoped RBAC object of `rbac.yaml` in this test.
    pub fn cluster_rbac_name(&self, name: &str) -> String {
        format!("{name}-{}", self.suffix)
    }

    /// Starts the operator (see [`Fixture::start`]) with `platform`.
    pub fn start_on(&self, platform: Platform) -> Running {
        let token = CancellationToken::new();
        let metrics = Arc::new(OperatorMetrics::default());
        let opts = Options {
            namespace: self.ns.clone(),
            image: "sandboxd:latest".into(),
            platform,
            leader: Some(LeaderConfig {
                namespace: self.ns.clone(),
                name: OPERATOR.into(),
                identity: format!("test-{}", self.suffix),
                lease_duration: Duration::from_secs(6),
                renew_every: Duration::from_secs(2),
            }),
            admission_policy: true,
            webhook: Default::default(),
            image_job: Default::default(),
            // The PeerPod GC may build an Azure provider from a test's peer-pods-cm: it must
            // never reach beyond this machine (a dead loopback port).
            azure: sandboxd::cloud::azure::EndpointArgs::development("http://127.0.0.1:9/"),
        };
        let handle = tokio::spawn(sandboxd::operator::run_operator(
            self.operator_client.clone(),
            opts,
            metrics.clone(),
            token.clone(),
        ));
        Running {
            token,
            handle,
            metrics,
        }
    }

    /// The KataConfig of this test, selecting the pool.
    pub fn kataconfig(&self, name: &str) -> KataConfig {
        let spec: KataConfigSpec = serde_json::from_value(json!({
            "enablePeerPods": true,
            "logLevel": "info",
            "kataConfigPoolSelector": {"matchLabels": {self.pool_key.clone(): "kata"}},
        }))
        .unwrap();
        KataConfig::new(name, spec)
    }

    pub async fn create(&self, kc: &KataConfig) -> Result<KataConfig> {
        let api: Api<KataConfig> = Api::all(self.admin.clone());
        Ok(api.create(&PostParams::default(), kc).await?)
    }

    pub fn kcs(&self) -> Api<KataConfig> {
        Api::all(self.admin.clone())
    }

    pub fn node_api(&self) -> Api<Node> {
        Api::all(self.admin.clone())
    }

    /// Waits until the KataConfig's status satisfies `pred`.
    pub async fn wait_status<F>(&self, name: &str, what: &str, pred: F) -> Result<KataConfig>
    where
        F: Fn(&KataConfig) -> bool,
    {
        let api = self.kcs();
        eventually(what, WAIT, || async {
            let kc = api.get(name).await?;
            if pred(&kc) {
                Ok(Some(kc))
            } else {
                Err(anyhow!(
                    "status now: {}",
                    serde_json::to_string(&kc.status)?
                ))
            }
        })
        .await
    }

    /// Waits until a node's labels satisfy `pred`.
    pub async fn wait_node<F>(&self, node: &str, what: &str, pred: F) -> Result<Node>
    where
        F: Fn(&BTreeMap<String, String>) -> bool,
    {
        let api = self.node_api();
        eventually(what, WAIT, || async {
            let n = api.get(node).await?;
            if pred(n.labels()) {
                Ok(Some(n))
            } else {
                Err(anyhow!("labels now: {:?}", n.labels()))
            }
        })
        .await
    }

    /// Acts as the node installer on `node`: reports `state` the way it does.
    pub async fn report(&self, node: &str, state: &str, message: Option<&str>) -> Result<()> {
        let mut anns = serde_json::Map::new();
        anns.insert(ANN_STATE.into(), json!(state));
        if let Some(m) = message {
            anns.insert(ANN_MESSAGE.into(), json!(m));
        }
        if state == STATE_INSTALLED {
            anns.insert(ANN_CONFIG.into(), json!(InstallConfig::new("info").hash()));
        }
        let body = json!({"apiVersion": "v1", "kind": "Node",
                          "metadata": {"name": node, "annotations": anns}});
        self.node_api()
            .patch(
                node,
                &PatchParams::apply(INSTALLER_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        Ok(())
    }

    /// Acts as the installer for every node told to uninstall, until the KataConfig is gone.
    pub async fn uninstall_as_installer(&self, kc: &str) -> Result<()> {
        let kcs = self.kcs();
        let nodes = self.node_api();
        eventually(
            "the KataConfig to be gone after uninstall",
            WAIT,
            || async {
                for n in &self.nodes {
                    if let Some(node) = nodes.get_opt(n).await?
                        && node.labels().get(LABEL_NODE_INSTALL).map(String::as_str)
                            == Some(UNINSTALL)
                        && node.annotations().get(ANN_STATE).map(String::as_str)
                            != Some(STATE_UNINSTALLED)
                    {
                        self.report(n, STATE_UNINSTALLED, None).await?;
                    }
                }
                Ok(kcs.get_opt(kc).await?.is_none().then_some(()))
            },
        )
        .await
    }

    /// Asserts nothing of the KataConfig is left: RuntimeClass, DaemonSet, node labels and
    /// annotations.
    pub async fn assert_clean(&self) -> Result<()> {
        let rcs: Api<RuntimeClass> = Api::all(self.admin.clone());
        eventually("RuntimeClass kata-remote gone", WAIT, || async {
            Ok(rcs.get_opt(RUNTIME_CLASS).await?.is_none().then_some(()))
        })
        .await?;
        let dss: Api<DaemonSet> = Api::namespaced(self.admin.clone(), &self.ns);
        eventually("installer DaemonSet gone", WAIT, || async {
            Ok(dss
                .get_opt(INSTALLER_DAEMONSET)
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        for n in &self.nodes {
            if let Some(node) = self.node_api().get_opt(n).await? {
                let ours: Vec<_> = node
                    .labels()
                    .keys()
                    .chain(node.annotations().keys())
                    .filter(|k| {
                        [
                            LABEL_KATA,
                            LABEL_NODE_INSTALL,
                            ANN_STATE,
                            ANN_MESSAGE,
                            ANN_CONFIG,
                        ]
                        .contains(&k.as_str())
                    })
                    .cloned()
                    .collect();
                if !ours.is_empty() {
                    return Err(anyhow!("node {n} still carries {ours:?}"));
                }
            }
        }
        Ok(())
    }

    /// Deletes this test's nodes and any KataConfig left behind.
    pub async fn teardown(self) -> Result<()> {
        clear_kataconfigs(&self.admin).await?;
        let rcs: Api<RuntimeClass> = Api::all(self.admin.clone());
        let _ = rcs.delete(RUNTIME_CLASS, &DeleteParams::default()).await;
        for n in &self.nodes {
            let _ = self.node_api().delete(n, &DeleteParams::default()).await;
        }
        Ok(())
    }
}

/// The InProgress condition as (status, reason, message).
pub fn in_progress(kc: &KataConfig) -> Option<(String, String, String)> {
    kc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "InProgress")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The kataNodes lists of a status.
pub fn kata_nodes(kc: &KataConfig) -> sandboxd::api::kataconfig::KataNodesStatus {
    kc.status
        .as_ref()
        .and_then(|s| s.kata_nodes.clone())
        .unwrap_or_default()
}

/// A list of names, sorted.
pub fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}
