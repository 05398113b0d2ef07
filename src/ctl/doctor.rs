//! `sandboxd ctl doctor`: checks the whole chain a peer pod needs and prints each finding
//! with its fix — operator, CRDs, credentials, `peer-pods-cm`, pod VM image, RuntimeClass,
//! node labels and VM capacity, the webhook (a server-side dry-run create of a
//! `kata-remote` pod must come back mutated), CAA on every node, and through ARM the NSG
//! rules for VXLAN and the agent port between the worker subnet and the pod VMs. Exits
//! non-zero when any check fails.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::json;

use super::azure_arm::{self, Azure, Direction, EndpointArgs};
use super::azure_nsg::{self, Flow, Prefix, Protocol, Verdict};
use super::{Ctx, Output};
use crate::api::names::{
    CAA_DAEMONSET, CLOUD_SECRET, CONFIG_MAP, FORWARDER_PORT, LABEL_KATA, RELAY_DAEMONSET,
    RUNTIME_CLASS, VM_RESOURCE,
};
use crate::config::{CloudProvider, CloudSecret, PeerPodsConfig};

/// Flags of `ctl doctor`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Name of the operator Deployment in the namespace.
    #[arg(long, default_value = crate::api::names::OPERATOR)]
    pub(crate) operator_deployment: String,
    /// Namespace of the dry-run `kata-remote` pod that probes the webhook (never stored).
    #[arg(long, default_value = "default")]
    pub(crate) probe_namespace: String,
    /// Label selector of the nodes that should run peer pods (default: the nodes labelled
    /// node-role.kubernetes.io/kata-oc).
    #[arg(long)]
    pub(crate) node_selector: Option<String>,
    /// Skip the checks that need Azure (NSG rules, image existence).
    #[arg(long)]
    pub(crate) no_azure: bool,
    /// ARM and Entra ID endpoints.
    #[command(flatten)]
    pub(crate) endpoints: EndpointArgs,
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    /// Fine.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Peer pods will not work until fixed.
    Fail,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Finding {
    /// Which check (`operator`, `crds`, `secret`, `configmap`, `image`, `runtimeclass`,
    /// `nodes`, `webhook`, `caa`, `nsg`).
    pub(crate) check: &'static str,
    /// Outcome.
    pub(crate) status: Status,
    /// What was found.
    pub(crate) message: String,
    /// How to fix it, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fix: Option<String>,
}

fn ok(check: &'static str, message: impl Into<String>) -> Finding {
    Finding {
        check,
        status: Status::Ok,
        message: message.into(),
        fix: None,
    }
}

fn fail(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        check,
        status: Status::Fail,
        message: message.into(),
        fix: Some(fix.into()),
    }
}

fn warn(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        check,
        status: Status::Warn,
        message: message.into(),
        fix: Some(fix.into()),
    }
}

/// Errors of the doctor itself (a failed check is a finding, not an error).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Some checks failed.
    #[error("{0} check(s) failed")]
    Failed(usize),
}

/// What the configuration checks found, for the checks after them.
struct Config {
    map: Option<BTreeMap<String, String>>,
    parsed: Option<PeerPodsConfig>,
    secret: Option<CloudSecret>,
}

/// Runs every check against the cluster (and ARM).
pub(crate) async fn findings(ctx: &Ctx, args: &Args, client: &Client) -> Vec<Finding> {
    let ns = ctx.namespace.as_str();
    let mut out = Vec::new();
    out.push(check_operator(client, ns, &args.operator_deployment).await);
    out.extend(check_crds(client).await);
    let (cfg, found) = check_config(client, ns).await;
    out.extend(found);
    out.push(check_runtime_class(client).await);
    let nodes = check_nodes(client, args.node_selector.as_deref()).await;
    let node_names = nodes.0.clone();
    out.extend(nodes.1);
    out.push(check_webhook(client, &args.probe_namespace).await);
    out.extend(check_caa(client, ns, &node_names).await);
    if !args.no_azure {
        out.extend(check_azure(client, ns, args, &cfg).await);
    }
    out
}

fn kube_err(check: &'static str, what: &str, e: kube::Error) -> Finding {
    fail(
        check,
        format!("reading {what}: {e}"),
        "check that the kubeconfig's user may read it (kubectl auth can-i get ...)",
    )
}

