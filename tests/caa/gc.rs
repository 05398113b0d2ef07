//! The operator's PeerPod garbage collector, under the operator's ServiceAccount RBAC
//! (`deploy/operator/rbac.yaml`), against CAAs that are down or whose node is gone.
//! Cluster-exclusive: the collector scans every PeerPod of the cluster.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sandboxd::api::peerpod::PeerPod;
use sandboxd::operator::peerpod_gc;
use serde_json::json;

use super::{Setup, setup_with, start_pod_vm};
use crate::harness::{self, Env};

const SECRET_KEYS: &[&str] = &[
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
    "AZURE_SUBSCRIPTION_ID",
];

/// The operator's ClusterRole and Role from `deploy/operator/rbac.yaml`, bound (under
/// per-test names) to ServiceAccount `sandboxd-operator` of the test namespace.
async fn operator_client(env: &Env, admin: &Client) -> Result<Client> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/operator/rbac.yaml"),
    )?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)?;
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == "sandboxd-operator")
            .cloned()
            .with_context(|| format!("{kind} sandboxd-operator in rbac.yaml"))
    };
    let name = env.unique("sandboxd-operator");
    let ssa = PatchParams::apply("test").force();
    let mut role: ClusterRole = serde_json::from_value(find("ClusterRole")?)?;
    role.metadata.name = Some(name.clone());
    Api::<ClusterRole>::all(admin.clone())
        .patch(&name, &ssa, &Patch::Apply(&role))
        .await?;
    let subjects =
        json!([{"kind": "ServiceAccount", "name": "sandboxd-operator", "namespace": env.ns}]);
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": subjects,
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(&name, &ssa, &Patch::Apply(&crb))
        .await?;
    let mut r: Role = serde_json::from_value(find("Role")?)?;
    r.metadata.namespace = Some(env.ns.clone());
    Api::<Role>::namespaced(admin.clone(), &env.ns)
        .patch("sandboxd-operator", &ssa, &Patch::Apply(&r))
        .await?;
    let rb: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "sandboxd-operator", "namespace": env.ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sandboxd-operator"},
        "subjects": subjects,
    }))?;
    Api::<RoleBinding>::namespaced(admin.clone(), &env.ns)
        .patch("sandboxd-operator", &ssa, &Patch::Apply(&rb))
        .await?;
    harness::service_account_client(env.cp(), &env.ns, "sandboxd-operator").await
}

/// `peer-pods-cm` and `peer-pods-secret` in the test namespace (the operator namespace of
/// the test), holding what the CAA of `s` got through its environment.
async fn peer_pods_config(env: &Env, s: &Setup) -> Result<()> {
    let mut cm = serde_json::Map::new();
    let mut secret = serde_json::Map::new();
    for (k, v) in &s.envs {
        if SECRET_KEYS.contains(k) {
            secret.insert(k.to_string(), json!(v));
        } else if k.starts_with("AZURE_") || ["CLOUD_PROVIDER", "DISABLECVM", "TAGS"].contains(k) {
            cm.insert(k.to_string(), json!(v));
        }
    }
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "peer-pods-cm"}, "data": cm,
    }))?;
    Api::<ConfigMap>::namespaced(s.admin.clone(), &env.ns)
        .create(&PostParams::default(), &cm)
        .await?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "peer-pods-secret"}, "stringData": secret,
    }))?;
    Api::<Secret>::namespaced(s.admin.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// Runs the collector as the operator's ServiceAccount until the guard drops.
async fn start_gc(env: &Env, s: &Setup) -> Result<tokio_util::sync::DropGuard> {
    peer_pods_config(env, s).await?;
    let client = operator_client(env, &s.admin).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let opts = peerpod_gc::Options {
        namespace: env.ns.clone(),
        grace: Duration::from_secs(2),
        node_grace: Duration::from_secs(2),
        every: Duration::from_millis(500),
        min_poll: Duration::from_millis(20),
        // The operator's command-line flag: the ARM test server is a development endpoint.
        azure: sandboxd::cloud::azure::EndpointArgs::development(&s.arm_base),
    };
    tokio::spawn(peerpod_gc::run(client, opts, stop.clone()));
    Ok(stop.drop_guard())
}

fn force() -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    }
}

