//! The KataConfig controller: watches what it reads (KataConfigs, node metadata, peer-pod
//! metadata, its RuntimeClass and installer DaemonSet), plans, applies only what differs,
//! and rebuilds the status from what it observed.

pub mod plan;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DynamicObject, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::plan::{NodeAction, NodeView, PodRef};
use self::status::Phase;
use super::controller::{Failure, Shared, Watches, reconcile_loop, synced};
use super::installer::{self, InstallerSpec};
use super::machineconfig::{self as mco, PoolView};
use super::metrics::OperatorMetrics;
use super::node_install::{InstallConfig, ShimChoice};
use super::nodes::{Flavor, Selection};
use super::runtimeclass;
use crate::api::kataconfig::{CONDITION_IN_PROGRESS, FINALIZER, KataConfig, KataConfigStatus};
use crate::api::names::*;
use crate::k8s::apply::{self, hash_matches, is_not_found};
use crate::k8s::{FIELD_MANAGER, conditions};

/// How often a reconcile that waits on pods (which may carry no label we watch) repeats.
const POD_RECHECK: Duration = Duration::from_secs(3);
/// A safety net: every KataConfig is reconciled at least this often while it changes
/// nothing (reads only).
const RESYNC: Duration = Duration::from_secs(300);

/// Errors of the KataConfig controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write failed.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// A read failed.
    #[error("{what}: {source}")]
    Api {
        /// What was read.
        what: &'static str,
        /// Why.
        source: kube::Error,
    },
    /// A watch ended before its first list.
    #[error("the {0} watch stopped before it synced")]
    Sync(&'static str),
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply(e) => e.metric_label(),
            Error::Api { .. } => "api",
            Error::Sync(_) => "sync",
        }
    }
}

/// What the controller needs to know beyond the API.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// Which worker default applies to an empty selector.
    pub(crate) flavor: Flavor,
    /// How the one-KataConfig rule is kept (`None`: not by this operator).
    pub(crate) rule: Option<super::admission::Mechanism>,
}

struct Ctx {
    client: Client,
    /// The operator namespace (installer DaemonSet).
    namespace: String,
    /// The sandboxd image the installer DaemonSet runs.
    image: String,
    opts: Options,
    kcs: Store<KataConfig>,
    nodes: Store<PartialObjectMeta<Node>>,
    rcs: Store<RuntimeClass>,
    dss: Store<DaemonSet>,
    /// OpenShift only: the MachineConfig and the MachineConfigPool, by name.
    mco: Option<McoStores>,
    metrics: Arc<OperatorMetrics>,
    recorder: Recorder,
    /// The default PeerPodConfig (its `PodVMImageReady` shows in `InProgress`).
    ppcs: Store<crate::api::peerpodconfig::PeerPodConfig>,
    /// KataConfigs (by uid) whose uninstall finished: a pass on a store that has not yet
    /// seen them go must not start over (it would label nodes again).
    finished: std::sync::Mutex<std::collections::HashSet<String>>,
}

struct McoStores {
    mcs: Store<DynamicObject>,
    pools: Store<DynamicObject>,
}

