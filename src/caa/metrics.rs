//! CAA's Prometheus metrics: pod VM creates and deletes (results, durations), the VMs this
//! node holds, sweeps, the agent relay and ARM's answers (throttling, retries).
//!
//! Labels are bounded (operations, results, error kinds): the node a series belongs to is
//! the scrape target's (the PodMonitor adds it), never a label written here.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cloud::azure::policy::Counters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// `ok` or an error's metric label.
    result: String,
}

/// The metrics of one CAA process.
pub(crate) struct CaaMetrics {
    creates: Family<ResultLabels, Counter>,
    deletes: Family<ResultLabels, Counter>,
    create_duration: Histogram,
    delete_duration: Histogram,
    pod_vms: Gauge,
    sweeps: Counter,
    swept: Counter,
    relay_connections: Counter,
    relay_active: Gauge,
    relay_errors: Counter,
}

impl Default for CaaMetrics {
    fn default() -> Self {
        Self {
            creates: Family::default(),
            deletes: Family::default(),
            // 0.25 s … ~17 min: a local VM is ready in a second, an Azure one in minutes.
            create_duration: Histogram::new(exponential_buckets(0.25, 2.0, 13)),
            delete_duration: Histogram::new(exponential_buckets(0.25, 2.0, 13)),
            pod_vms: Gauge::default(),
            sweeps: Counter::default(),
            swept: Counter::default(),
            relay_connections: Counter::default(),
            relay_active: Gauge::default(),
            relay_errors: Counter::default(),
        }
    }
}

/// The process's CAA metrics (one CAA per process; the relay's connection tasks and the
/// sweep reach them without plumbing).
pub(crate) static METRICS: LazyLock<CaaMetrics> = LazyLock::new(CaaMetrics::default);

impl CaaMetrics {
    /// Registers the metrics (as `sandboxd_caa_*`) and, for Azure, ARM's counters.
    pub(crate) fn register(&self, registry: &mut Registry, arm: Option<Arc<Counters>>) {
        // Successes exist from the start (a rate of 0, not "no data"); each failure kind
        // appears with its first occurrence.
        inc_by(&self.creates, None, 0);
        inc_by(&self.deletes, None, 0);
        let r = registry.sub_registry_with_prefix("caa");
        r.register(
            "vm_creates",
            "Pod VM creates (StartVM) by result: ok or the error kind",
            self.creates.clone(),
        );
        r.register(
            "vm_deletes",
            "Pod VM deletes (StopVM, failed creates, sweeps of deleted records) by result",
            self.deletes.clone(),
        );
        r.register(
            "vm_create_duration_seconds",
            "Time from the create call until the VM is ready (successful creates)",
            self.create_duration.clone(),
        );
        r.register(
            "vm_delete_duration_seconds",
            "Time until the cloud confirms a VM is gone (successful deletes)",
            self.delete_duration.clone(),
        );
        r.register(
            "pod_vms",
            "Peer pod sandboxes this node's CAA holds, created or running (each uses one of the node's kata.peerpods.io/vm)",
            self.pod_vms.clone(),
        );
        r.register(
            "sweeps",
            "Sweeps for unreferenced VMs run",
            self.sweeps.clone(),
        );
        r.register(
            "sweep_deleted_vms",
            "VMs the sweep deleted because no PeerPod referenced them (leaked VMs)",
            self.swept.clone(),
        );
        r.register(
            "relay_connections",
            "Agent connections relayed to pod VMs",
            self.relay_connections.clone(),
        );
        r.register(
            "relay_active_connections",
            "Agent connections being relayed now",
            self.relay_active.clone(),
        );
        r.register(
            "relay_errors",
            "Agent connections that failed to reach the VM or ended with an error (the log names the kind)",
            self.relay_errors.clone(),
        );
        if let Some(counters) = arm {
            r.register_collector(Box::new(ArmCollector(counters)));
        }
    }

