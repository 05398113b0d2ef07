//! `sandboxd ctl status [--watch]`: what the seed has the user watch by hand — KataConfig
//! progress per node, its conditions, the pod VM image Job, the readiness of the operator,
//! the cloud-api-adaptor DaemonSet and the webhook Deployment, and peer-pod VMs used against
//! the limit on each node. Exits non-zero when something failed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;

use super::{Ctx, Output, output};
use crate::api::kataconfig::KataConfig;
use crate::api::names::{
    CAA_DAEMONSET, IMAGE_CREATION_JOB, LABEL_KATA, OPERATOR, PEER_POD_CONFIG, VM_RESOURCE, WEBHOOK,
};
use crate::api::peerpod::PeerPod;
use crate::api::peerpodconfig::PeerPodConfig;
use crate::k8s::apply::is_not_found;

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The API server refused a read.
    #[error("reading {what}: {source}")]
    Api {
        /// What.
        what: &'static str,
        /// Why.
        source: kube::Error,
    },
    /// Something failed; the report says what.
    #[error("{}", .0.join("; "))]
    Failed(Vec<String>),
    /// `--watch --timeout` ran out.
    #[error("still in progress after {0}s")]
    Timeout(u64),
}

/// Flags of `ctl status`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Refresh until the KataConfig is no longer in progress (or something fails).
    #[arg(long, short = 'w')]
    pub(crate) watch: bool,
    /// Seconds between refreshes with `--watch`.
    #[arg(long, default_value_t = 2)]
    pub(crate) interval: u64,
    /// Give up watching after this many seconds.
    #[arg(long)]
    pub(crate) timeout: Option<u64>,
}

/// Ready replicas of a workload.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct Readiness {
    /// Ready.
    pub(crate) ready: i32,
    /// Wanted.
    pub(crate) want: i32,
}

/// One node of the KataConfig.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NodeState {
    /// Node name.
    pub(crate) name: String,
    /// `installed`, `installing`, `waitingToInstall`, `failedToInstall`, ...
    pub(crate) state: String,
}

/// One condition, without timestamps.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ConditionLine {
    /// Type.
    #[serde(rename = "type")]
    pub(crate) type_: String,
    /// `True`, `False`, `Unknown`.
    pub(crate) status: String,
    /// Reason.
    pub(crate) reason: String,
    /// Message.
    pub(crate) message: String,
}

/// The KataConfig part of the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KataConfigReport {
    /// Name.
    pub(crate) name: String,
    /// `enablePeerPods`.
    pub(crate) peer_pods: bool,
    /// Nodes with the runtime installed.
    pub(crate) ready_node_count: i64,
    /// Nodes selected.
    pub(crate) node_count: i64,
    /// Each node's state.
    pub(crate) nodes: Vec<NodeState>,
    /// Conditions.
    pub(crate) conditions: Vec<ConditionLine>,
    /// Whether an install, update or uninstall runs.
    pub(crate) in_progress: bool,
}

/// Peer-pod VMs on one node.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct NodeVms {
    /// Node name.
    pub(crate) node: String,
    /// PeerPod records on it.
    pub(crate) used: usize,
    /// Its `kata.peerpods.io/vm` capacity, if set.
    pub(crate) limit: Option<String>,
}

/// Everything `status` shows.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Report {
    /// The namespace looked at.
    pub(crate) namespace: String,
    /// The operator Deployment, if installed.
    pub(crate) operator: Option<Readiness>,
    /// The KataConfig, if any.
    pub(crate) kataconfig: Option<KataConfigReport>,
    /// The PeerPodConfig limit, if any.
    pub(crate) limit: Option<String>,
    /// PeerPodConfig conditions.
    pub(crate) peer_pod_config: Vec<ConditionLine>,
    /// The image Job: `Running`, `Succeeded` or `Failed`.
    pub(crate) image_job: Option<String>,
    /// The CAA DaemonSet.
    pub(crate) caa: Option<Readiness>,
    /// The webhook Deployment.
    pub(crate) webhook: Option<Readiness>,
    /// Peer-pod VMs per node.
    pub(crate) vms: Vec<NodeVms>,
    /// What failed, each with what to do.
    pub(crate) failures: Vec<String>,
}

