//! The OpenShift path: with the `machineconfiguration.openshift.io` API present (the
//! harness's stand-in CRDs), the operator installs through a MachineConfig and the `kata-oc`
//! MachineConfigPool instead of the installer DaemonSet. The test acts as the machine-config
//! operator: it writes the pool's status and the per-node annotations.
//!
//! The stand-in CRDs are cluster-wide, so this test runs alone (`cluster_exclusive`), and
//! leaves the cluster as it found it: it removes the CRDs again unless they were there
//! before. The other operator tests pin `Platform::Kubernetes`, so they do not depend on
//! whether another suite left the stand-ins installed.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Client, ResourceExt};
use sandboxd::api::names::*;
use sandboxd::operator::Platform;
use sandboxd::operator::machineconfig::*;
use serde_json::json;

use super::support::*;
use crate::harness::{self, Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![Case::cluster_exclusive(
        "operator::openshift_installs_through_machine_config_pool_and_uninstall_removes_it",
        openshift,
    )]
}

const CRDS: [&str; 2] = [
    "machineconfigs.machineconfiguration.openshift.io",
    "machineconfigpools.machineconfiguration.openshift.io",
];
const RENDERED: &str = "rendered-kata-oc-0f1e2d";
const WORKER: &str = "rendered-worker-9a8b7c";

async fn openshift(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let had = crds.get_opt(CRDS[1]).await?.is_some();
    let file = harness::fixture_crds()
        .into_iter()
        .find(|p| p.ends_with("machineconfiguration.openshift.io.yaml"))
        .context("the machineconfiguration stand-in CRDs")?;
    harness::install_crds(&admin, &file).await?;
    let result = install_and_uninstall(&env).await;
    let cleanup = if had {
        Ok(())
    } else {
        remove_crds(&admin).await
    };
    result.and(cleanup)
}

/// Deletes the stand-in CRDs and waits until the API group is gone from discovery, so the
/// cluster looks like plain Kubernetes again.
async fn remove_crds(admin: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in CRDS {
        let _ = crds.delete(name, &DeleteParams::default()).await;
    }
    eventually(
        "the machineconfiguration API to be gone",
        Duration::from_secs(60),
        || async {
            for name in CRDS {
                if crds.get_opt(name).await?.is_some() {
                    return Ok(None);
                }
            }
            let groups = admin.list_api_groups().await?;
            Ok((!groups.groups.iter().any(|g| g.name == GROUP)).then_some(()))
        },
    )
    .await
}

fn mcs(c: &Client) -> Api<DynamicObject> {
    Api::all_with(c.clone(), &machine_config_resource())
}

fn pools(c: &Client) -> Api<DynamicObject> {
    Api::all_with(c.clone(), &pool_resource())
}

/// The machine-config operator's report on a node.
async fn mco_node(
    f: &Fixture,
    node: &str,
    current: &str,
    desired: &str,
    state: &str,
) -> Result<()> {
    let reason = if state == "Degraded" {
        "failed to apply /etc/crio/crio.conf.d: read-only file system"
    } else {
        ""
    };
    f.node_api()
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                ANN_MCO_CURRENT: current, ANN_MCO_DESIRED: desired,
                ANN_MCO_STATE: state, ANN_MCO_REASON: reason,
            }}})),
        )
        .await?;
    Ok(())
}

/// The machine-config operator's report on the pool.
async fn mco_pool(
    f: &Fixture,
    machines: i64,
    updated: i64,
    degraded: i64,
    degraded_message: &str,
) -> Result<()> {
    let conditions = if degraded > 0 {
        json!([{"type": "NodeDegraded", "status": "True", "message": degraded_message}])
    } else {
        json!([{"type": "Updated", "status": if updated == machines {"True"} else {"False"}}])
    };
    pools(&f.admin)
        .patch_status(
            POOL,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "configuration": {"name": RENDERED, "source": [
                    {"kind": "MachineConfig", "name": "00-worker"},
                    {"kind": "MachineConfig", "name": MACHINE_CONFIG},
                ]},
                "machineCount": machines, "updatedMachineCount": updated,
                "readyMachineCount": updated - degraded, "degradedMachineCount": degraded,
                "unavailableMachineCount": machines - updated + degraded,
                "conditions": conditions,
            }})),
        )
        .await?;
    Ok(())
}

