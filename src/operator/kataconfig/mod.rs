//! The KataConfig controller: watches what it reads (KataConfigs, node metadata, peer-pod
//! metadata, its RuntimeClass and installer DaemonSet), plans, applies only what differs,
//! and rebuilds the status from what it observed.

pub mod plan;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::plan::{NodeAction, NodeView, PodRef};
use self::status::Phase;
use super::installer::{self, InstallerSpec};
use super::metrics::OperatorMetrics;
use super::names::*;
use super::node_install::InstallConfig;
use super::nodes::{Flavor, Selection};
use super::runtimeclass;
use crate::api::kataconfig::{CONDITION_IN_PROGRESS, FINALIZER, KataConfig, KataConfigStatus};
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
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply(e) => e.metric_label(),
            Error::Api { .. } => "api",
            Error::Sync(_) => "sync",
        }
    }
}

/// What the controller needs to know beyond the API.
#[derive(Clone, Debug)]
pub struct Options {
    /// The operator namespace (installer DaemonSet).
    pub namespace: String,
    /// The sandboxd image the installer DaemonSet runs.
    pub image: String,
    /// Which worker default applies to an empty selector.
    pub flavor: Flavor,
    /// Identity for Events.
    pub instance: String,
}

struct Ctx {
    client: Client,
    opts: Options,
    kcs: Store<KataConfig>,
    nodes: Store<PartialObjectMeta<Node>>,
    rcs: Store<RuntimeClass>,
    dss: Store<DaemonSet>,
    metrics: Arc<OperatorMetrics>,
    recorder: Recorder,
}

fn spawn_watch<S, T>(stream: S, notify: Arc<Notify>, shutdown: CancellationToken)
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    T: Send,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = stream.next() => match ev {
                    Some(Ok(_)) => notify.notify_one(),
                    Some(Err(e)) => tracing::debug!(error = %e, "watch error (retrying)"),
                    None => break,
                },
            }
        }
    });
}

/// Runs the controller until `shutdown`.
pub async fn run(
    client: Client,
    opts: Options,
    metrics: Arc<OperatorMetrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let notify = Arc::new(Notify::new());
    let wc = watcher::Config::default();

    let (kcs, w) = reflector::store();
    let s = reflector::reflector(
        w,
        watcher(Api::<KataConfig>::all(client.clone()), wc.clone()),
    );
    spawn_watch(s.default_backoff(), notify.clone(), shutdown.clone());

    let (nodes, w) = reflector::store();
    let s = reflector::reflector(
        w,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            wc.clone(),
        ),
    );
    spawn_watch(s.default_backoff(), notify.clone(), shutdown.clone());

    // Peer pods, metadata only, by the webhook's label: a trigger, never a cache of pods.
    let s = watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        wc.clone().labels(&format!("{PEER_POD_LABEL}=true")),
    );
    spawn_watch(s.default_backoff(), notify.clone(), shutdown.clone());

    let (rcs, w) = reflector::store();
    let s = reflector::reflector(
        w,
        watcher(
            Api::<RuntimeClass>::all(client.clone()),
            wc.clone().fields(&format!("metadata.name={RUNTIME_CLASS}")),
        ),
    );
    spawn_watch(s.default_backoff(), notify.clone(), shutdown.clone());

    let (dss, w) = reflector::store();
    let s = reflector::reflector(
        w,
        watcher(
            Api::<DaemonSet>::namespaced(client.clone(), &opts.namespace),
            wc.clone()
                .fields(&format!("metadata.name={INSTALLER_DAEMONSET}")),
        ),
    );
    spawn_watch(s.default_backoff(), notify.clone(), shutdown.clone());

    for (what, ready) in [
        (
            "KataConfig",
            Box::pin(kcs.wait_until_ready())
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
        ),
        ("Node", Box::pin(nodes.wait_until_ready())),
        ("RuntimeClass", Box::pin(rcs.wait_until_ready())),
        ("DaemonSet", Box::pin(dss.wait_until_ready())),
    ] {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = ready => r.map_err(|_| Error::Sync(what))?,
        }
    }

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sandboxd-operator".into(),
            instance: Some(opts.instance.clone()),
        },
    );
    let ctx = Ctx {
        client,
        opts,
        kcs,
        nodes,
        rcs,
        dss,
        metrics,
        recorder,
    };
    tracing::info!("KataConfig controller started");
    let mut backoff = Duration::from_millis(500);
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        // Let a burst of watch events settle into one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        match reconcile_all(&ctx).await {
            Ok(next) => {
                ctx.metrics.observe(started.elapsed(), None);
                backoff = Duration::from_millis(500);
                wait = next.unwrap_or(RESYNC);
            }
            Err(e) => {
                ctx.metrics
                    .observe(started.elapsed(), Some(e.metric_label()));
                if e.metric_label() == "conflict" {
                    tracing::debug!(error = %e, "reconcile raced another write; retrying");
                } else {
                    tracing::warn!(error = %e, "reconcile failed; retrying");
                }
                wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
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

fn node_views(ctx: &Ctx) -> Vec<NodeView> {
    ctx.nodes
        .state()
        .iter()
        .map(|n| NodeView {
            name: n.name_any(),
            labels: n.labels().clone(),
            annotations: n.annotations().clone(),
        })
        .collect()
}

async fn reconcile_active(ctx: &Ctx, kc: &KataConfig) -> Result<Option<Duration>, Error> {
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    let config_hash = InstallConfig::new(&kc.spec.log_level).hash();
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
    }
    ensure_installer(ctx, kc).await?;

    let nodes = node_views(ctx);
    let mut p = plan::plan(&nodes, Some(&selection), &config_hash, None);
    let mut requeue = None;
    if p.needs_pods {
        let pods = list_kata_pods(&ctx.client).await?;
        p = plan::plan(&nodes, Some(&selection), &config_hash, Some(&pods));
        if !p.held_by_pods.is_empty() {
            requeue = Some(POD_RECHECK);
        }
    }
    apply_node_actions(ctx, &p.actions).await?;
    write_status(ctx, kc, &p, &Phase::Active).await?;
    Ok(requeue)
}

