//! What the kata shim sees of CAA: the service and method names on the wire (a client that
//! writes its frames by hand), a shim that gives up after CreateVM, StopVM under the Rust
//! shim's one-second deadline, the errors it shows the user, CRI-O's sandbox names, and the
//! local provider's instance sizes.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use protobuf::Message;
use sandboxd::api::names::annotations;
use sandboxd::api::peerpod::PeerPod;
use sandboxd::armtest::{self, Fault, FaultKind};
use sandboxd::protocol::{hypervisor, podvminfo};

use super::{create_request, ctx, hv, pod, record_names, setup, setup_with, start_via, stop_via};
use crate::harness::ttrpc_wire::{self, Answer};
use crate::harness::{self, Case, Env};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "caa::every_service_and_method_answers_under_the_names_kata_spells_on_the_wire",
            wire_names,
        ),
        Case::cluster(
            "caa::a_shim_that_gives_up_after_createvm_leaves_no_record_behind",
            gives_up,
        ),
        Case::cluster(
            "caa::stopvm_under_a_one_second_deadline_answers_ok_and_the_vm_is_deleted_in_the_background",
            short_stop,
        ),
        Case::cluster(
            "caa::errors_the_shim_shows_are_sentences_not_debug_dumps",
            sentences,
        ),
        Case::cluster(
            "caa::a_crio_sandbox_name_is_read_as_its_pod_and_uid",
            crio_name,
        ),
        Case::cluster(
            "caa::the_local_provider_ignores_requested_instance_sizes",
            local_sizes,
        ),
    ]
}

const WAIT: Duration = Duration::from_secs(120);

async fn literal(
    socket: &std::path::Path,
    service: &str,
    method: &str,
    payload: &[u8],
    timeout: Option<Duration>,
) -> Result<Answer> {
    ttrpc_wire::call(socket, service, method, payload, timeout, WAIT).await
}

