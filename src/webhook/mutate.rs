//! The peer pod mutation, as a pure function of the pod: its VM size by Kubernetes' own
//! effective-resource rule, and the JSON patch that turns container resources into that size.
//!
//! The pod VM is the pod's only consumer of CPU and memory on the cloud side, so the pod's
//! containers lose their resources (the worker node must not account for them), the first
//! container asks for one unit of the per-node VM extended resource instead, and the size
//! travels to the cloud-api-adaptor as kata hypervisor annotations.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use serde_json::{Map, Value, json};

use super::quantity::{self, NANO, QuantityError, div_ceil};

/// The label that marks a peer pod, so the operator can find them without watching every pod.
pub const PEER_POD_LABEL: &str = "kata.peerpods.io/peer-pod";
/// vCPUs of the pod VM (integer).
pub const ANNOTATION_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
/// Memory of the pod VM in MiB (integer).
pub const ANNOTATION_MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
/// GPUs of the pod VM (integer).
pub const ANNOTATION_GPUS: &str = "io.katacontainers.config.hypervisor.default_gpus";
/// An explicit VM size chosen by the user; never touched.
pub const ANNOTATION_MACHINE_TYPE: &str = "io.katacontainers.config.hypervisor.machine_type";
/// The resource that sizes `default_gpus`.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The default per-node VM extended resource.
pub const DEFAULT_EXTENDED_RESOURCE: &str = "kata.peerpods.io/vm";

const MIB_NANOS: i128 = NANO << 20;

/// Errors computing a pod's mutation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The object is not a JSON object where a pod must be.
    #[error("the object is not a pod: {0}")]
    NotAnObject(&'static str),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Quantity { .. } => "invalid_quantity",
            Error::NoContainers => "no_containers",
            Error::NotAnObject(_) => "not_an_object",
        }
    }
}

/// The size of the pod VM, in the units of the kata annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSize {
    /// vCPUs, rounded up; `None` when the pod asks for no CPU.
    pub vcpus: Option<u64>,
    /// Memory in MiB, rounded up; `None` when the pod asks for no memory.
    pub memory_mib: Option<u64>,
    /// GPUs; `None` when the pod asks for none.
    pub gpus: Option<u64>,
    /// Resources the pod asked for that a pod VM size cannot carry (hugepages, storage,
    /// other extended resources), sorted.
    pub dropped: BTreeSet<String>,
}

/// The outcome of mutating one peer pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// RFC 6902 operations turning the submitted pod into the peer pod.
    pub patch: json_patch::Patch,
    /// Messages for the user (admission warnings).
    pub warnings: Vec<String>,
    /// The size written to the annotations (before user-set annotations win).
    pub size: PodSize,
}

type Amounts = BTreeMap<String, i128>;

fn parse_map(
    place: &str,
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Result<Amounts, Error> {
    let mut out = Amounts::new();
    for (name, q) in map.into_iter().flatten() {
        let nanos = quantity::parse_nanos(&q.0).map_err(|source| Error::Quantity {
            place: place.to_string(),
            resource: name.clone(),
            source,
        })?;
        out.insert(name.clone(), nanos.max(0));
    }
    Ok(out)
}

/// A container's (or the pod's) requests and limits; a limit without a request is also the
/// request, as the API server's defaulting makes it.
fn requirements(
    place: &str,
    r: Option<&ResourceRequirements>,
) -> Result<(Amounts, Amounts), Error> {
    let mut requests = parse_map(place, r.and_then(|r| r.requests.as_ref()))?;
    let limits = parse_map(place, r.and_then(|r| r.limits.as_ref()))?;
    for (name, v) in &limits {
        requests.entry(name.clone()).or_insert(*v);
    }
    Ok((requests, limits))
}

fn add(into: &mut Amounts, from: &Amounts) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

fn max_into(into: &mut Amounts, from: &Amounts) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_insert(0);
        *e = (*e).max(*v);
    }
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// Kubernetes' effective pod amount (the scheduler's rule): app containers plus restartable
/// init containers (sidecars) run together; each regular init container runs alone beside
/// the sidecars started before it; the pod needs the larger of the two.
fn effective(
    spec: &PodSpec,
    pick: impl Fn(&(Amounts, Amounts)) -> &Amounts,
) -> Result<Amounts, Error> {
    let mut total = Amounts::new();
    for c in &spec.containers {
        let r = requirements(&format!("container {:?}", c.name), c.resources.as_ref())?;
        add(&mut total, pick(&r));
    }
    let mut sidecars = Amounts::new();
    let mut init_peak = Amounts::new();
    for c in spec.init_containers.iter().flatten() {
        let r = requirements(
            &format!("init container {:?}", c.name),
            c.resources.as_ref(),
        )?;
        let own = pick(&r);
        if is_sidecar(c) {
            add(&mut total, own);
            add(&mut sidecars, own);
        } else {
            let mut running = sidecars.clone();
            add(&mut running, own);
            max_into(&mut init_peak, &running);
        }
    }
    max_into(&mut total, &init_peak);
    Ok(total)
}