async fn check_operator(client: &Client, ns: &str, name: &str) -> Finding {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Err(e) => kube_err("operator", "the operator Deployment", e),
        Ok(None) => fail(
            "operator",
            format!("operator not installed: no Deployment {name} in namespace {ns}"),
            "sandboxd ctl install --wait",
        ),
        Ok(Some(d)) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            if ready >= 1 && ready >= want.min(1) {
                ok(
                    "operator",
                    format!("Deployment {name} ready ({ready}/{want} replicas)"),
                )
            } else {
                fail(
                    "operator",
                    format!(
                        "operator not ready: Deployment {name} has {ready}/{want} ready replicas"
                    ),
                    format!(
                        "kubectl -n {ns} describe deployment {name}; kubectl -n {ns} logs deployment/{name}"
                    ),
                )
            }
        }
    }
}

async fn check_crds(client: &Client) -> Vec<Finding> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = Vec::new();
    let mut fine = Vec::new();
    for (_, crd) in crate::api::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await {
            Err(e) => out.push(kube_err("crds", &format!("CRD {name}"), e)),
            Ok(None) => out.push(fail(
                "crds",
                format!("CRD {name} not installed"),
                "sandboxd ctl install",
            )),
            Ok(Some(c)) => {
                let established = c
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    fine.push(name);
                } else {
                    out.push(fail(
                        "crds",
                        format!("CRD {name} is not Established"),
                        format!("kubectl describe crd {name}"),
                    ));
                }
            }
        }
    }
    if out.is_empty() {
        out.push(ok("crds", format!("{} established", fine.join(", "))));
    }
    out
}

