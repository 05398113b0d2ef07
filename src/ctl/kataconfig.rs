//! `sandboxd ctl kataconfig create`: the seed's step 4 (the KataConfig custom resource).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};

use super::{Ctx, output};
use crate::api::kataconfig::{KataConfig, KataConfigSpec};
use crate::k8s::apply::is_not_found;

/// The name the seed gives its KataConfig.
pub(crate) const DEFAULT_NAME: &str = "cluster-kataconfig";

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A `--selector` is not `key=value`.
    #[error("--selector {0:?}: expected key=value (value may be empty: key=)")]
    Selector(String),
    /// The log level is not one the CRD accepts.
    #[error("--log-level {0:?}: expected one of trace, debug, info, warn, error")]
    LogLevel(String),
    /// One already exists.
    #[error(
        "KataConfig {0} already exists and only one may exist: change it with `kubectl edit \
         kataconfig {0}` or delete it first"
    )]
    Exists(String),
    /// The CRD is not installed.
    #[error("the KataConfig API is not installed: run `sandboxd ctl install` first")]
    NotInstalled,
    /// The API server refused.
    #[error("creating the KataConfig: {0}")]
    Api(#[source] kube::Error),
}

/// `ctl kataconfig ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Create the KataConfig: installs the `kata-remote` runtime class on the selected nodes.
    Create(CreateArgs),
}

/// Flags of `kataconfig create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// Its name.
    #[arg(long, default_value = DEFAULT_NAME)]
    pub(crate) name: String,
    /// Run pods of the runtime class in their own cloud VMs (`enablePeerPods`).
    #[arg(long)]
    pub(crate) peer_pods: bool,
    /// Only nodes with this label (`key=value`; repeat for several, all must match).
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    pub(crate) selector: Vec<String>,
    /// Log level of the runtime on the nodes.
    #[arg(long, default_value = "info")]
    pub(crate) log_level: String,
    /// Only nodes Node Feature Discovery marked able to run Kata.
    #[arg(long)]
    pub(crate) check_node_eligibility: bool,
    /// Which containerd shim serves the runtime class on the nodes (`spec.shim`): kata's
    /// where the node has one, else sandboxd's (`auto`); `kata`; or `sandboxd`.
    #[arg(long, value_parser = ["auto", "kata", "sandboxd"], default_value = "auto")]
    pub(crate) shim: String,
}

/// The KataConfig these flags describe.
pub(crate) fn build(args: &CreateArgs) -> Result<KataConfig, Error> {
    if !["trace", "debug", "info", "warn", "error"].contains(&args.log_level.as_str()) {
        return Err(Error::LogLevel(args.log_level.clone()));
    }
    let mut labels = BTreeMap::new();
    for s in &args.selector {
        let (k, v) = s
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| Error::Selector(s.clone()))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    let selector = (!labels.is_empty()).then(|| LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    });
    Ok(KataConfig::new(
        &args.name,
        KataConfigSpec {
            kata_config_pool_selector: selector,
            check_node_eligibility: args.check_node_eligibility,
            log_level: args.log_level.clone(),
            enable_peer_pods: args.peer_pods,
            shim: args.shim.clone(),
        },
    ))
}

/// Run `ctl kataconfig ...`.
pub(crate) async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<()> {
    let Command::Create(args) = cmd;
    let kc = build(&args)?;
    let client = ctx.client().await?;
    let api: Api<KataConfig> = Api::all(client);
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            if let Some(existing) = list.items.first() {
                return Err(Error::Exists(existing.name_any()).into());
            }
        }
        Err(e) if is_not_found(&e) => return Err(Error::NotInstalled.into()),
        Err(e) => return Err(Error::Api(e).into()),
    }
    let created = api
        .create(&PostParams::default(), &kc)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => Error::Exists(args.name.clone()),
            e if is_not_found(&e) => Error::NotInstalled,
            e => Error::Api(e),
        })?;
    if let Some(text) = output::structured(ctx.output, &created)? {
        print!("{text}");
        return Ok(());
    }
    println!("kataconfig {} created", created.name_any());
    println!(
        "the operator now installs kata-remote on the selected nodes; follow it with `sandboxd ctl status --watch`"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(selector: &[&str], level: &str) -> CreateArgs {
        CreateArgs {
            name: DEFAULT_NAME.into(),
            peer_pods: true,
            selector: selector.iter().map(|s| s.to_string()).collect(),
            log_level: level.into(),
            check_node_eligibility: false,
            shim: "auto".into(),
        }
    }

    #[test]
    fn selectors_become_match_labels() {
        let kc = build(&args(&["a=b", "kata="], "debug")).unwrap();
        let labels = kc
            .spec
            .kata_config_pool_selector
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(labels["a"], "b");
        assert_eq!(labels["kata"], "");
        assert!(kc.spec.enable_peer_pods);
        assert_eq!(kc.spec.log_level, "debug");
    }

    #[test]
    fn bad_selector_and_level_are_refused() {
        assert!(matches!(
            build(&args(&["novalue"], "info")),
            Err(Error::Selector(_))
        ));
        assert!(matches!(
            build(&args(&["=x"], "info")),
            Err(Error::Selector(_))
        ));
        assert!(matches!(build(&args(&[], "loud")), Err(Error::LogLevel(_))));
    }

    #[test]
    fn no_selector_means_all_workers() {
        assert!(
            build(&args(&[], "info"))
                .unwrap()
                .spec
                .kata_config_pool_selector
                .is_none()
        );
    }
}
