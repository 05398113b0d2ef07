//! The pod VM image Jobs: `osc-podvm-image-creation` builds and publishes the image when
//! `AZURE_IMAGE_ID` in the configmap is empty, `osc-podvm-image-deletion` deletes it again on
//! uninstall, and only when sandboxd built it.
//!
//! The creation Job runs the operator's own image (`sandboxd image job`) with the cloud
//! secret and the configmap as its environment, and writes `AZURE_IMAGE_ID` into the
//! configmap itself, with the annotation `sandboxd.io/built-image-id` naming the same id (or
//! under the field manager [`IMAGE_JOB_FIELD_MANAGER`]). The operator
//! watches the Jobs (no polling) and reports on the PeerPodConfig's `PodVMImageReady`:
//! running, failed (with the Job's own failure message, kept until the user sets an image id
//! or deletes the Job, which starts a new one), or ready. A completed Job is never run again.
//!
//! When the creation Job completed and the configmap's `AZURE_IMAGE_ID` was written by it
//! (annotation or field owner, see [`written_by_job`]), the
//! id is recorded on the KataConfig ([`ANN_BUILT_IMAGE`]) with the finalizer [`FINALIZER`]:
//! the KataConfig's deletion then runs the deletion Job for that id and waits for it, at
//! most [`Settings::deletion_timeout`]. A user-provided id is never recorded, so never deleted.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Ctx;
use super::plan::ConfigInputs;
use crate::api::kataconfig::{self, CONDITION_IN_PROGRESS, KataConfig};
use crate::api::names::{IMAGE_CREATION_JOB, IMAGE_DELETION_JOB, LABEL_MANAGED_BY, MANAGED_BY};
use crate::api::peerpodconfig::{CONDITION_POD_VM_IMAGE_READY, PeerPodConfig, PeerPodConfigSpec};
use crate::k8s::{apply, conditions};

/// The ServiceAccount of the image Jobs (RBAC in `deploy/operator/rbac.yaml`: get and patch
/// of the configmap `peer-pods-cm`, nothing else).
pub const SERVICE_ACCOUNT: &str = "sandboxd-podvm-image";
/// The field manager the creation Job writes `AZURE_IMAGE_ID` with. The operator records an
/// image as built by sandboxd only when this manager owns that key.
pub const IMAGE_JOB_FIELD_MANAGER: &str = "sandboxd-podvm-image";
/// Environment of the Jobs: the namespace of the configmap to update.
pub(crate) const ENV_NAMESPACE: &str = "POD_NAMESPACE";
/// Environment of the Jobs: the name of the configmap to update.
pub(crate) const ENV_CONFIGMAP: &str = "PEER_PODS_CM";
/// KataConfig annotation: the id of the pod VM image sandboxd built (deleted on uninstall).
pub const ANN_BUILT_IMAGE: &str = "peerpods.sandboxd.io/built-image-id";
/// KataConfig finalizer held while an image sandboxd built must be deleted on uninstall.
pub const FINALIZER: &str = "peerpods.sandboxd.io/podvm-image";
/// Label on both Jobs (the operator watches Jobs by it).
pub(crate) const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Value of [`LABEL_COMPONENT`].
pub(crate) const COMPONENT: &str = "podvm-image";
/// The configmap key holding the image id.
pub(crate) const IMAGE_ID_KEY: &str = "AZURE_IMAGE_ID";

/// Reasons of `PodVMImageReady`.
pub mod reasons {
    /// `AZURE_IMAGE_ID` is set and sandboxd did not build it.
    pub(crate) const IMAGE_PROVIDED: &str = "ImageProvided";
    /// `AZURE_IMAGE_ID` is the image the creation Job built.
    pub(crate) const IMAGE_BUILT: &str = "ImageBuilt";
    /// The cloud provider needs no pod VM image.
    pub(crate) const NOT_REQUIRED: &str = "NotRequired";
    /// The creation Job is running (or starting).
    pub(crate) const JOB_RUNNING: &str = "ImageJobRunning";
    /// The creation Job failed; the message carries its failure.
    pub(crate) const JOB_FAILED: &str = "ImageJobFailed";
    /// The creation Job completed but `AZURE_IMAGE_ID` is empty.
    pub(crate) const IMAGE_MISSING: &str = "ImageMissing";
    /// The Job waits for a valid configuration (`ConfigValid`).
    pub(crate) const WAITING_FOR_CONFIG: &str = "WaitingForConfig";
}

