//! `ctl vm create|delete`: the built binary drives a CAA process (Azure provider against the
//! in-process ARM test server, deployed RBAC) through its hypervisor socket as the kata shim
//! would, and the VM appears and disappears in ARM and in the PeerPod records.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use sandboxd::api::peerpod::PeerPod;
use serde_json::json;

use super::support::ctl;
use crate::harness::process::{Process, run_dir};
use crate::harness::{self, Case, Env};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "ctl::vm_create_starts_a_pod_vm_through_the_caa_socket_and_vm_delete_removes_it",
            create_delete,
        ),
        Case::cluster(
            "ctl::vm_create_without_a_caa_socket_or_with_a_size_not_allowed_fails_clearly",
            bad_inputs,
        ),
        Case::cluster(
            "ctl::dev_kubelet_stand_in_starts_the_vm_of_a_bound_kata_remote_pod_and_stops_it_on_delete",
            kubelet_stand_in,
        ),
    ]
}

/// An ARM test server, a node and a CAA process serving `hypervisor.sock`: the CAA suite's.
async fn caa(env: &Env) -> Result<crate::caa::Setup> {
    crate::caa::setup(env, "").await
}

async fn pod(env: &Env, name: &str, node: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(env.admin().await?, &env.ns);
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node,
                 "containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    pods.create(&PostParams::default(), &p).await?;
    Ok(())
}

async fn create_delete(env: Env) -> Result<()> {
    let c = caa(&env).await?;
    pod(&env, "web", &c.node).await?;
    let socket = c.socket.display().to_string();
    let pod_ref = format!("{}/web", env.ns);
    let out = ctl(
        &env,
        &env.ns,
        &[
            "vm",
            "create",
            "--pod",
            &pod_ref,
            "--sandbox-id",
            "0123abcd4567ef89",
            "--socket",
            &socket,
            "--machine-type",
            "Standard_D4as_v5",
        ],
    )
    .await?
    .ok()?;
    let vm = "podvm-web-0123abcd";
    let view = c
        .arm
        .vms()
        .into_iter()
        .find(|v| v.name == vm)
        .context("the VM exists in ARM after vm create")?;
    ensure!(view.size == "Standard_D4as_v5", "size {}", view.size);
    ensure!(
        out.stdout.contains(vm) && out.stdout.contains(&view.private_ip),
        "vm create should print the VM name and IP {}: {}",
        view.private_ip,
        out.all()
    );
    let pp: PeerPod = Api::namespaced(env.admin().await?, &env.ns).get(vm).await?;
    ensure!(pp.spec.node_name == c.node, "node {}", pp.spec.node_name);
    // `vm list` shows it too.
    let listed = ctl(&env, &env.ns, &["vm", "list"]).await?.ok()?;
    let line = listed
        .stdout
        .lines()
        .find(|l| l.contains(vm))
        .with_context(|| listed.all())?;
    ensure!(
        line.split_whitespace().nth(1) == Some("web"),
        "vm list names the pod the VM serves: {line:?}"
    );

    ctl(
        &env,
        &env.ns,
        &[
            "vm",
            "delete",
            "--sandbox-id",
            "0123abcd4567ef89",
            "--socket",
            &socket,
        ],
    )
    .await?
    .ok()?;
    ensure!(
        !c.arm.vms().iter().any(|v| v.name == vm),
        "the VM is still in ARM after vm delete"
    );
    // CAA releases the record just after StopVM answers (a background write).
    let pps: Api<PeerPod> = Api::namespaced(env.admin().await?, &env.ns);
    harness::eventually(
        "the PeerPod is released after vm delete",
        Duration::from_secs(10),
        || {
            let pps = pps.clone();
            async move { Ok(pps.get_opt(vm).await?.is_none().then_some(())) }
        },
    )
    .await?;
    Ok(())
}

