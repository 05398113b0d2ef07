//! Install, progress, selector changes, uninstall, singleton, restarts, steady state.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Resource, ResourceExt};
use sandboxd::api::names::*;
use sandboxd::operator::admission;
use serde_json::json;

use super::support::*;
use super::writes::Writes;
use crate::harness::{Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "operator::install_labels_selected_nodes_and_status_follows_installer_reports",
            install_and_progress,
        ),
        Case::cluster_exclusive(
            "operator::selector_change_adds_and_removes_nodes_and_waits_for_peer_pods",
            selector_change,
        ),
        Case::cluster_exclusive(
            "operator::delete_blocked_by_kata_pod_names_it_then_cleans_everything",
            delete_blocked_then_clean,
        ),
        Case::cluster_exclusive("operator::second_kataconfig_is_refused", second_refused),
        Case::cluster_exclusive(
            "operator::node_deleted_mid_install_does_not_block_install_or_uninstall",
            node_deleted_mid_install,
        ),
        Case::cluster_exclusive(
            "operator::restart_mid_install_converges_without_duplicates",
            restart_mid_install,
        ),
    ]
}

fn kata_pod(name: &str, node: Option<&str>) -> Result<Pod> {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {
            "runtimeClassName": RUNTIME_CLASS,
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
        }
    });
    if let Some(n) = node {
        v["spec"]["nodeName"] = json!(n);
    }
    Ok(serde_json::from_value(v)?)
}