impl Report {
    /// Whether there is nothing left to wait for.
    pub(crate) fn settled(&self) -> bool {
        !self.failures.is_empty() || self.kataconfig.as_ref().is_some_and(|k| !k.in_progress)
    }
}

fn api_err(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { what, source }
}

async fn opt<T>(r: Result<Option<T>, kube::Error>, what: &'static str) -> Result<Option<T>, Error> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(api_err(what)(e)),
    }
}

fn conditions(
    cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<ConditionLine> {
    cs.iter()
        .map(|c| ConditionLine {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

/// The KataConfig part of the report, and its failures.
pub(crate) fn kataconfig_report(kc: &KataConfig, failures: &mut Vec<String>) -> KataConfigReport {
    let status = kc.status.clone().unwrap_or_default();
    let kn = status.kata_nodes.unwrap_or_default();
    let mut nodes = Vec::new();
    for (state, list) in [
        ("installed", &kn.installed),
        ("installing", &kn.installing),
        ("waitingToInstall", &kn.waiting_to_install),
        ("failedToInstall", &kn.failed_to_install),
        ("uninstalling", &kn.uninstalling),
        ("waitingToUninstall", &kn.waiting_to_uninstall),
        ("failedToUninstall", &kn.failed_to_uninstall),
    ] {
        for n in list {
            nodes.push(NodeState {
                name: n.clone(),
                state: state.into(),
            });
        }
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let conds = conditions(&status.conditions);
    let in_progress_cond = conds.iter().find(|c| c.type_ == "InProgress");
    // No status yet: the operator has not seen it, so it is still in progress.
    let in_progress = in_progress_cond.is_none_or(|c| c.status == "True");
    for n in &nodes {
        if n.state.starts_with("failed") {
            failures.push(format!(
                "node {} {}: look at its node-install annotations (`kubectl describe node {}`)",
                n.name, n.state, n.name
            ));
        }
    }
    if let Some(c) = in_progress_cond
        && c.reason.contains("Failed")
    {
        failures.push(format!(
            "KataConfig {}: {} {}",
            kc.name_any(),
            c.reason,
            c.message
        ));
    }
    KataConfigReport {
        name: kc.name_any(),
        peer_pods: kc.spec.enable_peer_pods,
        ready_node_count: kn.ready_node_count,
        node_count: kn.node_count,
        nodes,
        conditions: conds,
        in_progress,
    }
}

fn deployment_readiness(d: &Deployment) -> Readiness {
    Readiness {
        ready: d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        want: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
    }
}

/// Reads everything once.
pub(crate) async fn collect(client: &Client, namespace: &str) -> Result<Report, Error> {
    let mut report = Report {
        namespace: namespace.to_string(),
        ..Default::default()
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    report.operator = opt(
        deployments.get_opt(OPERATOR).await,
        "the operator Deployment",
    )
    .await?
    .map(|d| deployment_readiness(&d));
    if report.operator.is_none() {
        report.failures.push(format!(
            "the operator is not installed in namespace {namespace}: run `sandboxd ctl install` \
             (or pass -n with the namespace it runs in)"
        ));
    }
    report.webhook = opt(deployments.get_opt(WEBHOOK).await, "the webhook Deployment")
        .await?
        .map(|d| deployment_readiness(&d));
    let kcs: Api<KataConfig> = Api::all(client.clone());
    let kc = match kcs.list(&ListParams::default()).await {
        Ok(l) => l.items.into_iter().next(),
        Err(e) if is_not_found(&e) => None,
        Err(e) => return Err(api_err("KataConfigs")(e)),
    };
    report.kataconfig = kc
        .as_ref()
        .map(|kc| kataconfig_report(kc, &mut report.failures));
    let ppcs: Api<PeerPodConfig> = Api::namespaced(client.clone(), namespace);
    if let Some(ppc) = opt(ppcs.get_opt(PEER_POD_CONFIG).await, "the PeerPodConfig").await? {
        report.limit = Some(ppc.spec.limit.clone());
        report.peer_pod_config = conditions(
            &ppc.status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
        );
        for c in &report.peer_pod_config {
            if c.status == "False" && c.type_ == "ConfigValid" {
                report.failures.push(format!(
                    "peer-pods configuration invalid ({}): {}; fix the secret/configmap, then \
                     `sandboxd ctl caa restart`",
                    c.reason, c.message
                ));
            }
        }
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    report.image_job = opt(jobs.get_opt(IMAGE_CREATION_JOB).await, "the image Job")
        .await?
        .map(|j| {
            let s = j.status.unwrap_or_default();
            let failed = s
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Failed" && c.status == "True");
            if failed {
                "Failed"
            } else if s.succeeded.unwrap_or(0) > 0 {
                "Succeeded"
            } else {
                "Running"
            }
            .to_string()
        });
    if report.image_job.as_deref() == Some("Failed") {
        report.failures.push(format!(
            "pod VM image Job failed: `kubectl -n {namespace} logs job/{IMAGE_CREATION_JOB}` and \
             `kubectl -n {namespace} get events --field-selector involvedObject.name={IMAGE_CREATION_JOB}`"
        ));
    }
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    report.caa = opt(dss.get_opt(CAA_DAEMONSET).await, "the CAA DaemonSet")
        .await?
        .map(|d| {
            let s = d.status.unwrap_or_default();
            Readiness {
                ready: s.number_ready,
                want: s.desired_number_scheduled,
            }
        });
    let peerpods: Api<PeerPod> = Api::all(client.clone());
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    match peerpods.list(&ListParams::default()).await {
        Ok(l) => {
            for p in l.items {
                *used.entry(p.spec.node_name.clone()).or_default() += 1;
            }
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(api_err("PeerPods")(e)),
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let kata_nodes = nodes
        .list(&ListParams::default().labels(LABEL_KATA))
        .await
        .map_err(api_err("nodes"))?;
    let mut names: BTreeMap<String, Option<String>> = BTreeMap::new();
    for n in kata_nodes.items {
        let limit = n
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get(VM_RESOURCE))
            .map(|q| q.0.clone());
        names.insert(n.name_any(), limit);
    }
    for node in used.keys() {
        names.entry(node.clone()).or_default();
    }
    report.vms = names
        .into_iter()
        .map(|(node, limit)| NodeVms {
            used: used.get(&node).copied().unwrap_or(0),
            node,
            limit,
        })
        .collect();
    Ok(report)
}

fn readiness(r: &Option<Readiness>, missing: &str) -> String {
    match r {
        Some(r) => format!(
            "{} ({})",
            output::progress_bar(r.ready.into(), r.want.into(), 10),
            if r.ready >= r.want && r.want > 0 {
                "ready"
            } else {
                "not ready"
            }
        ),
        None => missing.to_string(),
    }
}

/// The report as text.
pub(crate) fn render(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!("namespace {}\n", r.namespace));
    s.push_str(&format!(
        "operator:  {}\n",
        readiness(&r.operator, "not installed")
    ));
    match &r.kataconfig {
        None => s.push_str(
            "kataconfig: none (create it with `sandboxd ctl kataconfig create --peer-pods`)\n",
        ),
        Some(k) => {
            s.push_str(&format!(
                "kataconfig {} (peer pods {}): {} nodes installed {}\n",
                k.name,
                if k.peer_pods { "on" } else { "off" },
                output::progress_bar(k.ready_node_count, k.node_count, 20),
                if k.in_progress { "(in progress)" } else { "" }
            ));
            for n in &k.nodes {
                s.push_str(&format!("  {:<30} {}\n", n.name, n.state));
            }
            for c in &k.conditions {
                s.push_str(&format!(
                    "  condition {}={} {} {}\n",
                    c.type_, c.status, c.reason, c.message
                ));
            }
        }
    }
    for c in &r.peer_pod_config {
        s.push_str(&format!(
            "peerpodconfig condition {}={} {} {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    s.push_str(&format!(
        "image job: {}\n",
        r.image_job.as_deref().unwrap_or("none")
    ));
    s.push_str(&format!(
        "caa:       {}\n",
        readiness(&r.caa, "not deployed")
    ));
    s.push_str(&format!(
        "webhook:   {}\n",
        readiness(&r.webhook, "not deployed")
    ));
    if let Some(l) = &r.limit {
        s.push_str(&format!("limit:     {l} peer-pod VMs per node\n"));
    }
    if !r.vms.is_empty() {
        let rows: Vec<Vec<String>> = r
            .vms
            .iter()
            .map(|v| {
                vec![
                    v.node.clone(),
                    format!("{}/{}", v.used, v.limit.as_deref().unwrap_or("-")),
                ]
            })
            .collect();
        s.push_str(&output::table(&["NODE", "VMS USED/LIMIT"], &rows));
    }
    for f in &r.failures {
        s.push_str(&format!("FAILED: {f}\n"));
    }
    s
}

/// Run `ctl status`.
pub(crate) async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let start = std::time::Instant::now();
    let clear = args.watch && ctx.output == Output::Table && std::io::stdout().is_terminal();
    let mut last = None;
    loop {
        let report = collect(&client, &ctx.namespace).await?;
        if last.as_ref() != Some(&report) {
            match output::structured(ctx.output, &report)? {
                Some(text) => print!("{text}"),
                None => {
                    if clear {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", render(&report));
                }
            }
        }
        if !report.failures.is_empty() {
            return Err(Error::Failed(report.failures).into());
        }
        if !args.watch || report.settled() {
            return Ok(());
        }
        if let Some(t) = args.timeout
            && start.elapsed() >= Duration::from_secs(t)
        {
            return Err(Error::Timeout(t).into());
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::kataconfig::{KataConfigSpec, KataConfigStatus, KataNodesStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn kc(installed: &[&str], failed: &[&str], in_progress: &str, reason: &str) -> KataConfig {
        let mut kc = KataConfig::new("k", KataConfigSpec::default());
        kc.status = Some(KataConfigStatus {
            kata_nodes: Some(KataNodesStatus {
                node_count: (installed.len() + failed.len()) as i64,
                ready_node_count: installed.len() as i64,
                installed: installed.iter().map(|s| s.to_string()).collect(),
                failed_to_install: failed.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            conditions: vec![Condition {
                type_: "InProgress".into(),
                status: in_progress.into(),
                reason: reason.into(),
                message: "m".into(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
                observed_generation: None,
            }],
            ..Default::default()
        });
        kc
    }

    #[test]
    fn failed_nodes_are_failures() {
        let mut f = Vec::new();
        let r = kataconfig_report(&kc(&["a"], &["b"], "True", "Installing"), &mut f);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("node b failedToInstall"));
        assert_eq!(r.nodes.len(), 2);
        assert!(r.in_progress);
    }

    #[test]
    fn done_when_in_progress_is_false() {
        let mut f = Vec::new();
        let r = kataconfig_report(&kc(&["a", "b"], &[], "False", ""), &mut f);
        assert!(f.is_empty());
        assert!(!r.in_progress);
        let report = Report {
            kataconfig: Some(r),
            ..Default::default()
        };
        assert!(report.settled());
        let text = render(&report);
        assert!(text.contains("[####################] 2/2"), "{text}");
    }

    #[test]
    fn failed_reason_is_a_failure() {
        let mut f = Vec::new();
        kataconfig_report(&kc(&[], &[], "False", "Failed"), &mut f);
        assert_eq!(f.len(), 1);
    }
}
