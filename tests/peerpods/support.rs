//! Support for the peer-pods suite: CRDs, the operator's RBAC as deployed, the operator
//! in-process under its ServiceAccount, a KataConfig that selects no node, cleanup.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sandboxd::api::kataconfig::{KataConfig, KataConfigSpec};
use sandboxd::api::names::{PEER_POD_CONFIG, VM_RESOURCE};
use sandboxd::api::peerpodconfig::PeerPodConfig;
use sandboxd::operator::metrics::OperatorMetrics;
use sandboxd::operator::{Options, Platform};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, Env, eventually};

/// Default wait for the operator to react.
pub const WAIT: Duration = Duration::from_secs(40);

/// One test's world.
pub struct Fixture {
    pub admin: Client,
    pub ns: String,
    pub suffix: String,
    /// Label key this test's PeerPodConfig selects (value `yes`).
    pub select_key: String,
    nodes: Vec<String>,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), sandboxd::operator::Error>>,
    /// How the operator runs (kept for [`Fixture::upgrade_operator`]).
    client: Client,
    opts: Options,
}

fn crd_path(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/crds")
        .join(file)
}

impl Fixture {
    /// CRDs, RBAC, no KataConfig, the operator running under its ServiceAccount.
    pub async fn start(env: &Env) -> Result<Self> {
        Self::start_with(env, Default::default()).await
    }

    /// [`Fixture::start`] with these pod VM image Job settings.
    pub async fn start_with(
        env: &Env,
        image_job: sandboxd::operator::peerpods::image_job::Settings,
    ) -> Result<Self> {
        Self::start_opts(env, Default::default(), image_job).await
    }

    /// [`Fixture::start`] with these webhook rollout settings.
    pub async fn start_with_webhook(
        env: &Env,
        webhook: sandboxd::operator::peerpods::webhook::Settings,
    ) -> Result<Self> {
        Self::start_opts(env, webhook, Default::default()).await
    }

    /// [`Fixture::start`] with webhook rollout and image Job settings.
    pub async fn start_opts(
        env: &Env,
        webhook: sandboxd::operator::peerpods::webhook::Settings,
        image_job: sandboxd::operator::peerpods::image_job::Settings,
    ) -> Result<Self> {
        let admin = env.admin().await?;
        for f in [
            "kataconfigs.kataconfiguration.openshift.io.yaml",
            "peerpodconfigs.confidentialcontainers.org.yaml",
        ] {
            harness::install_crds(&admin, &crd_path(f)).await?;
        }
        crate::operator::support::clear_kataconfigs(&admin).await?;
        let suffix = env.unique("p").trim_start_matches("p-").to_string();
        crate::operator::support::apply_rbac(&admin, &env.ns, &suffix).await?;
        let client =
            harness::service_account_client(env.cp(), &env.ns, "sandboxd-operator").await?;
        let token = CancellationToken::new();
        let opts = Options {
            namespace: env.ns.clone(),
            image: "sandboxd:latest".into(),
            platform: Platform::Kubernetes,
            leader: None,
            admission_policy: false,
            webhook,
            image_job,
            // The PeerPod GC may build an Azure provider from a test's peer-pods-cm: it must
            // never reach beyond this machine (a dead loopback port).
            azure: sandboxd::cloud::azure::EndpointArgs::development("http://127.0.0.1:9/"),
        };
        let handle = tokio::spawn(sandboxd::operator::run_operator(
            client.clone(),
            opts.clone(),
            Arc::new(OperatorMetrics::default()),
            token.clone(),
        ));
        Ok(Self {
            client,
            opts,
            admin,
            ns: env.ns.clone(),
            select_key: format!("sandboxd.test/peerpods-{suffix}"),
            suffix,
            nodes: Vec::new(),
            token,
            handle,
        })
    }

    /// Creates the KataConfig with peer pods on; its pool selects no node (the KataConfig
    /// controller leaves this test's nodes alone).
    pub async fn enable(&self) -> Result<()> {
        let spec: KataConfigSpec = serde_json::from_value(json!({
            "enablePeerPods": true,
            "kataConfigPoolSelector": {"matchLabels": {format!("sandboxd.test/none-{}", self.suffix): "x"}},
        }))?;
        self.kcs()
            .create(
                &PostParams::default(),
                &KataConfig::new("example-kataconfig", spec),
            )
            .await?;
        Ok(())
    }