/// Runs the controller until `shutdown`.
pub(crate) async fn run(
    shared: Shared,
    opts: Options,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let client = &shared.client;
    let watches = Watches::new(&shutdown);
    let wc = watcher::Config::default();
    let kcs = watches.store(Api::<KataConfig>::all(client.clone()), wc.clone());
    // Node metadata without managedFields (the bulk of it, and never read).
    let nodes = watches.store_trimmed(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        wc.clone(),
        |n| n.managed_fields_mut().clear(),
    );
    // Peer pods, metadata only, by the webhook's label: a trigger, never a cache of pods.
    watches.trigger(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        wc.clone().labels(&format!("{PEER_POD_LABEL}=true")),
    );
    let rcs = watches.store(
        Api::<RuntimeClass>::all(client.clone()),
        wc.clone().fields(&format!("metadata.name={RUNTIME_CLASS}")),
    );
    let dss = watches.store(
        Api::<DaemonSet>::namespaced(client.clone(), &shared.namespace),
        wc.clone()
            .fields(&format!("metadata.name={INSTALLER_DAEMONSET}")),
    );
    // Not awaited: a cluster without the PeerPodConfig CRD still runs the KataConfig.
    let ppcs = watches.store(
        Api::namespaced(client.clone(), &shared.namespace),
        wc.clone()
            .fields(&format!("metadata.name={PEER_POD_CONFIG}")),
    );
    let mco = (opts.flavor == Flavor::OpenShift).then(|| McoStores {
        mcs: watches.dynamic(client, &mco::machine_config_resource(), mco::MACHINE_CONFIG),
        pools: watches.dynamic(client, &mco::pool_resource(), mco::POOL),
    });
    let mut first_lists = Vec::new();
    if let Some(m) = &mco {
        first_lists.push(synced("MachineConfig", &m.mcs));
        first_lists.push(synced("MachineConfigPool", &m.pools));
    }
    first_lists.extend([
        synced("KataConfig", &kcs),
        synced("Node", &nodes),
        synced("RuntimeClass", &rcs),
        synced("DaemonSet", &dss),
    ]);
    match watches.ready(first_lists).await {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(what) => return Err(Error::Sync(what)),
    }
    let ctx = Ctx {
        client: shared.client.clone(),
        namespace: shared.namespace.clone(),
        image: shared.image.clone(),
        opts,
        kcs,
        nodes,
        rcs,
        dss,
        mco,
        recorder: shared.recorder(),
        metrics: shared.metrics,
        ppcs,
        finished: Default::default(),
    };
    let ctx = &ctx;
    reconcile_loop("kataconfig", &watches, || async move {
        let started = Instant::now();
        let result = reconcile_all(ctx).await;
        let error = result.as_ref().err().map(Error::metric_label);
        ctx.metrics.observe(started.elapsed(), error);
        Ok::<_, Error>(result?.unwrap_or(RESYNC))
    })
    .await;
    Ok(())
}

impl Failure for Error {
    fn is_conflict(&self) -> bool {
        self.metric_label() == "conflict"
    }
}

fn min_requeue(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn reconcile_all(ctx: &Ctx) -> Result<Option<Duration>, Error> {
    let mut kcs = ctx.kcs.state();
    {
        let finished = ctx.finished.lock().unwrap_or_else(|e| e.into_inner());
        kcs.retain(|k| k.uid().is_none_or(|u| !finished.contains(&u)));
    }
    // The oldest KataConfig is the active one; any other is ignored and marked.
    kcs.sort_by(|a, b| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let mut requeue = None;
    let active = kcs.first().map(|k| k.name_any());
    for (i, kc) in kcs.iter().enumerate() {
        let next = if i == 0 {
            reconcile_active(ctx, kc).await?
        } else {
            reconcile_duplicate(ctx, kc, active.as_deref().unwrap_or_default()).await?
        };
        requeue = min_requeue(requeue, next);
    }
    Ok(requeue)
}

async fn reconcile_duplicate(
    ctx: &Ctx,
    kc: &KataConfig,
    active: &str,
) -> Result<Option<Duration>, Error> {
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    if kc.metadata.deletion_timestamp.is_some() {
        apply::remove_finalizer(&api, kc, FINALIZER).await?;
        return Ok(None);
    }
    let empty = plan::Plan::default();
    write_status(ctx, kc, &empty, &Phase::Duplicate { active }).await?;
    Ok(None)
}

fn pool_view(ctx: &Ctx) -> Option<PoolView> {
    let m = ctx.mco.as_ref()?;
    m.pools.state().first().map(|p| PoolView::from_object(p))
}

/// The nodes as the plan reads them; on OpenShift the machine-config operator's reports
/// are translated into the installer protocol.
fn node_views(ctx: &Ctx, config_hash: &str) -> Vec<NodeView> {
    let pool = pool_view(ctx);
    ctx.nodes
        .state()
        .iter()
        .map(|n| {
            let view = NodeView {
                name: n.name_any(),
                labels: n.labels().clone(),
                annotations: n.annotations().clone(),
            };
            match ctx.mco {
                Some(_) => mco::translate(&view, pool.as_ref(), config_hash),
                None => view,
            }
        })
        .collect()
}

async fn apply_dynamic(ctx: &Ctx, ar: &ApiResource, obj: &DynamicObject) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), ar);
    apply::apply_dynamic(&api, ar, obj).await?;
    ctx.metrics.object_write(&ar.kind);
    Ok(())
}

