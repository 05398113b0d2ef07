//! `admission.k8s.io/v1` AdmissionReview in and out, and the decision for one request.
//!
//! A request this webhook can attribute (it has a uid) always gets an AdmissionReview
//! answer, refusals included; only a body that is not an AdmissionReview at all gets an
//! HTTP error.

use std::sync::Arc;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::metrics::{Outcome, WebhookMetrics};
use super::mutate;
use super::policy::{AdmissionPolicy, Decision};

/// The AdmissionReview API version this webhook speaks.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Why a body could not be answered with an AdmissionReview (answered with HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not JSON of an AdmissionReview.
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The body is an object of another kind or version.
    #[error(
        "expected apiVersion {API_VERSION:?} kind \"AdmissionReview\", got apiVersion {api_version:?} kind {kind:?}"
    )]
    WrongType {
        /// What the body said.
        api_version: String,
        /// What the body said.
        kind: String,
    },
    /// The AdmissionReview carries no `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// The request has an empty uid, so no answer could be matched to it.
    #[error("the AdmissionReview request has no uid")]
    NoUid,
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Malformed(_) => "malformed",
            Error::WrongType { .. } => "wrong_type",
            Error::NoRequest => "no_request",
            Error::NoUid => "no_uid",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<RequestIn>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Gvk {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    kind: Gvk,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    object: Option<Value>,
    #[serde(default)]
    dry_run: bool,
}

/// An AdmissionReview answer.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReviewOut {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// Always `AdmissionReview`.
    pub kind: String,
    /// The answer.
    pub response: Response,
}

/// The `response` of an AdmissionReview.
#[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// The request's uid.
    pub uid: String,
    /// Whether the pod is admitted.
    pub allowed: bool,
    /// Why not, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Base64 of the JSON patch, when mutated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// `JSONPatch` when there is a patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Messages for the requesting client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The status of a refusal.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// HTTP-like code (403 refused by policy, 400 invalid pod).
    pub code: u16,
    /// Shown to the user.
    pub message: String,
    /// `Forbidden` or `BadRequest`.
    pub reason: String,
}

/// What the webhook does to peer pods.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Pods with this `spec.runtimeClassName` are peer pods.
    pub target_runtime_class: String,
    /// The per-node VM extended resource put on the first container.
    pub extended_resource: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            target_runtime_class: "kata-remote".into(),
            extended_resource: mutate::DEFAULT_EXTENDED_RESOURCE.into(),
        }
    }
}

/// The admission logic: settings, a namespace policy and metrics.
#[derive(Clone)]
pub struct Webhook {
    settings: Arc<Settings>,
    policy: Arc<dyn AdmissionPolicy>,
    metrics: WebhookMetrics,
}

impl Webhook {
    /// A webhook with `settings` and `policy`, counting into `metrics`.
    pub fn new(
        settings: Settings,
        policy: Arc<dyn AdmissionPolicy>,
        metrics: WebhookMetrics,
    ) -> Self {
        Self {
            settings: Arc::new(settings),
            policy,
            metrics,
        }
    }

    /// The metrics this webhook counts into.
    pub fn metrics(&self) -> &WebhookMetrics {
        &self.metrics
    }

    /// Answers one AdmissionReview body.
    pub fn review(&self, body: &[u8]) -> Result<ReviewOut, Error> {
        let start = std::time::Instant::now();
        let result = self.review_inner(body);
        let outcome = match &result {
            Ok((_, o)) => *o,
            Err(e) => {
                tracing::warn!(error = %e, "refusing a request that is not an AdmissionReview");
                Outcome::Invalid
            }
        };
        self.metrics.observe(outcome, start.elapsed());
        result.map(|(r, _)| ReviewOut {
            api_version: API_VERSION.into(),
            kind: "AdmissionReview".into(),
            response: r,
        })
    }

    fn review_inner(&self, body: &[u8]) -> Result<(Response, Outcome), Error> {
        let review: ReviewIn = serde_json::from_slice(body).map_err(Error::Malformed)?;
        if review.api_version != API_VERSION || review.kind != "AdmissionReview" {
            return Err(Error::WrongType {
                api_version: review.api_version,
                kind: review.kind,
            });
        }
        let req = review.request.ok_or(Error::NoRequest)?;
        if req.uid.is_empty() {
            return Err(Error::NoUid);
        }
        let allow = Response {
            uid: req.uid.clone(),
            allowed: true,
            ..Default::default()
        };
        let refuse = |code: u16, reason: &str, message: String| Response {
            uid: req.uid.clone(),
            allowed: false,
            status: Some(Status {
                code,
                message,
                reason: reason.into(),
            }),
            ..Default::default()
        };
        // Only pod creation is ours; anything else passes untouched, so a misconfigured
        // webhook never blocks updates or deletes.
        if !(req.kind.group.is_empty() && req.kind.version == "v1" && req.kind.kind == "Pod")
            || req.sub_resource.as_deref().is_some_and(|s| !s.is_empty())
            || req.operation != "CREATE"
        {
            return Ok((allow, Outcome::Ignored));
        }
        let Some(object) = req.object.as_ref() else {
            let r = refuse(
                400,
                "BadRequest",
                "the request carries no pod object".into(),
            );
            return Ok((r, Outcome::Invalid));
        };
        let pod = match Pod::deserialize(object) {
            Ok(pod) => pod,
            Err(e) => {
                let r = refuse(400, "BadRequest", format!("the pod does not parse: {e}"));
                return Ok((r, Outcome::Invalid));
            }
        };
        let runtime_class = pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.as_deref());
        if runtime_class != Some(self.settings.target_runtime_class.as_str()) {
            return Ok((allow, Outcome::Ignored));
        }
        let namespace = req
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let name = if req.name.is_empty() {
            pod.metadata
                .generate_name
                .as_deref()
                .map(|g| format!("{g}*"))
                .unwrap_or_default()
        } else {
            req.name.clone()
        };
        let span =
            tracing::info_span!("admission", uid = %req.uid, namespace = %namespace, pod = %name);
        let _enter = span.enter();
        match self.policy.decide(&namespace) {
            Decision::Refuse(message) => {
                tracing::info!(%message, "refused a peer pod");
                return Ok((refuse(403, "Forbidden", message), Outcome::Denied));
            }
            Decision::LeaveAlone(why) => {
                tracing::info!(reason = %why, "admitted a peer pod unchanged");
                return Ok((allow, Outcome::Ignored));
            }
            Decision::Mutate => {}
        }
        match mutate::mutate(object, &pod, &self.settings.extended_resource) {
            Ok(m) => {
                let patch = serde_json::to_vec(&m.patch).expect("a JSON patch serialises");
                tracing::info!(
                    vcpus = ?m.size.vcpus,
                    memory_mib = ?m.size.memory_mib,
                    gpus = ?m.size.gpus,
                    dry_run = req.dry_run,
                    "mutated a peer pod"
                );
                self.metrics.mutated();
                Ok((
                    Response {
                        uid: req.uid.clone(),
                        allowed: true,
                        status: None,
                        patch: Some(base64::engine::general_purpose::STANDARD.encode(patch)),
                        patch_type: Some("JSONPatch".into()),
                        warnings: m.warnings,
                    },
                    Outcome::Mutated,
                ))
            }
            Err(e) => {
                tracing::info!(error = %e, "refused a peer pod that cannot be sized");
                self.metrics.error(e.metric_label());
                let r = refuse(400, "BadRequest", format!("peer pod: {e}"));
                Ok((r, Outcome::Invalid))
            }
        }
    }
}
