//! `sandboxd ctl caa restart`: restarts the cloud-api-adaptor DaemonSet after the secret or
//! configmap changed, the way the seed's `oc set env ds/... REBOOT="$(date)"` does: it sets
//! the `REBOOT` environment variable of every container of the pod template.

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::Ctx;
use crate::api::names::CAA_DAEMONSET;
use crate::k8s::apply::is_not_found;

/// The variable the seed sets.
pub(crate) const REBOOT_ENV: &str = "REBOOT";
/// The field manager of the restart (not the operator's, so its apply keeps the variable).
pub(crate) const RESTART_MANAGER: &str = "sandboxd-ctl-restart";

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// No DaemonSet.
    #[error(
        "no DaemonSet {CAA_DAEMONSET} in namespace {0}: the operator creates it once a KataConfig \
         with peer pods exists (`sandboxd ctl kataconfig create --peer-pods`)"
    )]
    Missing(String),
    /// The API server refused.
    #[error("DaemonSet {CAA_DAEMONSET}: {0}")]
    Api(#[source] kube::Error),
}

/// `ctl caa ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Restart the cloud-api-adaptor pods (new pods read the secret and configmap again).
    Restart,
}

/// The strategic merge patch that sets `REBOOT=value` on the named containers.
pub(crate) fn restart_patch(containers: &[String], value: &str) -> serde_json::Value {
    let containers: Vec<_> = containers
        .iter()
        .map(|c| json!({"name": c, "env": [{"name": REBOOT_ENV, "value": value}]}))
        .collect();
    json!({"spec": {"template": {"spec": {"containers": containers}}}})
}

/// Run `ctl caa ...`.
pub(crate) async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<()> {
    let Command::Restart = cmd;
    let client = ctx.client().await?;
    let api: Api<DaemonSet> = Api::namespaced(client, &ctx.namespace);
    let ds = api.get(CAA_DAEMONSET).await.map_err(|e| {
        if is_not_found(&e) {
            Error::Missing(ctx.namespace.clone())
        } else {
            Error::Api(e)
        }
    })?;
    let names: Vec<String> = ds
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.patch(
        CAA_DAEMONSET,
        &PatchParams {
            field_manager: Some(RESTART_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Strategic(restart_patch(&names, &now)),
    )
    .await
    .map_err(Error::Api)?;
    println!(
        "daemonset {}/{CAA_DAEMONSET} restarting ({REBOOT_ENV}={now}); existing peer pods keep their VMs",
        ctx.namespace
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_sets_reboot_on_every_container() {
        let p = restart_patch(&["caa".into(), "x".into()], "t");
        let cs = p["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[1]["env"][0], json!({"name": "REBOOT", "value": "t"}));
    }
}