async fn delete_dynamic(ctx: &Ctx, ar: &ApiResource, name: &str) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), ar);
    Ok(apply::delete_dynamic(&api, ar, name).await?)
}

/// OpenShift: the MachineConfig and the pool, applied only when their hash differs.
async fn ensure_machine_config(ctx: &Ctx, m: &McoStores, kc: &KataConfig) -> Result<(), Error> {
    let mc = mco::desired_machine_config(
        kc,
        &InstallConfig::new(&kc.spec.log_level).with_shim(ShimChoice::from_spec(&kc.spec.shim)),
    );
    if !hash_matches(m.mcs.state().first().map(|o| o.as_ref()), &mc) {
        apply_dynamic(ctx, &mco::machine_config_resource(), &mc).await?;
    }
    let pool = mco::desired_pool(kc);
    if !hash_matches(m.pools.state().first().map(|o| o.as_ref()), &pool) {
        apply_dynamic(ctx, &mco::pool_resource(), &pool).await?;
    }
    Ok(())
}

async fn reconcile_active(ctx: &Ctx, kc: &KataConfig) -> Result<Option<Duration>, Error> {
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    let config_hash = InstallConfig::new(&kc.spec.log_level)
        .with_shim(ShimChoice::from_spec(&kc.spec.shim))
        .hash();
    if kc.metadata.deletion_timestamp.is_some() {
        if !kc.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(None);
        }
        return uninstall(ctx, kc, &config_hash).await;
    }
    if apply::add_finalizer(&api, kc, FINALIZER).await? {
        // The write triggers another pass with the fresh object.
        return Ok(Some(Duration::ZERO));
    }
    let selection = match Selection::new(
        kc.spec.kata_config_pool_selector.as_ref(),
        kc.spec.check_node_eligibility,
        ctx.opts.flavor,
    ) {
        Ok(s) => s,
        Err(e) => {
            write_status(
                ctx,
                kc,
                &plan::Plan::default(),
                &Phase::InvalidSpec(e.to_string()),
            )
            .await?;
            return Ok(None);
        }
    };

    let rc = runtimeclass::desired(kc);
    let observed = ctx.rcs.state().into_iter().next();
    if !hash_matches(observed.as_deref(), &rc) {
        apply::apply(&Api::<RuntimeClass>::all(ctx.client.clone()), &rc).await?;
        ctx.metrics.object_write("RuntimeClass");
    }
    match &ctx.mco {
        Some(m) => ensure_machine_config(ctx, m, kc).await?,
        None => ensure_installer(ctx, kc).await?,
    }

    let nodes = node_views(ctx, &config_hash);
    let mut p = plan::plan(&nodes, Some(&selection), &config_hash, None);
    let mut requeue = None;
    if p.needs_pods {
        let pods = list_kata_pods(&ctx.client).await?;
        p = plan::plan(&nodes, Some(&selection), &config_hash, Some(&pods));
        if !p.held_by_pods.is_empty() {
            requeue = Some(POD_RECHECK);
        }
    }
    // OpenShift: the pool's own counts gate completion (a failed node already says more).
    if ctx.mco.is_some()
        && p.failures.is_empty()
        && let Some(pending) = pool_view(ctx)
            .unwrap_or_default()
            .pending(p.nodes.node_count as usize)
    {
        p.pending.push(pending);
    }
    if kc.spec.enable_peer_pods {
        p.pod_vm_image = ctx.ppcs.state().first().and_then(|ppc| {
            let s = ppc.status.as_ref()?;
            crate::operator::peerpods::image_job::kataconfig_progress(&s.conditions)
        });
    }
    apply_node_actions(ctx, &p.actions).await?;
    write_status(ctx, kc, &p, &Phase::Active).await?;
    Ok(requeue)
}