/// Errors of the image Jobs.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A write failed.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// A read failed.
    #[error("{what}: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply(e) => e.metric_label(),
            Error::Read { .. } => "read",
        }
    }
}

/// How the Jobs run (operator flags).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Arguments of the creation Job's container (default `image job`).
    pub args: Vec<String>,
    /// `backoffLimit` of both Jobs: failed pods retried before the Job fails.
    pub backoff_limit: i32,
    /// `activeDeadlineSeconds` of the creation Job.
    pub creation_deadline: Duration,
    /// How long the KataConfig's deletion waits for the deletion Job before it goes anyway
    /// (with a Warning Event naming the image to delete by hand).
    pub deletion_timeout: Duration,
    /// The operator's own Azure cloud and development endpoint flags, handed on to every
    /// component it deploys that talks to Azure (both Jobs and the CAA DaemonSet): they exist
    /// only on command lines, so this is how they reach those pods.
    pub azure: crate::cloud::azure::EndpointArgs,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            args: vec!["image".into(), "job".into()],
            backoff_limit: 2,
            creation_deadline: Duration::from_secs(2 * 3600),
            deletion_timeout: Duration::from_secs(600),
            azure: crate::cloud::azure::EndpointArgs::default(),
        }
    }
}

/// Where a Job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JobState {
    /// Not finished (pending or running pods).
    Running,
    /// Finished successfully.
    Complete,
    /// Failed for good; the Job's reason and message.
    Failed(String),
}

/// The state of a Job from its conditions.
pub(crate) fn job_state(job: &Job) -> JobState {
    let conds = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let on = |t: &str| conds.iter().find(|c| c.type_ == t && c.status == "True");
    if on("Complete").is_some() || on("SuccessCriteriaMet").is_some() {
        return JobState::Complete;
    }
    if let Some(c) = on("Failed").or_else(|| on("FailureTarget")) {
        let reason = c.reason.clone().unwrap_or_default();
        let message = c.message.clone().unwrap_or_default();
        return JobState::Failed(match (reason.is_empty(), message.is_empty()) {
            (false, false) => format!("{reason}: {message}"),
            (false, true) => reason,
            (true, false) => message,
            (true, true) => "failed".into(),
        });
    }
    JobState::Running
}

/// What the plan reads.
#[derive(Clone, Debug, Default)]
pub(crate) struct Inputs<'a> {
    /// The configuration is valid (`ConfigValid`), the image aside.
    pub(crate) config_ok: bool,
    /// The provider is known to need no image (a valid configuration that is not Azure).
    pub(crate) no_image_needed: bool,
    /// `AZURE_IMAGE_ID`, when not empty.
    pub(crate) image_id: Option<&'a str>,
    /// The creation Job: its state and whether it is being deleted.
    pub(crate) job: Option<(JobState, bool)>,
    /// The creation Job's field manager owns `AZURE_IMAGE_ID` in the configmap.
    pub(crate) written_by_job: bool,
    /// The image recorded as built by sandboxd.
    pub(crate) built: Option<&'a str>,
}

/// What to do about the pod VM image, and what to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `PodVMImageReady` status: the image is known (the CAA may run).
    pub(crate) ready: bool,
    /// Its reason.
    pub(crate) reason: &'static str,
    /// Its message.
    pub(crate) message: String,
    /// Create the creation Job.
    pub(crate) create: bool,
    /// Delete the running creation Job (the user provided an image meanwhile).
    pub(crate) delete_running: bool,
    /// Record this id as built by sandboxd.
    pub(crate) record: Option<String>,
}

impl Plan {
    fn new(ready: bool, reason: &'static str, message: String) -> Self {
        Self {
            ready,
            reason,
            message,
            create: false,
            delete_running: false,
            record: None,
        }
    }
}