async fn bad_inputs(env: Env) -> Result<()> {
    let missing = run_dir().join(format!("vm-none-{}.sock", env.ns));
    let missing = missing.display().to_string();
    ctl(
        &env,
        &env.ns,
        &[
            "vm",
            "create",
            "--pod",
            "ns/web",
            "--sandbox-id",
            "aa",
            "--socket",
            &missing,
        ],
    )
    .await?
    .fails_with(&[
        "cannot reach the CAA hypervisor socket",
        &missing,
        "--socket",
    ])?;
    ctl(
        &env,
        &env.ns,
        &[
            "vm",
            "create",
            "--pod",
            "web",
            "--sandbox-id",
            "aa",
            "--socket",
            &missing,
        ],
    )
    .await?
    .fails_with(&["--pod must be NAMESPACE/NAME"])?;

    let c = caa(&env).await?;
    pod(&env, "big", &c.node).await?;
    let socket = c.socket.display().to_string();
    let pod_ref = format!("{}/big", env.ns);
    ctl(
        &env,
        &env.ns,
        &[
            "vm",
            "create",
            "--pod",
            &pod_ref,
            "--sandbox-id",
            "bbbb1111bbbb1111",
            "--socket",
            &socket,
            "--machine-type",
            "Standard_M416ms_v2",
        ],
    )
    .await?
    .fails_with(&["CreateVM failed", "Standard_M416ms_v2"])?;
    ensure!(
        c.arm.vms().is_empty(),
        "a VM was created: {:?}",
        c.arm.vms()
    );
    Ok(())
}

/// The kubelet stand-in of `make demo`: a bound `kata-remote` pod gets its VM through the CAA
/// socket and is marked Running; deleting the pod stops the VM and finishes the deletion.
async fn kubelet_stand_in(env: Env) -> Result<()> {
    let c = caa(&env).await?;
    let admin = env.admin().await?;
    super::doctor::ensure_runtime_class(&admin).await?;
    let state = run_dir().join(format!("kl-{}", env.ns));
    let args: Vec<String> = [
        "dev",
        "kubelet",
        "--kubeconfig",
        &env.cp().kubeconfig_path.display().to_string(),
        "--node",
        &c.node,
        "--socket",
        &c.socket.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kubelet = Process::start(
        &format!("kubelet-{}", env.ns),
        Path::new(env!("CARGO_BIN_EXE_sandboxd")),
        &args,
        &[],
    )?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &env.ns);
    for (name, rc) in [("peer", Some("kata-remote")), ("plain", None)] {
        let mut spec =
            json!({"nodeName": c.node, "containers": [{"name": "c", "image": "busybox"}]});
        if let Some(rc) = rc {
            spec["runtimeClassName"] = json!(rc);
        }
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
        pods.create(&PostParams::default(), &p).await?;
    }
    let running = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            Ok(p.status
                .and_then(|s| s.phase)
                .filter(|ph| ph == "Running")
                .map(|_| ()))
        }
    };
    harness::eventually("the peer pod Running", Duration::from_secs(60), || {
        running("peer")
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", kubelet.log_tail(20)))?;
    harness::eventually("the plain pod Running", Duration::from_secs(30), || {
        running("plain")
    })
    .await?;
    let uid = pods.get("peer").await?.metadata.uid.context("uid")?;
    let id = sandboxd::devenv::kubelet::sandbox_id(&uid);
    let vm = sandboxd::cloud::vm_name("peer", &id);
    ensure!(
        c.arm.vms().iter().any(|v| v.name == vm),
        "no VM {vm} in ARM for the Running peer pod: {:?}",
        c.arm.vms()
    );
    ensure!(
        c.arm.vms().len() == 1,
        "only the kata-remote pod gets a VM: {:?}",
        c.arm.vms()
    );
    pods.delete("peer", &Default::default()).await?;
    harness::eventually("the peer pod gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { Ok(pods.get_opt("peer").await?.is_none().then_some(())) }
    })
    .await?;
    ensure!(
        !c.arm.vms().iter().any(|v| v.name == vm),
        "the VM outlived its pod"
    );
    Ok(())
}