async fn check_config(client: &Client, ns: &str) -> (Config, Vec<Finding>) {
    let mut out = Vec::new();
    let mut cfg = Config {
        map: None,
        parsed: None,
        secret: None,
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match cms.get_opt(CONFIG_MAP).await {
        Err(e) => out.push(kube_err("configmap", CONFIG_MAP, e)),
        Ok(None) => out.push(fail(
            "configmap",
            format!("{CONFIG_MAP} missing in namespace {ns}"),
            format!("sandboxd ctl -n {ns} azure configmap"),
        )),
        Ok(Some(cm)) => {
            let map = cm.data.unwrap_or_default();
            match PeerPodsConfig::from_map(&map) {
                Ok(p) => {
                    out.push(ok(
                        "configmap",
                        format!(
                            "{CONFIG_MAP} valid (CLOUD_PROVIDER={}, VXLAN_PORT={})",
                            p.cloud_provider, p.vxlan_port
                        ),
                    ));
                    cfg.parsed = Some(p);
                }
                Err(e) => out.push(fail(
                    "configmap",
                    e.to_string(),
                    format!("fix the keys named, e.g. with sandboxd ctl -n {ns} azure configmap"),
                )),
            }
            cfg.map = Some(map);
        }
    }
    let azure = cfg
        .parsed
        .as_ref()
        .is_none_or(|p| p.cloud_provider == CloudProvider::Azure);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    match secrets.get_opt(CLOUD_SECRET).await {
        Err(e) => out.push(kube_err("secret", CLOUD_SECRET, e)),
        Ok(None) if azure => out.push(fail(
            "secret",
            format!("{CLOUD_SECRET} missing in namespace {ns}"),
            format!("sandboxd ctl -n {ns} azure secret"),
        )),
        Ok(None) => out.push(ok(
            "secret",
            format!("{CLOUD_SECRET} not needed for CLOUD_PROVIDER=local"),
        )),
        Ok(Some(s)) => {
            let map = azure_arm::secret_map(&s);
            match CloudSecret::from_map(&map) {
                // Only key names appear: the validator never quotes a secret value.
                Err(e) => out.push(fail(
                    "secret",
                    e.to_string(),
                    format!("sandboxd ctl -n {ns} azure secret"),
                )),
                Ok(sec) => {
                    let kind = match sec.credentials {
                        crate::config::AzureCredentials::ClientSecret { .. } => "client secret",
                        crate::config::AzureCredentials::WorkloadIdentity { .. } => {
                            "workload identity"
                        }
                        crate::config::AzureCredentials::ManagedIdentity { .. } => {
                            "managed identity"
                        }
                    };
                    out.push(ok(
                        "secret",
                        format!("{CLOUD_SECRET} has the keys for a {kind} credential"),
                    ));
                    cfg.secret = Some(sec);
                }
            }
        }
    }
    match cfg.parsed.as_ref().and_then(|p| p.azure.as_ref()) {
        Some(a) => match &a.image_id {
            Some(id) => out.push(ok("image", format!("AZURE_IMAGE_ID is {id}"))),
            None => out.push(fail(
                "image",
                "AZURE_IMAGE_ID is empty: there is no pod VM image to boot",
                format!(
                    "create the KataConfig with peer pods enabled (its image job fills it), or \
                     sandboxd ctl -n {ns} azure configmap --image-id <image id>"
                ),
            )),
        },
        None if cfg.parsed.is_some() => {
            out.push(ok("image", "no image needed for CLOUD_PROVIDER=local"))
        }
        None => out.push(fail(
            "image",
            format!("no valid {CONFIG_MAP}, so no AZURE_IMAGE_ID"),
            format!("sandboxd ctl -n {ns} azure configmap"),
        )),
    }
    (cfg, out)
}

async fn check_runtime_class(client: &Client) -> Finding {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    match api.get_opt(RUNTIME_CLASS).await {
        Err(e) => kube_err("runtimeclass", "RuntimeClass", e),
        Ok(None) => fail(
            "runtimeclass",
            format!("RuntimeClass {RUNTIME_CLASS} missing"),
            "sandboxd ctl kataconfig create --peer-pods (the operator creates it)",
        ),
        Ok(Some(rc)) if rc.handler != RUNTIME_CLASS => fail(
            "runtimeclass",
            format!(
                "RuntimeClass {RUNTIME_CLASS} has handler {:?}, not {RUNTIME_CLASS:?}",
                rc.handler
            ),
            format!("kubectl delete runtimeclass {RUNTIME_CLASS}; the operator recreates it"),
        ),
        Ok(Some(_)) => ok(
            "runtimeclass",
            format!("RuntimeClass {RUNTIME_CLASS} (handler {RUNTIME_CLASS})"),
        ),
    }
}

/// The peer-pod nodes and their findings.
async fn check_nodes(client: &Client, selector: Option<&str>) -> (Vec<String>, Vec<Finding>) {
    let api: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default().labels(selector.unwrap_or(LABEL_KATA));
    let nodes = match api.list(&lp).await {
        Ok(l) => l.items,
        Err(e) => return (Vec::new(), vec![kube_err("nodes", "nodes", e)]),
    };
    if nodes.is_empty() {
        let what = match selector {
            Some(s) => format!("no node matches {s}"),
            None => format!("no node is labelled {LABEL_KATA}"),
        };
        return (
            Vec::new(),
            vec![fail(
                "nodes",
                what,
                "sandboxd ctl kataconfig create --peer-pods (the operator labels the selected nodes)",
            )],
        );
    }
    let mut out = Vec::new();
    let mut names = Vec::new();
    let mut fine = Vec::new();
    for n in &nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        names.push(name.clone());
        let labelled = n
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(LABEL_KATA));
        let capacity = n
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get(VM_RESOURCE))
            .and_then(|q| q.0.parse::<i64>().ok())
            .unwrap_or(0);
        if !labelled {
            out.push(fail(
                "nodes",
                format!("node {name} is not labelled {LABEL_KATA}"),
                "make the KataConfig's kataConfigPoolSelector select it (sandboxd ctl kataconfig create --selector ...)",
            ));
        } else if capacity <= 0 {
            out.push(fail(
                "nodes",
                format!(
                    "node {name} has no {VM_RESOURCE} capacity: peer pods cannot be scheduled there"
                ),
                "check the PeerPodConfig limit (sandboxd ctl limit get) and the operator's logs",
            ));
        } else {
            fine.push(format!("{name} ({capacity} VMs)"));
        }
    }
    if !fine.is_empty() {
        out.push(ok(
            "nodes",
            format!("labelled with {VM_RESOURCE} capacity: {}", fine.join(", ")),
        ));
    }
    (names, out)
}

