//! Proves the harness: the real API server, controller manager and scheduler do what later
//! suites rely on.

use std::time::Duration;

use anyhow::{Result, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::harness::{self, Case, Env, Phase, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "smoke::crd_becomes_established_and_enforces_its_schema",
            crd_established,
        ),
        Case::cluster(
            "smoke::server_side_apply_and_status_subresource",
            ssa_and_status,
        ),
        Case::cluster("smoke::watch_delivers_events", watch_events),
        Case::cluster(
            "smoke::scheduler_binds_pod_by_extended_resource_capacity",
            scheduler_capacity,
        ),
        Case::cluster(
            "smoke::deleting_an_owner_garbage_collects_its_dependent",
            garbage_collection,
        ),
        Case::cluster(
            "smoke::service_account_client_is_refused_what_its_role_lacks",
            sa_rbac,
        ),
        Case::cluster(
            "smoke::daemonset_becomes_ready_when_the_kubelet_stand_in_runs_its_pod",
            daemonset_ready,
        ),
        Case::cluster(
            "smoke::stand_in_crds_for_openshift_and_olm_install",
            stand_in_crds,
        ),
    ]
}

/// A group per test: two CRDs may not share a kind within one group.
fn group_of(env: &Env) -> String {
    format!("{}.smoke.sandboxd.test", env.unique("g"))
}

fn widget_crd(group: &str, plural: &str) -> Result<CustomResourceDefinition> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "names": {"kind": "Widget", "plural": plural, "singular": plural.trim_end_matches('s')},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "required": ["size"],
                                 "properties": {"size": {"type": "integer", "minimum": 1}}},
                        "status": {"type": "object",
                                   "properties": {"phase": {"type": "string"}}}
                    }
                }}
            }]
        }
    }))?)
}

async fn widget_api(env: &Env, client: &Client) -> Result<kube::Api<kube::core::DynamicObject>> {
    // A CRD per test: cluster-scoped names must not collide between tests.
    let plural = "widgets";
    let group = group_of(env);
    let crd = widget_crd(&group, plural)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    harness::wait_crd_established(client, &crd.name_any()).await?;
    let gvk = GroupVersionKind::gvk(&group, "v1", "Widget");
    let api = harness::dynamic_api(client, &gvk, plural, Some(&env.ns));
    // Discovery of a new CRD takes a moment; wait until the API serves it.
    eventually(
        "the new CRD to be served",
        Duration::from_secs(20),
        || async { Ok(api.list(&ListParams::default()).await.ok().map(|_| ())) },
    )
    .await?;
    Ok(api)
}

async fn crd_established(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let api = widget_api(&env, &client).await?;
    let bad = serde_json::from_value(json!({
        "apiVersion": format!("{}/v1", group_of(&env)), "kind": "Widget",
        "metadata": {"name": "bad"}, "spec": {"size": 0}
    }))?;
    let err = api.create(&PostParams::default(), &bad).await.unwrap_err();
    ensure!(
        err.to_string().contains("spec.size"),
        "schema violation should name spec.size: {err}"
    );
    Ok(())
}

async fn ssa_and_status(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let api = widget_api(&env, &client).await?;
    let obj: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("{}/v1", group_of(&env)), "kind": "Widget",
        "metadata": {"name": "w"}, "spec": {"size": 2},
        "status": {"phase": "ignored-on-main-resource"}
    }))?;
    let pp = PatchParams::apply("sandboxd-test");
    let applied = api.patch("w", &pp, &Patch::Apply(&obj)).await?;
    ensure!(
        applied.data["spec"]["size"] == 2,
        "spec applied: {:?}",
        applied.data
    );
    ensure!(
        applied.data.get("status").is_none(),
        "status must not be written through the main resource: {:?}",
        applied.data
    );
    let status = json!({
        "apiVersion": format!("{}/v1", group_of(&env)), "kind": "Widget",
        "metadata": {"name": "w"}, "status": {"phase": "Ready"}
    });
    api.patch_status("w", &pp, &Patch::Apply(&status)).await?;
    let got = api.get("w").await?;
    ensure!(got.data["status"]["phase"] == "Ready", "{:?}", got.data);
    let managers: Vec<_> = got
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    ensure!(
        managers.iter().all(|m| m == "sandboxd-test"),
        "managers {managers:?}"
    );
    Ok(())
}

async fn watch_events(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, &env.ns);
    let list = api.list(&ListParams::default()).await?;
    let rv = list.metadata.resource_version.unwrap_or_default();
    let mut stream = api
        .watch(&WatchParams::default().timeout(30), &rv)
        .await?
        .boxed();
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "watched"}, "data": {"a": "1"}}))?;
    api.create(&PostParams::default(), &cm).await?;
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = stream.try_next().await? {
            if let WatchEvent::Added(cm) = ev
                && cm.name_any() == "watched"
            {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await??;
    ensure!(seen, "no Added event for the ConfigMap");
    Ok(())
}

fn pod_requesting(name: &str, resource: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "containers": [{
                "name": "c", "image": "example.invalid/app:1",
                "resources": {"requests": {resource: "1"}, "limits": {resource: "1"}}
            }]
        }
    }))?)
}