/// The pod VM size of `spec` and the resources it cannot carry.
///
/// Per resource, the effective request and limit come from Kubernetes' pod rule (pod-level
/// `spec.resources` win where set). The limit is used when the request is non-zero and the
/// limit is at least the request, otherwise the request; values round up to whole vCPUs,
/// MiB and GPUs.
pub fn pod_size(spec: &PodSpec, extended_resource: &str) -> Result<PodSize, Error> {
    let mut requests = effective(spec, |r| &r.0)?;
    let mut limits = effective(spec, |r| &r.1)?;
    if let Some(pod_level) = spec.resources.as_ref() {
        let (req, lim) = requirements("pod", Some(pod_level))?;
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
        .filter(|n| {
            !matches!(n.as_str(), "cpu" | "memory" | GPU_RESOURCE) && *n != extended_resource
        })
        .cloned()
        .collect();
    Ok(PodSize {
        vcpus: chosen("cpu").map(|v| to_u64(div_ceil(v, NANO))),
        memory_mib: chosen("memory").map(|v| to_u64(div_ceil(v, MIB_NANOS))),
        gpus: chosen(GPU_RESOURCE).map(|v| to_u64(div_ceil(v, NANO))),
        dropped,
    })
}

/// Turns `object` (the pod as submitted; `pod` is the same object, typed) into a peer pod.
pub fn mutate(object: &Value, pod: &Pod, extended_resource: &str) -> Result<Mutation, Error> {
    let spec = pod.spec.as_ref().ok_or(Error::NoContainers)?;
    if spec.containers.is_empty() {
        return Err(Error::NoContainers);
    }
    let size = pod_size(spec, extended_resource)?;
    let had_resources = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.resources.as_ref().is_some_and(has_amounts))
        || spec.resources.as_ref().is_some_and(has_amounts);

    let mut out = object.clone();
    let root = out
        .as_object_mut()
        .ok_or(Error::NotAnObject("not a JSON object"))?;
    let spec_v = root
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or(Error::NotAnObject("spec is not an object"))?;
    spec_v.remove("resources");
    for list in ["containers", "initContainers"] {
        if let Some(items) = spec_v.get_mut(list).and_then(Value::as_array_mut) {
            for c in items.iter_mut().filter_map(Value::as_object_mut) {
                c.remove("resources");
            }
        }
    }
    let first = spec_v
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.first_mut())
        .and_then(Value::as_object_mut)
        .ok_or(Error::NoContainers)?;
    first.insert(
        "resources".into(),
        json!({
            "requests": { extended_resource: "1" },
            "limits": { extended_resource: "1" },
        }),
    );

    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or(Error::NotAnObject("metadata is not an object"))?;
    string_map(meta, "labels")?.insert(PEER_POD_LABEL.into(), "true".into());
    let annotations = string_map(meta, "annotations")?;
    for (key, value) in [
        (ANNOTATION_VCPUS, size.vcpus),
        (ANNOTATION_MEMORY, size.memory_mib),
        (ANNOTATION_GPUS, size.gpus),
    ] {
        if let Some(v) = value
            && !annotations.contains_key(key)
        {
            annotations.insert(key.into(), v.to_string().into());
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
        patch: json_patch::diff(object, &out),
        warnings,
        size,
    })
}