/// The pure decision: the configmap's image id wins; otherwise the Job's state is shown, and
/// a Job is started only when none exists and the configuration is otherwise valid.
pub(crate) fn plan(i: &Inputs<'_>) -> Plan {
    let state = i.job.as_ref().map(|(s, _)| s);
    if let Some(id) = i.image_id {
        let built_now = state == Some(&JobState::Complete) && i.written_by_job;
        let mut p = if i.built == Some(id) || built_now {
            Plan::new(
                true,
                reasons::IMAGE_BUILT,
                format!("pod VM image {id}, built by Job {IMAGE_CREATION_JOB}"),
            )
        } else {
            Plan::new(
                true,
                reasons::IMAGE_PROVIDED,
                format!("{IMAGE_ID_KEY} is set: {id}"),
            )
        };
        if built_now && i.built != Some(id) {
            p.record = Some(id.to_string());
        }
        p.delete_running = state == Some(&JobState::Running) && !i.written_by_job;
        return p;
    }
    if i.no_image_needed {
        return Plan::new(
            true,
            reasons::NOT_REQUIRED,
            "the cloud provider needs no pod VM image".into(),
        );
    }
    match &i.job {
        Some((_, true)) => Plan::new(
            false,
            reasons::JOB_RUNNING,
            format!("waiting for the previous Job {IMAGE_CREATION_JOB} to be deleted"),
        ),
        Some((JobState::Running, false)) => Plan::new(
            false,
            reasons::JOB_RUNNING,
            format!(
                "Job {IMAGE_CREATION_JOB} is building and publishing the pod VM image; it writes \
                 {IMAGE_ID_KEY} when done"
            ),
        ),
        Some((JobState::Failed(why), false)) => Plan::new(
            false,
            reasons::JOB_FAILED,
            format!(
                "Job {IMAGE_CREATION_JOB} failed: {why}. Set {IMAGE_ID_KEY} in the configmap, or \
                 delete the Job to try again"
            ),
        ),
        Some((JobState::Complete, false)) => Plan::new(
            false,
            reasons::IMAGE_MISSING,
            format!(
                "Job {IMAGE_CREATION_JOB} completed but {IMAGE_ID_KEY} is empty. Set it, or delete \
                 the Job to build again"
            ),
        ),
        None if !i.config_ok => Plan::new(
            false,
            reasons::WAITING_FOR_CONFIG,
            format!(
                "Job {IMAGE_CREATION_JOB} starts once the configuration is valid (ConfigValid)"
            ),
        ),
        None => {
            let mut p = Plan::new(
                false,
                reasons::JOB_RUNNING,
                format!("starting Job {IMAGE_CREATION_JOB}"),
            );
            p.create = true;
            p
        }
    }
}

/// The `InProgress` status, reason and message the KataConfig shows for the PeerPodConfig's
/// `PodVMImageReady` condition, once its nodes are done (DESIGN: `PodVMImageJobRunning`,
/// `PodVMImageJobCompleted`, `PodVMImageJobFailed`). `None` when the image says nothing
/// (provided by the user, not needed, or no condition).
pub(crate) fn kataconfig_progress(
    ppc_conditions: &[Condition],
) -> Option<(bool, &'static str, String)> {
    let c = conditions::find(ppc_conditions, CONDITION_POD_VM_IMAGE_READY)?;
    let (running, reason) = match c.reason.as_str() {
        reasons::JOB_RUNNING => (true, kataconfig::reasons::POD_VM_IMAGE_JOB_RUNNING),
        reasons::JOB_FAILED | reasons::IMAGE_MISSING => {
            (false, kataconfig::reasons::POD_VM_IMAGE_JOB_FAILED)
        }
        reasons::IMAGE_BUILT => (false, kataconfig::reasons::POD_VM_IMAGE_JOB_COMPLETED),
        _ => return None,
    };
    Some((running, reason, c.message.clone()))
}

/// Whether the configmap's `AZURE_IMAGE_ID` was written by the image tooling: the
/// annotation `sandboxd image` puts beside it names the same id, or the field is owned by
/// [`IMAGE_JOB_FIELD_MANAGER`].
pub(crate) fn written_by_job(cm: &ConfigMap) -> bool {
    let id = cm.data.as_ref().and_then(|d| d.get(IMAGE_ID_KEY));
    let annotated = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::api::names::ANNOTATION_BUILT_IMAGE_ID));
    if id.is_some() && id == annotated {
        return true;
    }
    cm.metadata
        .managed_fields
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.manager.as_deref() == Some(IMAGE_JOB_FIELD_MANAGER))
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| f.0["f:data"].get(format!("f:{IMAGE_ID_KEY}")).is_some())
}

/// What both Jobs share.
struct Common<'a> {
    namespace: &'a str,
    image: &'a str,
    spec: &'a PeerPodConfigSpec,
    settings: &'a Settings,
    owner: OwnerReference,
}

