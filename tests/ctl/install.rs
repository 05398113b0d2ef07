//! `ctl install` / `ctl uninstall` against the control plane: what is applied, `--wait`
//! (with the test acting as kubelet), the refusal while a KataConfig exists, and the
//! refusal next to an OLM install of OpenShift sandboxed containers.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use sandboxd::api::kataconfig::{KataConfig, KataConfigSpec};
use serde_json::json;

use super::support::ctl;
use crate::harness::{self, Case, Env, Phase, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "ctl::install_applies_the_overlay_waits_for_the_operator_and_uninstall_removes_it",
            install_wait_uninstall,
        ),
        Case::cluster_exclusive(
            "ctl::install_wait_times_out_with_progress_when_no_pod_becomes_ready",
            wait_times_out,
        ),
        Case::cluster_exclusive(
            "ctl::install_refuses_next_to_an_olm_install_of_sandboxed_containers",
            refuses_olm_install,
        ),
    ]
}

/// Acts as the kubelet for the operator's pods in `ns` until `stop` flips.
async fn kubelet_for_operator_pods(client: Client, ns: String) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    loop {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=sandboxd-operator"))
            .await?;
        for p in list.items {
            let scheduled = p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some();
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if scheduled && !running {
                harness::set_pod_phase(
                    &client,
                    &ns,
                    &p.name_any(),
                    Phase::Running,
                    Some("10.9.0.2"),
                )
                .await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn install_wait_uninstall(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let node = env.unique("ctl-install-node");
    harness::fake_node(&admin, &node, &[], &[]).await?;
    let kubelet = tokio::spawn(kubelet_for_operator_pods(admin.clone(), env.ns.clone()));
    let result = async {
        let out = ctl(
            &env,
            &env.ns,
            &[
                "install",
                "--vanilla",
                "--wait",
                "--timeout",
                "90",
                "--image",
                "example.test/sandboxd:9",
            ],
        )
        .await?
        .ok()?;
        ensure!(
            out.stdout.contains("operator available (2/2"),
            "{}",
            out.all()
        );
        ensure!(
            out.stderr.contains("waiting for the operator"),
            "{}",
            out.all()
        );

        // What the vanilla overlay says, in the namespace asked for, with the image asked for.
        let deploys: Api<Deployment> = Api::namespaced(admin.clone(), &env.ns);
        let d = deploys.get("sandboxd-operator").await?;
        let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
        ensure!(
            c.args.as_deref()
                == Some(&["operator".to_string(), "--platform=kubernetes".to_string()][..]),
            "{:?}",
            c.args
        );
        ensure!(c.image.as_deref() == Some("example.test/sandboxd:9"));
        let ns: Namespace = Api::all(admin.clone()).get(&env.ns).await?;
        ensure!(
            ns.labels()
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str)
                == Some("privileged"),
            "{:?}",
            ns.labels()
        );
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), &env.ns);
        for sa in [
            "sandboxd-operator",
            "sandboxd-caa",
            "sandboxd-node-installer",
        ] {
            sas.get(sa)
                .await
                .with_context(|| format!("ServiceAccount {sa}"))?;
        }
        let crb: ClusterRoleBinding = Api::all(admin.clone()).get("sandboxd-operator").await?;
        ensure!(crb.subjects.unwrap()[0].namespace.as_deref() == Some(env.ns.as_str()));
        // The operator's field manager owns it: a second install is a no-op apply.
        ctl(&env, &env.ns, &["install", "--vanilla"]).await?.ok()?;

        // Uninstall is refused while a KataConfig exists, and says what to do.
        let kcs: Api<KataConfig> = Api::all(admin.clone());
        let kc_name = env.unique("ctl-uninstall-block");
        kcs.create(
            &PostParams::default(),
            &KataConfig::new(
                &kc_name,
                KataConfigSpec {
                    log_level: "info".into(),
                    ..Default::default()
                },
            ),
        )
        .await?;
        let refused = ctl(&env, &env.ns, &["uninstall", "--keep-crds"]).await?;
        let _ = kcs.delete(&kc_name, &DeleteParams::default()).await;
        refused.fails_with(&[&kc_name, "kubectl delete kataconfig"])?;
        deploys
            .get("sandboxd-operator")
            .await
            .context("refused uninstall deleted")?;
        eventually("KataConfig gone", Duration::from_secs(30), || async {
            Ok(kcs.get_opt(&kc_name).await?.is_none().then_some(()))
        })
        .await?;

        let out = ctl(
            &env,
            &env.ns,
            &["uninstall", "--keep-crds", "--keep-namespace"],
        )
        .await?
        .ok()?;
        ensure!(out.stdout.contains("deleted Deployment"), "{}", out.all());
        ensure!(deploys.get_opt("sandboxd-operator").await?.is_none());
        let crbs: Api<ClusterRoleBinding> = Api::all(admin.clone());
        ensure!(crbs.get_opt("sandboxd-operator").await?.is_none());
        let roles: Api<Role> = Api::namespaced(admin.clone(), &env.ns);
        ensure!(roles.list(&ListParams::default()).await?.items.is_empty());
        // The CRDs stayed (--keep-crds).
        let _: Vec<KataConfig> = kcs.list(&ListParams::default()).await?.items;
        Ok(())
    }
    .await;
    kubelet.abort();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    let _ = nodes.delete(&node, &DeleteParams::default()).await;
    result
}