    /// Records a StartVM's create: its result and, when it succeeded, how long it took.
    pub(crate) fn create(&self, took: Duration, error: Option<&str>) {
        if error.is_none() {
            self.create_duration.observe(took.as_secs_f64());
        }
        inc(&self.creates, error);
    }

    /// Records a delete: its result and, when it succeeded, how long it took.
    pub(crate) fn delete(&self, took: Duration, error: Option<&str>) {
        if error.is_none() {
            self.delete_duration.observe(took.as_secs_f64());
        }
        inc(&self.deletes, error);
    }

    /// Sets the number of peer pod sandboxes (VM slots in use) of this node.
    pub(crate) fn set_pod_vms(&self, n: usize) {
        self.pod_vms.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records a sweep and the VMs it deleted.
    pub(crate) fn swept(&self, deleted: usize) {
        self.sweeps.inc();
        self.swept.inc_by(deleted as u64);
    }

    /// Records a relayed connection starting; the guard counts it active until dropped.
    pub(crate) fn relay_started(&'static self) -> RelayGuard {
        self.relay_connections.inc();
        self.relay_active.inc();
        RelayGuard(self)
    }

    /// Records a relayed connection that failed or ended with an error.
    pub(crate) fn relay_error(&self) {
        self.relay_errors.inc();
    }
}

fn inc(family: &Family<ResultLabels, Counter>, error: Option<&str>) {
    inc_by(family, error, 1);
}

fn inc_by(family: &Family<ResultLabels, Counter>, error: Option<&str>, n: u64) {
    family
        .get_or_create(&ResultLabels {
            result: error.unwrap_or("ok").to_string(),
        })
        .inc_by(n);
}

/// Counts one relayed connection as active while it lives.
pub(crate) struct RelayGuard(&'static CaaMetrics);

impl Drop for RelayGuard {
    fn drop(&mut self) {
        self.0.relay_active.dec();
    }
}

/// ARM's counters of the Azure provider's retry policy, read at each scrape.
#[derive(Debug)]
struct ArmCollector(Arc<Counters>);

impl Collector for ArmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "arm_requests",
                "ARM requests sent (every attempt)",
                &self.0.attempts,
            ),
            (
                "arm_throttled",
                "ARM answers 429 Too Many Requests (each is waited out and retried)",
                &self.0.throttled,
            ),
            (
                "arm_retries",
                "ARM requests retried after a 5xx answer, a timeout or a dropped connection",
                &self.0.transient_retries,
            ),
        ] {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            let m = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_metrics_address_is_on_the_daemonsets_metrics_port() {
        let addr: std::net::SocketAddr = super::super::DEFAULT_METRICS_ADDR.parse().unwrap();
        assert_eq!(addr.port(), super::super::METRICS_PORT);
    }

    #[test]
    fn creates_deletes_sweeps_relay_and_arm_counters_are_exposed_under_caa() {
        let m = CaaMetrics::default();
        let arm = Arc::new(Counters::default());
        arm.throttled.fetch_add(2, Ordering::Relaxed);
        let mut registry = crate::telemetry::Metrics::for_component("caa");
        m.register(registry.registry_mut(), Some(arm));
        m.create(Duration::from_secs(3), None);
        m.create(Duration::from_secs(1), Some("quota"));
        m.delete(Duration::from_secs(2), None);
        m.swept(2);
        m.relay_error();
        m.set_pod_vms(4);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry.finish()).unwrap();
        for line in [
            "sandboxd_caa_vm_creates_total{result=\"ok\"} 1",
            "sandboxd_caa_vm_creates_total{result=\"quota\"} 1",
            "sandboxd_caa_vm_create_duration_seconds_count 1",
            "sandboxd_caa_vm_deletes_total{result=\"ok\"} 1",
            "sandboxd_caa_pod_vms 4",
            "sandboxd_caa_sweeps_total 1",
            "sandboxd_caa_sweep_deleted_vms_total 2",
            "sandboxd_caa_relay_errors_total 1",
            "sandboxd_caa_arm_throttled_total 2",
            "sandboxd_caa_arm_requests_total 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
