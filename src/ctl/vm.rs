//! `sandboxd ctl vm list`: peer-pod VMs from the PeerPod records, cluster-wide (the seed's
//! "get VMs" step without the cloud console).

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use super::{Ctx, output};
use crate::api::peerpod::PeerPod;
use crate::k8s::apply::is_not_found;

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PeerPod API is missing.
    #[error("the PeerPod API is not installed: run `sandboxd ctl install` first")]
    NotInstalled,
    /// The API server refused.
    #[error("listing PeerPods: {0}")]
    Api(#[source] kube::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NotInstalled => "not_installed",
            Error::Api(_) => "api",
        }
    }
}

/// `ctl vm ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List peer-pod VMs in every namespace.
    List,
}

/// One row of `vm list`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmRow {
    /// Namespace of the pod.
    pub namespace: String,
    /// The PeerPod record (the pod's name).
    pub pod: String,
    /// Cloud VM name.
    pub vm: String,
    /// Worker node.
    pub node: String,
    /// VM private IP.
    pub ip: String,
    /// Age.
    pub age: String,
    /// Phase.
    pub phase: String,
}

/// The rows for these records, sorted by namespace and pod.
pub fn rows(pods: &[PeerPod]) -> Vec<VmRow> {
    let mut rows: Vec<VmRow> = pods
        .iter()
        .map(|p| {
            let status = p.status.clone().unwrap_or_default();
            VmRow {
                namespace: p.namespace().unwrap_or_default(),
                pod: p.name_any(),
                vm: p.spec.vm_name.clone(),
                node: p.spec.node_name.clone(),
                ip: status.vm_ip.unwrap_or_else(|| "<none>".into()),
                age: output::age(p.metadata.creation_timestamp.as_ref()),
                phase: status.phase.unwrap_or_else(|| "Pending".into()),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    rows
}

/// Run `ctl vm ...`.
pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<()> {
    let Command::List = cmd;
    let client = ctx.client().await?;
    let api: Api<PeerPod> = Api::all(client);
    let list = api.list(&ListParams::default()).await.map_err(|e| {
        if is_not_found(&e) {
            Error::NotInstalled
        } else {
            Error::Api(e)
        }
    })?;
    let rows = rows(&list.items);
    if let Some(text) = output::structured(ctx.output, &rows)? {
        print!("{text}");
        return Ok(());
    }
    if rows.is_empty() {
        println!("no peer-pod VMs");
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| vec![r.namespace, r.pod, r.vm, r.node, r.ip, r.age, r.phase])
        .collect();
    print!(
        "{}",
        output::table(
            &["NAMESPACE", "POD", "VM", "NODE", "IP", "AGE", "PHASE"],
            &table
        )
    );
    Ok(())
}
