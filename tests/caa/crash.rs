//! Crash safety: CAA is SIGKILLed at every step boundary of create and delete (paused there
//! by the test-only `SANDBOXD_CAA_PAUSE_AT` hook, or caught by timing inside the ARM test
//! server's slow operations) and at random points; after a restart the shim's retry, or
//! the pod's deletion, must end with no VM that no live pod owns and no stuck finalizer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams};
use sandboxd::api::peerpod::PeerPod;
use sandboxd::armtest;
use sandboxd::caa::crashpoint;

use super::{NodeCaa, Setup, pod, setup_with, start_via, stop_via};
use crate::harness::{self, Env};

/// Where CAA dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// At a named step boundary.
    Step(&'static str),
    /// While ARM is still creating the VM.
    CreateLro,
    /// While ARM is still deleting the VM.
    DeleteLro,
}

impl Point {
    fn during_stop(self) -> bool {
        match self {
            Point::Step(s) => s.starts_with("stop-"),
            Point::CreateLro => false,
            Point::DeleteLro => true,
        }
    }

    fn pause(self) -> Option<&'static str> {
        match self {
            Point::Step(s) => Some(s),
            _ => None,
        }
    }
}

fn force() -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    }
}

/// Starts the interrupted call(s) for `point` in the background, waits until CAA reached
/// the point, and SIGKILLs it.
async fn drive_to_crash(
    n: &mut NodeCaa,
    arm: &armtest::Handle,
    ns: &str,
    pod_name: &str,
    id: &str,
    point: Point,
) -> Result<()> {
    let vm = format!("podvm-{pod_name}-{}", &id[..8]);
    if point.during_stop() {
        start_via(&n.socket, ns, pod_name, id).await?;
    }
    let (socket, ns2, p2, id2) = (
        n.socket.clone(),
        ns.to_string(),
        pod_name.to_string(),
        id.to_string(),
    );
    let stop = point.during_stop();
    let call = tokio::spawn(async move {
        if stop {
            stop_via(&socket, &id2).await
        } else {
            start_via(&socket, &ns2, &p2, &id2).await.map(|_| ())
        }
    });
    let log = n.caa.log_path().to_path_buf();
    let arm2 = arm.clone();
    let reached = harness::eventually(
        &format!("CAA reaching {point:?}"),
        Duration::from_secs(60),
        || {
            let (log, arm, vm) = (log.clone(), arm2.clone(), vm.clone());
            async move {
                Ok(match point {
                    Point::Step(s) => std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains(&format!("paused at crash point {s}"))
                        .then_some(()),
                    Point::CreateLro | Point::DeleteLro => {
                        let want = if point == Point::CreateLro {
                            "Creating"
                        } else {
                            "Deleting"
                        };
                        arm.vms()
                            .iter()
                            .any(|v| v.name == vm && v.provisioning_state == want)
                            .then_some(())
                    }
                })
            }
        },
    )
    .await;
    n.caa.signal(nix::sys::signal::Signal::SIGKILL);
    n.caa.stop(Duration::from_secs(5));
    let _ = call.await;
    reached.map_err(|e| anyhow!("{e:#}\n{}", n.caa.log_tail(20)))
}

/// Neither a VM nor a PeerPod named `vm` is left.
async fn gone(arm: &armtest::Handle, admin: &Client, ns: &str, vm: &str, what: &str) -> Result<()> {
    let pp: Api<PeerPod> = Api::namespaced(admin.clone(), ns);
    harness::eventually(what, Duration::from_secs(60), || {
        let (arm, pp, vm) = (arm.clone(), pp.clone(), vm.to_string());
        async move {
            let vm_left = arm.vms().iter().any(|v| v.name == vm);
            Ok((!vm_left && pp.get_opt(&vm).await?.is_none()).then_some(()))
        }
    })
    .await
    .map(|_| ())
}

async fn delete_pod(admin: &Client, ns: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    pods.delete(name, &force()).await?;
    harness::eventually("the pod gone", Duration::from_secs(30), || {
        let pods = pods.clone();
        let name = name.to_string();
        async move { Ok(pods.get_opt(&name).await?.is_none().then_some(())) }
    })
    .await
}

