//! `sandboxd ctl support-bundle` and `sandboxd ctl must-gather`: everything a bug report
//! about peer pods needs, with every credential redacted ([`redact`]).
//!
//! Collected: the KataConfig, PeerPodConfigs, PeerPods, RuntimeClasses, the CRDs, the peer
//! pods webhook configuration, the objects of the operator namespace (Deployments,
//! DaemonSets, Jobs, Pods, Services, ConfigMaps, Secrets as keys only, Leases, ...), the
//! selected nodes' labels, taints, capacity and conditions, Events of the operator
//! namespace and of peer pods, logs of every container in the operator namespace (operator,
//! webhook, CAA on each node, node installer, image Jobs; the previous container too),
//! `ctl doctor`'s findings and the versions. `manifest.json` lists what was collected and
//! what was not: refused by RBAC (403, recorded, not fatal), absent (404), failed, or
//! skipped because the size or time bound was reached.
//!
//! `support-bundle` writes one `.tar.gz`; `must-gather` writes the same tree into a
//! directory (`/must-gather`, which `oc adm must-gather` copies off its pod).

pub(crate) mod archive;
pub mod pod;
pub(crate) mod redact;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, LogParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};

use self::archive::{Sink, component};
use self::redact::Redactor;
use super::Ctx;
use super::doctor;

/// Bounds and selections shared by `support-bundle` and `must-gather`.
#[derive(Debug, clap::Args)]
pub(crate) struct Limits {
    /// Stop collecting after this long (e.g. 90s, 5m); what was collected is written and
    /// the rest is listed in the manifest as skipped.
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    pub(crate) timeout: Duration,
    /// Largest total size of the collected files in MiB (before compression); files past it
    /// are skipped and listed in the manifest.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_size_mib: u64,
    /// Lines kept from the end of each container log.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) log_lines: i64,
    /// Largest size of one container log in MiB.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_log_mib: i64,
    /// Only log lines of the last DURATION (e.g. 2h; `oc adm must-gather --since` passes it
    /// as MUST_GATHER_SINCE).
    #[arg(long, env = "MUST_GATHER_SINCE", value_parser = parse_timeout)]
    pub(crate) since: Option<Duration>,
    /// Only log lines after this time (RFC 3339; `oc adm must-gather --since-time` passes it
    /// as MUST_GATHER_SINCE_TIME).
    #[arg(long, env = "MUST_GATHER_SINCE_TIME", value_parser = parse_time, conflicts_with = "since")]
    pub(crate) since_time: Option<time::OffsetDateTime>,
    /// The doctor's flags (its node selector also selects the nodes described here).
    #[command(flatten)]
    pub(crate) doctor: doctor::Args,
}

/// Flags of `ctl support-bundle`.
#[derive(Debug, clap::Args)]
pub(crate) struct BundleArgs {
    /// The archive to write (default: `sandboxd-support-<UTC time>.tar.gz` in the current
    /// directory).
    #[arg(long, short = 'f')]
    pub(crate) file: Option<PathBuf>,
    /// Bounds and selections.
    #[command(flatten)]
    pub(crate) limits: Limits,
}

/// Flags of `ctl must-gather` (also what the binary runs when invoked as `gather`).
#[derive(Debug, clap::Args)]
pub(crate) struct MustGatherArgs {
    /// The directory `oc adm must-gather` copies off the pod (must-gather scripts' own
    /// `BASE_COLLECTION_PATH` moves it too).
    #[arg(long, env = "BASE_COLLECTION_PATH", default_value = "/must-gather")]
    pub(crate) dir: PathBuf,
    /// Bounds and selections.
    #[command(flatten)]
    pub(crate) limits: Limits,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?}: expected a duration such as 90s or 5m"))
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?}: expected an RFC 3339 time such as 2026-01-02T15:04:05Z ({e})"))
}

impl Limits {
    /// The age of the oldest log line wanted, in seconds (`None`: all of the tail).
    fn since_seconds(&self) -> Option<i64> {
        let since = self.since.or_else(|| {
            let t = self.since_time?;
            let age = time::OffsetDateTime::now_utc() - t;
            Some(Duration::from_secs(
                age.whole_seconds().max(1).unsigned_abs(),
            ))
        })?;
        Some(i64::try_from(since.as_secs().max(1)).unwrap_or(i64::MAX))
    }
}