fn job(c: Common<'_>, name: &str, args: &[String], deadline: Duration, api_access: bool) -> Job {
    let Common {
        namespace,
        image,
        spec,
        settings,
        owner,
    } = c;
    let labels = json!({LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT});
    // Behind a cluster-wide proxy: blob uploads, ARM and Entra ID calls go through it.
    let mut env = vec![
        json!({"name": ENV_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": ENV_CONFIGMAP, "value": spec.config_map_name}),
        json!({"name": "TMPDIR", "value": "/tmp"}),
    ];
    env.extend(settings.azure.proxy_env_entries());
    let args: Vec<String> = args
        .iter()
        .cloned()
        .chain(settings.azure.to_args())
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": settings.backoff_limit,
            "activeDeadlineSeconds": deadline.as_secs(),
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": api_access,
                    // No fixed UID or GID: the image's user (65532) runs on Kubernetes, and
                    // OpenShift's restricted-v2 SCC assigns one from the namespace's range
                    // (it refuses a fixed one outside it).
                    "securityContext": {
                        "runAsNonRoot": true,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "podvm-image",
                        "image": image,
                        "args": args,
                        "envFrom": [
                            {"secretRef": {"name": spec.cloud_secret_name}},
                            {"configMapRef": {"name": spec.config_map_name}},
                        ],
                        "env": env,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }))
    .expect("the image Job is a valid Job")
}

/// The creation Job (`sandboxd image job`, or the configured args).
pub fn creation_job(
    namespace: &str,
    image: &str,
    spec: &PeerPodConfigSpec,
    settings: &Settings,
    owner: OwnerReference,
) -> Job {
    let c = Common {
        namespace,
        image,
        spec,
        settings,
        owner,
    };
    job(
        c,
        IMAGE_CREATION_JOB,
        &settings.args,
        settings.creation_deadline,
        true,
    )
}

/// The deletion Job for `image_id` (`sandboxd image delete --image-id <id>`). It needs no
/// API access: no ServiceAccount token is mounted.
pub fn deletion_job(
    namespace: &str,
    image: &str,
    spec: &PeerPodConfigSpec,
    image_id: &str,
    settings: &Settings,
    owner: OwnerReference,
) -> Job {
    let args = ["image", "delete", "--image-id", image_id].map(String::from);
    let c = Common {
        namespace,
        image,
        spec,
        settings,
        owner,
    };
    job(
        c,
        IMAGE_DELETION_JOB,
        &args,
        settings.deletion_timeout,
        false,
    )
}

fn find_job(ctx: &Ctx, name: &str) -> Option<std::sync::Arc<Job>> {
    ctx.jobs
        .state()
        .into_iter()
        .find(|j| j.name_any() == name && j.namespace().as_deref() == Some(&ctx.namespace))
}

/// The newest termination message of the Job's pods (the last lines of its log when it
/// failed), truncated.
async fn pod_message(ctx: &Ctx, job: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
    let mut list = pods.list(&lp).await.ok()?.items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    let msg = list.iter().rev().find_map(|p| {
        p.status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
            .filter(|m| !m.trim().is_empty())
    })?;
    let mut m = msg.trim().replace('\n', " | ");
    if m.len() > 400 {
        let mut cut = m.len() - 400;
        while !m.is_char_boundary(cut) {
            cut += 1;
        }
        m = format!("...{}", &m[cut..]);
    }
    Some(m)
}

async fn create_job(ctx: &Ctx, job: &Job) -> Result<(), Error> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let pp = PostParams {
        field_manager: Some(crate::k8s::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let name = job.name_any();
    match api.create(&pp, job).await {
        Ok(_) => {
            tracing::info!(job = %name, "pod VM image Job created");
            Ok(())
        }
        // The watch has not shown it yet.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(apply::Error::Api {
            verb: "creating",
            kind: "Job".into(),
            name,
            source,
        }
        .into()),
    }
}

async fn delete_job(ctx: &Ctx, name: &str) -> Result<(), Error> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    // Jobs orphan their pods by default; background deletion takes them along.
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if apply::is_not_found(&e) => Ok(()),
        Err(source) => Err(apply::Error::Api {
            verb: "deleting",
            kind: "Job".into(),
            name: name.into(),
            source,
        }
        .into()),
    }
}