    pub fn kcs(&self) -> Api<KataConfig> {
        Api::all(self.admin.clone())
    }

    pub fn ppcs(&self) -> Api<PeerPodConfig> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.admin.clone())
    }

    /// Waits for the default PeerPodConfig.
    pub async fn wait_ppc(&self) -> Result<PeerPodConfig> {
        let api = self.ppcs();
        eventually("PeerPodConfig created", WAIT, || async {
            Ok(api.get_opt(PEER_POD_CONFIG).await?)
        })
        .await
    }

    /// Makes the default PeerPodConfig select this test's label, with `limit`.
    pub async fn select_mine(&self, limit: &str) -> Result<()> {
        self.ppcs()
            .patch(
                PEER_POD_CONFIG,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {
                    "limit": limit,
                    "nodeSelector": {
                        "node-role.kubernetes.io/kata-oc": null,
                        self.select_key.clone(): "yes",
                    },
                }})),
            )
            .await?;
        Ok(())
    }

    pub async fn set_limit(&self, limit: &str) -> Result<()> {
        self.ppcs()
            .patch(
                PEER_POD_CONFIG,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"limit": limit}})),
            )
            .await?;
        Ok(())
    }

    /// A fake Ready node; `selected` gives it this test's label.
    pub async fn node(&mut self, short: &str, selected: bool) -> Result<String> {
        let name = format!("{short}-{}", self.suffix);
        let value = if selected { "yes" } else { "no" };
        harness::fake_node(
            &self.admin,
            &name,
            &[(self.select_key.as_str(), value)],
            &[],
        )
        .await?;
        self.nodes.push(name.clone());
        Ok(name)
    }

    /// `(capacity, allocatable)` of `kata.peerpods.io/vm` on `node`.
    pub async fn vm_resource(&self, node: &str) -> Result<(Option<String>, Option<String>)> {
        let n = self.nodes().get(node).await?;
        let s = n.status.unwrap_or_default();
        let get = |m: Option<
            std::collections::BTreeMap<
                String,
                k8s_openapi::apimachinery::pkg::api::resource::Quantity,
            >,
        >| { m.and_then(|m| m.get(VM_RESOURCE).map(|q| q.0.clone())) };
        Ok((get(s.capacity), get(s.allocatable)))
    }

    /// Waits until `node` advertises `want` VMs (None: not at all) in both maps.
    pub async fn wait_vm(&self, node: &str, want: Option<&str>) -> Result<()> {
        let want = want.map(str::to_string);
        eventually(
            &format!("node {node} advertises {VM_RESOURCE}={want:?}"),
            WAIT,
            || async {
                let (c, a) = self.vm_resource(node).await?;
                Ok((c == want && a == want).then_some(()))
            },
        )
        .await
    }

    /// Waits until the default PeerPodConfig's condition `type_` has `status`, returning it.
    pub async fn wait_condition(
        &self,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        let api = self.ppcs();
        eventually(
            &format!("PeerPodConfig {type_}={status} ({reason})"),
            WAIT,
            || async {
                let p = api.get(PEER_POD_CONFIG).await?;
                Ok(p.status
                    .unwrap_or_default()
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == type_ && c.status == status && c.reason == reason))
            },
        )
        .await
    }

    /// An upgrade: the operator stops and a new one deploying `image` takes over.
    pub async fn upgrade_operator(&mut self, image: &str) -> Result<()> {
        self.token.cancel();
        let _ = (&mut self.handle).await;
        self.opts.image = image.into();
        self.token = CancellationToken::new();
        self.handle = tokio::spawn(sandboxd::operator::run_operator(
            self.client.clone(),
            self.opts.clone(),
            Arc::new(OperatorMetrics::default()),
            self.token.clone(),
        ));
        Ok(())
    }

    /// Stops the operator, deletes this test's nodes and pods, and the KataConfig.
    pub async fn teardown(self) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), &self.ns);
        let _ = pods
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &Default::default(),
            )
            .await;
        crate::operator::support::clear_kataconfigs(&self.admin).await?;
        // Let the operator see the KataConfig gone before it stops.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let nodes = self.nodes();
        self.token.cancel();
        let _ = self.handle.await;
        for n in &self.nodes {
            let _ = nodes.delete(n, &DeleteParams::default()).await;
        }
        Ok(())
    }
}