async fn check_webhook(client: &Client, probe_ns: &str) -> Finding {
    let api: Api<Pod> = Api::namespaced(client.clone(), probe_ns);
    let pod: Pod = match serde_json::from_value(json!({
        "metadata": {"generateName": "sandboxd-doctor-probe-"},
        "spec": {
            "runtimeClassName": RUNTIME_CLASS,
            "containers": [{
                "name": "probe",
                "image": "registry.k8s.io/pause:3.10",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}
            }]
        }
    })) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                "webhook",
                format!("building the probe pod: {e}"),
                "report a bug",
            );
        }
    };
    let pp = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match api.create(&pp, &pod).await {
        Err(kube::Error::Api(s)) if s.message.contains("RuntimeClass") => fail(
            "webhook",
            format!("cannot probe the webhook: {}", s.message),
            "sandboxd ctl kataconfig create --peer-pods (creates the RuntimeClass)",
        ),
        Err(e) => fail(
            "webhook",
            format!("a dry-run kata-remote pod in namespace {probe_ns} was refused: {e}"),
            "check the peer-pods-webhook Deployment and Service in the operator namespace \
             (kubectl get mutatingwebhookconfiguration peer-pods-webhook -o yaml)",
        ),
        Ok(p) => {
            let mutated = p
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.resources.as_ref())
                .and_then(|r| r.limits.as_ref())
                .is_some_and(|l| l.contains_key(VM_RESOURCE));
            if mutated {
                ok(
                    "webhook",
                    format!("a dry-run kata-remote pod in {probe_ns} came back with {VM_RESOURCE}"),
                )
            } else {
                fail(
                    "webhook",
                    format!(
                        "a dry-run kata-remote pod in namespace {probe_ns} was admitted unmutated: \
                         the peer-pods webhook is not installed or does not cover that namespace"
                    ),
                    "create the KataConfig with peer pods enabled (the operator deploys the webhook); \
                     kubectl get mutatingwebhookconfiguration peer-pods-webhook",
                )
            }
        }
    }
}

async fn check_caa(client: &Client, ns: &str, nodes: &[String]) -> Vec<Finding> {
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let ds = match ds_api.get_opt(CAA_DAEMONSET).await {
        Err(e) => return vec![kube_err("caa", "the CAA DaemonSet", e)],
        Ok(None) => {
            return vec![fail(
                "caa",
                format!("CAA DaemonSet {CAA_DAEMONSET} missing in namespace {ns}"),
                "create the KataConfig with enablePeerPods: true and a valid peer-pods-cm \
                 (sandboxd ctl kataconfig create --peer-pods)",
            )];
        }
        Ok(Some(d)) => d,
    };
    let (selector, pods) = match ds_pods(client, ns, &ds).await {
        Ok(x) => x,
        Err(e) => return vec![kube_err("caa", "CAA pods", e)],
    };
    let ready_on = |node: &str| ready_on(&pods, node);
    let mut out = check_relay(client, ns, &ds, nodes).await;
    let mut fine = Vec::new();
    for n in nodes {
        if ready_on(n) {
            fine.push(n.clone());
        } else {
            out.push(fail(
                "caa",
                format!("no ready CAA pod on node {n}: peer pods there cannot start"),
                format!(
                    "kubectl -n {ns} get pods -l {selector} -o wide; kubectl -n {ns} logs ds/{CAA_DAEMONSET}"
                ),
            ));
        }
    }
    if out.iter().all(|f| f.status == Status::Ok) {
        out.push(ok(
            "caa",
            if fine.is_empty() {
                format!("DaemonSet {CAA_DAEMONSET} present (no peer-pod nodes to check)")
            } else {
                format!("CAA ready on {}", fine.join(", "))
            },
        ));
    }
    out
}

/// The label selector of DaemonSet `ds` and its pods.
async fn ds_pods(
    client: &Client,
    ns: &str,
    ds: &DaemonSet,
) -> Result<(String, Vec<Pod>), kube::Error> {
    let selector = ds
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pods = pods.list(&ListParams::default().labels(&selector)).await?;
    Ok((selector, pods.items))
}