async fn scheduler_capacity(env: Env) -> Result<()> {
    let client = env.admin().await?;
    // Unique to this test so other tests' nodes and pods cannot interfere.
    let resource = format!("smoke.sandboxd.test/{}", env.unique("slot"));
    let with = env.unique("node-with");
    let without = env.unique("node-without");
    harness::fake_node(&client, &with, &[], &[(resource.as_str(), "1")]).await?;
    harness::fake_node(&client, &without, &[], &[]).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    pods.create(&PostParams::default(), &pod_requesting("first", &resource)?)
        .await?;
    let node = eventually(
        "the first pod to be bound",
        Duration::from_secs(30),
        || async { Ok(pods.get("first").await?.spec.and_then(|s| s.node_name)) },
    )
    .await?;
    ensure!(node == with, "bound to {node}, expected {with}");

    pods.create(
        &PostParams::default(),
        &pod_requesting("second", &resource)?,
    )
    .await?;
    let events: Api<Event> = Api::namespaced(client.clone(), &env.ns);
    let msg = eventually(
        "a FailedScheduling event for the second pod",
        Duration::from_secs(30),
        || async {
            let list = events
                .list(
                    &ListParams::default()
                        .fields("involvedObject.name=second,reason=FailedScheduling"),
                )
                .await?;
            Ok(list.items.into_iter().filter_map(|e| e.message).next())
        },
    )
    .await?;
    ensure!(
        msg.contains(&format!("Insufficient {resource}")),
        "message: {msg}"
    );
    ensure!(
        pods.get("second")
            .await?
            .spec
            .and_then(|s| s.node_name)
            .is_none(),
        "the second pod must stay unbound"
    );
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for n in [&with, &without] {
        nodes.delete(n, &DeleteParams::default()).await?;
    }
    Ok(())
}

async fn garbage_collection(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &env.ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &env.ns);
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}}))?;
    let owner = cms.create(&PostParams::default(), &owner).await?;
    let dependent: Secret = serde_json::from_value(json!({
        "metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.uid().unwrap_or_default()
        }]},
        "stringData": {"k": "v"}
    }))?;
    secrets.create(&PostParams::default(), &dependent).await?;
    cms.delete("owner", &DeleteParams::background()).await?;
    eventually(
        "the dependent to be garbage collected",
        Duration::from_secs(60),
        || async { Ok(secrets.get_opt("dependent").await?.is_none().then_some(())) },
    )
    .await
}

async fn sa_rbac(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let roles: Api<Role> = Api::namespaced(client.clone(), &env.ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &env.ns);
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "cm-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
            }))?,
        )
        .await?;
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "cm-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": env.ns}]
            }))?,
        )
        .await?;
    let sa = harness::service_account_client(env.cp(), &env.ns, "reader").await?;
    let sa_cms: Api<ConfigMap> = Api::namespaced(sa.clone(), &env.ns);
    sa_cms.list(&ListParams::default()).await?;
    let sa_secrets: Api<Secret> = Api::namespaced(sa.clone(), &env.ns);
    match sa_secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => anyhow::bail!("listing secrets should be forbidden, got {other:?}"),
    }
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "nope"}}))?;
    match sa_cms.create(&PostParams::default(), &cm).await {
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(()),
        other => anyhow::bail!("creating a configmap should be forbidden, got {other:?}"),
    }
}

async fn daemonset_ready(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let label = env.unique("ds-node");
    let node = env.unique("dsnode");
    harness::fake_node(&client, &node, &[(label.as_str(), "true")], &[]).await?;
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), &env.ns);
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {
                    "nodeSelector": {label.as_str(): "true"},
                    "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]
                }
            }
        }
    }))?;
    dss.create(&PostParams::default(), &ds).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    let pod = eventually(
        "the DaemonSet pod on the fake node",
        Duration::from_secs(30),
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=agent"))
                .await?;
            Ok(list.items.into_iter().find(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            }))
        },
    )
    .await?;
    harness::set_pod_phase(
        &client,
        &env.ns,
        &pod.name_any(),
        Phase::Running,
        Some("10.244.0.5"),
    )
    .await?;
    eventually(
        "the DaemonSet to report one ready pod",
        Duration::from_secs(30),
        || async {
            let ds = dss.get("agent").await?;
            Ok(ds
                .status
                .filter(|s| s.number_ready == 1 && s.desired_number_scheduled == 1)
                .map(|_| ()))
        },
    )
    .await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes.delete(&node, &DeleteParams::default()).await?;
    Ok(())
}

async fn stand_in_crds(env: Env) -> Result<()> {
    let client = env.admin().await?;
    let files = harness::fixture_crds();
    ensure!(
        files.len() >= 4,
        "expected the stand-in CRD fixtures, found {files:?}"
    );
    let mut names = Vec::new();
    for f in &files {
        names.extend(harness::install_crds(&client, f).await?);
    }
    for expected in [
        "machineconfigs.machineconfiguration.openshift.io",
        "infrastructures.config.openshift.io",
        "credentialsrequests.cloudcredential.openshift.io",
        "subscriptions.operators.coreos.com",
    ] {
        ensure!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // The object the seed reads the resource group from.
    let gvk = GroupVersionKind::gvk("config.openshift.io", "v1", "Infrastructure");
    let infra = harness::dynamic_api(&client, &gvk, "infrastructures", None);
    let name = env.unique("cluster");
    let obj = serde_json::from_value(json!({
        "apiVersion": "config.openshift.io/v1", "kind": "Infrastructure",
        "metadata": {"name": name}, "spec": {}
    }))?;
    eventually(
        "Infrastructure to be served",
        Duration::from_secs(20),
        || async { Ok(infra.list(&ListParams::default()).await.ok().map(|_| ())) },
    )
    .await?;
    infra.create(&PostParams::default(), &obj).await?;
    let status = json!({"status": {"platformStatus": {"azure": {"resourceGroupName": "rg-test"}}}});
    infra
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let got = infra.get(&name).await?;
    ensure!(got.data["status"]["platformStatus"]["azure"]["resourceGroupName"] == "rg-test");
    infra.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}
