//! `ctl kataconfig create`: the seed's KataConfig from flags; one only; bad flags.

use anyhow::{Result, ensure};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use sandboxd::api::kataconfig::KataConfig;

use super::support::ctl;
use crate::harness::{Case, Env};

pub fn cases() -> Vec<Case> {
    vec![Case::cluster_exclusive(
        "ctl::kataconfig_create_makes_the_seeds_kataconfig_and_only_one",
        create,
    )]
}

async fn create(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let kcs: Api<KataConfig> = Api::all(admin);
    ensure!(
        kcs.list(&ListParams::default()).await?.items.is_empty(),
        "a KataConfig was left behind: {:?}",
        kcs.list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|k| k.name_any())
            .collect::<Vec<_>>()
    );
    let name = env.unique("ctl-kc");
    ctl(
        &env,
        &env.ns,
        &["kataconfig", "create", "--name", &name, "--selector", "=x"],
    )
    .await?
    .fails_with(&["--selector", "key=value"])?;
    ctl(
        &env,
        &env.ns,
        &[
            "kataconfig",
            "create",
            "--name",
            &name,
            "--log-level",
            "loud",
        ],
    )
    .await?
    .fails_with(&["loud"])?;
    ensure!(kcs.get_opt(&name).await?.is_none());
    let result = async {
        let out = ctl(
            &env,
            &env.ns,
            &[
                "kataconfig",
                "create",
                "--name",
                &name,
                "--peer-pods",
                "--selector",
                "pool=kata",
                "--selector",
                "zone=a",
                "--log-level",
                "debug",
            ],
        )
        .await?
        .ok()?;
        ensure!(out.stdout.contains(&name), "{}", out.all());
        let kc = kcs.get(&name).await?;
        ensure!(kc.spec.enable_peer_pods);
        ensure!(kc.spec.log_level == "debug");
        let labels = kc
            .spec
            .kata_config_pool_selector
            .unwrap()
            .match_labels
            .unwrap();
        ensure!(
            labels["pool"] == "kata" && labels["zone"] == "a",
            "{labels:?}"
        );
        // Only one KataConfig may exist.
        ctl(
            &env,
            &env.ns,
            &["kataconfig", "create", "--name", "second-one"],
        )
        .await?
        .fails_with(&["already exists", &name])?;
        ensure!(kcs.get_opt("second-one").await?.is_none());
        Ok(())
    }
    .await;
    let _ = kcs.delete(&name, &DeleteParams::default()).await;
    result
}