/// A pod deleted while its node's CAA is down: the operator deletes the VM and removes the
/// PeerPod finalizer; the VM of a pod that is still there is left alone.
pub async fn pod_deleted_while_caa_down(env: Env) -> Result<()> {
    // The CAA's own sweep must not be what cleans up here.
    let extra = [("CAA_SWEEP_GRACE_SECONDS", "600".to_string())];
    let mut s = setup_with(&env, "", sandboxd::armtest::Config::default(), &extra).await?;
    let ns = env.ns.clone();
    let result = async {
        let gone = start_pod_vm(&s, &ns, "gone", "aaaaaaaa10000001").await?;
        let kept = start_pod_vm(&s, &ns, "kept", "bbbbbbbb10000002").await?;
        s.caa.signal(nix::sys::signal::Signal::SIGKILL);
        s.caa.stop(Duration::from_secs(5));
        let _gc = start_gc(&env, &s).await?;
        let pods: Api<Pod> = Api::namespaced(s.admin.clone(), &ns);
        pods.delete("gone", &force()).await?;
        let pp: Api<PeerPod> = Api::namespaced(s.admin.clone(), &ns);
        let arm = s.arm.clone();
        harness::eventually(
            "the deleted pod's VM and PeerPod are gone",
            Duration::from_secs(60),
            || {
                let (arm, pp, gone) = (arm.clone(), pp.clone(), gone.clone());
                async move {
                    let vm_gone = !arm.vms().iter().any(|v| v.name == gone);
                    Ok((vm_gone && pp.get_opt(&gone).await?.is_none()).then_some(()))
                }
            },
        )
        .await?;
        // Two more passes: the live pod's VM and record stay.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let vms: Vec<String> = s.arm.vms().into_iter().map(|v| v.name).collect();
        assert_eq!(vms, vec![kept.clone()]);
        let kept_pp = pp.get(&kept).await?;
        assert!(kept_pp.metadata.deletion_timestamp.is_none());
        assert_eq!(kept_pp.finalizers(), &["peer.pod/finalizer".to_string()]);
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow::anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}

/// A node deleted with VMs on it: the operator deletes them (and releases their records
/// once the pods are gone); the VMs of a node that still exists are left alone.
pub async fn vms_of_a_deleted_node_are_deleted(env: Env) -> Result<()> {
    let extra = [("CAA_SWEEP_GRACE_SECONDS", "600".to_string())];
    let s = setup_with(&env, "", sandboxd::armtest::Config::default(), &extra).await?;
    let ns = env.ns.clone();
    let mut doomed = s.node_caa(&env, "doomed", &[]).await?;
    let result = async {
        let kept = start_pod_vm(&s, &ns, "kept", "cccccccc10000003").await?;
        let mut on_doomed = Vec::new();
        for (name, id) in [("d1", "dddddddd10000004"), ("d2", "eeeeeeee10000005")] {
            super::pod(&s.admin, &ns, name, &doomed.node).await?;
            super::start_via(&doomed.socket, &ns, name, id).await?;
            on_doomed.push(format!("podvm-{name}-{}", &id[..8]));
        }
        assert_eq!(s.arm.vms().len(), 3);
        doomed.caa.signal(nix::sys::signal::Signal::SIGKILL);
        doomed.caa.stop(Duration::from_secs(5));
        Api::<Node>::all(s.admin.clone())
            .delete(&doomed.node, &force())
            .await?;
        let _gc = start_gc(&env, &s).await?;
        let arm = s.arm.clone();
        harness::eventually(
            "the deleted node's VMs are deleted",
            Duration::from_secs(60),
            || {
                let arm = arm.clone();
                async move {
                    let vms: Vec<String> = arm.vms().into_iter().map(|v| v.name).collect();
                    Ok((vms.len() == 1).then_some(vms))
                }
            },
        )
        .await
        .map(|vms| assert_eq!(vms, vec![kept.clone()]))?;
        // The pods go (as the pod garbage collector makes them): their records follow.
        let pods: Api<Pod> = Api::namespaced(s.admin.clone(), &ns);
        for p in ["d1", "d2"] {
            let _ = pods.delete(p, &force()).await;
        }
        let pp: Api<PeerPod> = Api::namespaced(s.admin.clone(), &ns);
        harness::eventually(
            "the deleted node's PeerPods are released",
            Duration::from_secs(60),
            || {
                let (pp, on_doomed) = (pp.clone(), on_doomed.clone());
                async move {
                    let names = super::record_names(&pp).await?;
                    Ok((!names.iter().any(|n| on_doomed.contains(n))).then_some(()))
                }
            },
        )
        .await?;
        assert_eq!(
            s.arm.vms().into_iter().map(|v| v.name).collect::<Vec<_>>(),
            vec![kept]
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow::anyhow!("{e:#}\nCAA log:\n{}", doomed.caa.log_tail(30)))
}