/// Records `id` as built by sandboxd on the KataConfig, with the finalizer that makes its
/// deletion delete the image (one write, guarded by resourceVersion).
async fn record_built(ctx: &Ctx, kc: &KataConfig, id: &str) -> Result<(), Error> {
    let mut finalizers = kc.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.into());
    }
    let body = json!({"metadata": {
        "resourceVersion": kc.resource_version(),
        "annotations": {ANN_BUILT_IMAGE: id},
        "finalizers": finalizers,
    }});
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    api.patch(
        &kc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await
    .map_err(|source| apply::Error::Api {
        verb: "recording the built image on",
        kind: "KataConfig".into(),
        name: kc.name_any(),
        source,
    })?;
    tracing::info!(image_id = id, "recorded the pod VM image sandboxd built");
    Ok(())
}

/// One pass while peer pods are on: starts, watches or stops the creation Job and records a
/// built image. Returns `PodVMImageReady` and whether the CAA may run (the image is known).
pub(super) async fn reconcile(
    ctx: &Ctx,
    kc: &KataConfig,
    ppc: &PeerPodConfig,
    inputs: &ConfigInputs,
    config: Option<&crate::config::PeerPodsConfig>,
) -> Result<(Condition, bool), Error> {
    let spec = &ppc.spec;
    let image_id = inputs
        .configmap
        .1
        .as_ref()
        .and_then(|m| m.get(IMAGE_ID_KEY))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty());
    let existing = find_job(ctx, IMAGE_CREATION_JOB);
    let mut job = existing
        .as_ref()
        .map(|j| (job_state(j), j.metadata.deletion_timestamp.is_some()));
    if let Some((JobState::Failed(why), _)) = &mut job
        && image_id.is_none()
        && let Some(m) = pod_message(ctx, IMAGE_CREATION_JOB).await
    {
        why.push_str(&format!("; the pod said: {m}"));
    }
    let built = kc.annotations().get(ANN_BUILT_IMAGE).map(String::as_str);
    // Who wrote the id matters while the Job runs (its own write must not stop it) and once
    // it completed (record it); read the field owners only then.
    let live = matches!(job, Some((JobState::Running | JobState::Complete, _)));
    let written_by_job = match image_id {
        Some(id) if live && built != Some(id) => {
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            cms.get_opt(&spec.config_map_name)
                .await
                .map_err(|source| Error::Read {
                    what: "reading the configmap's field owners",
                    source,
                })?
                .is_some_and(|cm| written_by_job(&cm))
        }
        _ => false,
    };
    let p = plan(&Inputs {
        config_ok: config.is_some(),
        no_image_needed: config.is_some_and(|c| c.azure.is_none()),
        image_id,
        job,
        written_by_job,
        built,
    });
    if p.create {
        let j = creation_job(
            &ctx.namespace,
            &ctx.image,
            spec,
            &ctx.image_job,
            super::owner(kc),
        );
        create_job(ctx, &j).await?;
    }
    if p.delete_running {
        tracing::info!("the configmap got an image id; stopping the pod VM image Job");
        delete_job(ctx, IMAGE_CREATION_JOB).await?;
    }
    if let Some(id) = &p.record {
        record_built(ctx, kc, id).await?;
    }
    let cond = conditions::new(
        CONDITION_POD_VM_IMAGE_READY,
        p.ready,
        p.reason,
        p.message,
        ppc.metadata.generation,
    );
    Ok((cond, p.ready))
}

/// Peer pods off (or uninstalling): a creation Job that has not completed is stopped, and a
/// deleted KataConfig that recorded a built image runs the deletion Job and waits for it.
/// Returns when to look again, if sooner than usual.
pub(super) async fn off(ctx: &Ctx) -> Result<Option<Duration>, Error> {
    if let Some(j) = find_job(ctx, IMAGE_CREATION_JOB)
        && job_state(&j) != JobState::Complete
        && j.metadata.deletion_timestamp.is_none()
    {
        delete_job(ctx, IMAGE_CREATION_JOB).await?;
    }
    let mut next = None;
    for kc in ctx.kcs.state() {
        if kc.metadata.deletion_timestamp.is_none()
            || !kc.finalizers().iter().any(|f| f == FINALIZER)
        {
            continue;
        }
        let wait = delete_built_image(ctx, &kc).await?;
        next = next.or(wait);
    }
    Ok(next)
}