async fn wire_names(env: Env) -> Result<()> {
    let s = setup(&env, "").await?;
    let ns = env.ns.as_str();
    let result = async {
        let sock = s.socket.as_path();
        let mut v = hypervisor::VersionRequest::new();
        v.version = "0.0.1".into();
        let got = literal(
            sock,
            "hypervisor.Hypervisor",
            "Version",
            &v.write_to_bytes()?,
            None,
        )
        .await?
        .ok()?;
        ensure!(hypervisor::VersionResponse::parse_from_bytes(&got)?.version == sandboxd::VERSION);

        pod(&s.admin, ns, "wire", &s.node).await?;
        let id = "0e0e0e0e0e0e0e0e";
        let create = create_request(id, ns, "wire", &[]);
        let got = literal(
            sock,
            "hypervisor.Hypervisor",
            "CreateVM",
            &create.write_to_bytes()?,
            Some(Duration::from_secs(60)),
        )
        .await?
        .ok()?;
        let path = hypervisor::CreateVMResponse::parse_from_bytes(&got)?.agentSocketPath;
        ensure!(path.ends_with(&format!("{id}/agent.ttrpc")), "{path}");
        let mut start = hypervisor::StartVMRequest::new();
        start.id = id.into();
        literal(
            sock,
            "hypervisor.Hypervisor",
            "StartVM",
            &start.write_to_bytes()?,
            Some(Duration::from_secs(600)),
        )
        .await?
        .ok()?;

        // kata's and CAA's own clients call podvminfo.PodVMInfo (the generated server's
        // camel-cased podvminfo.PodVmInfo is not a name anyone sends).
        let mut info = podvminfo::GetInfoRequest::new();
        info.PodName = "wire".into();
        info.PodNamespace = ns.into();
        info.Wait = true;
        let got = literal(
            sock,
            "podvminfo.PodVMInfo",
            "GetInfo",
            &info.write_to_bytes()?,
            None,
        )
        .await?
        .ok()?;
        let vmid = podvminfo::GetInfoResponse::parse_from_bytes(&got)?.VMID;
        ensure!(
            vmid.ends_with(&format!("/virtualMachines/podvm-wire-{}", &id[..8])),
            "{vmid}"
        );
        let wrong = literal(
            sock,
            "podvminfo.PodVmInfo",
            "GetInfo",
            &info.write_to_bytes()?,
            None,
        )
        .await?;
        ensure!(
            wrong.code != 0 && wrong.message.contains("service does not exist"),
            "the camel-cased name is served: {wrong:?}"
        );

        let mut stop = hypervisor::StopVMRequest::new();
        stop.id = id.into();
        let a = literal(
            sock,
            "hypervisor.Hypervisor",
            "StopVM",
            &stop.write_to_bytes()?,
            Some(Duration::from_secs(60)),
        )
        .await?;
        ensure!(a.code == 0 && a.message.is_empty(), "{a:?}");
        ensure!(hypervisor::StopVMResponse::parse_from_bytes(&a.payload).is_ok());
        ensure!(
            s.arm.vms().is_empty(),
            "StopVM answered before the VM was gone"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}

/// The shim fails between CreateVM and StartVM (and calls no StopVM); the kubelet retries
/// with a new sandbox, which fails the same way. Nothing may pile up.
async fn gives_up(env: Env) -> Result<()> {
    let s = setup(&env, "").await?;
    let ns = env.ns.as_str();
    let result = async {
        pod(&s.admin, ns, "retry", &s.node).await?;
        for id in ["1111aaaa00000001", "2222aaaa00000002", "3333aaaa00000003"] {
            hv(&s.socket)
                .await?
                .create_vm(ctx(), &create_request(id, ns, "retry", &[]))
                .await?;
        }
        let pps: Api<PeerPod> = Api::namespaced(s.admin.clone(), ns);
        // Give a background write every chance to land.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let left = record_names(&pps).await?;
        ensure!(
            left.is_empty(),
            "records of sandboxes that never started: {left:?}"
        );
        // A StopVM for one of them (some shims send it) is fine and asks the cloud nothing.
        let deletes = || {
            s.arm
                .requests()
                .iter()
                .filter(|r| r.method == "DELETE")
                .count()
        };
        let before = deletes();
        stop_via(&s.socket, "1111aaaa00000001").await?;
        ensure!(
            deletes() == before,
            "StopVM of a sandbox that never started deleted in ARM"
        );
        // The next retry starts: exactly its record and VM, then nothing once stopped.
        let vm = start_via(&s.socket, ns, "retry", "4444aaaa00000004").await?;
        ensure!(record_names(&pps).await? == std::slice::from_ref(&vm));
        let vms: Vec<String> = s.arm.vms().into_iter().map(|v| v.name).collect();
        ensure!(vms == [vm], "VMs {vms:?}");
        stop_via(&s.socket, "4444aaaa00000004").await?;
        harness::eventually("no record left", Duration::from_secs(10), || {
            let pps = pps.clone();
            async move { Ok(record_names(&pps).await?.is_empty().then_some(())) }
        })
        .await?;
        ensure!(s.arm.vms().is_empty());
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}

/// kata's Rust shim gives StopVM about a second; the ARM delete here takes three.
async fn short_stop(env: Env) -> Result<()> {
    let s = setup(&env, "").await?;
    let ns = env.ns.as_str();
    let result = async {
        let id = "5555bbbb00000005";
        let vm = super::start_pod_vm(&s, ns, "slow", id).await?;
        s.arm.inject(Fault::new(
            "DELETE",
            &vm,
            1,
            FaultKind::Delay { millis: 3000 },
        ));
        let mut stop = hypervisor::StopVMRequest::new();
        stop.id = id.into();
        let a = literal(
            &s.socket,
            "hypervisor.Hypervisor",
            "StopVM",
            &stop.write_to_bytes()?,
            Some(Duration::from_secs(1)),
        )
        .await?;
        ensure!(
            a.code == 0,
            "StopVM under a 1 s deadline answered {}: {}",
            a.code,
            a.message
        );
        ensure!(
            a.message.contains("continues in the background"),
            "the answer does not say the deletion goes on: {a:?}"
        );
        ensure!(hypervisor::StopVMResponse::parse_from_bytes(&a.payload).is_ok());
        // The deletion goes on to completion: no VM, no record.
        let pps: Api<PeerPod> = Api::namespaced(s.admin.clone(), ns);
        let arm = s.arm.clone();
        harness::eventually("VM and record gone", Duration::from_secs(30), || {
            let (arm, pps, vm) = (arm.clone(), pps.clone(), vm.clone());
            async move {
                Ok(
                    (!arm.vms().iter().any(|v| v.name == vm) && pps.get_opt(&vm).await?.is_none())
                        .then_some(()),
                )
            }
        })
        .await?;
        // A StopVM retried meanwhile or afterwards is answered as usual.
        stop_via(&s.socket, id).await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}

/// What `kubectl describe pod` would show: a sentence, no `Status {`, `ErrorResponse`,
/// `HttpError {`, bodies or headers.
fn is_sentence(m: &str) -> Result<()> {
    for dump in [
        "Status {",
        "ErrorResponse",
        "ApiError",
        "HttpError",
        "Headers",
        "Body:",
        "Some(",
    ] {
        ensure!(!m.contains(dump), "{dump:?} in {m:?}");
    }
    Ok(())
}

async fn sentences(env: Env) -> Result<()> {
    let s = setup(&env, "").await?;
    let ns = env.ns.as_str();
    let result = async {
        // A pod that does not exist.
        let e = hv(&s.socket)
            .await?
            .create_vm(ctx(), &create_request("6666cccc00000006", ns, "ghost", &[]))
            .await
            .err()
            .context("CreateVM for a pod that does not exist succeeded")?;
        let m = status_message(e)?;
        ensure!(
            m == format!(
                "invalid request: pod {ns}/ghost does not exist (or is being deleted): no VM is made for it"
            ),
            "{m}"
        );
        is_sentence(&m)?;

        // ARM refuses the create.
        pod(&s.admin, ns, "denied", &s.node).await?;
        s.arm.inject(Fault::new(
            "PUT",
            "virtualMachines/podvm-denied",
            1,
            FaultKind::Status {
                status: 403,
                code: "AuthorizationFailed".into(),
                retry_after_secs: None,
                retry_after_ms: None,
            },
        ));
        let e = start_via(&s.socket, ns, "denied", "7777cccc00000007")
            .await
            .err()
            .context("StartVM succeeded although ARM refused")?;
        let e = e
            .downcast::<ttrpc::Error>()
            .map_err(|e| anyhow!("not a ttrpc error: {e:#}"))?;
        let m = status_message(e)?;
        ensure!(
            m == "the cloud refused the request: ARM answered 403 (AuthorizationFailed): injected fault",
            "{m}"
        );
        is_sentence(&m)?;
        // The record says the same.
        let pp: PeerPod = Api::namespaced(s.admin.clone(), ns)
            .get("podvm-denied-7777cccc")
            .await?;
        let st = pp.status.unwrap_or_default();
        ensure!(st.message.as_deref() == Some(m.as_str()), "{:?}", st.message);
        stop_via(&s.socket, "7777cccc00000007").await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}

fn status_message(e: ttrpc::Error) -> Result<String> {
    match e {
        ttrpc::Error::RpcStatus(st) => Ok(st.message),
        other => Err(anyhow!("not a status: {other:?}")),
    }
}

/// On CRI-O the sandbox name is `k8s_<pod>_<namespace>_<uid>_<attempt>`.
async fn crio_name(env: Env) -> Result<()> {
    let s = setup(&env, "").await?;
    let ns = env.ns.as_str();
    let result = async {
        let p: Pod = pod(&s.admin, ns, "web", &s.node).await?;
        let uid = p.uid().context("uid")?;
        let id = "8888dddd00000008";
        let mut req = create_request(id, ns, "web", &[]);
        req.annotations.insert(
            annotations::SANDBOX_NAME.into(),
            format!("k8s_web_{ns}_{uid}_0"),
        );
        // CRI-O's shim may not send the namespace key: the name carries it.
        req.annotations.remove(annotations::SANDBOX_NAMESPACE);
        hv(&s.socket).await?.create_vm(ctx(), &req).await?;
        let mut start = hypervisor::StartVMRequest::new();
        start.id = id.into();
        hv(&s.socket).await?.start_vm(ctx(), &start).await?;
        let vm = format!("podvm-web-{}", &id[..8]);
        let pp: PeerPod = Api::namespaced(s.admin.clone(), ns).get(&vm).await?;
        ensure!(pp.owner_references()[0].name == "web");
        ensure!(pp.owner_references()[0].uid == uid);
        ensure!(pp.spec.pod_uid == uid);
        let view = s
            .arm
            .vms()
            .into_iter()
            .find(|v| v.name == vm)
            .context("the VM")?;
        ensure!(view.tags["sandboxd-pod-uid"] == uid);
        stop_via(&s.socket, id).await?;

        // A sandbox of an earlier pod of that name (its uid gone) is refused.
        let mut old = create_request("9999dddd00000009", ns, "web", &[]);
        old.annotations.insert(
            annotations::SANDBOX_NAME.into(),
            format!("k8s_web_{ns}_11111111-2222-3333-4444-555555555555_3"),
        );
        let e = hv(&s.socket)
            .await?
            .create_vm(ctx(), &old)
            .await
            .err()
            .context("a sandbox of a gone pod uid was accepted")?;
        let m = status_message(e)?;
        ensure!(m.contains("no longer exists") && m.contains(&uid), "{m}");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}

/// `CLOUD_PROVIDER=local` has no instance sizes: a pod asking for vCPUs, memory or a machine
/// type is not refused for it.
async fn local_sizes(env: Env) -> Result<()> {
    let s = setup_with(
        &env,
        "",
        armtest::Config::default(),
        &[
            ("CLOUD_PROVIDER", "local".to_string()),
            ("RUST_LOG", "sandboxd=debug".to_string()),
        ],
    )
    .await?;
    let ns = env.ns.as_str();
    let result = async {
        pod(&s.admin, ns, "big", &s.node).await?;
        for (id, extra) in [
            (
                "aaaaeeee0000000a",
                vec![
                    (annotations::DEFAULT_VCPUS, "4"),
                    (annotations::DEFAULT_MEMORY, "8192"),
                ],
            ),
            (
                "bbbbeeee0000000b",
                vec![(annotations::MACHINE_TYPE, "Standard_D8as_v5")],
            ),
        ] {
            let created = hv(&s.socket)
                .await?
                .create_vm(ctx(), &create_request(id, ns, "big", &extra))
                .await
                .map_err(|e| anyhow!("CreateVM {extra:?} refused: {e}"))?;
            ensure!(
                created
                    .agentSocketPath
                    .ends_with(&format!("{id}/agent.ttrpc"))
            );
            stop_via(&s.socket, id).await?;
        }
        ensure!(
            s.caa
                .log_tail(200)
                .contains("the requested size is ignored"),
            "nothing logged about the ignored size"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(30)))
}