/// One crash point, twice: the shim retries the interrupted call after the restart (pod
/// alive), and the pod is deleted while CAA is down.
async fn scenario(env: &Env, s: &Setup, i: usize, point: Point) -> Result<()> {
    let ns = env.ns.as_str();
    let pause = |p: Option<&'static str>| -> Vec<(&'static str, String)> {
        p.map(|p| vec![(crashpoint::ENV, p.to_string())])
            .unwrap_or_default()
    };
    let mut n = s
        .node_caa(env, &format!("k{i}"), &pause(point.pause()))
        .await?;
    let result = async {
        // The shim retries after the restart.
        let (a, id_a) = (
            format!("a{i}"),
            format!("{:08x}{:08x}", 0xa000_0000u32 + i as u32, 1),
        );
        pod(&s.admin, ns, &a, &n.node).await?;
        drive_to_crash(&mut n, &s.arm, ns, &a, &id_a, point).await?;
        n.kill_and_restart(&[(crashpoint::ENV, None)]).await?;
        if !point.during_stop() {
            let vm = start_via(&n.socket, ns, &a, &id_a).await?;
            let view = s.arm.vms().into_iter().find(|v| v.name == vm);
            assert_eq!(
                view.map(|v| v.provisioning_state).as_deref(),
                Some("Succeeded"),
                "{point:?}: the retried StartVM gives a running VM"
            );
        }
        stop_via(&n.socket, &id_a).await?;
        delete_pod(&s.admin, ns, &a).await?;
        let vm_a = format!("podvm-{a}-{}", &id_a[..8]);
        gone(
            &s.arm,
            &s.admin,
            ns,
            &vm_a,
            "the retried sandbox's VM and record",
        )
        .await?;

        // The pod goes while CAA is down.
        n.kill_and_restart(&[(crashpoint::ENV, point.pause())])
            .await?;
        let (b, id_b) = (
            format!("b{i}"),
            format!("{:08x}{:08x}", 0xb000_0000u32 + i as u32, 2),
        );
        pod(&s.admin, ns, &b, &n.node).await?;
        drive_to_crash(&mut n, &s.arm, ns, &b, &id_b, point).await?;
        delete_pod(&s.admin, ns, &b).await?;
        n.kill_and_restart(&[(crashpoint::ENV, None)]).await?;
        let vm_b = format!("podvm-{b}-{}", &id_b[..8]);
        gone(
            &s.arm,
            &s.admin,
            ns,
            &vm_b,
            "the deleted pod's VM and record",
        )
        .await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{point:?}: {e:#}\nCAA log:\n{}", n.caa.log_tail(25)))
}

/// Nothing is left: no VM (no pod lives any more) and no PeerPod.
async fn assert_clean(s: &Setup, ns: &str) -> Result<()> {
    let vms: Vec<String> = s.arm.vms().into_iter().map(|v| v.name).collect();
    let pps = super::record_names(&Api::<PeerPod>::namespaced(s.admin.clone(), ns)).await?;
    if vms.is_empty() && pps.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("leaked VMs {vms:?}, PeerPods left {pps:?}"))
    }
}

pub async fn every_step_boundary(env: Env) -> Result<()> {
    let config = armtest::Config {
        lro_duration: Duration::from_millis(1500),
        ..Default::default()
    };
    // The sweep's grace is long: the main path must clean up, not the backstop.
    let extra = [
        ("CAA_SWEEP_GRACE_SECONDS", "600".to_string()),
        ("CAA_MIN_POLL_MS", "50".to_string()),
    ];
    let s = setup_with(&env, "", config, &extra).await?;
    let mut points: Vec<Point> = crashpoint::STEPS.iter().map(|s| Point::Step(s)).collect();
    points.push(Point::CreateLro);
    points.push(Point::DeleteLro);
    let results = futures::future::join_all(
        points
            .iter()
            .enumerate()
            .map(|(i, p)| scenario(&env, &s, i, *p)),
    )
    .await;
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if !failures.is_empty() {
        return Err(anyhow!("{}", failures.join("\n\n")));
    }
    assert_clean(&s, &env.ns).await
}

pub async fn random_points(env: Env) -> Result<()> {
    let config = armtest::Config {
        lro_duration: Duration::from_millis(600),
        ..Default::default()
    };
    let extra = [("CAA_SWEEP_GRACE_SECONDS", "600".to_string())];
    let s = setup_with(&env, "", config, &extra).await?;
    let ns = env.ns.clone();
    let mut n = s.node_caa(&env, "rnd", &[]).await?;
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let result = async {
        for round in 0..8u32 {
            let name = format!("r{round}");
            let id = format!("{:08x}{:08x}", 0xc000_0000u32 + round, seed as u32);
            pod(&s.admin, &ns, &name, &n.node).await?;
            // 1 = in CreateVM/StartVM, 2 = in StopVM, 3 = done.
            let stage = Arc::new(AtomicU8::new(1));
            let (socket, ns2, name2, id2, st) = (
                n.socket.clone(),
                ns.clone(),
                name.clone(),
                id.clone(),
                stage.clone(),
            );
            let call = tokio::spawn(async move {
                start_via(&socket, &ns2, &name2, &id2).await?;
                st.store(2, Ordering::SeqCst);
                stop_via(&socket, &id2).await?;
                st.store(3, Ordering::SeqCst);
                Ok::<(), anyhow::Error>(())
            });
            let after = Duration::from_millis(rng.u64(0..2000));
            tokio::time::sleep(after).await;
            n.caa.signal(nix::sys::signal::Signal::SIGKILL);
            n.caa.stop(Duration::from_secs(5));
            let _ = call.await;
            let retry = rng.bool();
            if !retry {
                delete_pod(&s.admin, &ns, &name).await?;
            }
            n.kill_and_restart(&[]).await?;
            if retry {
                // What the shim would do next: finish what was interrupted.
                if stage.load(Ordering::SeqCst) == 1 {
                    start_via(&n.socket, &ns, &name, &id).await?;
                }
                stop_via(&n.socket, &id).await?;
                delete_pod(&s.admin, &ns, &name).await?;
            }
            let vm = format!("podvm-{name}-{}", &id[..8]);
            gone(
                &s.arm,
                &s.admin,
                &ns,
                &vm,
                &format!("round {round} (kill after {after:?}, retry {retry})"),
            )
            .await?;
        }
        assert_clean(&s, &ns).await
    }
    .await;
    result.map_err(|e| anyhow!("seed {seed}: {e:#}\nCAA log:\n{}", n.caa.log_tail(25)))
}