/// One thing the bundle could not collect.
#[derive(Debug, Serialize)]
pub(crate) struct Missing {
    /// What was asked for.
    pub(crate) what: String,
    /// The HTTP status, when the API server answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<u16>,
    /// Why.
    pub(crate) reason: String,
}

/// One collected file.
#[derive(Debug, Serialize)]
pub(crate) struct Collected {
    /// Path inside the bundle.
    pub(crate) path: String,
    /// Size in bytes.
    pub(crate) bytes: usize,
}

/// `manifest.json`: what the bundle holds and what it does not.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Manifest {
    /// The tool and its version.
    pub(crate) tool: String,
    /// The operator namespace.
    pub(crate) namespace: String,
    /// When collection started and ended (RFC 3339, UTC).
    pub(crate) started: String,
    /// See `started`.
    pub(crate) finished: String,
    /// The bounds in force.
    pub(crate) limits: Value,
    /// Files in the bundle.
    pub(crate) collected: Vec<Collected>,
    /// Requests the API server refused (403: the caller's RBAC).
    pub(crate) refused: Vec<Missing>,
    /// Objects or APIs that do not exist on this cluster (404).
    pub(crate) absent: Vec<Missing>,
    /// Requests that failed otherwise (e.g. logs of a node without a reachable kubelet).
    pub(crate) errors: Vec<Missing>,
    /// What was not collected because the size or time bound was reached.
    pub(crate) skipped: Vec<Missing>,
    /// How redaction worked.
    pub(crate) redaction: String,
}

/// A resource to collect.
struct Kind {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
}

const fn k(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> Kind {
    Kind {
        group,
        version,
        kind,
        plural,
    }
}

impl Kind {
    fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: self.version.into(),
            api_version: if self.group.is_empty() {
                self.version.into()
            } else {
                format!("{}/{}", self.group, self.version)
            },
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }

    fn dir(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("{g}/{}", self.plural)
    }
}

/// Objects of the operator namespace.
const NAMESPACED: &[Kind] = &[
    k("", "v1", "Pod", "pods"),
    k("", "v1", "Service", "services"),
    k("", "v1", "ConfigMap", "configmaps"),
    k("", "v1", "ServiceAccount", "serviceaccounts"),
    k("apps", "v1", "Deployment", "deployments"),
    k("apps", "v1", "DaemonSet", "daemonsets"),
    k("apps", "v1", "ReplicaSet", "replicasets"),
    k("batch", "v1", "Job", "jobs"),
    k(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
    ),
    k("coordination.k8s.io", "v1", "Lease", "leases"),
    k("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    k(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
    ),
    k(
        "confidentialcontainers.org",
        "v1alpha1",
        "PeerPodConfig",
        "peerpodconfigs",
    ),
];

/// Cluster-scoped objects, all of them (few) or those whose name `sandboxd` would give.
const CLUSTER: &[(Kind, Option<&[&str]>)] = &[
    (
        k(
            "kataconfiguration.openshift.io",
            "v1",
            "KataConfig",
            "kataconfigs",
        ),
        None,
    ),
    (
        k("node.k8s.io", "v1", "RuntimeClass", "runtimeclasses"),
        None,
    ),
    (
        k(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
        ),
        Some(&[
            "kataconfigs.kataconfiguration.openshift.io",
            "peerpodconfigs.confidentialcontainers.org",
            "peerpods.confidentialcontainers.org",
        ]),
    ),
    (
        k(
            "admissionregistration.k8s.io",
            "v1",
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
        ),
        Some(&["peer-pods-webhook"]),
    ),
    (
        k(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicy",
            "validatingadmissionpolicies",
        ),
        Some(&["sandboxd-", "kataconfig"]),
    ),
    (
        k(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
        ),
        Some(&["sandboxd-", "peer-pods"]),
    ),
    // OpenShift: the node installation through the machine config operator.
    (
        k(
            "machineconfiguration.openshift.io",
            "v1",
            "MachineConfig",
            "machineconfigs",
        ),
        Some(&[crate::operator::machineconfig::MACHINE_CONFIG]),
    ),
    (
        k(
            "machineconfiguration.openshift.io",
            "v1",
            "MachineConfigPool",
            "machineconfigpools",
        ),
        Some(&[crate::operator::machineconfig::POOL]),
    ),
    (
        k(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
        ),
        Some(&["sandboxd-", "peer-pods"]),
    ),
];