async fn delete_pod_now(f: &Fixture, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(f.admin.clone(), &f.ns);
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await?;
    eventually("pod gone", WAIT, || async {
        Ok(pods.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

fn has_kata_labels(l: &BTreeMap<String, String>) -> bool {
    l.get(LABEL_KATA).map(String::as_str) == Some("")
        && l.get(LABEL_NODE_INSTALL).map(String::as_str) == Some(INSTALL)
}

fn has_none_of_ours(l: &BTreeMap<String, String>) -> bool {
    !l.contains_key(LABEL_KATA) && !l.contains_key(LABEL_NODE_INSTALL)
}

async fn install_and_progress(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    let a = f.node("kata-a", true).await?;
    let b = f.node("kata-b", true).await?;
    let c = f.node("kata-c", true).await?;
    let other = f.node("plain", false).await?;
    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;

    for n in [&a, &b, &c] {
        f.wait_node(n, "kata labels on selected node", has_kata_labels)
            .await?;
    }
    let rcs: Api<RuntimeClass> = Api::all(f.admin.clone());
    let rc = rcs.get(RUNTIME_CLASS).await?;
    ensure!(rc.handler == RUNTIME_CLASS);
    let overhead = rc.overhead.clone().unwrap().pod_fixed.unwrap();
    ensure!(overhead["cpu"].0 == "250m" && overhead["memory"].0 == "350Mi");
    ensure!(rc.scheduling.clone().unwrap().node_selector.unwrap()[LABEL_KATA].is_empty());
    let kc = f.kcs().get(&name).await?;
    ensure!(
        rc.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == kc.meta().uid.as_ref()),
        "RuntimeClass not owned by the KataConfig"
    );
    let dss: Api<DaemonSet> = Api::namespaced(f.admin.clone(), &f.ns);
    let ds = dss.get(INSTALLER_DAEMONSET).await?;
    let container = &ds.spec.unwrap().template.spec.unwrap().containers[0];
    ensure!(container.image.as_deref() == Some("sandboxd:latest"));
    ensure!(container.args.clone().unwrap() == ["operator", "node-install"]);

    let kc = f
        .wait_status(&name, "three nodes waiting", |kc| {
            kata_nodes(kc).waiting_to_install.len() == 3
        })
        .await?;
    let (st, reason, _) = in_progress(&kc).unwrap();
    ensure!(
        (st.as_str(), reason.as_str()) == ("True", "Installing"),
        "{st} {reason}"
    );
    ensure!(kata_nodes(&kc).node_count == 3);
    ensure!(kc.status.as_ref().unwrap().observed_generation == kc.metadata.generation);
    ensure!(
        f.node_api()
            .get(&other)
            .await?
            .labels()
            .get(LABEL_KATA)
            .is_none()
    );

    // The installer reports node by node.
    f.report(&a, STATE_INSTALLING, None).await?;
    f.wait_status(&name, "a installing", |kc| {
        kata_nodes(kc).installing == [a.clone()]
    })
    .await?;
    f.report(&a, STATE_INSTALLED, None).await?;
    f.report(
        &b,
        STATE_FAILED,
        Some("kata shim containerd-shim-kata-v2 not found"),
    )
    .await?;
    let kc = f
        .wait_status(&name, "a installed, b failed", |kc| {
            let k = kata_nodes(kc);
            k.installed == [a.clone()] && k.failed_to_install == [b.clone()]
        })
        .await?;
    ensure!(kata_nodes(&kc).ready_node_count == 1);
    let (_, _, msg) = in_progress(&kc).unwrap();
    ensure!(msg.contains(&b) && msg.contains("not found"), "{msg}");

    f.report(&b, STATE_INSTALLED, None).await?;
    f.report(&c, STATE_INSTALLED, None).await?;
    let kc = f
        .wait_status(&name, "all installed, InProgress False", |kc| {
            kata_nodes(kc).ready_node_count == 3
                && in_progress(kc).is_some_and(|(s, r, _)| s == "False" && r.is_empty())
        })
        .await?;
    ensure!(sorted(&kata_nodes(&kc).installed) == sorted(&[a.clone(), b.clone(), c.clone()]));
    ensure!(kc.status.as_ref().unwrap().runtime_classes == [RUNTIME_CLASS]);

    // Steady state: for a minute nothing is written but the Lease (which is not watched),
    // while the operator keeps reconciling what it watches.
    let writes = Writes::start(&f.admin, &f.ns).await?;
    let passes = op.metrics.reconcile_count("ok");
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Events the operator must look at and leave alone: a peer pod comes and goes, a
    // node it does not select changes.
    let pods: Api<Pod> = Api::namespaced(f.admin.clone(), &f.ns);
    let mut peer = kata_pod("steady-peer", None)?;
    peer.labels_mut()
        .insert(PEER_POD_LABEL.into(), "true".into());
    peer.spec.as_mut().unwrap().runtime_class_name = None;
    pods.create(&PostParams::default(), &peer).await?;
    f.node_api()
        .patch(
            &other,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"unrelated": "x"}}})),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    delete_pod_now(&f, "steady-peer").await?;
    tokio::time::sleep(Duration::from_secs(28)).await;
    let mut seen = writes.take();
    // The watch sees writes: the test's own change to the unselected node is there.
    let own = format!("Node/{other}");
    ensure!(
        seen.contains(&own),
        "the write watch missed {own}: {seen:?}"
    );
    seen.retain(|w| *w != own);
    ensure!(seen.is_empty(), "writes at steady state: {seen:?}");
    ensure!(
        op.metrics.reconcile_count("ok") > passes,
        "the operator did not reconcile during the steady-state minute"
    );

    // Uninstall.
    f.kcs().delete(&name, &DeleteParams::default()).await?;
    f.uninstall_as_installer(&name).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}

