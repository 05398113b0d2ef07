//! The peer-pods controller: with `enablePeerPods: true` on the KataConfig it keeps the
//! default `PeerPodConfig`, makes every node its `nodeSelector` matches advertise
//! `kata.peerpods.io/vm` = limit (the scheduler then never places more peer pods on a node
//! than its limit), and reports whether the user's secret, configmap and ssh key secret
//! are valid. With peer pods off, or the KataConfig deleted, the resource leaves every node.
//!
//! The secrets and the configmap are read by name in the operator namespace on every pass
//! (no Secret cache); nodes, KataConfigs and PeerPodConfigs are watched.

pub mod caa;
pub mod credentials;
pub mod image_job;
pub mod plan;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::plan::{ConfigInputs, NodeAction, NodeView};
use super::controller::{Failure, Shared, Watches, reconcile_loop, synced};
use crate::api::kataconfig::KataConfig;
use crate::api::names::{
    CAA_DAEMONSET, PEER_POD_CONFIG, RELAY_DAEMONSET, SSH_KEY_SECRET, VM_RESOURCE,
};
use crate::api::peerpodconfig::{
    CONDITION_CONFIG_VALID, CONDITION_LIMIT_APPLIED, PeerPodConfig, PeerPodConfigSpec,
    PeerPodConfigStatus,
};
use crate::k8s::{apply, conditions};

/// How often the user's secret and configmap are re-read while peer pods are on.
const CONFIG_RECHECK: Duration = Duration::from_secs(5);

/// Reasons of the PeerPodConfig conditions.
pub mod reasons {
    /// The limit is advertised by every selected node.
    pub(crate) const APPLIED: &str = "Applied";
    /// `spec.limit` is not a non-negative integer; nodes were left unchanged.
    pub(crate) const INVALID_LIMIT: &str = "InvalidLimit";
    /// The secret, configmap and ssh key secret are valid.
    pub(crate) const VALID: &str = "Valid";
    /// A key is missing or invalid, or an object is missing; the message names each.
    pub(crate) const INVALID_CONFIG: &str = "InvalidConfig";
}

/// Errors of the peer-pods controller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A write or read failed.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// A read by name failed.
    #[error("reading {kind} {name}: {source}")]
    Read {
        /// The kind read.
        kind: &'static str,
        /// The object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Creating the default PeerPodConfig failed.
    #[error("creating PeerPodConfig {PEER_POD_CONFIG}: {0}")]
    Create(#[source] kube::Error),
    /// Patching a node's status failed.
    #[error("patching the status of node {node}: {source}")]
    NodeStatus {
        /// The node.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Rolling out the webhook failed.
    #[error(transparent)]
    Webhook(#[from] webhook::Error),
    /// The pod VM image Jobs failed.
    #[error(transparent)]
    ImageJob(#[from] image_job::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply(e) => e.metric_label(),
            Error::Read { .. } => "read",
            Error::Create(_) => "create",
            Error::NodeStatus { .. } => "node_status",
            Error::Webhook(e) => e.metric_label(),
            Error::ImageJob(e) => e.metric_label(),
        }
    }
}

struct Ctx {
    client: Client,
    namespace: String,
    image: String,
    kcs: Store<KataConfig>,
    ppcs: Store<PeerPodConfig>,
    nodes: Store<Node>,
    recorder: Recorder,
    webhook: webhook::Rollout,
    /// The pod VM image Jobs (watched by label) and how they run.
    jobs: Store<Job>,
    image_job: image_job::Settings,
    /// What the API server offers the CAA pod.
    cluster: caa::Cluster,
}

/// Drops what [`node_views`] never reads.
fn trim_node(n: &mut Node) {
    n.managed_fields_mut().clear();
    n.annotations_mut().clear();
    n.spec = None;
    if let Some(status) = n.status.take() {
        let keep =
            |m: Option<
                BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >| { m.map(|m| m.into_iter().filter(|(k, _)| k == VM_RESOURCE).collect()) };
        n.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            capacity: keep(status.capacity),
            allocatable: keep(status.allocatable),
            ..Default::default()
        });
    }
}