const PEERPODS: Kind = k(
    "confidentialcontainers.org",
    "v1alpha1",
    "PeerPod",
    "peerpods",
);
const SECRETS: Kind = k("", "v1", "Secret", "secrets");
const EVENTS: Kind = k("", "v1", "Event", "events");
const NODES: Kind = k("", "v1", "Node", "nodes");

/// Longest wait for one API request (the overall timeout may cut it shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the doctor's checks.
const DOCTOR_TIMEOUT: Duration = Duration::from_secs(90);

/// Collects a bundle into `sink`. Progress goes to stderr.
pub(crate) struct Collector<'a> {
    client: Client,
    ns: String,
    sink: &'a mut dyn Sink,
    redactor: Redactor,
    manifest: Manifest,
    deadline: Instant,
    max_bytes: usize,
    written: usize,
    limits: &'a Limits,
}

/// Why one request did not give what was asked.
enum Failure {
    Api(kube::Error),
    TimedOut,
}

impl<'a> Collector<'a> {
    /// A collector for the cluster of `client`, the operator namespace `ns`.
    pub(crate) fn new(
        client: Client,
        ns: &str,
        sink: &'a mut dyn Sink,
        limits: &'a Limits,
    ) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            client,
            ns: ns.to_string(),
            sink,
            redactor: Redactor::new(),
            manifest: Manifest {
                tool: format!("sandboxd {}", crate::VERSION),
                namespace: ns.to_string(),
                started: rfc3339(now),
                limits: json!({
                    "timeout_seconds": limits.timeout.as_secs(),
                    "max_size_mib": limits.max_size_mib,
                    "log_lines": limits.log_lines,
                    "max_log_mib": limits.max_log_mib,
                    "log_since_seconds": limits.since_seconds(),
                }),
                redaction: "Secret values are never written (keys and sizes only); every value \
                            of a readable Secret, PEM and OpenSSH private keys, bearer and \
                            shared-key authorisations, JWTs, SAS signatures, storage account \
                            keys and credential-named values are replaced by [REDACTED]"
                    .into(),
                ..Default::default()
            },
            deadline: Instant::now() + limits.timeout,
            max_bytes: usize::try_from(limits.max_size_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            written: 0,
            limits,
        }
    }

    fn progress(&self, step: usize, of: usize, what: &str) {
        eprintln!("support-bundle: [{step}/{of}] {what}");
    }

    fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Runs a request bounded by the per-request and the overall time.
    async fn bounded<T, F>(&self, fut: F) -> Result<T, Failure>
    where
        F: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(REQUEST_TIMEOUT), fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failure::Api(e)),
            Err(_) => Err(Failure::TimedOut),
        }
    }

    /// Records why `what` is missing from the bundle.
    fn missing(&mut self, what: String, failure: Failure) {
        match failure {
            Failure::Api(kube::Error::Api(s)) => {
                let m = Missing {
                    what,
                    status: Some(s.code),
                    reason: self.redactor.text(&s.message).into_owned(),
                };
                match s.code {
                    401 | 403 => self.manifest.refused.push(m),
                    404 => self.manifest.absent.push(m),
                    _ => self.manifest.errors.push(m),
                }
            }
            Failure::Api(e) => self.manifest.errors.push(Missing {
                what,
                status: None,
                reason: self.redactor.text(&e.to_string()).into_owned(),
            }),
            Failure::TimedOut => self.manifest.skipped.push(Missing {
                what,
                status: None,
                reason: "the time bound was reached".into(),
            }),
        }
    }

    /// Writes one file (already redacted) unless the size bound is reached.
    fn write(&mut self, path: &str, data: &[u8]) -> anyhow::Result<()> {
        if self.written + data.len() > self.max_bytes {
            self.manifest.skipped.push(Missing {
                what: path.to_string(),
                status: None,
                reason: format!(
                    "the size bound ({} MiB) was reached",
                    self.limits.max_size_mib
                ),
            });
            return Ok(());
        }
        self.sink.add(path, data)?;
        self.written += data.len();
        self.manifest.collected.push(Collected {
            path: path.to_string(),
            bytes: data.len(),
        });
        Ok(())
    }

    /// Writes an object as YAML, redacted.
    fn write_object(&mut self, path: &str, mut obj: Value) -> anyhow::Result<()> {
        self.redactor.object(&mut obj);
        let yaml = serde_saphyr::to_string(&obj)?;
        // The object walk saw every string; the text pass catches what spans them.
        let yaml = self.redactor.text(&yaml).into_owned();
        self.write(path, yaml.as_bytes())
    }

    /// Lists `kind` (in `ns`, or cluster-wide) and returns the objects as JSON.
    async fn list(&mut self, kind: &Kind, ns: Option<&str>, lp: &ListParams) -> Option<Vec<Value>> {
        let ar = kind.resource();
        let api: Api<DynamicObject> = match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        let what = match ns {
            Some(ns) => format!("list {} in namespace {ns}", kind.dir()),
            None => format!("list {}", kind.dir()),
        };
        if self.out_of_time() {
            self.missing(what, Failure::TimedOut);
            return None;
        }
        match self.bounded(api.list(lp)).await {
            Ok(list) => Some(
                list.items
                    .into_iter()
                    .filter_map(|o| {
                        let mut v = serde_json::to_value(o).ok()?;
                        // Field ownership is noise in a bug report.
                        if let Some(m) = v["metadata"].as_object_mut() {
                            m.remove("managedFields");
                        }
                        v["apiVersion"] = json!(ar.api_version);
                        v["kind"] = json!(ar.kind);
                        Some(v)
                    })
                    .collect(),
            ),
            Err(f) => {
                self.missing(what, f);
                None
            }
        }
    }

    /// Lists `kind` and writes one file per object.
    async fn collect_kind(
        &mut self,
        kind: &Kind,
        ns: Option<&str>,
        keep: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let Some(items) = self.list(kind, ns, &ListParams::default()).await else {
            return Ok(Vec::new());
        };
        let mut kept = Vec::new();
        for obj in items {
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if !keep(&name) {
                continue;
            }
            let path = match obj["metadata"]["namespace"].as_str() {
                Some(ns) => format!(
                    "namespaces/{}/{}/{}.yaml",
                    component(ns),
                    kind.dir(),
                    component(&name)
                ),
                None => format!(
                    "cluster-scoped-resources/{}/{}.yaml",
                    kind.dir(),
                    component(&name)
                ),
            };
            self.write_object(&path, obj.clone())?;
            kept.push(obj);
        }
        Ok(kept)
    }

    /// Collects everything and writes the manifest; returns it.
    pub(crate) async fn run(mut self, ctx: &Ctx) -> anyhow::Result<Manifest> {
        const STEPS: usize = 8;
        let ns = self.ns.clone();

        // Secrets first: their values are learnt before anything else is written.
        self.progress(1, STEPS, &format!("secrets of {ns} (keys only)"));
        if let Some(secrets) = self.list(&SECRETS, Some(&ns), &ListParams::default()).await {
            for s in &secrets {
                for field in ["data", "stringData"] {
                    for v in s[field].as_object().into_iter().flat_map(|m| m.values()) {
                        let Some(text) = v.as_str() else { continue };
                        let decoded = if field == "data" {
                            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text)
                                .ok()
                                .and_then(|b| String::from_utf8(b).ok())
                        } else {
                            Some(text.to_string())
                        };
                        if let Some(d) = decoded {
                            self.redactor.learn(&d);
                        }
                    }
                }
            }
            for s in secrets {
                let name = s["metadata"]["name"].as_str().unwrap_or("").to_string();
                let path = format!(
                    "namespaces/{}/core/secrets/{}.yaml",
                    component(&ns),
                    component(&name)
                );
                self.write_object(&path, s)?;
            }
        }

        self.progress(2, STEPS, "KataConfig, RuntimeClasses, CRDs, webhook, RBAC");
        for (kind, names) in CLUSTER {
            let keep = |n: &str| names.is_none_or(|ns| ns.iter().any(|p| n.starts_with(p)));
            self.collect_kind(kind, None, keep).await?;
        }

        self.progress(3, STEPS, &format!("objects of namespace {ns}"));
        let mut pods: Vec<Value> = Vec::new();
        let mut images: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for kind in NAMESPACED {
            let objs = self.collect_kind(kind, Some(&ns), |_| true).await?;
            for o in &objs {
                if matches!(kind.kind, "Deployment" | "DaemonSet" | "Job") {
                    let name = format!(
                        "{}/{}",
                        kind.kind,
                        o["metadata"]["name"].as_str().unwrap_or("")
                    );
                    for c in o["spec"]["template"]["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        if let Some(img) = c["image"].as_str() {
                            images
                                .entry(name.clone())
                                .or_default()
                                .insert(img.to_string());
                        }
                    }
                }
            }
            if kind.kind == "Pod" {
                pods = objs;
            }
        }
        self.events(&ns, None).await?;

        self.progress(4, STEPS, "PeerPods and peer pods in every namespace");
        self.collect_kind(&PEERPODS, None, |_| true).await?;
        let peer_pods = self
            .list(
                &k("", "v1", "Pod", "pods"),
                None,
                &ListParams::default()
                    .labels(&format!("{}=true", crate::api::names::PEER_POD_LABEL)),
            )
            .await
            .unwrap_or_default();
        let mut by_ns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in &peer_pods {
            let pns = p["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            let path = format!(
                "namespaces/{}/core/pods/{}.yaml",
                component(&pns),
                component(&name)
            );
            self.write_object(&path, p.clone())?;
            by_ns.entry(pns).or_default().insert(name);
        }
        for (pns, names) in &by_ns {
            if *pns != ns {
                self.events(pns, Some(names)).await?;
            }
        }

        self.progress(5, STEPS, "nodes: labels, taints, capacity, conditions");
        let mut node_names: BTreeSet<String> = BTreeSet::new();
        for p in pods.iter().chain(peer_pods.iter()) {
            if let Some(n) = p["spec"]["nodeName"].as_str() {
                node_names.insert(n.to_string());
            }
        }
        let selector = self
            .limits
            .doctor
            .node_selector
            .clone()
            .unwrap_or_else(|| crate::api::names::LABEL_KATA.to_string());
        self.nodes(&selector, &node_names).await?;

        self.progress(6, STEPS, &format!("logs of the containers in {ns}"));
        self.logs(&ns, &pods).await?;

        self.progress(7, STEPS, "ctl doctor");
        self.doctor(ctx).await?;

        self.progress(8, STEPS, "versions and manifest");
        let server = match self.bounded(self.client.apiserver_version()).await {
            Ok(v) => json!({"gitVersion": v.git_version, "platform": v.platform}),
            Err(f) => {
                self.missing("GET /version".into(), f);
                Value::Null
            }
        };
        let versions = json!({
            "sandboxd": {"version": crate::VERSION, "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)},
            "kubernetes": server,
            "images": images,
        });
        self.write_object("versions.yaml", versions)?;

        self.manifest.finished = rfc3339(time::OffsetDateTime::now_utc());
        let mut text = serde_json::to_string_pretty(&self.manifest)?;
        text.push('\n');
        let text = self.redactor.text(&text).into_owned();
        self.sink.add("manifest.json", text.as_bytes())?;
        self.sink.finish()?;
        Ok(self.manifest)
    }

    /// Events of `ns` (only those about `names` when given), as one file.
    async fn events(&mut self, ns: &str, names: Option<&BTreeSet<String>>) -> anyhow::Result<()> {
        let Some(items) = self.list(&EVENTS, Some(ns), &ListParams::default()).await else {
            return Ok(());
        };
        let mut items: Vec<Value> = items
            .into_iter()
            .filter(|e| {
                names.is_none_or(|n| {
                    e["involvedObject"]["name"]
                        .as_str()
                        .or(e["regarding"]["name"].as_str())
                        .is_some_and(|x| n.contains(x))
                })
            })
            .collect();
        items.sort_by_key(event_time);
        let list = json!({"apiVersion": "v1", "kind": "EventList", "items": items});
        self.write_object(
            &format!("namespaces/{}/core/events.yaml", component(ns)),
            list,
        )
    }

    /// The selected nodes and those named in `extra`, trimmed to what matters here.
    async fn nodes(&mut self, selector: &str, extra: &BTreeSet<String>) -> anyhow::Result<()> {
        let selected = self
            .list(&NODES, None, &ListParams::default().labels(selector))
            .await
            .unwrap_or_default();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut nodes = selected;
        let missing: Vec<String> = extra
            .iter()
            .filter(|n| !nodes.iter().any(|x| x["metadata"]["name"] == n.as_str()))
            .cloned()
            .collect();
        for n in missing {
            let lp = ListParams::default().fields(&format!("metadata.name={n}"));
            if let Some(found) = self.list(&NODES, None, &lp).await {
                nodes.extend(found);
            }
        }
        for n in nodes {
            let name = n["metadata"]["name"].as_str().unwrap_or("").to_string();
            if !seen.insert(name.clone()) {
                continue;
            }
            let trimmed = json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": n["metadata"]["labels"],
                    "annotations": n["metadata"]["annotations"],
                    "creationTimestamp": n["metadata"]["creationTimestamp"],
                },
                "spec": {"taints": n["spec"]["taints"], "unschedulable": n["spec"]["unschedulable"]},
                "status": {
                    "capacity": n["status"]["capacity"],
                    "allocatable": n["status"]["allocatable"],
                    "conditions": n["status"]["conditions"],
                    "nodeInfo": n["status"]["nodeInfo"],
                    "addresses": n["status"]["addresses"],
                },
            });
            self.write_object(
                &format!(
                    "cluster-scoped-resources/core/nodes/{}.yaml",
                    component(&name)
                ),
                trimmed,
            )?;
        }
        Ok(())
    }

    /// The current and previous log of every container of `pods`.
    async fn logs(&mut self, ns: &str, pods: &[Value]) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        for p in pods {
            let Ok(pod) = serde_json::from_value::<Pod>(p.clone()) else {
                continue;
            };
            let name = pod.name_any();
            let spec = pod.spec.clone().unwrap_or_default();
            let statuses: Vec<_> = pod
                .status
                .iter()
                .flat_map(|s| {
                    s.init_container_statuses
                        .iter()
                        .flatten()
                        .chain(s.container_statuses.iter().flatten())
                })
                .cloned()
                .collect();
            let containers = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .map(|c| c.name.clone());
            for c in containers {
                let restarted = statuses.iter().any(|s| {
                    s.name == c
                        && (s.restart_count > 0
                            || s.last_state
                                .as_ref()
                                .is_some_and(|l| l.terminated.is_some()))
                });
                for previous in [false, true] {
                    if previous && !restarted {
                        continue;
                    }
                    let file = if previous {
                        "previous.log"
                    } else {
                        "current.log"
                    };
                    let what = format!(
                        "log of {ns}/{name} container {c}{}",
                        if previous { " (previous)" } else { "" }
                    );
                    if self.out_of_time() {
                        self.missing(what, Failure::TimedOut);
                        continue;
                    }
                    let lp = LogParams {
                        container: Some(c.clone()),
                        previous,
                        tail_lines: Some(self.limits.log_lines),
                        since_seconds: self.limits.since_seconds(),
                        limit_bytes: Some(self.limits.max_log_mib.saturating_mul(1 << 20)),
                        timestamps: true,
                        ..Default::default()
                    };
                    match self.bounded(api.logs(&name, &lp)).await {
                        Ok(text) => {
                            let text = self.redactor.text(&text).into_owned();
                            let path = format!(
                                "namespaces/{}/pods/{}/{}/logs/{file}",
                                component(ns),
                                component(&name),
                                component(&c)
                            );
                            self.write(&path, text.as_bytes())?;
                        }
                        Err(f) => self.missing(what, f),
                    }
                }
            }
        }
        Ok(())
    }

    /// `ctl doctor`'s findings, as the table it prints and as JSON.
    async fn doctor(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let run = doctor::findings(ctx, &self.limits.doctor, &self.client);
        let Ok(found) = tokio::time::timeout(left.min(DOCTOR_TIMEOUT), run).await else {
            self.missing("ctl doctor".into(), Failure::TimedOut);
            return Ok(());
        };
        let table = doctor::render(&found);
        let table = self.redactor.text(&table).into_owned();
        self.write("doctor.txt", table.as_bytes())?;
        let mut json = serde_json::to_string_pretty(&found)?;
        json.push('\n');
        let json = self.redactor.text(&json).into_owned();
        self.write("doctor.json", json.as_bytes())
    }
}

