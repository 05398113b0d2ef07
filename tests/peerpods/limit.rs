//! The per-node VM limit: advertised on the selected nodes, enforced by the real scheduler,
//! kept, updated, refused when invalid, and removed when peer pods go away.

use anyhow::{Result, anyhow, ensure};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use sandboxd::api::names::{PEER_POD_CONFIG, VM_RESOURCE};
use sandboxd::api::peerpodconfig::CONDITION_LIMIT_APPLIED;
use serde_json::json;

use super::support::{Fixture, WAIT};
use crate::harness::{Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "peerpods::the_scheduler_never_places_more_peer_pods_on_a_node_than_its_limit",
            |env| async move { with_fixture(env, scheduler_enforces_the_limit).await },
        ),
        Case::cluster_exclusive(
            "peerpods::an_invalid_limit_is_refused_by_the_api_server_and_nodes_stay_unchanged",
            |env| async move { with_fixture(env, invalid_limit_is_refused).await },
        ),
        Case::cluster_exclusive(
            "peerpods::disabling_peer_pods_or_uninstalling_removes_the_vm_capacity",
            |env| async move { with_fixture(env, disabling_and_uninstall_remove_capacity).await },
        ),
    ]
}

async fn with_fixture<F, Fut>(env: Env, body: F) -> Result<()>
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = (Fixture, Result<()>)>,
{
    let fx = Fixture::start(&env).await?;
    let (fx, r) = body(fx).await;
    let t = fx.teardown().await;
    r.and(t)
}

fn vm_pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{
                "name": "c",
                "image": "registry.invalid/pause:1",
                "resources": {"limits": {VM_RESOURCE: "1"}, "requests": {VM_RESOURCE: "1"}},
            }],
        },
    }))
    .unwrap()
}

async fn wait_bound(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(&format!("pod {name} bound"), WAIT, || async {
        let p = pods.get(name).await?;
        Ok(p.spec.and_then(|s| s.node_name))
    })
    .await
}

async fn scheduler_enforces_the_limit(mut fx: Fixture) -> (Fixture, Result<()>) {
    let r = async {
        fx.enable().await?;
        let ppc = fx.wait_ppc().await?;
        // The seed's defaults, owned by the KataConfig.
        ensure!(ppc.spec.limit == "10", "default limit {}", ppc.spec.limit);
        ensure!(ppc.spec.cloud_secret_name == "peer-pods-secret");
        ensure!(ppc.spec.config_map_name == "peer-pods-cm");
        ensure!(
            ppc.spec
                .node_selector
                .get("node-role.kubernetes.io/kata-oc")
                .map(String::as_str)
                == Some("")
        );
        let owner = ppc.metadata.owner_references.clone().unwrap_or_default();
        ensure!(
            owner
                .iter()
                .any(|o| o.kind == "KataConfig" && o.name == "example-kataconfig"),
            "owner references {owner:?}"
        );

        let node = fx.node("ppw", true).await?;
        let other = fx.node("ppx", false).await?;
        fx.select_mine("2").await?;
        fx.wait_vm(&node, Some("2")).await?;
        ensure!(
            fx.vm_resource(&other).await? == (None, None),
            "unselected node got it"
        );

        let pods: Api<Pod> = Api::namespaced(fx.admin.clone(), &fx.ns);
        for name in ["vm-1", "vm-2"] {
            pods.create(&PostParams::default(), &vm_pod(name, &node))
                .await?;
            ensure!(wait_bound(&pods, name).await? == node);
        }
        pods.create(&PostParams::default(), &vm_pod("vm-3", &node))
            .await?;
        let msg = eventually("vm-3 unschedulable", WAIT, || async {
            let p = pods.get("vm-3").await?;
            ensure!(
                p.spec.as_ref().and_then(|s| s.node_name.clone()).is_none(),
                "vm-3 bound over the limit"
            );
            Ok(p.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .and_then(|c| c.message))
        })
        .await?;
        ensure!(
            msg.contains("Insufficient kata.peerpods.io/vm"),
            "scheduler said {msg:?}"
        );

        // Raising the limit takes effect on the node; the scheduler binds the waiting pod.
        fx.set_limit("3").await?;
        fx.wait_vm(&node, Some("3")).await?;
        ensure!(wait_bound(&pods, "vm-3").await? == node);

        // A node that loses the resource (re-registration) gets it back.
        fx.nodes()
            .patch_status(
                &node,
                &PatchParams::default(),
                &Patch::<()>::Json(serde_json::from_value(json!([
                    {"op": "remove", "path": "/status/capacity/kata.peerpods.io~1vm"},
                    {"op": "remove", "path": "/status/allocatable/kata.peerpods.io~1vm"},
                ]))?),
            )
            .await?;
        fx.wait_vm(&node, Some("3")).await?;

        // A node leaving the selection loses the resource.
        fx.nodes()
            .patch(
                &node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {fx.select_key.clone(): "no"}}})),
            )
            .await?;
        fx.wait_vm(&node, None).await?;
        Ok(())
    }
    .await;
    (fx, r)
}

