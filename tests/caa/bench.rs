//! `make bench-caa`: CAA's own cost per pod and its behaviour under 100 concurrent pods.
//! Skipped unless `SANDBOXD_BENCH_CAA=1`; with `SANDBOXD_BENCH_CAA_OUT=<file>` the results
//! are appended there as Markdown (the Makefile points it at `docs/BENCHMARKS.md`).
//!
//! Overhead of one pod = wall time of CreateVM + StartVM + StopVM as the shim sees it, minus
//! the time ARM was busy with that pod: the union of the server-side intervals of its
//! requests and of its two long-running operations (create and delete), as the ARM test
//! server logged them. What is left is CAA: PeerPod writes, ttrpc, polling lag, the client.

use std::time::{Duration, Instant};

use anyhow::Result;
use sandboxd::armtest::{self, RequestLog};

use sandboxd::protocol::hypervisor;

use super::{create_request, ctx, hv, pod, setup_with, stop_via};
use crate::harness::Env;

/// Set to run the benchmark.
pub const ENV: &str = "SANDBOXD_BENCH_CAA";
const OUT_ENV: &str = "SANDBOXD_BENCH_CAA_OUT";
/// The `sandboxd` binary the CAA processes run (the Makefile gives the release build).
pub const BIN_ENV: &str = "SANDBOXD_BENCH_CAA_BIN";

pub fn skip() -> Option<String> {
    std::env::var(ENV)
        .is_err()
        .then(|| format!("benchmark: set {ENV}=1 (make bench-caa)"))
}

/// Length of the union of `[start, end)` intervals (µs).
fn union_len(mut iv: Vec<(u64, u64)>) -> u64 {
    iv.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in iv {
        match cur {
            Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                cur = Some((s, e));
            }
            None => cur = Some((s, e)),
        }
    }
    if let Some((cs, ce)) = cur {
        total += ce - cs;
    }
    total
}

/// ARM-busy time of one pod's requests (µs).
fn arm_time(reqs: &[RequestLog], vm: &str, lro: Duration) -> u64 {
    let lro = lro.as_micros() as u64;
    let mut iv: Vec<(u64, u64)> = reqs
        .iter()
        .filter(|r| r.path.contains("/subscriptions/"))
        .map(|r| (r.at_micros, r.at_micros + r.micros))
        .collect();
    let vm_path = format!("/virtualmachines/{vm}").to_ascii_lowercase();
    for method in ["PUT", "DELETE"] {
        if let Some(r) = reqs
            .iter()
            .find(|r| r.method == method && r.path.to_ascii_lowercase().ends_with(&vm_path))
        {
            iv.push((r.at_micros, r.at_micros + r.micros + lro));
        }
    }
    union_len(iv)
}

/// Where ARM's side of a burst went: when the VM writes arrived (first to last), how many
/// operation polls and NIC reads there were, and when the last request arrived, all relative
/// to the first request of the burst.
fn arm_timeline(reqs: &[RequestLog]) -> String {
    let Some(t0) = reqs.first().map(|r| r.at_micros) else {
        return "no ARM requests".into();
    };
    let ms = |r: &RequestLog| (r.at_micros - t0) as f64 / 1000.0;
    let writes: Vec<f64> = reqs
        .iter()
        .filter(|r| {
            (r.method == "PUT" || r.method == "DELETE")
                && r.path.to_ascii_lowercase().contains("/virtualmachines/")
        })
        .map(ms)
        .collect();
    let polls = reqs
        .iter()
        .filter(|r| r.path.contains("/operations/"))
        .count();
    let nics = reqs
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.to_ascii_lowercase().contains("/networkinterfaces/")
        })
        .count();
    let last = reqs.iter().map(ms).fold(0.0, f64::max);
    let busy: u64 = reqs
        .iter()
        .filter(|r| {
            (r.method == "PUT" || r.method == "DELETE")
                && r.path.to_ascii_lowercase().contains("/virtualmachines/")
        })
        .map(|r| r.micros)
        .sum();
    format!(
        "{} VM writes arrived at {:.0}..{:.0} ms (ARM busy {:.0} ms on them in all), {polls} operation polls, {nics} NIC reads, last request at {last:.0} ms",
        writes.len(),
        writes.first().copied().unwrap_or_default(),
        writes.iter().copied().fold(0.0, f64::max),
        busy as f64 / 1000.0,
    )
}