fn event_time(e: &Value) -> String {
    e["lastTimestamp"]
        .as_str()
        .or(e["eventTime"].as_str())
        .or(e["metadata"]["creationTimestamp"].as_str())
        .unwrap_or("")
        .to_string()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `sandboxd-support-20260102T030405Z`.
fn bundle_name(t: time::OffsetDateTime) -> String {
    format!(
        "sandboxd-support-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn summary(m: &Manifest, dest: &str) -> String {
    let bytes: usize = m.collected.iter().map(|c| c.bytes).sum();
    format!(
        "support-bundle: wrote {dest}: {} files ({:.1} MiB before compression); {} refused by RBAC, {} absent, {} failed, {} skipped (see manifest.json)",
        m.collected.len(),
        bytes as f64 / 1048576.0,
        m.refused.len(),
        m.absent.len(),
        m.errors.len(),
        m.skipped.len()
    )
}

/// `ctl support-bundle`.
pub(crate) async fn run(ctx: &Ctx, args: BundleArgs) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let now = time::OffsetDateTime::now_utc();
    let name = bundle_name(now);
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.tar.gz")));
    let tmp = path.with_extension("partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", tmp.display()))?;
    let mut sink = archive::TarGz::new(
        std::io::BufWriter::new(file),
        &name,
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    );
    let manifest = Collector::new(client, &ctx.namespace, &mut sink, &args.limits)
        .run(ctx)
        .await;
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    use std::io::Write;
    sink.into_inner()?.flush()?;
    std::fs::rename(&tmp, &path)?;
    eprintln!("{}", summary(&manifest, &path.display().to_string()));
    Ok(())
}