async fn ensure_installer(ctx: &Ctx, kc: &KataConfig) -> Result<(), Error> {
    let ds = installer::desired(
        kc,
        &InstallerSpec {
            namespace: &ctx.namespace,
            image: &ctx.image,
            log_level: &kc.spec.log_level,
            shim: ShimChoice::from_spec(&kc.spec.shim).as_str(),
        },
    );
    let observed = ctx.dss.state().into_iter().next();
    if !hash_matches(observed.as_deref(), &ds) {
        let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        apply::apply(&api, &ds).await?;
        ctx.metrics.object_write("DaemonSet");
    }
    Ok(())
}

async fn uninstall(
    ctx: &Ctx,
    kc: &KataConfig,
    config_hash: &str,
) -> Result<Option<Duration>, Error> {
    let pods = list_kata_pods(&ctx.client).await?;
    if !pods.is_empty() {
        write_status(ctx, kc, &plan::Plan::default(), &Phase::Blocked(&pods)).await?;
        return Ok(Some(POD_RECHECK));
    }
    // No new pod can be admitted with the runtime class once it is gone.
    if !ctx.rcs.state().is_empty() {
        apply::delete_if_exists(&Api::<RuntimeClass>::all(ctx.client.clone()), RUNTIME_CLASS)
            .await?;
    }
    let nodes = node_views(ctx, config_hash);
    let mut p = plan::plan(&nodes, None, config_hash, Some(&pods));
    if p.remaining > 0 && ctx.mco.is_none() {
        // The installer must run to undo its work on the remaining nodes.
        ensure_installer(ctx, kc).await?;
    }
    apply_node_actions(ctx, &p.actions).await?;
    // OpenShift: the pool must be empty (every node back in the worker pool) before the
    // MachineConfig and the pool go.
    if let Some(pool) = pool_view(ctx).filter(|v| v.machines > 0) {
        p.pending.push(format!(
            "waiting for the machine-config operator to move {} machine(s) out of pool {}",
            pool.machines,
            mco::POOL
        ));
    }
    if p.remaining > 0 || !p.pending.is_empty() {
        write_status(ctx, kc, &p, &Phase::Uninstalling).await?;
        return Ok(None);
    }
    match &ctx.mco {
        Some(m) => {
            if !m.mcs.state().is_empty() {
                delete_dynamic(ctx, &mco::machine_config_resource(), mco::MACHINE_CONFIG).await?;
            }
            if !m.pools.state().is_empty() {
                delete_dynamic(ctx, &mco::pool_resource(), mco::POOL).await?;
            }
        }
        None => {
            let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            apply::delete_if_exists(&ds_api, INSTALLER_DAEMONSET).await?;
        }
    }
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    apply::remove_finalizer(&api, kc, FINALIZER).await?;
    if let Some(uid) = kc.uid() {
        ctx.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid);
    }
    tracing::info!(kataconfig = %kc.name_any(), "uninstall finished");
    Ok(None)
}

/// How many node writes are in flight at once (one reconcile may label a thousand nodes).
const NODE_WRITES_IN_FLIGHT: usize = 16;