/// How long after its operation ended (the VM write's arrival plus the operation's
/// duration) the poll that saw it done arrived (ms).
fn poll_lag(reqs: &[RequestLog], method: &str, lro: Duration) -> f64 {
    let write = reqs
        .iter()
        .find(|r| r.method == method && r.path.to_ascii_lowercase().contains("/virtualmachines/"));
    let last_poll = reqs.iter().rfind(|r| r.path.contains("/operations/"));
    match (write, last_poll) {
        (Some(w), Some(p)) => {
            (p.at_micros as f64 - (w.at_micros as f64 + lro.as_micros() as f64)) / 1000.0
        }
        _ => 0.0,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One measured pod (ms): its overhead, CreateVM's wall time, StartVM's and StopVM's wall
/// time minus their ARM time, and the polling lag of its create and delete operations.
struct PodTimes {
    overhead: f64,
    create: f64,
    start: f64,
    stop: f64,
    create_lag: f64,
    delete_lag: f64,
}

impl PodTimes {
    fn describe(&self) -> String {
        format!(
            "{:.1} ms = CreateVM {:.1} + StartVM {:.1} (lag {:.1}) + StopVM {:.1} (lag {:.1})",
            self.overhead, self.create, self.start, self.create_lag, self.stop, self.delete_lag
        )
    }
}

pub async fn run(env: Env) -> Result<()> {
    let mut report = String::new();
    let profile = if std::env::var_os(BIN_ENV).is_some() {
        "static release (dist profile) CAA binary"
    } else {
        "debug CAA binary"
    };

    // 1. Overhead per pod, pods one after another.
    let lro = Duration::from_millis(200);
    let config = armtest::Config {
        lro_duration: lro,
        ..Default::default()
    };
    let extra = [
        ("CAA_SWEEP_GRACE_SECONDS", "600".to_string()),
        ("CAA_MIN_POLL_MS", "10".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let mut s = setup_with(&env, "", config, &extra).await?;
    let ns = env.ns.clone();
    // 200 measured pods: the p99 is then the third-largest, not the second-largest of 55.
    let n = 205;
    let mut pods: Vec<PodTimes> = Vec::new();
    for i in 0..n {
        let name = format!("o{i}");
        let id = format!("{i:08x}0000b0b0");
        pod(&s.admin, &ns, &name, &s.node).await?;
        let before = s.arm.requests().len();
        let t = Instant::now();
        hv(&s.socket)
            .await?
            .create_vm(ctx(), &create_request(&id, &ns, &name, &[]))
            .await?;
        let created = t.elapsed().as_micros() as u64;
        let mut start = hypervisor::StartVMRequest::new();
        start.id = id.clone();
        hv(&s.socket).await?.start_vm(ctx(), &start).await?;
        let vm = format!("podvm-{name}-{}", &id[..8]);
        let started = t.elapsed().as_micros() as u64;
        let mid = s.arm.requests().len();
        stop_via(&s.socket, &id).await?;
        let wall = t.elapsed().as_micros() as u64;
        let reqs = s.arm.requests();
        let arm = arm_time(&reqs[before..], &vm, lro);
        let arm_start = arm_time(&reqs[before..mid], &vm, lro);
        let arm_stop = arm_time(&reqs[mid..], &vm, lro);
        if i >= 5 {
            // The first pods warm connections and caches.
            pods.push(PodTimes {
                overhead: wall.saturating_sub(arm) as f64 / 1000.0,
                create: created as f64 / 1000.0,
                start: (started - created).saturating_sub(arm_start) as f64 / 1000.0,
                stop: (wall - started).saturating_sub(arm_stop) as f64 / 1000.0,
                create_lag: poll_lag(&reqs[before..mid], "PUT", lro),
                delete_lag: poll_lag(&reqs[mid..], "DELETE", lro),
            });
        }
    }
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    let overhead_ms = sorted(pods.iter().map(|p| p.overhead).collect());
    let create_ms = sorted(pods.iter().map(|p| p.create).collect());
    let start_ms = sorted(pods.iter().map(|p| p.start).collect());
    let stop_ms = sorted(pods.iter().map(|p| p.stop).collect());
    let lag_ms = sorted(
        pods.iter()
            .flat_map(|p| [p.create_lag, p.delete_lag])
            .collect(),
    );
    // Where the tail goes: the slowest pods, call by call.
    pods.sort_by(|a, b| b.overhead.total_cmp(&a.overhead));
    let slowest: Vec<String> = pods.iter().take(4).map(PodTimes::describe).collect();
    println!("slowest pods: {}", slowest.join("; "));
    println!(
        "polling lag (last poll minus the operation's end), create and delete: p50 {:.1} ms, max {:.1} ms",
        pct(&lag_ms, 0.5),
        lag_ms.last().copied().unwrap_or_default()
    );
    let (p50, p99) = (pct(&overhead_ms, 0.5), pct(&overhead_ms, 0.99));
    let breakdown = format!(
        "CreateVM {:.1} ms, StartVM {:.1} ms, StopVM {:.1} ms",
        pct(&create_ms, 0.5),
        pct(&start_ms, 0.5),
        pct(&stop_ms, 0.5)
    );
    println!("caa overhead p50 {p50:.1} ms, p99 {p99:.1} ms; p50 by call: {breakdown}");

    // 2. 100 concurrent pods vs one, ARM operations taking 2 s, production manners.
    let lro = Duration::from_secs(2);
    s.arm.set_config(|c| {
        c.lro_duration = lro;
        c.lro_retry_after_secs = 1;
    });
    s.envs.retain(|(k, _)| *k != "CAA_MIN_POLL_MS");
    s.envs.push(("CAA_MIN_POLL_MS", "1000".to_string()));
    s.crash_and_restart().await?;
    let phase = |k: usize| {
        let s = &s;
        let ns = ns.clone();
        async move {
            for i in 0..k {
                pod(&s.admin, &ns, &format!("c{k}-{i}"), &s.node).await?;
            }
            // The kubelet calls CreateVM only after a pod was scheduled and its sandbox set
            // up: the burst starts once the API server and CAA's pod watch have taken in
            // the pods the test just created, so it measures the creates, not that churn.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let first = s.arm.requests().len();
            let t = Instant::now();
            let all = futures::future::join_all((0..k).map(|i| {
                let (socket, ns) = (s.socket.clone(), ns.clone());
                async move {
                    let (name, id) = (format!("c{k}-{i}"), format!("{i:08x}{k:08x}"));
                    hv(&socket)
                        .await?
                        .create_vm(ctx(), &create_request(&id, &ns, &name, &[]))
                        .await?;
                    let answered = t.elapsed();
                    let mut start = hypervisor::StartVMRequest::new();
                    start.id = id;
                    hv(&socket).await?.start_vm(ctx(), &start).await?;
                    Ok::<Duration, anyhow::Error>(answered)
                }
            }))
            .await;
            let create = t.elapsed();
            let mut answered = Duration::ZERO;
            for r in all {
                answered = answered.max(r?);
            }
            println!("{k} pods: every CreateVM answered by {answered:?}");
            let created = s.arm.requests().len();
            let t = Instant::now();
            let all = futures::future::join_all((0..k).map(|i| {
                let socket = s.socket.clone();
                async move { stop_via(&socket, &format!("{i:08x}{k:08x}")).await }
            }))
            .await;
            let delete = t.elapsed();
            for r in all {
                r?;
            }
            let reqs = s.arm.requests();
            println!("{k} pods, create: {}", arm_timeline(&reqs[first..created]));
            println!("{k} pods, delete: {}", arm_timeline(&reqs[created..]));
            Ok::<(Duration, Duration), anyhow::Error>((create, delete))
        }
    };
    let (c1, d1) = phase(1).await?;
    // Let the token buckets refill before the burst.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (c100, d100) = phase(100).await?;
    let throttled = s.arm.requests().iter().filter(|r| r.status == 429).count();
    let line = |a: Duration| format!("{:.2} s", a.as_secs_f64());
    report.push_str(&format!(
        "\n## CAA (`make bench-caa`, {profile} build)\n\n\
         Reproduce: `make bench-caa` (builds the release binary and runs \
         `caa::bench_overhead_per_pod_and_100_concurrent_pods_vs_one` with \
         `SANDBOXD_BENCH_CAA=1` from the release test build, so the in-process ARM test \
         server and ttrpc clients cost little; 2 shared cores, the API server on \
         loopback).\n\n\
         | measure | result | goal |\n|---|---|---|\n\
         | CAA overhead per pod (CreateVM+StartVM+StopVM wall time minus ARM-busy time), p50 | {p50:.1} ms | |\n\
         | CAA overhead per pod, p99 ({} pods, ARM operations 200 ms, polling 10 ms) | {p99:.1} ms | ≤ 50 ms |\n\
         | overhead p50 by call (StartVM/StopVM minus their ARM time) | {breakdown} | |\n\
         | the slowest pods, by call (lag: last operation poll minus the operation's end) | {} | |\n\
         | 1 pod, ARM operations 2 s: create / delete | {} / {} | |\n\
         | 100 concurrent pods: create / delete | {} / {} | |\n\
         | ratio 100 / 1: create / delete | {:.2} / {:.2} | ≤ 1.2 |\n\
         | 429s ARM answered during the run | {throttled} | |\n\n\
         The concurrent run uses production manners: token buckets of 250 reads (25/s) and \
         200 writes (10/s) per subscription, polling at the operation's `Retry-After` (1 s).\n",
        overhead_ms.len(),
        slowest.join("; "),
        line(c1),
        line(d1),
        line(c100),
        line(d100),
        c100.as_secs_f64() / c1.as_secs_f64(),
        d100.as_secs_f64() / d1.as_secs_f64(),
    ));
    eprintln!("{report}");
    if let Ok(path) = std::env::var(OUT_ENV) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(report.as_bytes())?;
    }
    Ok(())
}