/// The operator Deployment's label (`deploy/operator/operator.yaml`).
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=sandboxd-operator";

/// The operator namespace: `ns` when the operator runs there, else the one namespace it
/// runs in, namespaces being deleted aside (`oc adm must-gather` runs the gather command
/// without flags).
async fn operator_namespace(client: &Client, ns: &str) -> String {
    use k8s_openapi::api::apps::v1::Deployment;
    let lp = ListParams::default().labels(OPERATOR_SELECTOR);
    let here = Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&lp)
        .await;
    if here.map_or(true, |l| !l.items.is_empty()) {
        return ns.to_string();
    }
    let Ok(all) = Api::<Deployment>::all(client.clone()).list(&lp).await else {
        return ns.to_string();
    };
    // A Deployment being deleted (its namespace going) is not where the operator runs.
    let found: BTreeSet<String> = all
        .items
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter_map(|d| d.namespace())
        .collect();
    // Nor is a namespace being deleted.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let mut live = Vec::new();
    for n in found {
        if let Ok(Some(o)) = namespaces.get_opt(&n).await
            && o.metadata.deletion_timestamp.is_none()
        {
            live.push(n);
        }
    }
    match live.as_slice() {
        [only] => {
            eprintln!("support-bundle: the operator runs in namespace {only}; collecting there");
            only.clone()
        }
        _ => ns.to_string(),
    }
}

