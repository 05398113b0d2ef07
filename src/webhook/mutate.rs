//! The peer pod mutation, as a pure function of the pod: its VM size by Kubernetes' own
//! effective-resource rule, and the JSON patch that turns container resources into that size.
//!
//! The pod VM is the pod's only consumer of CPU and memory on the cloud side, so the pod's
//! containers lose their resources (the worker node must not account for them), the first
//! container asks for one unit of the per-node VM extended resource instead, and the size
//! travels to the cloud-api-adaptor as kata hypervisor annotations.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::pod::{self, Container, PeerPod, Resources};
use super::quantity::{self, NANO, QuantityError, div_ceil};
use crate::api::names::{PEER_POD_LABEL, annotations};

/// The resource that sizes `default_gpus`.
pub(crate) const GPU_RESOURCE: &str = "nvidia.com/gpu";

const MIB_NANOS: i128 = NANO << 20;

/// Errors computing a pod's mutation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A resource quantity in the pod does not parse.
    #[error("{place}: resource {resource:?}: {source}")]
    Quantity {
        /// Which container (or the pod) holds it.
        place: String,
        /// The resource name.
        resource: String,
        /// What is wrong with it.
        source: QuantityError,
    },
    /// The pod has no containers, so nothing can carry the extended resource.
    #[error("the pod has no containers")]
    NoContainers,
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Quantity { .. } => "invalid_quantity",
            Error::NoContainers => "no_containers",
        }
    }
}

/// The size of the pod VM, in the units of the kata annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PodSize {
    /// vCPUs, rounded up; `None` when the pod asks for no CPU.
    pub(crate) vcpus: Option<u64>,
    /// Memory in MiB, rounded up; `None` when the pod asks for no memory.
    pub(crate) memory_mib: Option<u64>,
    /// GPUs; `None` when the pod asks for none.
    pub(crate) gpus: Option<u64>,
    /// Resources the pod asked for that a pod VM size cannot carry (hugepages, storage,
    /// other extended resources), sorted.
    pub(crate) dropped: BTreeSet<String>,
}

/// The outcome of mutating one peer pod.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mutation {
    /// RFC 6902 operations turning the submitted pod into the peer pod, as JSON text.
    pub(crate) patch: String,
    /// Messages for the user (admission warnings).
    pub(crate) warnings: Vec<String>,
    /// The size written to the annotations (before user-set annotations win).
    pub(crate) size: PodSize,
}

type Amounts<'a> = BTreeMap<&'a str, i128>;

fn parse_amounts<'a>(
    place: &dyn Fn() -> String,
    list: Option<&'a pod::Amounts<'_>>,
    out: &mut Amounts<'a>,
) -> Result<(), Error> {
    for (name, q) in list.into_iter().flat_map(|l| &l.0) {
        let nanos = quantity::parse_nanos(q.as_str()).map_err(|source| Error::Quantity {
            place: place(),
            resource: name.as_str().to_string(),
            source,
        })?;
        out.insert(name.as_str(), nanos.max(0));
    }
    Ok(())
}

/// A container's (or the pod's) requests and limits; a limit without a request is also the
/// request, as the API server's defaulting makes it.
fn requirements<'a>(
    place: &dyn Fn() -> String,
    r: Option<&'a Resources<'_>>,
) -> Result<(Amounts<'a>, Amounts<'a>), Error> {
    let mut requests = Amounts::new();
    let mut limits = Amounts::new();
    if let Some(r) = r {
        parse_amounts(place, r.requests.as_ref(), &mut requests)?;
        parse_amounts(place, r.limits.as_ref(), &mut limits)?;
        for (name, v) in &limits {
            requests.entry(name).or_insert(*v);
        }
    }
    Ok((requests, limits))
}

fn add<'a>(into: &mut Amounts<'a>, from: &Amounts<'a>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

fn max_into<'a>(into: &mut Amounts<'a>, from: &Amounts<'a>) {
    for (k, v) in from {
        let e = into.entry(k).or_insert(0);
        *e = (*e).max(*v);
    }
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy
        .as_ref()
        .is_some_and(|p| p.as_str() == "Always")
}