async fn ensure_installer(ctx: &Ctx, kc: &KataConfig) -> Result<(), Error> {
    let ds = installer::desired(
        kc,
        &InstallerSpec {
            namespace: &ctx.opts.namespace,
            image: &ctx.opts.image,
            log_level: &kc.spec.log_level,
        },
    );
    let observed = ctx.dss.state().into_iter().next();
    if !hash_matches(observed.as_deref(), &ds) {
        let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.opts.namespace);
        apply::apply(&api, &ds).await?;
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
    let nodes = node_views(ctx);
    let p = plan::plan(&nodes, None, config_hash, Some(&pods));
    if p.remaining > 0 {
        // The installer must run to undo its work on the remaining nodes.
        ensure_installer(ctx, kc).await?;
    }
    apply_node_actions(ctx, &p.actions).await?;
    if p.remaining > 0 {
        write_status(ctx, kc, &p, &Phase::Uninstalling).await?;
        return Ok(None);
    }
    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.opts.namespace);
    apply::delete_if_exists(&ds_api, INSTALLER_DAEMONSET).await?;
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    apply::remove_finalizer(&api, kc, FINALIZER).await?;
    tracing::info!(kataconfig = %kc.name_any(), "uninstall finished");
    Ok(None)
}

async fn apply_node_actions(ctx: &Ctx, actions: &[(String, NodeAction)]) -> Result<(), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    for (name, action) in actions {
        let result = match action {
            NodeAction::Install | NodeAction::Uninstall => {
                let labels = if *action == NodeAction::Install {
                    json!({LABEL_KATA: "", LABEL_NODE_INSTALL: INSTALL})
                } else {
                    json!({LABEL_NODE_INSTALL: UNINSTALL})
                };
                let body = json!({"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": name, "labels": labels}});
                apply::apply_json(&api, name, FIELD_MANAGER, body)
                    .await
                    .map(|_| ())
            }
            NodeAction::Clean => {
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
                        name: name.clone(),
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
    }
    Ok(())
}

/// Every unfinished pod that uses the runtime: `runtimeClassName: kata-remote` or the
/// webhook's peer-pod label. One paged list; only names and nodes are kept.
pub async fn list_kata_pods(client: &Client) -> Result<Vec<PodRef>, Error> {
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
    let new = status::build(kc.status.as_ref(), p, phase, generation);
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