/// `ctl must-gather`: the bundle as files under `--dir`, with must-gather's `version` file.
pub(crate) async fn must_gather(ctx: &Ctx, args: MustGatherArgs) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let ctx = &Ctx {
        namespace: operator_namespace(&client, &ctx.namespace).await,
        ..ctx.clone()
    };
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", args.dir.display()))?;
    let mut sink = archive::Dir::new(&args.dir);
    sink.add(
        "version",
        format!("sandboxd-must-gather\n{}\n", crate::VERSION).as_bytes(),
    )?;
    let manifest = Collector::new(client, &ctx.namespace, &mut sink, &args.limits)
        .run(ctx)
        .await?;
    eprintln!("{}", summary(&manifest, &args.dir.display().to_string()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: Limits,
    }

    #[test]
    fn must_gathers_since_flags_bound_the_logs_by_age() {
        // oc passes Go's Duration.String().
        let c = Cli::parse_from(["x", "--since", "2h0m0s"]);
        assert_eq!(c.limits.since_seconds(), Some(7200));
        let an_hour_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let t = an_hour_ago
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let c = Cli::parse_from(["x", "--since-time", &t]);
        let s = c.limits.since_seconds().unwrap();
        assert!((3599..=3700).contains(&s), "{s}");
        assert_eq!(Cli::parse_from(["x"]).limits.since_seconds(), None);
        assert!(Cli::try_parse_from(["x", "--since-time", "yesterday"]).is_err());
        assert!(Cli::try_parse_from(["x", "--since", "1h", "--since-time", &t]).is_err());
    }
}
