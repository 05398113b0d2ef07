//! `ctl status` and `ctl vm list`: what they show from real objects, `--watch` until done,
//! and the non-zero exit on failure or without an operator.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sandboxd::api::kataconfig::{KataConfig, KataConfigSpec};
use sandboxd::api::peerpod::{PeerPod, PeerPodSpec};
use sandboxd::api::peerpodconfig::{PeerPodConfig, PeerPodConfigSpec};
use serde_json::{Value, json};

use super::support::ctl;
use crate::harness::{self, Case, Env};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "ctl::status_shows_progress_vms_and_readiness_and_fails_on_failure",
            status,
        ),
        Case::cluster("ctl::vm_list_shows_peer_pod_vms_cluster_wide", vm_list),
    ]
}

async fn peerpod(client: &Client, ns: &str, name: &str, node: &str, ip: &str) -> Result<()> {
    let api: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &PeerPod::new(
            name,
            PeerPodSpec {
                cloud_provider: "azure".into(),
                vm_name: format!("podvm-{name}-0a1b2c3d"),
                node_name: node.into(),
                pod_uid: "00000000-0000-0000-0000-000000000001".into(),
                ..Default::default()
            },
        ),
    )
    .await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "vmIP": ip}})),
    )
    .await?;
    Ok(())
}

async fn set_kc_status(
    api: &Api<KataConfig>,
    name: &str,
    installed: &[&str],
    installing: &[&str],
    failed: &[&str],
    in_progress: &str,
) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)?
        .to_string();
    let total = installed.len() + installing.len() + failed.len();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "kataNodes": {
                "nodeCount": total,
                "readyNodeCount": installed.len(),
                "installed": installed,
                "installing": installing,
                "failedToInstall": failed,
            },
            "conditions": [{
                "type": "InProgress", "status": in_progress,
                "reason": if in_progress == "True" { "Installing" } else { "" },
                "message": "", "lastTransitionTime": now,
            }],
        }})),
    )
    .await?;
    Ok(())
}

async fn status(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    ctl(&env, &env.ns, &["status"])
        .await?
        .fails_with(&["operator is not installed", "sandboxd ctl install"])?;
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), &env.ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "sandboxd-operator"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "op"}},
            "template": {"metadata": {"labels": {"app": "op"}},
                         "spec": {"containers": [{"name": "operator", "image": "sandboxd:latest"}]}},
        },
    }))?;
    deploys.create(&PostParams::default(), &d).await?;
    let ppcs: Api<PeerPodConfig> = Api::namespaced(admin.clone(), &env.ns);
    let mut spec: PeerPodConfigSpec = serde_json::from_value(json!({}))?;
    spec.limit = "4".into();
    ppcs.create(
        &PostParams::default(),
        &PeerPodConfig::new("peerpodconfig-openshift", spec),
    )
    .await?;
    let (a, b) = (env.unique("ctl-status-a"), env.unique("ctl-status-b"));
    for n in [&a, &b] {
        harness::fake_node(
            &admin,
            n,
            &[("node-role.kubernetes.io/kata-oc", "")],
            &[("kata.peerpods.io/vm", "4")],
        )
        .await?;
    }
    peerpod(&admin, &env.ns, "status-pod", &a, "10.1.0.5").await?;
    let kcs: Api<KataConfig> = Api::all(admin.clone());
    let kc_name = env.unique("ctl-status");
    let mut kc = KataConfig::new(
        &kc_name,
        KataConfigSpec {
            log_level: "info".into(),
            ..Default::default()
        },
    );
    kc.spec.enable_peer_pods = true;
    kcs.create(&PostParams::default(), &kc).await?;
    let result = async {
        set_kc_status(&kcs, &kc_name, &[&a], &[&b], &[], "True").await?;
        let out = ctl(&env, &env.ns, &["status", "-o", "json"]).await?.ok()?;
        let report: Value = serde_json::from_str(&out.stdout).context(out.all())?;
        ensure!(report["kataconfig"]["readyNodeCount"] == 1, "{report}");
        ensure!(report["kataconfig"]["inProgress"] == true, "{report}");
        ensure!(report["limit"] == "4", "{report}");
        ensure!(
            report["operator"] == json!({"ready": 0, "want": 1}),
            "{report}"
        );
        let vms = report["vms"].as_array().context("vms")?;
        ensure!(
            vms.iter()
                .any(|v| v["node"] == a.as_str() && v["used"] == 1 && v["limit"] == "4"),
            "{report}"
        );
        ensure!(
            vms.iter()
                .any(|v| v["node"] == b.as_str() && v["used"] == 0),
            "{report}"
        );
        let out = ctl(&env, &env.ns, &["status"]).await?.ok()?;
        ensure!(
            out.stdout.contains("[##########----------] 1/2"),
            "{}",
            out.all()
        );
        ensure!(
            out.stdout.contains(b.as_str()) && out.stdout.contains("installing"),
            "{}",
            out.all()
        );

        // --watch returns once the install completes.
        let watcher = {
            let env_ns = env.ns.clone();
            let env = Env {
                name: env.name.clone(),
                cp: env.cp,
                ns: env_ns.clone(),
                node: None,
            };
            tokio::spawn(async move {
                ctl(
                    &env,
                    &env_ns,
                    &["status", "--watch", "--interval", "1", "--timeout", "60"],
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(!watcher.is_finished(), "--watch returned while in progress");
        set_kc_status(&kcs, &kc_name, &[&a, &b], &[], &[], "False").await?;
        let out = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await???
            .ok()?;
        ensure!(out.stdout.contains("] 2/2"), "{}", out.all());

        // A node that failed makes status fail, naming it.
        set_kc_status(&kcs, &kc_name, &[&a], &[], &[&b], "False").await?;
        ctl(&env, &env.ns, &["status"])
            .await?
            .fails_with(&[&b, "failedToInstall"])?;
        Ok(())
    }
    .await;
    let _ = kcs.delete(&kc_name, &DeleteParams::default()).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in [&a, &b] {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
    }
    result
}

async fn vm_list(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/crds/peerpods.confidentialcontainers.org.yaml");
    harness::install_crds(&admin, &crd).await?;
    let node = env.unique("ctl-vm-node");
    peerpod(&admin, &env.ns, "web-1", &node, "10.2.0.7").await?;
    peerpod(&admin, &env.ns, "web-2", &node, "10.2.0.8").await?;
    // Cluster-wide: -n does not narrow it.
    let out = ctl(&env, "default", &["vm", "list"]).await?.ok()?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("podvm-web-1-0a1b2c3d"))
        .with_context(|| out.all())?;
    for field in [
        env.ns.as_str(),
        "web-1",
        node.as_str(),
        "10.2.0.7",
        "Running",
    ] {
        ensure!(line.contains(field), "{field} missing from {line:?}");
    }
    ensure!(out.stdout.starts_with("NAMESPACE"), "{}", out.all());
    let out = ctl(&env, "default", &["vm", "list", "-o", "json"])
        .await?
        .ok()?;
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).context(out.all())?;
    let mine: Vec<&Value> = rows
        .iter()
        .filter(|r| r["namespace"] == env.ns.as_str())
        .collect();
    ensure!(mine.len() == 2, "{rows:?}");
    ensure!(mine[1]["ip"] == "10.2.0.8" && mine[1]["node"] == node.as_str());
    Ok(())
}