/// Requests and limits of a pod.
#[derive(Default)]
struct Both<'a> {
    requests: Amounts<'a>,
    limits: Amounts<'a>,
}

impl<'a> Both<'a> {
    fn add(&mut self, other: &Both<'a>) {
        add(&mut self.requests, &other.requests);
        add(&mut self.limits, &other.limits);
    }

    fn max(&mut self, other: &Both<'a>) {
        max_into(&mut self.requests, &other.requests);
        max_into(&mut self.limits, &other.limits);
    }
}

fn container_amounts<'a>(kind: &str, c: &'a Container<'_>) -> Result<Both<'a>, Error> {
    let place = || format!("{kind} {:?}", c.name.as_str());
    let (requests, limits) = requirements(&place, c.resources.as_ref())?;
    Ok(Both { requests, limits })
}

/// Kubernetes' effective pod amounts (the scheduler's rule): app containers plus restartable
/// init containers (sidecars) run together; each regular init container runs alone beside
/// the sidecars started before it; the pod needs the larger of the two.
fn effective<'a>(pod: &'a PeerPod<'_>) -> Result<Both<'a>, Error> {
    let mut total = Both::default();
    for c in &pod.containers {
        total.add(&container_amounts("container", c)?);
    }
    let mut sidecars = Both::default();
    let mut init_peak = Both::default();
    for c in &pod.init_containers {
        let own = container_amounts("init container", c)?;
        if is_sidecar(c) {
            total.add(&own);
            sidecars.add(&own);
        } else {
            let mut running = Both {
                requests: sidecars.requests.clone(),
                limits: sidecars.limits.clone(),
            };
            running.add(&own);
            init_peak.max(&running);
        }
    }
    total.max(&init_peak);
    Ok(total)
}

/// The pod VM size of `pod` and the resources it cannot carry.
///
/// Per resource, the effective request and limit come from Kubernetes' pod rule (pod-level
/// `spec.resources` win where set). The limit is used when the request is non-zero and the
/// limit is at least the request, otherwise the request; values round up to whole vCPUs,
/// MiB and GPUs.
pub(crate) fn pod_size(pod: &PeerPod<'_>, extended_resource: &str) -> Result<PodSize, Error> {
    let Both {
        mut requests,
        mut limits,
    } = effective(pod)?;
    if let Some(pod_level) = pod.resources.as_ref() {
        let (req, lim) = requirements(&|| "pod".to_string(), Some(pod_level))?;
        requests.extend(req);
        limits.extend(lim);
    }
    let chosen = |name: &str| -> Option<i128> {
        let req = requests.get(name).copied().unwrap_or(0);
        let lim = limits.get(name).copied().unwrap_or(0);
        let v = if req > 0 && lim >= req { lim } else { req };
        (v > 0).then_some(v)
    };
    let to_u64 = |v: i128| u64::try_from(v).unwrap_or(u64::MAX);
    let dropped = requests
        .keys()
        .chain(limits.keys())
        .filter(|n| !matches!(**n, "cpu" | "memory" | GPU_RESOURCE) && **n != extended_resource)
        .map(|n| n.to_string())
        .collect();
    Ok(PodSize {
        vcpus: chosen("cpu").map(|v| to_u64(div_ceil(v, NANO))),
        memory_mib: chosen("memory").map(|v| to_u64(div_ceil(v, MIB_NANOS))),
        gpus: chosen(GPU_RESOURCE).map(|v| to_u64(div_ceil(v, NANO))),
        dropped,
    })
}