/// Whether one of `pods` on `node` is Ready.
fn ready_on(pods: &[Pod], node: &str) -> bool {
    pods.iter().any(|p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

/// When CAA serves behind the node agent relay (`CAA_RELAY_SOCKET` in its template): the
/// relay's DaemonSet and a ready relay pod on every peer-pod node. Only failures are
/// returned.
async fn check_relay(client: &Client, ns: &str, caa: &DaemonSet, nodes: &[String]) -> Vec<Finding> {
    let behind_relay = caa
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|p| {
            p.containers
                .iter()
                .any(|c| c.env.iter().flatten().any(|e| e.name == "CAA_RELAY_SOCKET"))
        });
    if !behind_relay {
        return Vec::new();
    }
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let relay = match api.get_opt(RELAY_DAEMONSET).await {
        Err(e) => return vec![kube_err("caa", "the node agent relay DaemonSet", e)],
        Ok(None) => {
            return vec![fail(
                "caa",
                format!(
                    "node agent relay DaemonSet {RELAY_DAEMONSET} missing in namespace {ns}: \
                     CAA serves behind it, so no peer pod can start"
                ),
                "the operator creates it with CAA's; check the operator's log",
            )];
        }
        Ok(Some(d)) => d,
    };
    let (selector, pods) = match ds_pods(client, ns, &relay).await {
        Ok(x) => x,
        Err(e) => return vec![kube_err("caa", "node agent relay pods", e)],
    };
    nodes
        .iter()
        .filter(|n| !ready_on(&pods, n))
        .map(|n| {
            fail(
                "caa",
                format!(
                    "no ready node agent relay pod on node {n}: peer pods there cannot start \
                     (their agent sockets and the hypervisor socket are the relay's)"
                ),
                format!(
                    "kubectl -n {ns} get pods -l {selector} -o wide; kubectl -n {ns} logs ds/{RELAY_DAEMONSET}"
                ),
            )
        })
        .collect()
}

/// The ARM checks: the subnet exists, each NSG in the path allows VXLAN both ways and the
/// agent port inbound, within the worker subnet.
async fn check_azure(client: &Client, ns: &str, args: &Args, cfg: &Config) -> Vec<Finding> {
    let (Some(parsed), Some(map)) = (&cfg.parsed, &cfg.map) else {
        return vec![warn(
            "nsg",
            "NSG rules not checked: needs a valid peer-pods-cm",
            "fix the configmap findings above, then run doctor again",
        )];
    };
    let Some(az) = &parsed.azure else {
        return Vec::new();
    };
    let secret = match &cfg.secret {
        Some(s) => s.clone(),
        None => match azure_arm::credentials(client, ns, None).await {
            Ok(s) => s,
            Err(e) => {
                return vec![warn(
                    "nsg",
                    format!("NSG rules not checked: {e}"),
                    "fix the secret findings above, then run doctor again",
                )];
            }
        },
    };
    if matches!(
        secret.credentials,
        crate::config::AzureCredentials::ManagedIdentity { .. }
    ) {
        return vec![warn(
            "nsg",
            "NSG rules not checked: the credentials are a managed identity, which only works on Azure VMs",
            "run doctor with AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID set, or with --no-azure",
        )];
    }
    let endpoints = match super::azure_arm::resolve_endpoints(&args.endpoints, map) {
        Ok(e) => e,
        Err(e) => return vec![fail("nsg", e.to_string(), "fix the endpoint URL")],
    };
    let azure = match Azure::new(&secret, &endpoints) {
        Ok(a) => a,
        Err(e) => {
            return vec![warn(
                "nsg",
                format!("NSG rules not checked: {e}"),
                "check the credentials",
            )];
        }
    };
    let unreachable = |e: azure_arm::Error| {
        vec![warn(
            "nsg",
            format!("NSG rules not checked: {e}"),
            "check the credentials and that ARM is reachable, or run with --no-azure",
        )]
    };
    let mut out = Vec::new();
    if let Some(image) = &az.image_id {
        match azure.image_exists(image).await {
            Ok(Some(false)) => out.push(fail(
                "image",
                format!("AZURE_IMAGE_ID names an image that does not exist: {image}"),
                format!(
                    "sandboxd ctl -n {ns} azure configmap --image-id <existing image id>, or clear \
                     AZURE_IMAGE_ID so the KataConfig's image job builds one"
                ),
            )),
            Ok(_) => {}
            Err(e) => out.push(warn(
                "image",
                format!("AZURE_IMAGE_ID not checked in Azure: {e}"),
                "check the credentials and that ARM is reachable",
            )),
        }
    }
    let vnet = match azure.vnet_of_subnet(&az.subnet_id).await {
        Ok(v) => v,
        Err(e) => return unreachable(e),
    };
    let Some((vnet, subnet)) = vnet.and_then(|v| {
        let s = v
            .subnets
            .iter()
            .find(|s| s.id.eq_ignore_ascii_case(&az.subnet_id))
            .cloned()?;
        Some((v, s))
    }) else {
        out.push(fail(
            "nsg",
            format!(
                "AZURE_SUBNET_ID names a subnet that does not exist: {}",
                az.subnet_id
            ),
            format!("sandboxd ctl -n {ns} azure configmap --subnet <name>"),
        ));
        return out;
    };
    let Some(range) = subnet.prefixes.iter().find_map(|p| Prefix::parse(p)) else {
        out.push(warn(
            "nsg",
            format!(
                "subnet {} has no IPv4 prefix to check rules against",
                subnet.name
            ),
            "check the subnet's address prefixes",
        ));
        return out;
    };
    let vnet_ranges: Vec<Prefix> = vnet
        .prefixes
        .iter()
        .filter_map(|p| Prefix::parse(p))
        .collect();
    let mut nsg_ids: Vec<String> = Vec::new();
    for id in az.nsg_id.iter().chain(subnet.nsg_id.iter()) {
        if !nsg_ids.iter().any(|x| x.eq_ignore_ascii_case(id)) {
            nsg_ids.push(id.clone());
        }
    }
    if nsg_ids.is_empty() {
        out.push(ok(
            "nsg",
            format!(
                "no NSG on the pod VMs or subnet {}: nothing filters VXLAN or the agent port",
                subnet.name
            ),
        ));
        return out;
    }
    let prefix = subnet.prefixes.first().cloned().unwrap_or_default();
    let flows = [
        (
            Direction::Inbound,
            Protocol::Udp,
            parsed.vxlan_port,
            "VXLAN",
        ),
        (Direction::Inbound, Protocol::Tcp, FORWARDER_PORT, "agent"),
        (
            Direction::Outbound,
            Protocol::Udp,
            parsed.vxlan_port,
            "VXLAN",
        ),
    ];
    for id in nsg_ids {
        let nsg = match azure.nsg(&id).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                out.push(fail(
                    "nsg",
                    format!("network security group {id} does not exist"),
                    format!("sandboxd ctl -n {ns} azure configmap --nsg <name>"),
                ));
                continue;
            }
            Err(e) => return unreachable(e),
        };
        let rg = azure_arm::parse_arm_id(&nsg.id)
            .map(|a| a.resource_group)
            .unwrap_or_default();
        let mut fine = Vec::new();
        for (direction, protocol, port, what) in flows {
            let flow = Flow {
                direction,
                protocol,
                source: range,
                destination: range,
                port,
            };
            let dir = match direction {
                Direction::Inbound => "Inbound",
                Direction::Outbound => "Outbound",
            };
            let (from, to) = match direction {
                Direction::Inbound => ("the worker subnet", "pod VMs"),
                Direction::Outbound => ("pod VMs", "the worker subnet"),
            };
            match azure_nsg::evaluate(&nsg, &flow, &vnet_ranges) {
                Verdict::Allowed { .. } => fine.push(format!(
                    "{port}/{} {}",
                    protocol.as_str().to_uppercase(),
                    dir.to_lowercase()
                )),
                Verdict::Denied { rule, priority } => {
                    let prio = azure_nsg::free_priority_below(&nsg, priority);
                    let (addr_flag, name) = match direction {
                        Direction::Inbound => ("--source-address-prefixes", "in"),
                        Direction::Outbound => ("--destination-address-prefixes", "out"),
                    };
                    out.push(fail(
                        "nsg",
                        format!(
                            "NSG {} denies {what} {port}/{} from {from} {prefix} to {to} (rule {rule}, priority {priority})",
                            nsg.name,
                            protocol.as_str().to_uppercase()
                        ),
                        format!(
                            "az network nsg rule create -g {rg} --nsg-name {} -n allow-peerpods-{}-{port}-{name} \
                             --priority {prio} --direction {dir} --access Allow --protocol {} \
                             {addr_flag} {prefix} --destination-port-ranges {port}",
                            nsg.name,
                            protocol.as_str().to_lowercase(),
                            protocol.as_str()
                        ),
                    ));
                }
            }
        }
        if fine.len() == flows.len() {
            out.push(ok(
                "nsg",
                format!(
                    "NSG {} allows {} within {prefix}",
                    nsg.name,
                    fine.join(", ")
                ),
            ));
        }
    }
    out
}

/// The findings as the table `ctl doctor` prints: one line each, its fix below.
pub(crate) fn render(found: &[Finding]) -> String {
    let mut out = String::new();
    for f in found {
        let status = match f.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("[{status:4}] {:12} {}\n", f.check, f.message));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("{:20}fix: {fix}\n", ""));
        }
    }
    out
}

/// Run the command.
pub(crate) async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let found = findings(ctx, &args, &client).await;
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&found)?),
        Output::Table => print!("{}", render(&found)),
    }
    let failed = found.iter().filter(|f| f.status == Status::Fail).count();
    if failed > 0 {
        return Err(Error::Failed(failed).into());
    }
    Ok(())
}