async fn selector_change(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    let a = f.node("sel-a", true).await?;
    let b = f.node("sel-b", false).await?;
    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;
    f.wait_node(&a, "a labelled", has_kata_labels).await?;
    f.report(&a, STATE_INSTALLED, None).await?;
    f.wait_status(&name, "a installed", |kc| {
        kata_nodes(kc).installed == [a.clone()]
    })
    .await?;

    // b joins the pool.
    let nodes = f.node_api();
    nodes
        .patch(
            &b,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {f.pool_key.clone(): "kata"}}})),
        )
        .await?;
    f.wait_node(&b, "b labelled", has_kata_labels).await?;
    let kc = f
        .wait_status(&name, "b waiting, update", |kc| {
            kata_nodes(kc).waiting_to_install == [b.clone()]
        })
        .await?;
    ensure!(in_progress(&kc).unwrap().1 == "Updating");
    f.report(&b, STATE_INSTALLED, None).await?;

    // a leaves the pool while a peer pod runs on it: it keeps the runtime.
    let pods: Api<Pod> = Api::namespaced(f.admin.clone(), &f.ns);
    pods.create(&PostParams::default(), &kata_pod("peer", Some(&a))?)
        .await?;
    nodes
        .patch(
            &a,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {f.pool_key.clone(): "gone"}}})),
        )
        .await?;
    let kc = f
        .wait_status(&name, "a waits for its pod", |kc| {
            kata_nodes(kc).waiting_to_uninstall == [a.clone()]
        })
        .await?;
    let (_, _, msg) = in_progress(&kc).unwrap();
    ensure!(msg.contains(&format!("{}/peer", f.ns)), "{msg}");
    ensure!(
        has_kata_labels(nodes.get(&a).await?.labels()),
        "a lost its labels under a pod"
    );

    delete_pod_now(&f, "peer").await?;
    f.wait_node(&a, "a told to uninstall", |l| {
        l.get(LABEL_NODE_INSTALL).map(String::as_str) == Some(UNINSTALL)
            && !l.contains_key(LABEL_KATA)
    })
    .await?;
    f.report(&a, STATE_UNINSTALLED, None).await?;
    f.wait_node(&a, "a clean", has_none_of_ours).await?;
    let kc = f
        .wait_status(&name, "only b, done", |kc| {
            let k = kata_nodes(kc);
            k.installed == [b.clone()]
                && k.node_count == 1
                && k.uninstalling.is_empty()
                && in_progress(kc).is_some_and(|(s, _, _)| s == "False")
        })
        .await?;
    ensure!(!kc.annotations().contains_key(ANN_STATE));

    f.kcs().delete(&name, &DeleteParams::default()).await?;
    f.uninstall_as_installer(&name).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}