/// Turns `pod` (the submitted pod's parts) into a peer pod: the JSON patch, the warnings and
/// the size.
///
/// The patch removes pod-level and every container's `resources`, sets the first
/// container's to one unit of `extended_resource`, adds the peer pod label, and adds the size
/// annotations the user did not set. `labels` and `annotations` exist afterwards.
pub(crate) fn mutate(pod: &PeerPod<'_>, extended_resource: &str) -> Result<Mutation, Error> {
    if pod.containers.is_empty() {
        return Err(Error::NoContainers);
    }
    let size = pod_size(pod, extended_resource)?;
    let had_resources = pod
        .containers
        .iter()
        .chain(&pod.init_containers)
        .any(|c| c.resources.as_ref().is_some_and(Resources::has_amounts))
        || pod.resources.as_ref().is_some_and(Resources::has_amounts);

    let mut patch = Patch::default();
    if pod.resources.is_some() {
        patch.op("remove", "/spec/resources", None);
    }
    let vm = {
        let mut one = String::from("{");
        json_str(&mut one, extended_resource);
        one.push_str(":\"1\"}");
        format!("{{\"requests\":{one},\"limits\":{one}}}")
    };
    patch.op("add", "/spec/containers/0/resources", Some(&vm));
    for (list, items) in [
        ("containers", &pod.containers),
        ("initContainers", &pod.init_containers),
    ] {
        for (i, c) in items.iter().enumerate() {
            if c.resources.is_some() && !(i == 0 && list == "containers") {
                patch.op("remove", &format!("/spec/{list}/{i}/resources"), None);
            }
        }
    }

    let label = {
        let mut l = String::from("{");
        json_str(&mut l, PEER_POD_LABEL);
        l.push_str(":\"true\"}");
        l
    };
    let sizes = [
        (annotations::DEFAULT_VCPUS, size.vcpus),
        (annotations::DEFAULT_MEMORY, size.memory_mib),
        (annotations::DEFAULT_GPUS, size.gpus),
    ];
    let mut annotations = String::from("{");
    for (key, value) in sizes {
        if let Some(v) = value {
            if annotations.len() > 1 {
                annotations.push(',');
            }
            json_str(&mut annotations, key);
            let _ = write!(annotations, ":\"{v}\"");
        }
    }
    annotations.push('}');
    if !pod.meta.present {
        let meta = format!("{{\"labels\":{label},\"annotations\":{annotations}}}");
        patch.op("add", "/metadata", Some(&meta));
    } else {
        if pod.meta.labels.is_none() {
            patch.op("add", "/metadata/labels", Some(&label));
        } else {
            let path = format!("/metadata/labels/{}", pointer_token(PEER_POD_LABEL));
            patch.op("add", &path, Some("\"true\""));
        }
        match pod.meta.annotations {
            None => patch.op("add", "/metadata/annotations", Some(&annotations)),
            Some(set) => {
                for (key, value) in sizes {
                    if let Some(v) = value
                        && !set.has(key)
                    {
                        let path = format!("/metadata/annotations/{}", pointer_token(key));
                        patch.op("add", &path, Some(&format!("\"{v}\"")));
                    }
                }
            }
        }
    }

    let mut warnings = Vec::new();
    if had_resources {
        warnings.push(format!(
            "peer pod: container resources were removed; the pod VM is sized by annotations \
             ({}) and the pod requests {extended_resource}=1",
            describe(&size)
        ));
    }
    if !size.dropped.is_empty() {
        let names: Vec<&str> = size.dropped.iter().map(String::as_str).collect();
        warnings.push(format!(
            "peer pod: resources a pod VM size cannot carry were dropped: {}",
            names.join(", ")
        ));
    }
    Ok(Mutation {
        patch: patch.finish(),
        warnings,
        size,
    })
}

/// A JSON patch written as text, operation by operation.
#[derive(Default)]
struct Patch(String);

impl Patch {
    /// Appends `{"op":op,"path":path[,"value":value]}`; `value` is JSON text.
    fn op(&mut self, op: &str, path: &str, value: Option<&str>) {
        self.0.push(if self.0.is_empty() { '[' } else { ',' });
        self.0.push_str("{\"op\":\"");
        self.0.push_str(op);
        self.0.push_str("\",\"path\":");
        json_str(&mut self.0, path);
        if let Some(v) = value {
            self.0.push_str(",\"value\":");
            self.0.push_str(v);
        }
        self.0.push('}');
    }

    fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push('[');
        }
        self.0.push(']');
        self.0
    }
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `key` escaped as one JSON pointer token (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn describe(size: &PodSize) -> String {
    let mut parts = Vec::new();
    if let Some(v) = size.vcpus {
        parts.push(format!("{v} vCPU"));
    }
    if let Some(v) = size.memory_mib {
        parts.push(format!("{v} MiB"));
    }
    if let Some(v) = size.gpus {
        parts.push(format!("{v} GPU"));
    }
    if parts.is_empty() {
        "default size".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::names::VM_RESOURCE;
    use crate::webhook::pod::PodIn;

    use serde_json::{Map, Value, json};

    /// A pod from compact JSON: `containers` / `initContainers` entries are
    /// `(requests, limits)` objects; `sidecar` marks `restartPolicy: Always`.
    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": spec})
    }

    /// Runs `f` on the peer pod parts of `v`, read as the webhook reads a request.
    fn with_pod<T>(v: &Value, f: impl FnOnce(&PeerPod) -> T) -> T {
        let text = v.to_string();
        let pod_in: PodIn = serde_json::from_str(&text).unwrap();
        f(&PeerPod::parse(&pod_in).unwrap())
    }

    fn mutate_json(v: &Value, extended_resource: &str) -> Result<Mutation, Error> {
        with_pod(v, |p| mutate(p, extended_resource))
    }

    fn c(name: &str, requests: Value, limits: Value) -> Value {
        let mut r = Map::new();
        if !requests.is_null() {
            r.insert("requests".into(), requests);
        }
        if !limits.is_null() {
            r.insert("limits".into(), limits);
        }
        json!({"name": name, "image": "busybox", "resources": r})
    }

    fn sidecar(name: &str, requests: Value) -> Value {
        let mut v = c(name, requests, Value::Null);
        v["restartPolicy"] = "Always".into();
        v
    }

    fn size(spec: Value) -> PodSize {
        with_pod(&pod(spec), |p| pod_size(p, VM_RESOURCE).unwrap())
    }

    fn sz(vcpus: Option<u64>, memory_mib: Option<u64>) -> PodSize {
        PodSize {
            vcpus,
            memory_mib,
            ..Default::default()
        }
    }

    #[test]
    fn pod_size_follows_the_design_examples_and_kubernetes_rules() {
        let null = Value::Null;
        let table: Vec<(&str, Value, PodSize)> = vec![
            (
                "limit above request wins: 2/4Gi with limits 3/5Gi",
                json!({"containers": [c("a", json!({"cpu": "2", "memory": "4Gi"}), json!({"cpu": "3", "memory": "5Gi"}))]}),
                sz(Some(3), Some(5120)),
            ),
            (
                "cpu request only",
                json!({"containers": [c("a", json!({"cpu": "2"}), null.clone())]}),
                sz(Some(2), None),
            ),
            (
                "fractional cpu rounds up: 200m/500m",
                json!({"containers": [c("a", json!({"cpu": "200m"}), json!({"cpu": "500m"}))]}),
                sz(Some(1), None),
            ),
            (
                "fractional cpu rounds up: 200m/1500m",
                json!({"containers": [c("a", json!({"cpu": "200m"}), json!({"cpu": "1500m"}))]}),
                sz(Some(2), None),
            ),
            (
                "limit only is also the request",
                json!({"containers": [c("a", null.clone(), json!({"cpu": "1", "memory": "1Gi"}))]}),
                sz(Some(1), Some(1024)),
            ),
            (
                "no resources: no size",
                json!({"containers": [{"name": "a", "image": "busybox"}]}),
                sz(None, None),
            ),
            (
                "app containers add up",
                json!({"containers": [
                    c("a", json!({"cpu": "500m", "memory": "256Mi"}), null.clone()),
                    c("b", json!({"cpu": "700m", "memory": "300Mi"}), null.clone()),
                    c("c", json!({"cpu": "100m"}), null.clone())]}),
                sz(Some(2), Some(556)),
            ),
            (
                "init containers run alone: the largest counts, not the sum",
                json!({
                    "initContainers": [
                        c("i1", json!({"cpu": "1", "memory": "1Gi"}), null.clone()),
                        c("i2", json!({"cpu": "1", "memory": "1Gi"}), null.clone())],
                    "containers": [c("a", json!({"cpu": "500m", "memory": "512Mi"}), null.clone())]}),
                sz(Some(1), Some(1024)),
            ),
            (
                "an init container larger than the app sets the size",
                json!({
                    "initContainers": [c("i", json!({"cpu": "3", "memory": "3Gi"}), null.clone())],
                    "containers": [c("a", json!({"cpu": "1", "memory": "1Gi"}), null.clone())]}),
                sz(Some(3), Some(3072)),
            ),
            (
                "sidecars run beside the app and beside later init containers",
                json!({
                    "initContainers": [
                        sidecar("proxy", json!({"cpu": "500m", "memory": "128Mi"})),
                        c("migrate", json!({"cpu": "2", "memory": "256Mi"}), null.clone())],
                    "containers": [c("a", json!({"cpu": "1", "memory": "1Gi"}), null.clone())]}),
                // app + sidecar = 1.5 cpu / 1152Mi; init + sidecar = 2.5 cpu / 384Mi
                sz(Some(3), Some(1152)),
            ),
            (
                "an init container before a sidecar does not run beside it",
                json!({
                    "initContainers": [
                        c("early", json!({"cpu": "2"}), null.clone()),
                        sidecar("proxy", json!({"cpu": "1"}))],
                    "containers": [c("a", json!({"cpu": "500m"}), null.clone())]}),
                sz(Some(2), None),
            ),
            (
                "pod-level resources win",
                json!({
                    "resources": {"requests": {"cpu": "4", "memory": "8Gi"}},
                    "containers": [c("a", json!({"cpu": "1", "memory": "1Gi"}), null.clone())]}),
                sz(Some(4), Some(8192)),
            ),
            (
                "pod-level limit above the pod-level request wins",
                json!({
                    "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "6"}},
                    "containers": [{"name": "a", "image": "x"}]}),
                sz(Some(6), None),
            ),
            (
                "limit below request: the request counts",
                json!({"containers": [
                    c("a", json!({"cpu": "1"}), json!({"cpu": "1"})),
                    c("b", json!({"cpu": "2"}), null.clone())]}),
                // requests 3, limits only 1 (b has none): the request wins
                sz(Some(3), None),
            ),
        ];
        for (what, spec, want) in table {
            assert_eq!(size(spec), want, "{what}");
        }
    }

    #[test]
    fn memory_units_become_whole_mib_rounded_up() {
        for (memory, mib) in [
            ("1Gi", 1024),
            ("1G", 954),
            ("500M", 477),
            ("512Mi", 512),
            ("1Ki", 1),
            ("2048Ki", 2),
            ("134217728", 128),
            ("1.5Gi", 1536),
            ("1e9", 954),
        ] {
            let got = size(json!({"containers": [c("a", json!({"memory": memory}), Value::Null)]}));
            assert_eq!(got.memory_mib, Some(mib), "{memory}");
        }
    }

    #[test]
    fn gpus_are_counted_and_other_resources_named_as_dropped() {
        let got = size(json!({"containers": [c(
            "a",
            json!({"cpu": "1", "nvidia.com/gpu": "2", "hugepages-2Mi": "64Mi", "example.com/fpga": "1"}),
            json!({"nvidia.com/gpu": "2", "ephemeral-storage": "1Gi"}),
        )]}));
        assert_eq!(got.gpus, Some(2));
        assert_eq!(
            got.dropped.into_iter().collect::<Vec<_>>(),
            ["ephemeral-storage", "example.com/fpga", "hugepages-2Mi"]
        );
    }

    fn apply(original: &Value, m: &Mutation) -> Value {
        let mut v = original.clone();
        let patch: json_patch::Patch = serde_json::from_str(&m.patch).unwrap();
        json_patch::patch(&mut v, &patch).unwrap();
        v
    }

    #[test]
    fn mutation_strips_resources_adds_vm_resource_label_and_size() {
        let v = pod(json!({
            "resources": {"requests": {"cpu": "1"}},
            "initContainers": [c("init", json!({"cpu": "500m"}), Value::Null)],
            "containers": [
                c("a", json!({"cpu": "2", "memory": "4Gi"}), json!({"cpu": "3", "memory": "5Gi"})),
                c("b", json!({"memory": "1Gi"}), Value::Null)]}));
        let m = mutate_json(&v, VM_RESOURCE).unwrap();
        let out = apply(&v, &m);
        assert_eq!(
            out["spec"]["containers"][0]["resources"],
            json!({"requests": {"kata.peerpods.io/vm": "1"}, "limits": {"kata.peerpods.io/vm": "1"}})
        );
        assert!(out["spec"]["containers"][1].get("resources").is_none());
        assert!(out["spec"]["initContainers"][0].get("resources").is_none());
        assert!(out["spec"].get("resources").is_none());
        assert_eq!(out["metadata"]["labels"][PEER_POD_LABEL], "true");
        // Pod-level cpu request 1 overrides the containers' sum; limits are container-level
        // (3) and at least the request, so they win. Memory: requests 4Gi + 1Gi; the only
        // limit (5Gi, Kubernetes sums the limits that are set) equals that.
        assert_eq!(
            out["metadata"]["annotations"][annotations::DEFAULT_VCPUS],
            "3"
        );
        assert_eq!(
            out["metadata"]["annotations"][annotations::DEFAULT_MEMORY],
            "5120"
        );
        assert!(
            out["metadata"]["annotations"]
                .get(annotations::DEFAULT_GPUS)
                .is_none()
        );
        assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
        assert!(
            m.warnings[0].contains("3 vCPU, 5120 MiB"),
            "{:?}",
            m.warnings
        );
        assert!(m.warnings.iter().all(|w| w.len() <= 256));
        // Everything else is untouched.
        assert_eq!(out["spec"]["containers"][0]["image"], "busybox");
        assert_eq!(out["metadata"]["name"], "p");
    }

    #[test]
    fn annotations_the_user_set_are_kept() {
        let mut v =
            pod(json!({"containers": [c("a", json!({"cpu": "2", "memory": "2Gi"}), Value::Null)]}));
        v["metadata"]["annotations"] = json!({
            annotations::DEFAULT_VCPUS: "8",
            annotations::MACHINE_TYPE: "Standard_D8as_v5",
            "team": "x",
        });
        v["metadata"]["labels"] = json!({"app": "web"});
        let out = apply(&v, &mutate_json(&v, VM_RESOURCE).unwrap());
        let a = &out["metadata"]["annotations"];
        assert_eq!(a[annotations::DEFAULT_VCPUS], "8");
        assert_eq!(a[annotations::MACHINE_TYPE], "Standard_D8as_v5");
        assert_eq!(a[annotations::DEFAULT_MEMORY], "2048");
        assert_eq!(a["team"], "x");
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "web", PEER_POD_LABEL: "true"})
        );
    }

    #[test]
    fn a_custom_extended_resource_is_used_and_dropped_resources_are_warned_about() {
        let v = pod(json!({"containers": [c("a", json!({"hugepages-1Gi": "1Gi"}), Value::Null)]}));
        let m = mutate_json(&v, "example.org/vm").unwrap();
        let out = apply(&v, &m);
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["limits"],
            json!({"example.org/vm": "1"})
        );
        assert!(
            m.warnings.iter().any(|w| w.contains("hugepages-1Gi")),
            "{:?}",
            m.warnings
        );
    }

    #[test]
    fn a_pod_without_resources_gets_no_size_and_no_resource_warning() {
        let v = pod(json!({"containers": [{"name": "a", "image": "x"}]}));
        let m = mutate_json(&v, VM_RESOURCE).unwrap();
        let out = apply(&v, &m);
        assert!(
            out["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .is_empty()
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        assert_eq!(out["metadata"]["labels"][PEER_POD_LABEL], "true");
    }

    #[test]
    fn invalid_quantities_and_empty_pods_are_errors_naming_the_place() {
        let v = pod(json!({"containers": [c("web", json!({"cpu": "lots"}), Value::Null)]}));
        let e = mutate_json(&v, VM_RESOURCE).unwrap_err();
        assert_eq!(e.metric_label(), "invalid_quantity");
        assert!(e.to_string().contains("container \"web\""), "{e}");
        assert!(e.to_string().contains("\"cpu\""), "{e}");

        let v = pod(json!({"containers": []}));
        let e = mutate_json(&v, VM_RESOURCE).unwrap_err();
        assert_eq!(e.metric_label(), "no_containers");
    }

    #[test]
    fn unusual_but_valid_pods_are_mutated_into_peer_pods() {
        // No metadata at all; null resources; claims only; escapes in strings; fields the
        // webhook does not know.
        let bare = json!({"apiVersion": "v1", "kind": "Pod", "spec": {
            "resources": null,
            "containers": [
                {"name": "a\"b", "resources": null, "futureField": {"x": [1, 2.5, null]}},
                {"name": "b", "resources": {"claims": [{"name": "gpu"}]}}],
            "initContainers": null}});
        let m = mutate_json(&bare, VM_RESOURCE).unwrap();
        let out = apply(&bare, &m);
        assert_eq!(
            out["metadata"],
            json!({"labels": {PEER_POD_LABEL: "true"}, "annotations": {}})
        );
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["requests"],
            json!({"kata.peerpods.io/vm": "1"})
        );
        assert!(out["spec"]["containers"][1].get("resources").is_none());
        assert_eq!(out["spec"]["containers"][0]["futureField"]["x"][1], 2.5);
        assert_eq!(
            m.warnings.len(),
            1,
            "a claim is a resource: {:?}",
            m.warnings
        );

        // Null labels and annotations; a size annotation the user wrote with an escape;
        // quantities with escapes; a sidecar without resources.
        let text = r#"{"metadata": {"labels": null, "annotations": {
                "io.katacontainers.config.hypervisor.default\u005fvcpus": "16"}},
            "spec": {"runtimeClassName": "kata-remote",
                "initContainers": [{"name": "s", "restartPolicy": "Always"}],
                "containers": [{"name": "a", "resources": {
                    "requests": {"cpu": "1\u003500m", "memory": "1Gi"}}}]}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let pod_in: PodIn = serde_json::from_str(text).unwrap();
        let m = mutate(&PeerPod::parse(&pod_in).unwrap(), VM_RESOURCE).unwrap();
        assert_eq!(m.size, sz(Some(2), Some(1024)));
        let out = apply(&v, &m);
        assert_eq!(out["metadata"]["labels"], json!({PEER_POD_LABEL: "true"}));
        assert_eq!(
            out["metadata"]["annotations"],
            json!({annotations::DEFAULT_VCPUS: "16", annotations::DEFAULT_MEMORY: "1024"})
        );
    }

    #[test]
    fn fields_of_the_wrong_shape_are_errors_naming_the_field() {
        for (spec, field) in [
            (json!({"containers": "web"}), "spec.containers:"),
            (
                json!({"containers": [{"name": "a"}, 7]}),
                "spec.containers[1]:",
            ),
            (
                json!({"containers": [{"name": "a"}], "initContainers": [{"name": "i", "resources": []}]}),
                "spec.initContainers[0]:",
            ),
            (
                json!({"containers": [{"name": "a", "resources": {"limits": {"cpu": 2}}}]}),
                "spec.containers[0]:",
            ),
            (
                json!({"containers": [{"name": "a"}], "resources": "big"}),
                "spec.resources:",
            ),
        ] {
            let text = pod(spec).to_string();
            let pod_in: PodIn = serde_json::from_str(&text).unwrap();
            let e = PeerPod::parse(&pod_in).map(|_| ()).unwrap_err();
            assert!(e.to_string().starts_with(field), "{e} should name {field}");
        }
        let text = r#"{"metadata": {"labels": "web"}, "spec": {"containers": [{"name": "a"}]}}"#;
        let pod_in: PodIn = serde_json::from_str(text).unwrap();
        let e = PeerPod::parse(&pod_in).map(|_| ()).unwrap_err();
        assert!(e.to_string().starts_with("metadata:"), "{e}");
    }
}