async fn wait_times_out(env: Env) -> Result<()> {
    // No node, no kubelet: the operator's pods never become ready.
    let out = ctl(
        &env,
        &env.ns,
        &["install", "--vanilla", "--wait", "--timeout", "2"],
    )
    .await?
    .fails_with(&[
        "not available after 2s",
        "0/2 replicas ready",
        "describe deployment",
    ])?;
    ensure!(
        out.stderr.contains("] 0/2"),
        "no progress bar:\n{}",
        out.all()
    );
    ctl(
        &env,
        &env.ns,
        &["uninstall", "--keep-crds", "--keep-namespace"],
    )
    .await?
    .ok()?;
    Ok(())
}

fn olm(client: &Client, kind: &str, plural: &str, ns: &str) -> Api<DynamicObject> {
    harness::dynamic_api(
        client,
        &GroupVersionKind::gvk("operators.coreos.com", "v1alpha1", kind),
        plural,
        Some(ns),
    )
}

pub(crate) async fn install_olm_crds(client: &Client) -> Result<()> {
    let file = harness::fixture_crds()
        .into_iter()
        .find(|p| p.ends_with("operators.coreos.com.yaml"))
        .context("the OLM stand-in CRDs")?;
    harness::install_crds(client, &file).await?;
    Ok(())
}

async fn refuses_olm_install(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    install_olm_crds(&admin).await?;
    let subs = olm(&admin, "Subscription", "subscriptions", &env.ns);
    let sub: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "Subscription",
        "metadata": {"name": "openshift-sandboxed-containers-operator"},
        "spec": {
            "channel": "stable",
            "installPlanApproval": "Automatic",
            "name": "sandboxed-containers-operator",
            "source": "redhat-operators",
            "sourceNamespace": "openshift-marketplace",
        }
    }))?;
    subs.create(&PostParams::default(), &sub).await?;
    let result = async {
        let out = ctl(&env, &env.ns, &["install", "--vanilla"]).await?;
        out.fails_with(&[
            &format!(
                "Subscription {}/openshift-sandboxed-containers-operator",
                env.ns
            ),
            "oc delete subscription",
        ])?;
        let deploys: Api<Deployment> = Api::namespaced(admin.clone(), &env.ns);
        ensure!(
            deploys.get_opt("sandboxd-operator").await?.is_none(),
            "installed despite the OLM install"
        );
        Ok(())
    }
    .await;
    let _ = subs
        .delete(
            "openshift-sandboxed-containers-operator",
            &DeleteParams::default(),
        )
        .await;
    result
}