async fn delete_built_image(ctx: &Ctx, kc: &KataConfig) -> Result<Option<Duration>, Error> {
    // The runtime's uninstall goes first: it waits for the pods (and so the VMs) using the
    // image.
    if kc.finalizers().iter().any(|f| f == kataconfig::FINALIZER) {
        return Ok(Some(Duration::from_secs(2)));
    }
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    let Some(id) = kc.annotations().get(ANN_BUILT_IMAGE).cloned() else {
        apply::remove_finalizer(&api, kc, FINALIZER).await?;
        return Ok(None);
    };
    let spec = ctx
        .ppcs
        .state()
        .into_iter()
        .find(|p| p.name_any() == crate::api::names::PEER_POD_CONFIG)
        .map(|p| p.spec.clone())
        .unwrap_or_default();
    let Some(job) = find_job(ctx, IMAGE_DELETION_JOB) else {
        let j = deletion_job(
            &ctx.namespace,
            &ctx.image,
            &spec,
            &id,
            &ctx.image_job,
            super::owner(kc),
        );
        create_job(ctx, &j).await?;
        uninstall_status(
            ctx,
            kc,
            format!(
                "deleting the pod VM image sandboxd built ({id}) with Job {IMAGE_DELETION_JOB}"
            ),
        )
        .await?;
        return Ok(Some(Duration::from_secs(5)));
    };
    let age = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| {
            let now = k8s_openapi::jiff::Timestamp::now();
            Duration::from_secs(now.duration_since(t.0).as_secs().max(0) as u64)
        })
        .unwrap_or_default();
    let (ok, note) = match job_state(&job) {
        JobState::Complete => (true, format!("deleted the pod VM image {id}")),
        JobState::Failed(why) => (
            false,
            format!(
                "Job {IMAGE_DELETION_JOB} failed ({why}); delete the pod VM image {id} by hand"
            ),
        ),
        JobState::Running if age >= ctx.image_job.deletion_timeout => (
            false,
            format!(
                "Job {IMAGE_DELETION_JOB} did not finish within {}s; delete the pod VM image {id} \
                 by hand",
                ctx.image_job.deletion_timeout.as_secs()
            ),
        ),
        JobState::Running => {
            uninstall_status(
                ctx,
                kc,
                format!(
                    "deleting the pod VM image sandboxd built ({id}) with Job {IMAGE_DELETION_JOB}"
                ),
            )
            .await?;
            let left = ctx.image_job.deletion_timeout.saturating_sub(age);
            return Ok(Some(left.min(Duration::from_secs(30))));
        }
    };
    let ev = Event {
        type_: if ok {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: if ok {
            "PodVMImageDeleted"
        } else {
            "PodVMImageDeletionFailed"
        }
        .into(),
        note: Some(note.clone()),
        action: "Uninstall".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &kc.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event");
    }
    if ok {
        tracing::info!(image_id = %id, "pod VM image deleted");
    } else {
        tracing::warn!("{note}");
    }
    apply::remove_finalizer(&api, kc, FINALIZER).await?;
    Ok(None)
}

/// The KataConfig's `InProgress` while its deletion waits for the image (the runtime's
/// uninstall is done and no longer writes the status).
async fn uninstall_status(ctx: &Ctx, kc: &KataConfig, message: String) -> Result<(), Error> {
    let old = kc.status.clone().unwrap_or_default();
    let mut status = old.clone();
    conditions::merge(
        &mut status.conditions,
        conditions::new(
            CONDITION_IN_PROGRESS,
            true,
            kataconfig::reasons::UNINSTALLING,
            message,
            kc.metadata.generation,
        ),
    );
    if conditions::lists_equal_ignoring_time(&old.conditions, &status.conditions) {
        return Ok(());
    }
    let api: Api<KataConfig> = Api::all(ctx.client.clone());
    let body = json!({
        "apiVersion": KataConfig::api_version(&()),
        "kind": KataConfig::kind(&()),
        "status": status,
    });
    apply::apply_status(&api, &kc.name_any(), body).await?;
    Ok(())
}