/// Runs the peer-pods controller on `shared` until `shutdown`. Errors are retried with
/// backoff, never returned: peer pods must not stop the KataConfig controller.
pub(crate) async fn run(
    shared: Shared,
    webhook: webhook::Settings,
    image_job: image_job::Settings,
    shutdown: CancellationToken,
) {
    let client = &shared.client;
    let watches = Watches::new(&shutdown);
    let wc = watcher::Config::default();
    let kcs = watches.store(Api::all(client.clone()), wc.clone());
    let ppcs = watches.store(
        Api::namespaced(client.clone(), &shared.namespace),
        wc.clone(),
    );
    let jobs = watches.store(
        Api::namespaced(client.clone(), &shared.namespace),
        wc.clone().labels(&image_job::watch_selector()),
    );
    // Nodes as this controller reads them: labels and the VM resource of the status,
    // nothing else (a full Node with managedFields is kilobytes, times every node).
    let nodes = watches.store_trimmed(Api::<Node>::all(client.clone()), wc, trim_node);
    let first_lists = vec![
        synced("KataConfig", &kcs),
        synced("PeerPodConfig", &ppcs),
        synced("Job", &jobs),
        synced("Node", &nodes),
    ];
    if watches.ready(first_lists).await != Ok(true) {
        return;
    }
    let cluster = match client.apiserver_version().await {
        Ok(v) => caa::Cluster::from_version(&v.major, &v.minor),
        Err(e) => {
            tracing::warn!(error = %e, "reading the API server's version failed; the CAA gets NODE_IP only (no status.hostIPs)");
            caa::Cluster::default()
        }
    };
    let ctx = Ctx {
        client: shared.client.clone(),
        namespace: shared.namespace.clone(),
        image: shared.image.clone(),
        recorder: shared.recorder(),
        kcs,
        ppcs,
        nodes,
        webhook: webhook::Rollout::new(webhook),
        jobs,
        image_job,
        cluster,
    };
    let ctx = &ctx;
    reconcile_loop("peerpods", &watches, || async move {
        let result = reconcile(ctx).await;
        super::peer_pod_metrics::GAUGES.reconciled(result.as_ref().err().map(Error::metric_label));
        result
    })
    .await;
}

impl Failure for Error {}

/// The KataConfig in force: the oldest one, when it is not being deleted.
fn active_kataconfig(ctx: &Ctx) -> Option<Arc<KataConfig>> {
    let mut kcs = ctx.kcs.state();
    kcs.sort_by(|a, b| {
        (a.metadata.creation_timestamp.clone(), a.name_any())
            .cmp(&(b.metadata.creation_timestamp.clone(), b.name_any()))
    });
    kcs.into_iter()
        .next()
        .filter(|kc| kc.metadata.deletion_timestamp.is_none())
}

fn node_views(ctx: &Ctx) -> Vec<NodeView> {
    ctx.nodes
        .state()
        .iter()
        .map(|n| {
            let status = n.status.as_ref();
            let cap = status.and_then(|s| s.capacity.as_ref());
            let alloc = status.and_then(|s| s.allocatable.as_ref());
            NodeView {
                name: n.name_any(),
                labels: n.labels().clone(),
                capacity: cap.and_then(|m| m.get(VM_RESOURCE)).map(|q| q.0.clone()),
                allocatable: alloc.and_then(|m| m.get(VM_RESOURCE)).map(|q| q.0.clone()),
                has_maps: (cap.is_some(), alloc.is_some()),
            }
        })
        .collect()
}

