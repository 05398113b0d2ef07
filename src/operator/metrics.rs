//! Operator metrics: reconcile counts, errors and durations, and writes by kind.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `ok` or an error's metric label.
    pub(crate) result: String,
}

/// Labels of the write counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WriteLabels {
    /// What was written.
    pub(crate) kind: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct OperatorMetrics {
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    writes: Family<WriteLabels, Counter>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            writes: Family::default(),
        }
    }
}

impl OperatorMetrics {
    /// Registers the metrics. Successful passes are counted from the start (a rate of 0,
    /// not "no data", before the first pass).
    pub fn register(&self, registry: &mut Registry) {
        let _ = self.reconciles.get_or_create(&ResultLabels {
            result: "ok".into(),
        });
        registry.register(
            "operator_reconciles",
            "KataConfig reconcile passes by result",
            self.reconciles.clone(),
        );
        registry.register(
            "operator_reconcile_duration_seconds",
            "Duration of KataConfig reconcile passes",
            self.duration.clone(),
        );
        registry.register(
            "operator_writes",
            "Writes to the API server by what was written",
            self.writes.clone(),
        );
    }

    /// Records one reconcile pass.
    pub(crate) fn observe(&self, took: Duration, error: Option<&str>) {
        self.duration.observe(took.as_secs_f64());
        self.reconciles
            .get_or_create(&ResultLabels {
                result: error.unwrap_or("ok").to_string(),
            })
            .inc();
    }

    fn write(&self, kind: &str) {
        self.writes
            .get_or_create(&WriteLabels { kind: kind.into() })
            .inc();
    }

    /// Records a node label write.
    pub(crate) fn node_write(&self) {
        self.write("node");
    }

    /// Records a write of an object the operator owns (RuntimeClass, DaemonSet, ...).
    pub(crate) fn object_write(&self, kind: &str) {
        self.write(kind);
    }

    /// Records a status write.
    pub(crate) fn status_write(&self) {
        self.write("status");
    }

    /// Reconcile passes so far, by result (for tests and benchmarks).
    pub fn reconcile_count(&self, result: &str) -> u64 {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .get()
    }
}