/// Waits until CAA logged that it paused at `step`.
async fn paused_at(n: &NodeCaa, step: &str) -> Result<()> {
    let log = n.caa.log_path().to_path_buf();
    harness::eventually(
        &format!("CAA pausing at {step}"),
        Duration::from_secs(30),
        || {
            let log = log.clone();
            async move {
                Ok(std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(&format!("paused at crash point {step}"))
                    .then_some(()))
            }
        },
    )
    .await
    .map(|_| ())
}

/// StartVM and StopVM answer before their background writes; CAA dies before those writes.
/// After a restart (no call retried, the pod still there) the record shows the running VM's
/// instance and IP, and a record whose VM StopVM deleted is released: no VM, no record left.
pub async fn answered_before_background_writes(env: Env) -> Result<()> {
    let s = setup_with(
        &env,
        "",
        armtest::Config::default(),
        &[("CAA_SWEEP_GRACE_SECONDS", "600".to_string())],
    )
    .await?;
    let ns = env.ns.as_str();
    let pp: Api<PeerPod> = Api::namespaced(s.admin.clone(), ns);
    let pause = |p: &str| vec![(crashpoint::ENV, p.to_string())];
    let mut n = s
        .node_caa(&env, "bg", &pause(crashpoint::START_ANSWERED))
        .await?;
    let result = async {
        // StartVM answers; the write of instance id, IP and Running never runs.
        let (a, id_a) = ("bga", "bbbb0a0a00000001");
        pod(&s.admin, ns, a, &n.node).await?;
        let vm_a = start_via(&n.socket, ns, a, id_a).await?;
        paused_at(&n, crashpoint::START_ANSWERED).await?;
        let before = pp.get(&vm_a).await?;
        assert!(
            before.spec.instance_id.is_empty(),
            "the instance id was written although the write was held"
        );
        let ip = s
            .arm
            .vms()
            .into_iter()
            .find(|v| v.name == vm_a)
            .map(|v| v.private_ip)
            .context("the VM StartVM answered for")?;
        n.kill_and_restart(&[(crashpoint::ENV, None)]).await?;
        let after = harness::eventually(
            "the restarted CAA records the running VM",
            Duration::from_secs(30),
            || {
                let (pp, vm) = (pp.clone(), vm_a.clone());
                async move {
                    let p = pp.get(&vm).await?;
                    Ok((!p.spec.instance_id.is_empty()).then_some(p))
                }
            },
        )
        .await?;
        assert!(
            after
                .spec
                .instance_id
                .ends_with(&format!("/virtualMachines/{vm_a}")),
            "{}",
            after.spec.instance_id
        );
        let st = after.status.unwrap_or_default();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.vm_ip.as_deref(), Some(ip.as_str()));
        assert_eq!(s.arm.vms().len(), 1, "the running VM is kept, nothing else");

        // StopVM answers once the VM is gone; the release of the record never runs.
        n.kill_and_restart(&[(crashpoint::ENV, Some(crashpoint::STOP_ANSWERED))])
            .await?;
        stop_via(&n.socket, id_a).await?;
        assert!(
            !s.arm.vms().iter().any(|v| v.name == vm_a),
            "StopVM answered before the VM was gone"
        );
        paused_at(&n, crashpoint::STOP_ANSWERED).await?;
        let held = pp
            .get_opt(&vm_a)
            .await?
            .context("the record is still held")?;
        assert!(held.metadata.deletion_timestamp.is_some());
        n.kill_and_restart(&[(crashpoint::ENV, None)]).await?;
        // The pod is still there and nothing calls StopVM again.
        gone(
            &s.arm,
            &s.admin,
            ns,
            &vm_a,
            "the record released after the restart",
        )
        .await?;
        assert_clean(&s, ns).await
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", n.caa.log_tail(25)))
}