async fn apply_node_actions(ctx: &Ctx, actions: &[(String, NodeAction)]) -> Result<(), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let api = &api;
    futures::stream::iter(actions.iter().cloned())
        .map(|(name, action)| async move { apply_node_action(ctx, api, &name, &action).await })
        .buffer_unordered(NODE_WRITES_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn apply_node_action(
    ctx: &Ctx,
    api: &Api<Node>,
    name: &str,
    action: &NodeAction,
) -> Result<(), Error> {
    // OpenShift: the kata label alone moves a node into the kata pool and removing it
    // moves the node back to the worker pool; elsewhere the installer follows
    // `node-install`.
    let labels = match (action, ctx.mco.is_some()) {
        (NodeAction::Install, true) => Some(json!({LABEL_KATA: ""})),
        (NodeAction::Install, false) => Some(json!({LABEL_KATA: "", LABEL_NODE_INSTALL: INSTALL})),
        (NodeAction::Uninstall, false) => Some(json!({LABEL_NODE_INSTALL: UNINSTALL})),
        (NodeAction::Uninstall, true) | (NodeAction::Clean, _) => None,
    };
    let result = match labels {
        Some(labels) => {
            let body = json!({"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": name, "labels": labels}});
            apply::apply_json(api, name, FIELD_MANAGER, body)
                .await
                .map(|_| ())
        }
        None => {
            let manager = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            let body = json!({"metadata": {
                "labels": {LABEL_KATA: null, LABEL_NODE_INSTALL: null},
                "annotations": {ANN_STATE: null, ANN_MESSAGE: null, ANN_CONFIG: null},
            }});
            api.patch(name, &manager, &Patch::Merge(&body))
                .await
                .map(|_| ())
                .map_err(|source| apply::Error::Api {
                    verb: "cleaning",
                    kind: "Node".into(),
                    name: name.to_string(),
                    source,
                })
        }
    };
    match result {
        Ok(()) => {
            ctx.metrics.node_write();
            tracing::debug!(node = %name, ?action, "node updated");
        }
        // A node that vanished needs nothing any more.
        Err(apply::Error::Api { source, .. }) if is_not_found(&source) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Every unfinished pod that uses the runtime: `runtimeClassName: kata-remote` or the
/// webhook's peer-pod label. One paged list; only names and nodes are kept.
pub(crate) async fn list_kata_pods(client: &Client) -> Result<Vec<PodRef>, Error> {
    let api: Api<Pod> = Api::all(client.clone());
    let mut lp = ListParams::default().limit(500);
    let mut out = Vec::new();
    loop {
        let page = api.list(&lp).await.map_err(|source| Error::Api {
            what: "listing pods",
            source,
        })?;
        for pod in page.items {
            let spec = pod.spec.as_ref();
            let uses = spec.and_then(|s| s.runtime_class_name.as_deref()) == Some(RUNTIME_CLASS)
                || pod.labels().get(PEER_POD_LABEL).map(String::as_str) == Some("true");
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if uses && !matches!(phase, Some("Succeeded") | Some("Failed")) {
                out.push(PodRef {
                    namespace: pod.namespace().unwrap_or_default(),
                    name: pod.name_any(),
                    node: spec.and_then(|s| s.node_name.clone()),
                });
            }
        }
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    out.sort();
    Ok(out)
}

async fn write_status(
    ctx: &Ctx,
    kc: &KataConfig,
    p: &plan::Plan,
    phase: &Phase<'_>,
) -> Result<(), Error> {
    let generation = kc.metadata.generation;
    let mut new = status::build(kc.status.as_ref(), p, phase, generation);
    if let Some(rule) = ctx.opts.rule {
        conditions::merge(
            &mut new.conditions,
            conditions::new(
                super::admission::CONDITION,
                true,
                rule.reason(),
                rule.message(),
                generation,
            ),
        );
    }
    if !status::differs(kc.status.as_ref(), &new) {
        return Ok(());
    }
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    let body = json!({
        "apiVersion": KataConfig::api_version(&()),
        "kind": KataConfig::kind(&()),
        "status": new,
    });
    apply::apply_status(&api, &kc.name_any(), body).await?;
    ctx.metrics.status_write();
    event_on_transition(ctx, kc, kc.status.as_ref(), &new).await;
    Ok(())
}

async fn event_on_transition(
    ctx: &Ctx,
    kc: &KataConfig,
    old: Option<&KataConfigStatus>,
    new: &KataConfigStatus,
) {
    let find = |s: Option<&KataConfigStatus>| {
        s.and_then(|s| conditions::find(&s.conditions, CONDITION_IN_PROGRESS).cloned())
    };
    let (Some(new_c), old_c) = (find(Some(new)), find(old)) else {
        return;
    };
    if old_c
        .as_ref()
        .is_some_and(|o| o.status == new_c.status && o.reason == new_c.reason)
    {
        return;
    }
    let failed = new_c.reason == crate::api::kataconfig::reasons::FAILED
        || new_c.reason == crate::api::kataconfig::reasons::BLOCKED_BY_EXISTING_KATA_PODS;
    let reason = if new_c.reason.is_empty() {
        "Installed".to_string()
    } else {
        new_c.reason.clone()
    };
    let mut note = new_c.message.clone();
    note.truncate(1000);
    let ev = Event {
        type_: if failed {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason,
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &kc.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event");
    }
}
