//! `sandboxd ctl limit get|set N`: the per-node peer-pod VM limit (`PeerPodConfig.spec.limit`
//! of `peerpodconfig-openshift`), the seed's optional step 5.

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::Ctx;
use crate::api::names::PEER_POD_CONFIG;
use crate::api::peerpodconfig::PeerPodConfig;
use crate::k8s::FIELD_MANAGER;
use crate::k8s::apply::is_not_found;

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// No PeerPodConfig yet.
    #[error(
        "no PeerPodConfig {PEER_POD_CONFIG} in namespace {0}: the operator creates it for a \
         KataConfig with peer pods (`sandboxd ctl kataconfig create --peer-pods`)"
    )]
    Missing(String),
    /// The API server refused.
    #[error("PeerPodConfig {PEER_POD_CONFIG}: {0}")]
    Api(#[source] kube::Error),
}

/// `ctl limit ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Print the current limit.
    Get,
    /// Set the limit (peer-pod VMs per node).
    Set {
        /// The new limit.
        limit: u32,
    },
}

/// Run `ctl limit ...`.
pub(crate) async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let api: Api<PeerPodConfig> = Api::namespaced(client, &ctx.namespace);
    let missing = |e: kube::Error| {
        if is_not_found(&e) {
            Error::Missing(ctx.namespace.clone())
        } else {
            Error::Api(e)
        }
    };
    match cmd {
        Command::Get => {
            let ppc = api.get(PEER_POD_CONFIG).await.map_err(missing)?;
            println!("{}", ppc.spec.limit);
        }
        Command::Set { limit } => {
            // Fail clearly instead of creating a partial object.
            api.get(PEER_POD_CONFIG).await.map_err(missing)?;
            let patch = json!({"spec": {"limit": limit.to_string()}});
            let ppc = api
                .patch(
                    PEER_POD_CONFIG,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(missing)?;
            println!(
                "limit set to {} peer-pod VMs per node; the operator updates each node's \
                 kata.peerpods.io/vm capacity",
                ppc.spec.limit
            );
        }
    }
    Ok(())
}