async fn install_and_uninstall(env: &Env) -> Result<()> {
    let mut f = Fixture::new(env).await?;
    for name in [MACHINE_CONFIG] {
        let _ = mcs(&f.admin).delete(name, &DeleteParams::default()).await;
    }
    let _ = pools(&f.admin).delete(POOL, &DeleteParams::default()).await;
    let a = f.node("oc-a", true).await?;
    let b = f.node("oc-b", true).await?;
    let other = f.node("oc-plain", false).await?;
    // Detection from the API, as deployed.
    let op = f.start_on(Platform::Auto);
    let name = env.unique("kc");
    let mut kc = f.kataconfig(&name);
    kc.spec.log_level = "debug".into();
    f.create(&kc).await?;

    // The MachineConfig and the pool appear; nodes get the kata label only.
    let mc = eventually("the MachineConfig", WAIT, || async {
        Ok(mcs(&f.admin).get_opt(MACHINE_CONFIG).await?)
    })
    .await?;
    ensure!(mc.labels().get(ROLE_LABEL).map(String::as_str) == Some(POOL));
    ensure!(mc.data["spec"]["extensions"][0] == EXTENSION);
    let files: Vec<&str> = mc.data["spec"]["config"]["storage"]["files"]
        .as_array()
        .context("files")?
        .iter()
        .filter_map(|x| x["path"].as_str())
        .collect();
    ensure!(
        files.contains(&"/etc/crio/crio.conf.d/50-sandboxd-kata-remote.conf")
            && files.contains(&"/etc/sandboxd/configuration-remote.toml"),
        "{files:?}"
    );
    let kata_file = &mc.data["spec"]["config"]["storage"]["files"][1]["contents"]["source"];
    let b64 = kata_file
        .as_str()
        .and_then(|s| s.split_once("base64,"))
        .context("data URL")?
        .1;
    use base64::Engine;
    let kata_toml = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64)?)?;
    ensure!(
        kata_toml.contains("enable_debug = true"),
        "logLevel debug must turn on the runtime's debug output"
    );
    let pool = eventually("the MachineConfigPool", WAIT, || async {
        Ok(pools(&f.admin).get_opt(POOL).await?)
    })
    .await?;
    ensure!(pool.data["spec"]["nodeSelector"]["matchLabels"][LABEL_KATA] == "");
    for n in [&a, &b] {
        f.wait_node(n, "kata label", |l| {
            l.get(LABEL_KATA).map(String::as_str) == Some("")
        })
        .await?;
    }
    for n in [&a, &b, &other] {
        let l = f.node_api().get(n).await?.labels().clone();
        ensure!(
            !l.contains_key(LABEL_NODE_INSTALL),
            "{n} got the installer label on OpenShift"
        );
    }
    ensure!(
        f.node_api()
            .get(&other)
            .await?
            .labels()
            .get(LABEL_KATA)
            .is_none()
    );
    let dss: Api<DaemonSet> = Api::namespaced(f.admin.clone(), &f.ns);
    ensure!(
        dss.get_opt(INSTALLER_DAEMONSET).await?.is_none(),
        "the installer DaemonSet was created on OpenShift"
    );
    let kc = f
        .wait_status(&name, "waiting for the pool to render", |kc| {
            kata_nodes(kc).waiting_to_install.len() == 2
                && in_progress(kc).is_some_and(|(s, r, m)| {
                    s == "True" && r == "Installing" && m.contains("render pool kata-oc")
                })
        })
        .await?;
    ensure!(kata_nodes(&kc).node_count == 2);

    // The MCO renders the pool and starts updating both nodes.
    mco_pool(&f, 2, 0, 0, "").await?;
    mco_node(&f, &a, WORKER, RENDERED, "Working").await?;
    mco_node(&f, &b, WORKER, RENDERED, "Working").await?;
    f.wait_status(&name, "both installing", |kc| {
        sorted(&kata_nodes(kc).installing) == sorted(&[a.clone(), b.clone()])
    })
    .await?;

    // a is done; b is degraded.
    mco_node(&f, &a, RENDERED, RENDERED, "Done").await?;
    mco_node(&f, &b, WORKER, RENDERED, "Degraded").await?;
    mco_pool(&f, 2, 1, 1, "Node oc-b is reporting: read-only file system").await?;
    let kc = f
        .wait_status(&name, "a installed, b failed", |kc| {
            let k = kata_nodes(kc);
            k.installed == [a.clone()] && k.failed_to_install == [b.clone()]
        })
        .await?;
    let (st, reason, msg) = in_progress(&kc).unwrap();
    ensure!(
        st == "False" && reason == "Failed" && msg.contains(&b) && msg.contains("read-only"),
        "{st} {reason} {msg}"
    );

    // b recovers; the pool is fully updated.
    mco_node(&f, &b, RENDERED, RENDERED, "Done").await?;
    mco_pool(&f, 2, 1, 0, "").await?;
    let kc = f
        .wait_status(&name, "both installed, pool still rolling", |kc| {
            kata_nodes(kc).ready_node_count == 2
        })
        .await?;
    let (st, _, msg) = in_progress(&kc).unwrap();
    ensure!(
        st == "True" && msg.contains("1 of 2 machine(s) updated"),
        "the pool's own count must gate completion: {st} {msg}"
    );
    mco_pool(&f, 2, 2, 0, "").await?;
    f.wait_status(&name, "done", |kc| {
        in_progress(kc).is_some_and(|(s, r, _)| s == "False" && r.is_empty())
    })
    .await?;
    // The runtime class exists as on Kubernetes.
    let rcs: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(f.admin.clone());
    ensure!(rcs.get_opt(RUNTIME_CLASS).await?.is_some());

    // Uninstall: nodes leave the pool; the MachineConfig and the pool stay until the MCO
    // has moved every machine back to the worker pool.
    f.kcs().delete(&name, &DeleteParams::default()).await?;
    for n in [&a, &b] {
        f.wait_node(n, "kata label removed", |l| !l.contains_key(LABEL_KATA))
            .await?;
    }
    let kc = f
        .wait_status(&name, "uninstalling, waiting for the MCO", |kc| {
            sorted(&kata_nodes(kc).uninstalling) == sorted(&[a.clone(), b.clone()])
        })
        .await?;
    ensure!(in_progress(&kc).unwrap().1 == "Uninstalling");
    ensure!(mcs(&f.admin).get_opt(MACHINE_CONFIG).await?.is_some());
    ensure!(pools(&f.admin).get_opt(POOL).await?.is_some());
    mco_node(&f, &a, WORKER, WORKER, "Done").await?;
    mco_node(&f, &b, WORKER, WORKER, "Done").await?;
    f.wait_status(&name, "nodes back, pool not yet empty", |kc| {
        kata_nodes(kc).uninstalling.is_empty()
            && in_progress(kc).is_some_and(|(_, _, m)| m.contains("move 2 machine(s) out of pool"))
    })
    .await?;
    ensure!(
        mcs(&f.admin).get_opt(MACHINE_CONFIG).await?.is_some(),
        "the MachineConfig went before the pool was empty"
    );
    pools(&f.admin)
        .patch_status(
            POOL,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"machineCount": 0, "updatedMachineCount": 0,
                                            "readyMachineCount": 0}}),
            ),
        )
        .await?;
    eventually("the KataConfig gone", WAIT, || async {
        Ok(f.kcs().get_opt(&name).await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        mcs(&f.admin).get_opt(MACHINE_CONFIG).await?.is_none(),
        "MachineConfig left"
    );
    eventually("the pool gone", WAIT, || async {
        Ok(pools(&f.admin).get_opt(POOL).await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        rcs.get_opt(RUNTIME_CLASS).await?.is_none(),
        "RuntimeClass left"
    );
    for n in [&a, &b] {
        let node = f.node_api().get(n).await?;
        ensure!(
            !node.labels().contains_key(LABEL_KATA) && !node.annotations().contains_key(ANN_STATE),
            "{n} still carries the operator's marks"
        );
    }
    op.stop().await?;
    f.teardown().await.map_err(|e| anyhow!("{e:#}"))
}
