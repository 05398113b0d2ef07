//! Gauges of the peer pods world as the operator sees it: peer pods by phase (the webhook's
//! label, watched with only the phase and the scheduling condition kept), those the
//! scheduler could not place, the per-node VM limit in force, whether the pod VM image is
//! ready, whether the peer pods webhook is registered with `failurePolicy: Fail`, and the
//! peer pods controller's reconcile results.
//!
//! No label names a node, pod or namespace: per-node use is CAA's `sandboxd_caa_pod_vms`,
//! whose node is the scrape target's.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::names::PEER_POD_LABEL;

/// The phases a pod reports (each gets a series, zero included).
const PHASES: [&str; 5] = ["Pending", "Running", "Succeeded", "Failed", "Unknown"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// The gauges (one set per process).
#[derive(Default)]
pub(crate) struct PeerPodGauges {
    phases: Family<PhaseLabels, Gauge>,
    unschedulable: Gauge,
    limit: Gauge,
    image_ready: Gauge,
    webhook_fail_closed: Gauge,
    reconciles: Family<ResultLabels, Counter>,
}

/// The operator's peer pod gauges.
pub(crate) static GAUGES: LazyLock<PeerPodGauges> = LazyLock::new(PeerPodGauges::default);

impl PeerPodGauges {
    /// Registers the gauges as `sandboxd_operator_*`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        for p in PHASES {
            let _ = self.phases.get_or_create(&PhaseLabels { phase: p.into() });
        }
        let _ = self.reconciles.get_or_create(&ResultLabels {
            result: "ok".into(),
        });
        registry.register(
            "operator_peer_pods",
            "Peer pods (labelled by the webhook) by phase",
            self.phases.clone(),
        );
        registry.register(
            "operator_peerpods_reconciles",
            "Peer pods reconcile passes (PeerPodConfig, CAA, webhook, image) by result",
            self.reconciles.clone(),
        );
        registry.register(
            "operator_peer_pods_unschedulable",
            "Pending peer pods the scheduler could not place (e.g. every node at its VM limit)",
            self.unschedulable.clone(),
        );
        registry.register(
            "operator_vm_limit_per_node",
            "The pod VM limit each selected node advertises as kata.peerpods.io/vm (0 when peer pods are off)",
            self.limit.clone(),
        );
        registry.register(
            "operator_podvm_image_ready",
            "1 when the pod VM image is recorded in peer-pods-cm (AZURE_IMAGE_ID), else 0",
            self.image_ready.clone(),
        );
        registry.register(
            "operator_webhook_fail_closed",
            "1 while the peer pods MutatingWebhookConfiguration is registered with failurePolicy Fail",
            self.webhook_fail_closed.clone(),
        );
    }

    /// The limit every selected node advertises.
    pub(crate) fn set_limit(&self, limit: u32) {
        self.limit.set(i64::from(limit));
    }

    /// Whether the pod VM image is ready.
    pub(crate) fn set_image_ready(&self, ready: bool) {
        self.image_ready.set(i64::from(ready));
    }

    /// Whether the webhook is registered (always with `failurePolicy: Fail`).
    pub(crate) fn set_webhook_fail_closed(&self, registered: bool) {
        self.webhook_fail_closed.set(i64::from(registered));
    }

    /// Records one peer pods reconcile pass (`None`: it succeeded).
    pub(crate) fn reconciled(&self, error: Option<&str>) {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: error.unwrap_or("ok").into(),
            })
            .inc();
    }

    fn count(&self, pods: &[std::sync::Arc<Pod>]) {
        let (phases, unschedulable) = tally(pods.iter().map(|p| p.as_ref()));
        for p in PHASES {
            self.phases
                .get_or_create(&PhaseLabels { phase: p.into() })
                .set(phases.get(p).copied().unwrap_or(0));
        }
        self.unschedulable.set(unschedulable);
    }
}

/// Peer pods by phase, and how many Pending ones the scheduler marked unschedulable.
fn tally<'a>(pods: impl Iterator<Item = &'a Pod>) -> (BTreeMap<&'static str, i64>, i64) {
    let mut phases = BTreeMap::new();
    let mut unschedulable = 0;
    for pod in pods {
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let phase = PHASES.iter().find(|p| **p == phase).unwrap_or(&"Unknown");
        *phases.entry(*phase).or_insert(0) += 1;
        if *phase == "Pending" && status.is_some_and(is_unschedulable) {
            unschedulable += 1;
        }
    }
    (phases, unschedulable)
}

fn is_unschedulable(s: &PodStatus) -> bool {
    s.conditions.iter().flatten().any(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })
}

/// Keeps only what the gauges read: the phase and the scheduling condition.
fn trim(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    if let Some(s) = pod.status.as_mut() {
        *s = PodStatus {
            phase: s.phase.take(),
            conditions: s.conditions.take().map(|cs| {
                cs.into_iter()
                    .filter(|c| c.type_ == "PodScheduled")
                    .collect()
            }),
            ..Default::default()
        };
    }
}

/// Watches peer pods and keeps the phase gauges current until `shutdown`.
pub(crate) fn watch(client: Client, shutdown: CancellationToken) {
    let (store, writer): (Store<Pod>, _) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<Pod>::all(client),
            watcher::Config::default().labels(&format!("{PEER_POD_LABEL}=true")),
        )
        .modify(trim),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = stream.next() => match ev {
                    Some(Ok(_)) => GAUGES.count(&store.state()),
                    Some(Err(e)) => tracing::debug!(error = %e, "peer pod watch error (retrying)"),
                    None => break,
                },
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(phase: &str, unschedulable: bool) -> Pod {
        let conditions = if unschedulable {
            json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}])
        } else {
            json!([{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}])
        };
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": phase, "conditions": conditions}
        }))
        .unwrap()
    }

    #[test]
    fn pods_are_counted_by_phase_and_unschedulable_pending_ones_apart() {
        let pods = [
            pod("Running", false),
            pod("Running", false),
            pod("Pending", true),
            pod("Pending", false),
            pod("Weird", false),
        ];
        let (phases, unschedulable) = tally(pods.iter());
        assert_eq!(phases["Running"], 2);
        assert_eq!(phases["Pending"], 2);
        assert_eq!(phases["Unknown"], 1);
        assert_eq!(unschedulable, 1);
    }

    #[test]
    fn trimming_keeps_the_phase_and_the_scheduling_condition_only() {
        let mut p = pod("Pending", true);
        trim(&mut p);
        assert!(p.spec.is_none());
        let s = p.status.as_ref().unwrap();
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert!(is_unschedulable(s));
        let mut q = pod("Running", false);
        trim(&mut q);
        assert_eq!(q.status.unwrap().conditions.unwrap().len(), 1);
    }
}