async fn invalid_limit_is_refused(mut fx: Fixture) -> (Fixture, Result<()>) {
    let r = async {
        fx.enable().await?;
        fx.wait_ppc().await?;
        let node = fx.node("ppi", true).await?;
        fx.select_mine("4").await?;
        fx.wait_vm(&node, Some("4")).await?;
        fx.wait_condition(CONDITION_LIMIT_APPLIED, "True", "Applied")
            .await?;
        // The CRD's schema: the API server itself refuses anything but digits.
        for bad in ["-1", "ten", "lots", "1.5", " 3"] {
            match fx.set_limit(bad).await {
                Err(e) => {
                    let text = format!("{e:#}");
                    ensure!(
                        text.contains("spec.limit")
                            && (text.contains("422") || text.contains("Invalid")),
                        "limit {bad:?}: {text}"
                    );
                }
                Ok(()) => return Err(anyhow!("the API server accepted limit {bad:?}")),
            }
            let have = fx.vm_resource(&node).await?;
            ensure!(
                have == (Some("4".into()), Some("4".into())),
                "node changed on an invalid limit: {have:?}"
            );
        }
        // Fixing it clears the condition.
        fx.set_limit("5").await?;
        fx.wait_vm(&node, Some("5")).await?;
        fx.wait_condition(CONDITION_LIMIT_APPLIED, "True", "Applied")
            .await?;
        Ok(())
    }
    .await;
    (fx, r)
}

async fn disabling_and_uninstall_remove_capacity(mut fx: Fixture) -> (Fixture, Result<()>) {
    let r = async {
        fx.enable().await?;
        fx.wait_ppc().await?;
        let node = fx.node("ppd", true).await?;
        fx.select_mine("2").await?;
        fx.wait_vm(&node, Some("2")).await?;
        // CAA's CA Secret, as a CAA creates it on first start.
        let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), &fx.ns);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "peerpod-caa-tls"},
                    "stringData": {"ca.crt": "x"},
                }))?,
            )
            .await?;

        fx.kcs()
            .patch(
                "example-kataconfig",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"enablePeerPods": false}})),
            )
            .await?;
        fx.wait_vm(&node, None).await?;
        eventually("CAA's CA Secret removed with peer pods", WAIT, || async {
            Ok(secrets
                .get_opt("peerpod-caa-tls")
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        let ppcs = fx.ppcs();
        eventually("PeerPodConfig deleted", WAIT, || async {
            Ok(ppcs.get_opt(PEER_POD_CONFIG).await?.is_none().then_some(()))
        })
        .await?;

        // On again: a fresh default PeerPodConfig; select the node and uninstall.
        fx.kcs()
            .patch(
                "example-kataconfig",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"enablePeerPods": true}})),
            )
            .await?;
        let ppc = fx.wait_ppc().await?;
        if ppc.spec.limit != "10" {
            return Err(anyhow!(
                "re-created PeerPodConfig has limit {}",
                ppc.spec.limit
            ));
        }
        fx.select_mine("2").await?;
        fx.wait_vm(&node, Some("2")).await?;
        fx.kcs()
            .delete("example-kataconfig", &Default::default())
            .await?;
        fx.wait_vm(&node, None).await?;
        Ok(())
    }
    .await;
    (fx, r)
}