async fn delete_blocked_then_clean(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    let a = f.node("del-a", true).await?;
    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;
    f.wait_node(&a, "a labelled", has_kata_labels).await?;
    f.report(&a, STATE_INSTALLED, None).await?;
    f.wait_status(&name, "installed", |kc| {
        kata_nodes(kc).ready_node_count == 1
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(f.admin.clone(), &f.ns);
    pods.create(&PostParams::default(), &kata_pod("workload", None)?)
        .await?;
    f.kcs().delete(&name, &DeleteParams::default()).await?;
    let kc = f
        .wait_status(&name, "blocked by the pod", |kc| {
            in_progress(kc).is_some_and(|(_, r, _)| r == "BlockedByExistingKataPods")
        })
        .await?;
    let (st, _, msg) = in_progress(&kc).unwrap();
    ensure!(st == "True");
    ensure!(msg.contains(&format!("{}/workload", f.ns)), "{msg}");
    // Nothing was taken away while blocked.
    ensure!(has_kata_labels(f.node_api().get(&a).await?.labels()));
    let rcs: Api<RuntimeClass> = Api::all(f.admin.clone());
    ensure!(rcs.get_opt(RUNTIME_CLASS).await?.is_some());

    delete_pod_now(&f, "workload").await?;
    f.uninstall_as_installer(&name).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}

async fn second_refused(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    f.node("one-a", true).await?;
    let op = f.start();
    let first = env.unique("kc");
    f.create(&f.kataconfig(&first)).await?;
    f.wait_status(&first, "first reconciled", |kc| kc.status.is_some())
        .await?;
    let second = env.unique("kc2");
    let err = eventually("the second KataConfig refused", WAIT, || async {
        match f.create(&f.kataconfig(&second)).await {
            Ok(_) => {
                // The policy's param cache was not warm yet: try again.
                let _ = f.kcs().delete(&second, &DeleteParams::default()).await;
                clear_second(&f, &second).await?;
                Err(anyhow!("second KataConfig was admitted"))
            }
            Err(e) => Ok(Some(e.to_string())),
        }
    })
    .await?;
    ensure!(err.contains("only one KataConfig may exist"), "{err}");
    ensure!(err.contains(&first), "{err}");

    // One that slips through (here: the binding is gone for a moment) is marked and ignored.
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(f.admin.clone());
    bindings
        .delete(KATACONFIG_SINGLETON, &DeleteParams::default())
        .await?;
    eventually(
        "the second KataConfig admitted without the binding",
        WAIT,
        || async { Ok(f.create(&f.kataconfig(&second)).await.ok().map(|_| ())) },
    )
    .await?;
    let kc = f
        .wait_status(&second, "second marked as ignored", |kc| {
            in_progress(kc)
                .is_some_and(|(s, r, m)| s == "False" && r == "Failed" && m.contains(&first))
        })
        .await?;
    ensure!(
        kc.finalizers().is_empty(),
        "an ignored KataConfig got a finalizer"
    );
    ensure!(kata_nodes(&f.kcs().get(&first).await?).node_count == 1);
    f.kcs().delete(&second, &DeleteParams::default()).await?;
    clear_second(&f, &second).await?;
    admission::ensure(&f.admin).await?;

    f.kcs().delete(&first, &DeleteParams::default()).await?;
    f.uninstall_as_installer(&first).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}

async fn clear_second(f: &Fixture, name: &str) -> Result<()> {
    let kcs = f.kcs();
    eventually("second KataConfig gone", WAIT, || async {
        Ok(kcs.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

async fn node_deleted_mid_install(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    let a = f.node("gone-a", true).await?;
    let b = f.node("gone-b", true).await?;
    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;
    f.wait_node(&a, "a labelled", has_kata_labels).await?;
    f.wait_node(&b, "b labelled", has_kata_labels).await?;
    f.report(&a, STATE_INSTALLED, None).await?;
    f.report(&b, STATE_INSTALLING, None).await?;
    f.wait_status(&name, "b installing", |kc| {
        kata_nodes(kc).installing == [b.clone()]
    })
    .await?;

    f.node_api().delete(&b, &DeleteParams::default()).await?;
    f.wait_status(&name, "done without b", |kc| {
        let k = kata_nodes(kc);
        k.node_count == 1
            && k.installed == [a.clone()]
            && in_progress(kc).is_some_and(|(s, r, _)| s == "False" && r.is_empty())
    })
    .await?;

    f.kcs().delete(&name, &DeleteParams::default()).await?;
    f.uninstall_as_installer(&name).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}

async fn restart_mid_install(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    let a = f.node("rs-a", true).await?;
    let b = f.node("rs-b", true).await?;
    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;
    f.wait_node(&a, "a labelled", has_kata_labels).await?;
    f.wait_node(&b, "b labelled", has_kata_labels).await?;
    f.wait_status(&name, "two waiting", |kc| {
        kata_nodes(kc).waiting_to_install.len() == 2
    })
    .await?;
    op.stop().await?;

    // While no operator runs, the installers finish.
    f.report(&a, STATE_INSTALLED, None).await?;
    f.report(&b, STATE_INSTALLED, None).await?;
    let rcs: Api<RuntimeClass> = Api::all(f.admin.clone());
    let rc_version = rcs.get(RUNTIME_CLASS).await?.resource_version();

    let op = f.start();
    let kc = f
        .wait_status(&name, "converged after restart", |kc| {
            kata_nodes(kc).ready_node_count == 2
                && in_progress(kc).is_some_and(|(s, _, _)| s == "False")
        })
        .await?;
    ensure!(
        kc.finalizers()
            .iter()
            .filter(|x| x.as_str() == sandboxd::api::kataconfig::FINALIZER)
            .count()
            == 1
    );
    ensure!(
        rcs.get(RUNTIME_CLASS).await?.resource_version() == rc_version,
        "the restarted operator rewrote an unchanged RuntimeClass"
    );
    let dss: Api<DaemonSet> = Api::namespaced(f.admin.clone(), &f.ns);
    let list = dss.list(&Default::default()).await?;
    ensure!(list.items.len() == 1, "{} DaemonSets", list.items.len());

    f.kcs().delete(&name, &DeleteParams::default()).await?;
    f.uninstall_as_installer(&name).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}