fn has_amounts(r: &ResourceRequirements) -> bool {
    r.requests.as_ref().is_some_and(|m| !m.is_empty())
        || r.limits.as_ref().is_some_and(|m| !m.is_empty())
        || r.claims.as_ref().is_some_and(|c| !c.is_empty())
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

fn string_map<'a>(
    meta: &'a mut Map<String, Value>,
    key: &'static str,
) -> Result<&'a mut Map<String, Value>, Error> {
    let slot = meta.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().ok_or(Error::NotAnObject(
        "labels or annotations are not an object",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod from compact JSON: `containers` / `initContainers` entries are
    /// `(requests, limits)` objects; `sidecar` marks `restartPolicy: Always`.
    fn pod(spec: Value) -> (Value, Pod) {
        let v = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": spec});
        let p: Pod = serde_json::from_value(v.clone()).unwrap();
        (v, p)
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
        let (_, p) = pod(spec);
        pod_size(p.spec.as_ref().unwrap(), DEFAULT_EXTENDED_RESOURCE).unwrap()
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
        json_patch::patch(&mut v, &m.patch).unwrap();
        v
    }

    #[test]
    fn mutation_strips_resources_adds_vm_resource_label_and_size() {
        let (v, p) = pod(json!({
            "resources": {"requests": {"cpu": "1"}},
            "initContainers": [c("init", json!({"cpu": "500m"}), Value::Null)],
            "containers": [
                c("a", json!({"cpu": "2", "memory": "4Gi"}), json!({"cpu": "3", "memory": "5Gi"})),
                c("b", json!({"memory": "1Gi"}), Value::Null)]}));
        let m = mutate(&v, &p, DEFAULT_EXTENDED_RESOURCE).unwrap();
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
        assert_eq!(out["metadata"]["annotations"][ANNOTATION_VCPUS], "3");
        assert_eq!(out["metadata"]["annotations"][ANNOTATION_MEMORY], "5120");
        assert!(
            out["metadata"]["annotations"]
                .get(ANNOTATION_GPUS)
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
        let (mut v, _) =
            pod(json!({"containers": [c("a", json!({"cpu": "2", "memory": "2Gi"}), Value::Null)]}));
        v["metadata"]["annotations"] = json!({
            ANNOTATION_VCPUS: "8",
            ANNOTATION_MACHINE_TYPE: "Standard_D8as_v5",
            "team": "x",
        });
        v["metadata"]["labels"] = json!({"app": "web"});
        let p: Pod = serde_json::from_value(v.clone()).unwrap();
        let out = apply(&v, &mutate(&v, &p, DEFAULT_EXTENDED_RESOURCE).unwrap());
        let a = &out["metadata"]["annotations"];
        assert_eq!(a[ANNOTATION_VCPUS], "8");
        assert_eq!(a[ANNOTATION_MACHINE_TYPE], "Standard_D8as_v5");
        assert_eq!(a[ANNOTATION_MEMORY], "2048");
        assert_eq!(a["team"], "x");
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "web", PEER_POD_LABEL: "true"})
        );
    }

    #[test]
    fn a_custom_extended_resource_is_used_and_dropped_resources_are_warned_about() {
        let (v, p) =
            pod(json!({"containers": [c("a", json!({"hugepages-1Gi": "1Gi"}), Value::Null)]}));
        let m = mutate(&v, &p, "example.org/vm").unwrap();
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
        let (v, p) = pod(json!({"containers": [{"name": "a", "image": "x"}]}));
        let m = mutate(&v, &p, DEFAULT_EXTENDED_RESOURCE).unwrap();
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
        let (v, p) = pod(json!({"containers": [c("web", json!({"cpu": "lots"}), Value::Null)]}));
        let e = mutate(&v, &p, DEFAULT_EXTENDED_RESOURCE).unwrap_err();
        assert_eq!(e.metric_label(), "invalid_quantity");
        assert!(e.to_string().contains("container \"web\""), "{e}");
        assert!(e.to_string().contains("\"cpu\""), "{e}");

        let (v, p) = pod(json!({"containers": []}));
        let e = mutate(&v, &p, DEFAULT_EXTENDED_RESOURCE).unwrap_err();
        assert_eq!(e.metric_label(), "no_containers");
    }
}
