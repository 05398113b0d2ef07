//! `admission.k8s.io/v1` AdmissionReview in and out, and the decision for one request.
//!
//! A request this webhook can attribute (it has a uid) always gets an AdmissionReview
//! answer, refusals included; only a body that is not an AdmissionReview at all gets an
//! HTTP error.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::metrics::{Outcome, WebhookMetrics};
use super::mutate;
use super::pod::{Obj, PodFull, PodIn, PodParts, Str};
use super::policy::{AdmissionPolicy, Decision};
use crate::api::names;

/// The AdmissionReview API version this webhook speaks.
pub(crate) const API_VERSION: &str = "admission.k8s.io/v1";

/// Why a body could not be answered with an AdmissionReview (answered with HTTP 400).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
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
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Malformed(_) => "malformed",
            Error::WrongType { .. } => "wrong_type",
            Error::NoRequest => "no_request",
            Error::NoUid => "no_uid",
        }
    }
}

// The request, borrowed from the body: strings without escapes are not copied. `O` is the
// pod object: read whole at once ([`Obj<PodFull>`]), or kept as raw text ([`RawValue`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct ReviewIn<'a, O> {
    #[serde(default, borrow)]
    api_version: Str<'a>,
    #[serde(default, borrow)]
    kind: Str<'a>,
    #[serde(borrow)]
    request: Option<RequestIn<'a, O>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Gvk<'a> {
    #[serde(default, borrow)]
    group: Str<'a>,
    #[serde(default, borrow)]
    version: Str<'a>,
    #[serde(default, borrow)]
    kind: Str<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct RequestIn<'a, O> {
    #[serde(default, borrow)]
    uid: Str<'a>,
    #[serde(default, borrow)]
    kind: Gvk<'a>,
    #[serde(default, borrow)]
    sub_resource: Option<Str<'a>>,
    #[serde(default, borrow)]
    name: Str<'a>,
    #[serde(default, borrow)]
    namespace: Option<Str<'a>>,
    #[serde(default, borrow)]
    operation: Str<'a>,
    #[serde(default = "none")]
    object: Option<O>,
    #[serde(default)]
    dry_run: bool,
}

fn none<O>() -> Option<O> {
    None
}

/// A pod object as a request carries it.
trait PodObject<'a> {
    /// The pod as far as read; `Err` when it does not parse as a pod.
    fn parts(self) -> Result<PodParts<'a>, serde_json::Error>;
}

impl<'a> PodObject<'a> for Obj<PodFull<'a>> {
    fn parts(self) -> Result<PodParts<'a>, serde_json::Error> {
        Ok(PodParts::Full(self.0.unwrap_or_default()))
    }
}

impl<'a> PodObject<'a> for &'a RawValue {
    fn parts(self) -> Result<PodParts<'a>, serde_json::Error> {
        let pod = serde_json::from_str::<Obj<PodIn>>(self.get())?;
        Ok(PodParts::Scanned(pod.0.unwrap_or_default()))
    }
}

/// An AdmissionReview answer.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReviewOut {
    /// Always [`API_VERSION`].
    pub(crate) api_version: String,
    /// Always `AdmissionReview`.
    pub(crate) kind: String,
    /// The answer.
    pub(crate) response: Response,
}

/// The `response` of an AdmissionReview.
#[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Response {
    /// The request's uid.
    pub(crate) uid: String,
    /// Whether the pod is admitted.
    pub(crate) allowed: bool,
    /// Why not, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<Status>,
    /// Base64 of the JSON patch, when mutated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) patch: Option<String>,
    /// `JSONPatch` when there is a patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) patch_type: Option<String>,
    /// Messages for the requesting client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) warnings: Vec<String>,
}

/// The status of a refusal.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Status {
    /// HTTP-like code (403 refused by policy, 400 invalid pod).
    pub(crate) code: u16,
    /// Shown to the user.
    pub(crate) message: String,
    /// `Forbidden` or `BadRequest`.
    pub(crate) reason: String,
}

/// What the webhook does to peer pods.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Pods with this `spec.runtimeClassName` are peer pods.
    pub(crate) target_runtime_class: String,
    /// The per-node VM extended resource put on the first container.
    pub(crate) extended_resource: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            target_runtime_class: names::RUNTIME_CLASS.into(),
            extended_resource: names::VM_RESOURCE.into(),
        }
    }
}

/// The admission logic: settings, a namespace policy and metrics.
#[derive(Clone)]
pub(crate) struct Webhook {
    settings: Arc<Settings>,
    policy: Arc<dyn AdmissionPolicy>,
    metrics: WebhookMetrics,
}