/// The labels the Job watch selects.
pub(crate) fn watch_selector() -> String {
    format!("{LABEL_COMPONENT}={COMPONENT}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_with(cond: Option<(&str, &str, &str)>) -> Job {
        let conds = cond
            .map(|(t, r, m)| json!([{"type": t, "status": "True", "reason": r, "message": m}]))
            .unwrap_or(json!([]));
        serde_json::from_value(json!({
            "metadata": {"name": IMAGE_CREATION_JOB},
            "status": {"conditions": conds},
        }))
        .unwrap()
    }

    #[test]
    fn job_states_come_from_the_terminal_conditions() {
        assert_eq!(job_state(&job_with(None)), JobState::Running);
        assert_eq!(
            job_state(&job_with(Some(("Complete", "", "")))),
            JobState::Complete
        );
        assert_eq!(
            job_state(&job_with(Some((
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit"
            )))),
            JobState::Failed(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            )
        );
        assert!(matches!(
            job_state(&job_with(Some(("FailureTarget", "DeadlineExceeded", "")))),
            JobState::Failed(m) if m == "DeadlineExceeded"
        ));
    }

    fn valid() -> Inputs<'static> {
        Inputs {
            config_ok: true,
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_image_id_with_a_valid_config_starts_one_job() {
        let p = plan(&valid());
        assert!(p.create && !p.ready);
        assert_eq!(p.reason, reasons::JOB_RUNNING);
        let p = plan(&Inputs {
            job: Some((JobState::Running, false)),
            ..valid()
        });
        assert!(!p.create && !p.ready);
        assert_eq!(p.reason, reasons::JOB_RUNNING);
    }

    #[test]
    fn an_invalid_config_starts_no_job_but_an_existing_one_is_still_shown() {
        let p = plan(&Inputs::default());
        assert!(!p.create);
        assert_eq!(p.reason, reasons::WAITING_FOR_CONFIG);
        let p = plan(&Inputs {
            job: Some((JobState::Failed("boom".into()), false)),
            ..Default::default()
        });
        assert_eq!(p.reason, reasons::JOB_FAILED);
    }

    #[test]
    fn a_failure_stays_until_an_image_id_or_the_job_is_deleted() {
        let failed = Inputs {
            job: Some((JobState::Failed("BackoffLimitExceeded".into()), false)),
            ..valid()
        };
        let p = plan(&failed);
        assert!(!p.create && !p.ready);
        assert_eq!(p.reason, reasons::JOB_FAILED);
        assert!(p.message.contains("BackoffLimitExceeded"), "{}", p.message);
        // Being deleted by the user: wait, do not create yet.
        let p = plan(&Inputs {
            job: Some((JobState::Failed("x".into()), true)),
            ..valid()
        });
        assert!(!p.create);
        // Gone: a new one.
        assert!(plan(&valid()).create);
        // The user sets an id: ready, nothing recorded, the failed Job left for its logs.
        let p = plan(&Inputs {
            image_id: Some("/img"),
            ..failed
        });
        assert!(p.ready && p.record.is_none() && !p.delete_running);
        assert_eq!(p.reason, reasons::IMAGE_PROVIDED);
    }

    #[test]
    fn a_completed_job_is_never_rerun_and_its_image_is_recorded_only_if_it_wrote_it() {
        let done = Inputs {
            job: Some((JobState::Complete, false)),
            ..valid()
        };
        let p = plan(&done);
        assert!(!p.create && !p.ready);
        assert_eq!(p.reason, reasons::IMAGE_MISSING);
        let p = plan(&Inputs {
            image_id: Some("/img"),
            written_by_job: true,
            ..done.clone()
        });
        assert_eq!(p.record.as_deref(), Some("/img"));
        assert_eq!(p.reason, reasons::IMAGE_BUILT);
        let p = plan(&Inputs {
            image_id: Some("/img"),
            written_by_job: true,
            built: Some("/img"),
            ..done.clone()
        });
        assert!(p.record.is_none(), "recorded once");
        assert_eq!(p.reason, reasons::IMAGE_BUILT);
        let p = plan(&Inputs {
            image_id: Some("/user"),
            written_by_job: false,
            ..done
        });
        assert!(p.record.is_none(), "a user's image is never recorded");
        assert_eq!(p.reason, reasons::IMAGE_PROVIDED);
    }

    #[test]
    fn a_user_image_stops_a_running_job_but_the_jobs_own_write_does_not() {
        let running = Inputs {
            job: Some((JobState::Running, false)),
            image_id: Some("/img"),
            ..valid()
        };
        assert!(plan(&running).delete_running);
        assert!(
            !plan(&Inputs {
                written_by_job: true,
                ..running
            })
            .delete_running
        );
    }

    #[test]
    fn providers_without_images_need_no_job() {
        let p = plan(&Inputs {
            no_image_needed: true,
            ..valid()
        });
        assert!(p.ready && !p.create);
        assert_eq!(p.reason, reasons::NOT_REQUIRED);
    }

    #[test]
    fn the_kataconfig_shows_the_design_reasons() {
        let c = |reason: &str| {
            vec![conditions::new(
                CONDITION_POD_VM_IMAGE_READY,
                false,
                reason,
                "m",
                None,
            )]
        };
        assert_eq!(
            kataconfig_progress(&c(reasons::JOB_RUNNING)).map(|x| (x.0, x.1)),
            Some((true, "PodVMImageJobRunning"))
        );
        assert_eq!(
            kataconfig_progress(&c(reasons::JOB_FAILED)).map(|x| (x.0, x.1)),
            Some((false, "PodVMImageJobFailed"))
        );
        assert_eq!(
            kataconfig_progress(&c(reasons::IMAGE_BUILT)).map(|x| (x.0, x.1)),
            Some((false, "PodVMImageJobCompleted"))
        );
        assert_eq!(kataconfig_progress(&c(reasons::IMAGE_PROVIDED)), None);
        assert_eq!(kataconfig_progress(&[]), None);
    }

    #[test]
    fn only_the_jobs_field_manager_makes_an_image_built() {
        let cm = |manager: &str| -> ConfigMap {
            serde_json::from_value(json!({
                "metadata": {"name": "peer-pods-cm", "managedFields": [{
                    "manager": manager, "operation": "Update", "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:data": {"f:AZURE_IMAGE_ID": {}}},
                }]},
            }))
            .unwrap()
        };
        assert!(written_by_job(&cm(IMAGE_JOB_FIELD_MANAGER)));
        assert!(!written_by_job(&cm("kubectl-edit")));
        let annotated = |ann: &str| -> ConfigMap {
            serde_json::from_value(json!({
                "metadata": {"name": "peer-pods-cm", "annotations": {
                    crate::api::names::ANNOTATION_BUILT_IMAGE_ID: ann,
                }},
                "data": {IMAGE_ID_KEY: "/img/1"},
            }))
            .unwrap()
        };
        assert!(written_by_job(&annotated("/img/1")));
        assert!(
            !written_by_job(&annotated("/img/0")),
            "the user replaced the built image"
        );
    }

    #[test]
    fn jobs_carry_the_operators_proxy_variables() {
        let spec = PeerPodConfigSpec::default();
        let mut s = Settings::default();
        s.azure.proxy_env = vec![
            ("HTTPS_PROXY".into(), "http://proxy.example:3128".into()),
            ("NO_PROXY".into(), ".cluster.local".into()),
        ];
        for j in [
            creation_job("ns", "img:1", &spec, &s, OwnerReference::default()),
            deletion_job(
                "ns",
                "img:1",
                &spec,
                "/img/1",
                &s,
                OwnerReference::default(),
            ),
        ] {
            let env = j.spec.unwrap().template.spec.unwrap().containers[0]
                .env
                .clone()
                .unwrap();
            let value = |n: &str| {
                env.iter()
                    .find(|e| e.name == n)
                    .and_then(|e| e.value.clone())
            };
            assert_eq!(
                value("HTTPS_PROXY").as_deref(),
                Some("http://proxy.example:3128")
            );
            assert_eq!(value("NO_PROXY").as_deref(), Some(".cluster.local"));
            assert_eq!(value("HTTP_PROXY"), None);
        }
    }

    #[test]
    fn jobs_run_the_operator_image_non_root_with_the_users_config() {
        let spec = PeerPodConfigSpec::default();
        let s = Settings {
            backoff_limit: 0,
            ..Default::default()
        };
        let j = creation_job("ns", "img:1", &spec, &s, OwnerReference::default());
        let js = j.spec.unwrap();
        assert_eq!(js.backoff_limit, Some(0));
        let pod = js.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.service_account_name.as_deref(), Some(SERVICE_ACCOUNT));
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        assert_eq!(c.args.clone().unwrap(), ["image", "job"]);
        assert_eq!(c.env_from.as_ref().unwrap().len(), 2);
        let d = deletion_job(
            "ns",
            "img:1",
            &spec,
            "/img/1",
            &s,
            OwnerReference::default(),
        );
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0].args.clone().unwrap(),
            ["image", "delete", "--image-id", "/img/1"]
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
    }
}
