//! `make bench-podvm`: the pod VM image booted under qemu (TCG here, KVM where it runs),
//! several runs, each a fresh boot:
//! - `/init` entered → agent ready (console uptime stamps; the kernel's own boot is not ours);
//! - CreateSandbox → first app container running, through the forwarder over mTLS, with the
//!   image not yet in the VM (pulled from a registry on this machine) and cached (a second
//!   pod of the same image), against the time libcontainer itself spent creating and
//!   starting the same containers in the same VM (the agent's counter);
//! - the agent's resident memory idle and with the pod running.
//!
//! Each run also prints the client-side time of each call of the cached pod and the round
//! trip of a trivial call (`grpc.Health/Check`) through the same path;
//! `SANDBOXD_BENCH_PODVM_CONSOLE=1` prints the VM's console (init's, the forwarder's and
//! the agent's logs) after each run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use protobuf::well_known_types::empty::Empty;
use sandboxd::forwarder::init::{AGENT_READY_MARKER, INIT_ENTERED_MARKER};
use sandboxd::pki::Ca;
use sandboxd::protocol::agent::*;

use super::agent_vm::{self, Vm};
use crate::agent::client::Wire;
use crate::agent::sequence::{self, Rootfs, Setup};
use crate::harness::Case;

pub fn case(inputs: Option<String>) -> Case {
    let skip = std::env::var_os("SANDBOXD_BENCH_PODVM")
        .is_none()
        .then(|| "benchmark: run with `make bench-podvm`".to_string())
        .or(inputs);
    Case::plain("image::bench_podvm", |_| run()).skip_if(skip)
}

fn gauge(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct PodTimes {
    total: f64,
    libcontainer: f64,
}

async fn pod<S>(w: &mut Wire<S>, setup: &Setup, n: u32) -> Result<(PodTimes, (u64, u64))>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let before: Metrics = w
        .ok("/grpc.AgentService/GetMetrics", &GetMetricsRequest::new())
        .await?;
    let t = Instant::now();
    let mut marks = Vec::new();
    let _: Empty = w
        .ok(
            "/grpc.AgentService/CreateSandbox",
            &CreateSandboxRequest {
                sandbox_id: format!("bench{n}"),
                hostname: "bench".into(),
                ..Default::default()
            },
        )
        .await?;
    marks.push(("CreateSandbox".to_string(), t.elapsed()));
    for (cid, args, sandbox) in [
        ("pause", vec!["/pause"], true),
        ("app", vec!["sleep", "1000"], false),
    ] {
        let spec = sequence::spec(setup, cid, &args, sandbox);
        let _: Empty = w
            .ok(
                "/grpc.AgentService/CreateContainer",
                &sequence::create_request(setup, cid, spec, sandbox),
            )
            .await?;
        marks.push((format!("CreateContainer {cid}"), t.elapsed()));
        let _: Empty = w
            .ok(
                "/grpc.AgentService/StartContainer",
                &StartContainerRequest {
                    container_id: cid.into(),
                    ..Default::default()
                },
            )
            .await?;
        marks.push((format!("StartContainer {cid}"), t.elapsed()));
    }
    let total = t.elapsed().as_secs_f64();
    let mut prev = Duration::ZERO;
    let steps: Vec<String> = marks
        .iter()
        .map(|(n, d)| {
            let s = format!("{n} {:.1} ms", (*d - prev).as_secs_f64() * 1000.0);
            prev = *d;
            s
        })
        .collect();
    eprintln!("pod {n}: {}", steps.join(", "));
    let after: Metrics = w
        .ok("/grpc.AgentService/GetMetrics", &GetMetricsRequest::new())
        .await?;
    let lc = gauge(
        &after.metrics,
        "sandboxd_agent_libcontainer_microseconds_total",
    ) - gauge(
        &before.metrics,
        "sandboxd_agent_libcontainer_microseconds_total",
    );
    let rss = (
        gauge(&after.metrics, "sandboxd_agent_resident_memory_bytes"),
        gauge(&after.metrics, "sandboxd_agent_anonymous_memory_bytes"),
    );
    let _: Empty = w
        .ok(
            "/grpc.AgentService/DestroySandbox",
            &DestroySandboxRequest::new(),
        )
        .await?;
    Ok((
        PodTimes {
            total,
            libcontainer: lc as f64 / 1e6,
        },
        rss,
    ))
}

async fn run() -> Result<()> {
    let runs: usize = std::env::var("SANDBOXD_BENCH_PODVM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rows = Vec::new();
    for run in 1..=runs {
        let ca = Ca::new("bench-podvm-ca", time::Duration::days(1))?;
        let regs = agent_vm::registries(&ca)?;
        let port = |a: &str| {
            a.rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or(0)
        };
        let ports = [port(&regs.open.addr), port(&regs.closed.addr)];
        let vm = Vm::boot(&ca, agent_vm::user_data(&ca, ports[1])?, &ports).await?;
        let console = vm.console_text();
        let entered =
            agent_vm::uptime_of(&console, INIT_ENTERED_MARKER).context("no /init marker")?;
        let ready =
            agent_vm::uptime_of(&console, AGENT_READY_MARKER).context("no agent-ready marker")?;
        let mut w = Wire::new(vm.connect().await?);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle: Metrics = w
            .ok("/grpc.AgentService/GetMetrics", &GetMetricsRequest::new())
            .await?;
        let rss_idle = (
            gauge(&idle.metrics, "sandboxd_agent_resident_memory_bytes"),
            gauge(&idle.metrics, "sandboxd_agent_anonymous_memory_bytes"),
        );
        let setup = Setup {
            base: "/run/kata-containers".into(),
            rootfs: Rootfs::Image(regs.image.clone()),
            cgroup_prefix: "kubepods/bench".into(),
            oom: false,
            pause: true,
        };
        let (uncached, rss_pod) = pod(&mut w, &setup, 1).await?;
        let mut rtts = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            let _: sandboxd::protocol::health::HealthCheckResponse = w
                .ok(
                    "/grpc.Health/Check",
                    &sandboxd::protocol::health::CheckRequest::new(),
                )
                .await?;
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        rtts.sort_by(f64::total_cmp);
        eprintln!(
            "round trip (grpc.Health/Check, 21 calls): median {:.2} ms, min {:.2} ms",
            rtts[10], rtts[0]
        );
        let (cached, _) = pod(&mut w, &setup, 2).await?;
        drop(w);
        if std::env::var_os("SANDBOXD_BENCH_PODVM_CONSOLE").is_some() {
            eprintln!("{}", vm.console_text());
        }
        let accel = vm.accel;
        vm.power_off().await?;
        let row = format!(
            "| {run} | {accel} | {:.0} ms | {:.2} s | {:.2} s | {:.3} s | {:.3} s | {:.2}x | {:.1} MiB ({:.1} anon) | {:.1} MiB ({:.1} anon) |",
            (ready - entered) * 1000.0,
            uncached.total,
            uncached.libcontainer,
            cached.total,
            cached.libcontainer,
            cached.total / cached.libcontainer.max(1e-6),
            rss_idle.0 as f64 / 1048576.0,
            rss_idle.1 as f64 / 1048576.0,
            rss_pod.0 as f64 / 1048576.0,
            rss_pod.1 as f64 / 1048576.0,
        );
        eprintln!("{row}");
        rows.push(row);
    }
    eprintln!(
        "\n| run | accel | /init → agent ready | CreateSandbox → app running (uncached) | libcontainer part | same, cached | libcontainer part | cached ÷ libcontainer | agent RSS idle | agent RSS with a pod |\n|---|---|---|---|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
    Ok(())
}
