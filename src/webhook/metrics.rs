//! The webhook's Prometheus metrics.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How an admission request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A peer pod was mutated.
    Mutated,
    /// Admitted unchanged (not a peer pod, not a pod creation, or a never-mutate namespace).
    Ignored,
    /// Refused by the namespace policy.
    Denied,
    /// The request or the pod in it was unusable.
    Invalid,
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` indexes it).
    pub(crate) const ALL: [Outcome; 4] = [
        Outcome::Mutated,
        Outcome::Ignored,
        Outcome::Denied,
        Outcome::Invalid,
    ];

    /// The metric label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Mutated => "mutated",
            Outcome::Ignored => "ignored",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Counters and the latency histogram of the webhook (cheap to clone; clones share values).
#[derive(Clone)]
pub(crate) struct WebhookMetrics {
    admissions: Family<OutcomeLabels, Counter>,
    /// The counters of `admissions`, one per [`Outcome`] in [`Outcome::ALL`] order, looked
    /// up once so that counting an admission is one atomic add.
    by_outcome: [Counter; 4],
    mutations: Counter,
    errors: Family<ReasonLabels, Counter>,
    duration: Histogram,
    reloads: Family<ReasonLabels, Counter>,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        let admissions = Family::<OutcomeLabels, Counter>::default();
        let by_outcome = Outcome::ALL
            .map(|outcome| admissions.get_or_create(&OutcomeLabels { outcome }).clone());
        Self {
            admissions,
            by_outcome,
            mutations: Counter::default(),
            errors: Family::default(),
            // 10 µs … ~80 ms.
            duration: Histogram::new(exponential_buckets(0.000_01, 2.0, 14)),
            reloads: Family::default(),
        }
    }
}

impl WebhookMetrics {
    /// Metrics registered in `registry` (under its `sandboxd` prefix, as `webhook_*`).
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("webhook");
        r.register(
            "admissions",
            "Admission requests answered, by outcome",
            m.admissions.clone(),
        );
        r.register("mutations", "Peer pods mutated", m.mutations.clone());
        r.register(
            "errors",
            "Errors while answering, by reason",
            m.errors.clone(),
        );
        r.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview",
            m.duration.clone(),
        );
        r.register(
            "certificate_reloads",
            "Serving certificate reloads, by result",
            m.reloads.clone(),
        );
        m
    }

    /// Records one answered request.
    pub(crate) fn observe(&self, outcome: Outcome, took: Duration) {
        self.by_outcome[outcome as usize].inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a mutated pod.
    pub(crate) fn mutated(&self) {
        self.mutations.inc();
    }

    /// Counts an error by its metric label.
    pub(crate) fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a certificate reload (`ok` or an error label).
    pub(crate) fn reload(&self, result: &str) {
        self.reloads
            .get_or_create(&ReasonLabels {
                reason: result.to_string(),
            })
            .inc();
    }
}