impl Webhook {
    /// A webhook with `settings` and `policy`, counting into `metrics`.
    pub(crate) fn new(
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
    pub(crate) fn metrics(&self) -> &WebhookMetrics {
        &self.metrics
    }

    /// Answers one AdmissionReview body.
    pub(crate) fn review(&self, body: &[u8]) -> Result<ReviewOut, Error> {
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
        // One pass over the body reads everything; a body that pass cannot read (not a
        // review, or a pod with fields of the wrong shape, which may still be someone
        // else's pod) is read again keeping the pod as raw text, to answer precisely.
        if let Ok(review) = serde_json::from_slice::<ReviewIn<Obj<PodFull>>>(body) {
            return self.decide(review);
        }
        let review =
            serde_json::from_slice::<ReviewIn<&RawValue>>(body).map_err(Error::Malformed)?;
        self.decide(review)
    }

    fn decide<'a, O: PodObject<'a>>(
        &self,
        review: ReviewIn<'a, O>,
    ) -> Result<(Response, Outcome), Error> {
        if review.api_version.as_str() != API_VERSION || review.kind.as_str() != "AdmissionReview" {
            return Err(Error::WrongType {
                api_version: review.api_version.0.into_owned(),
                kind: review.kind.0.into_owned(),
            });
        }
        let req = review.request.ok_or(Error::NoRequest)?;
        if req.uid.as_str().is_empty() {
            return Err(Error::NoUid);
        }
        let uid = req.uid.as_str();
        let allow = || Response {
            uid: uid.to_owned(),
            allowed: true,
            ..Default::default()
        };
        let refuse = |code: u16, reason: &str, message: String| Response {
            uid: uid.to_owned(),
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
        let kind = &req.kind;
        if !(kind.group.as_str().is_empty()
            && kind.version.as_str() == "v1"
            && kind.kind.as_str() == "Pod")
            || req
                .sub_resource
                .as_ref()
                .is_some_and(|s| !s.as_str().is_empty())
            || req.operation.as_str() != "CREATE"
        {
            return Ok((allow(), Outcome::Ignored));
        }
        let Some(object) = req.object else {
            let r = refuse(
                400,
                "BadRequest",
                "the request carries no pod object".into(),
            );
            return Ok((r, Outcome::Invalid));
        };
        let pod = match object.parts() {
            Ok(pod) => pod,
            Err(e) => {
                let r = refuse(400, "BadRequest", format!("the pod does not parse: {e}"));
                return Ok((r, Outcome::Invalid));
            }
        };
        if pod.runtime_class() != Some(self.settings.target_runtime_class.as_str()) {
            return Ok((allow(), Outcome::Ignored));
        }
        let peer = pod.peer();
        let meta_namespace = peer.as_ref().ok().and_then(|p| p.meta.namespace.as_ref());
        let namespace = req
            .namespace
            .as_ref()
            .or(meta_namespace)
            .map_or("", Str::as_str);
        let generated;
        let name = if !req.name.as_str().is_empty() {
            req.name.as_str()
        } else if let Some(g) = peer
            .as_ref()
            .ok()
            .and_then(|p| p.meta.generate_name.as_ref())
        {
            generated = format!("{}*", g.as_str());
            &generated
        } else {
            ""
        };
        let peer = match &peer {
            Ok(peer) => peer,
            Err(e) => {
                tracing::info!(uid, namespace, pod = name, error = %e, "refused a peer pod that does not parse");
                let r = refuse(400, "BadRequest", format!("the pod does not parse: {e}"));
                return Ok((r, Outcome::Invalid));
            }
        };
        match self.policy.decide(namespace) {
            Decision::Refuse(message) => {
                tracing::info!(uid, namespace, pod = name, %message, "refused a peer pod");
                return Ok((refuse(403, "Forbidden", message), Outcome::Denied));
            }
            Decision::LeaveAlone(why) => {
                tracing::info!(uid, namespace, pod = name, reason = %why, "admitted a peer pod unchanged");
                return Ok((allow(), Outcome::Ignored));
            }
            Decision::Mutate => {}
        }
        match mutate::mutate(peer, &self.settings.extended_resource) {
            Ok(m) => {
                tracing::info!(
                    uid,
                    namespace,
                    pod = name,
                    vcpus = m.size.vcpus,
                    memory_mib = m.size.memory_mib,
                    gpus = m.size.gpus,
                    dry_run = req.dry_run,
                    "mutated a peer pod"
                );
                self.metrics.mutated();
                Ok((
                    Response {
                        uid: uid.to_owned(),
                        allowed: true,
                        status: None,
                        patch: Some(base64::engine::general_purpose::STANDARD.encode(m.patch)),
                        patch_type: Some("JSONPatch".into()),
                        warnings: m.warnings,
                    },
                    Outcome::Mutated,
                ))
            }
            Err(e) => {
                tracing::info!(uid, namespace, pod = name, error = %e, "refused a peer pod that cannot be sized");
                self.metrics.error(e.metric_label());
                let r = refuse(400, "BadRequest", format!("peer pod: {e}"));
                Ok((r, Outcome::Invalid))
            }
        }
    }
}