async fn reconcile(ctx: &Ctx) -> Result<Duration, Error> {
    let active = active_kataconfig(ctx);
    // Without ValidatingAdmissionPolicy the webhook keeps the one-KataConfig rule while
    // any KataConfig is in force, peer pods or not.
    let singleton_for = active
        .as_ref()
        .filter(|_| ctx.webhook.settings().kataconfig_singleton)
        .map(|kc| kc.name_any());
    let kc = active.filter(|kc| kc.spec.enable_peer_pods);
    let Some(kc) = kc else {
        // Peer pods off or uninstalling: the resource leaves every node, the default
        // PeerPodConfig goes (the KataConfig's deletion takes it too, as its owner).
        let nodes = node_views(ctx);
        apply_nodes(
            ctx,
            &nodes,
            &plan::node_actions(&nodes, &BTreeMap::new(), None),
        )
        .await?;
        let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        if get_daemonset(&dss, CAA_DAEMONSET).await?.is_some() {
            apply::delete_if_exists(&dss, CAA_DAEMONSET).await?;
        }
        if get_daemonset(&dss, RELAY_DAEMONSET).await?.is_some() {
            apply::delete_if_exists(&dss, RELAY_DAEMONSET).await?;
        }
        // CAA's CA and client certificate go with CAA (the DaemonSet may have gone with
        // its owner already): a later install starts with a new CA.
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        apply::delete_if_exists(&secrets, crate::api::names::CAA_TLS_SECRET).await?;
        let webhook_wait = match (&singleton_for, active_kataconfig(ctx)) {
            (Some(name), Some(owner_kc)) => Some(
                ctx.webhook
                    .ensure(
                        &ctx.client,
                        &ctx.namespace,
                        &ctx.image,
                        &owner(&owner_kc),
                        &webhook::Targets {
                            mutate: false,
                            singleton_for: Some(name.clone()),
                        },
                    )
                    .await?,
            ),
            _ => {
                ctx.webhook.remove(&ctx.client, &ctx.namespace).await?;
                None
            }
        };
        // The pods' webhook is not registered now (at most the KataConfig rule's).
        let gauges = &super::peer_pod_metrics::GAUGES;
        gauges.set_webhook_fail_closed(false);
        gauges.set_limit(0);
        gauges.set_image_ready(false);
        credentials::teardown(ctx).await;
        if ctx
            .kcs
            .state()
            .iter()
            .any(|k| k.metadata.deletion_timestamp.is_none())
            && ctx
                .ppcs
                .state()
                .iter()
                .any(|p| p.name_any() == PEER_POD_CONFIG)
        {
            let api: Api<PeerPodConfig> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            apply::delete_if_exists(&api, PEER_POD_CONFIG).await?;
        }
        let image_wait = image_job::off(ctx).await?;
        let wait = image_wait.unwrap_or(Duration::from_secs(300));
        return Ok(webhook_wait.map_or(wait, |w| w.min(wait)));
    };
    let ppc = match ctx
        .ppcs
        .state()
        .into_iter()
        .find(|p| p.name_any() == PEER_POD_CONFIG)
    {
        Some(p) => p,
        None => {
            create_default(ctx, &kc).await?;
            // The watch brings it back for the next pass.
            return Ok(Duration::from_secs(1));
        }
    };
    let inputs = read_config(ctx, &ppc.spec).await?;
    let (inputs, creds) = credentials::ensure(ctx, &kc, &ppc.spec, inputs).await?;
    let verdict = plan::config_verdict(&inputs).map_err(|p| creds.explain(p));
    let cm_limit = inputs
        .configmap
        .1
        .as_ref()
        .and_then(|m| m.get("PEERPODS_LIMIT_PER_NODE"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    let generation = ppc.metadata.generation;
    let limit_condition = match plan::effective_limit(&ppc.spec.limit, cm_limit) {
        Ok(limit) => {
            let nodes = node_views(ctx);
            let actions = plan::node_actions(&nodes, &ppc.spec.node_selector, Some(limit));
            apply_nodes(ctx, &nodes, &actions).await?;
            super::peer_pod_metrics::GAUGES.set_limit(limit);
            conditions::new(
                CONDITION_LIMIT_APPLIED,
                true,
                reasons::APPLIED,
                format!("selected nodes advertise {VM_RESOURCE}={limit}"),
                generation,
            )
        }
        Err(problem) => conditions::new(
            CONDITION_LIMIT_APPLIED,
            false,
            reasons::INVALID_LIMIT,
            format!("limit refused, nodes left unchanged: {problem}"),
            generation,
        ),
    };
    let config_condition = match &verdict {
        Ok(_) => conditions::new(
            CONDITION_CONFIG_VALID,
            true,
            reasons::VALID,
            "the cloud secret, the configmap and the ssh key secret are valid",
            generation,
        ),
        Err(problems) => conditions::new(
            CONDITION_CONFIG_VALID,
            false,
            reasons::INVALID_CONFIG,
            problems.join("; "),
            generation,
        ),
    };
    let (image_condition, image_ready) =
        image_job::reconcile(ctx, &kc, &ppc, &inputs, verdict.as_ref().ok()).await?;
    super::peer_pod_metrics::GAUGES.set_image_ready(image_ready);
    let conds = vec![limit_condition, config_condition, image_condition];
    write_status(ctx, &ppc, conds).await?;
    if verdict.is_ok() && image_ready {
        // Only a valid configuration with a pod VM image ever (re)starts the CAA.
        ensure_caa(ctx, &kc, &ppc.spec, &caa::config_hash(&inputs)).await?;
    }
    let next = ctx
        .webhook
        .ensure(
            &ctx.client,
            &ctx.namespace,
            &ctx.image,
            &owner(&kc),
            &webhook::Targets {
                mutate: true,
                singleton_for,
            },
        )
        .await?;
    super::peer_pod_metrics::GAUGES.set_webhook_fail_closed(true);
    Ok(CONFIG_RECHECK.min(next))
}

fn owner(kc: &KataConfig) -> OwnerReference {
    OwnerReference {
        api_version: KataConfig::api_version(&()).into(),
        kind: KataConfig::kind(&()).into(),
        name: kc.name_any(),
        uid: kc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

async fn get_daemonset(api: &Api<DaemonSet>, name: &str) -> Result<Option<DaemonSet>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Read {
        kind: "DaemonSet",
        name: name.into(),
        source,
    })
}

/// Applies the CAA DaemonSet when its hash-stamped content differs from what is there.
async fn ensure_caa(
    ctx: &Ctx,
    kc: &KataConfig,
    spec: &PeerPodConfigSpec,
    config_hash: &str,
) -> Result<(), Error> {
    let desired = caa::daemonset(
        &ctx.namespace,
        &ctx.image,
        &spec.cloud_secret_name,
        &spec.config_map_name,
        &spec.node_selector,
        config_hash,
        owner(kc),
        ctx.cluster,
        &ctx.image_job.azure,
    );
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    // The relay first: a new CAA serves behind it.
    let relay = caa::relay_daemonset(&ctx.namespace, &ctx.image, &spec.node_selector, owner(kc));
    if !apply::hash_matches(get_daemonset(&api, RELAY_DAEMONSET).await?.as_ref(), &relay) {
        apply::apply(&api, &relay).await?;
        tracing::info!("node agent relay DaemonSet applied");
    }
    if apply::hash_matches(get_daemonset(&api, CAA_DAEMONSET).await?.as_ref(), &desired) {
        return Ok(());
    }
    apply::apply(&api, &desired).await?;
    tracing::info!(config_hash, "CAA DaemonSet applied");
    Ok(())
}

async fn create_default(ctx: &Ctx, kc: &KataConfig) -> Result<(), Error> {
    let mut ppc = PeerPodConfig::new(PEER_POD_CONFIG, PeerPodConfigSpec::default());
    ppc.metadata.namespace = Some(ctx.namespace.clone());
    ppc.metadata.owner_references = Some(vec![owner(kc)]);
    let api: Api<PeerPodConfig> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    // Created once and never overwritten: the spec is the user's to edit.
    let pp = PostParams {
        field_manager: Some(crate::k8s::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &ppc).await {
        Ok(_) => {
            tracing::info!(namespace = %ctx.namespace, "created PeerPodConfig {PEER_POD_CONFIG}");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::Create(source)),
    }
}

fn data_of_secret(s: Secret) -> BTreeMap<String, String> {
    s.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

async fn read_config(ctx: &Ctx, spec: &PeerPodConfigSpec) -> Result<ConfigInputs, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let get_secret = |name: String| {
        let secrets = secrets.clone();
        async move {
            match secrets.get_opt(&name).await {
                Ok(s) => Ok(s.map(data_of_secret)),
                Err(source) => Err(Error::Read {
                    kind: "Secret",
                    name,
                    source,
                }),
            }
        }
    };
    let secret = get_secret(spec.cloud_secret_name.clone()).await?;
    let ssh = get_secret(SSH_KEY_SECRET.to_string()).await?;
    let cm = cms
        .get_opt(&spec.config_map_name)
        .await
        .map_err(|source| Error::Read {
            kind: "ConfigMap",
            name: spec.config_map_name.clone(),
            source,
        })?
        .map(|c| c.data.unwrap_or_default());
    Ok(ConfigInputs {
        secret: (spec.cloud_secret_name.clone(), secret),
        configmap: (spec.config_map_name.clone(), cm),
        ssh,
    })
}

async fn apply_nodes(
    ctx: &Ctx,
    nodes: &[NodeView],
    actions: &[(String, NodeAction)],
) -> Result<(), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    for (name, action) in actions {
        let Some(view) = nodes.iter().find(|n| &n.name == name) else {
            continue;
        };
        let patch: json_patch::Patch = serde_json::from_value(plan::json_patch(view, action))
            .expect("the plan builds valid JSON patches");
        match api
            .patch_status(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => tracing::info!(node = %name, ?action, "peer-pod VM capacity updated"),
            // A node deleted meanwhile, or a remove racing another change: the watch
            // brings the next pass.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 422 => {}
            Err(source) => {
                return Err(Error::NodeStatus {
                    node: name.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

async fn write_status(ctx: &Ctx, ppc: &PeerPodConfig, new: Vec<Condition>) -> Result<(), Error> {
    let old = ppc.status.clone().unwrap_or_default();
    let mut status = old.clone();
    for c in new {
        conditions::merge(&mut status.conditions, c);
    }
    status.observed_generation = ppc.metadata.generation;
    if conditions::lists_equal_ignoring_time(&old.conditions, &status.conditions)
        && old.observed_generation == status.observed_generation
    {
        return Ok(());
    }
    let api: Api<PeerPodConfig> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let body = json!({
        "apiVersion": PeerPodConfig::api_version(&()),
        "kind": PeerPodConfig::kind(&()),
        "status": status,
    });
    apply::apply_status(&api, PEER_POD_CONFIG, body).await?;
    event_on_change(ctx, ppc, &old, &status).await;
    Ok(())
}

async fn event_on_change(
    ctx: &Ctx,
    ppc: &PeerPodConfig,
    old: &PeerPodConfigStatus,
    new: &PeerPodConfigStatus,
) {
    for type_ in [CONDITION_CONFIG_VALID, CONDITION_LIMIT_APPLIED] {
        let Some(c) = conditions::find(&new.conditions, type_) else {
            continue;
        };
        let before = conditions::find(&old.conditions, type_);
        if before.is_some_and(|b| b.status == c.status && b.message == c.message) {
            continue;
        }
        let ok = c.status == "True";
        if ok && before.is_none() {
            continue;
        }
        let mut note = c.message.clone();
        note.truncate(1000);
        let ev = Event {
            type_: if ok {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: c.reason.clone(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &ppc.object_ref(&())).await {
            tracing::debug!(error = %e, "publishing an event");
        }
    }
}
