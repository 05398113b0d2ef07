//! `make bench` for the operator: 1000 fake Nodes, one KataConfig. Runs only with
//! `SANDBOXD_BENCH=1` (skipped otherwise, so never in `make test`). The operator runs as a
//! process (`SANDBOXD_BENCH_BIN`, else the test build of `sandboxd`) under its own
//! ServiceAccount, so its peak RSS (VmHWM) is its own.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sandboxd::api::names::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;
use super::writes::Writes;
use crate::harness::control_plane::{UserAuth, kubeconfig_yaml};
use crate::harness::process::{Process, free_port, run_dir};
use crate::harness::{Case, Env, eventually};

const NODES: usize = 1000;
const PARALLEL: usize = 32;

pub fn cases() -> Vec<Case> {
    let skip = std::env::var_os("SANDBOXD_BENCH")
        .is_none()
        .then(|| "benchmark: run with SANDBOXD_BENCH=1 (make bench)".to_string());
    vec![Case::cluster_exclusive("operator::bench_1000_nodes_one_kataconfig", bench).skip_if(skip)]
}

async fn token_kubeconfig(env: &Env, ns: &str, sa: &str) -> Result<std::path::PathBuf> {
    let cp = env.cp();
    let sas: Api<ServiceAccount> = Api::namespaced(env.admin().await?, ns);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await?;
    let token = token.status.and_then(|s| s.token).context("no token")?;
    let path = run_dir().join(format!("{ns}-operator.kubeconfig"));
    std::fs::write(
        &path,
        kubeconfig_yaml(&cp.server, &cp.ca_pem, &UserAuth::Token(token)),
    )?;
    Ok(path)
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM for {pid}"))
}

async fn bench(env: Env) -> Result<()> {
    let f = Fixture::new(&env).await?;
    let nodes = f.node_api();
    let names: Vec<String> = (0..NODES)
        .map(|i| format!("bench-{i:04}-{}", f.suffix))
        .collect();
    let started = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let nodes = nodes.clone();
            let pool = f.pool_key.clone();
            async move {
                let node: Node = serde_json::from_value(json!({"metadata": {
                    "name": name,
                    "labels": {pool: "kata", "sandboxd.test/fake-node": "true",
                               "sandboxd.test/bench": "true"},
                }}))?;
                nodes.create(&PostParams::default(), &node).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    eprintln!("bench: {NODES} nodes created in {:?}", started.elapsed());

    let kubeconfig = token_kubeconfig(&env, &f.ns, "sandboxd-operator").await?;
    let bin = std::env::var("SANDBOXD_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sandboxd").to_string());
    let port = free_port();
    let args: Vec<String> = [
        "operator",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--namespace",
        &f.ns,
        "--platform",
        "kubernetes",
        "--identity",
        "bench",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut proc = Process::start("operator-bench", std::path::Path::new(&bin), &args, &[])?;
    let result = measure(&env, &f, &names, &mut proc, port).await;
    proc.stop(Duration::from_secs(10));
    // Clean up: the KataConfig (finalizer stripped), the RuntimeClass, the nodes.
    clear_kataconfigs(&f.admin).await?;
    let rcs: Api<RuntimeClass> = Api::all(f.admin.clone());
    let _ = rcs.delete(RUNTIME_CLASS, &DeleteParams::default()).await;
    futures::stream::iter(names.iter().cloned())
        .map(|n| {
            let nodes = nodes.clone();
            async move {
                let _ = nodes.delete(&n, &DeleteParams::default()).await;
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<_>>()
        .await;
    result
}

async fn measure(
    env: &Env,
    f: &Fixture,
    names: &[String],
    proc: &mut Process,
    port: u16,
) -> Result<()> {
    // The operator is up once it has synced and reconciled (nothing to do yet).
    let deadline = Instant::now() + WAIT;
    loop {
        proc.check_running()
            .map_err(|e| anyhow!("{e:#}\n{}", proc.log_tail(20)))?;
        let m = http_get(port, "/metrics").await.unwrap_or_default();
        if m.contains("sandboxd_operator_reconciles_total{result=\"ok\"}") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the operator did not reconcile: {}",
            proc.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let writes = Writes::start(&f.admin, &f.ns).await?;
    let nodes = f.node_api();
    let kcs = f.kcs();
    let name = env.unique("kc");

    let t0 = Instant::now();
    f.create(&f.kataconfig(&name)).await?;
    let labelled = format!("{LABEL_NODE_INSTALL}={INSTALL},sandboxd.test/bench=true");
    let planned = eventually(
        "every node planned and the status settled",
        Duration::from_secs(120),
        || async {
            let kc = kcs.get(&name).await?;
            let k = kata_nodes(&kc);
            if k.node_count as usize != NODES || k.waiting_to_install.len() != NODES {
                return Ok(None);
            }
            let n = nodes
                .list_metadata(&ListParams::default().labels(&labelled))
                .await?
                .items
                .len();
            Ok((n == NODES).then(|| t0.elapsed()))
        },
    )
    .await?;
    // Settled: nothing more arrives for 2 s.
    let mut convergence = writes.take();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let more = writes.take();
        if more.is_empty() {
            break;
        }
        convergence.extend(more);
    }

    // Phase 2: every installer reports `installed`; time until the status says so.
    let t1 = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|n| async move { f.report(&n, STATE_INSTALLED, None).await })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let reported = t1.elapsed();
    eventually(
        "status showing every node installed",
        Duration::from_secs(120),
        || async {
            let kc = kcs.get(&name).await?;
            Ok((kata_nodes(&kc).ready_node_count as usize == NODES
                && in_progress(&kc).is_some_and(|(s, _, _)| s == "False"))
            .then_some(()))
        },
    )
    .await?;
    let installed = t1.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = writes.take();

    // The following minute.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let steady = writes.take();
    proc.check_running()?;
    let hwm = vm_hwm_kib(proc.pid())?;
    let metrics = http_get(port, "/metrics").await?;
    let reconciles: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sandboxd_operator_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();

    let node_writes = convergence
        .iter()
        .filter(|w| w.starts_with("Node/"))
        .count();
    println!(
        "\n| nodes | planned + status settled | API writes (convergence) | of which Node | \
         1000 installer reports → status | writes in the next 60 s | peak RSS (VmHWM) | reconcile passes |\n\
         |---|---|---|---|---|---|---|---|\n\
         | {NODES} | {:.2} s | {} | {} | {:.2} s (reports sent in {:.2} s) | {} | {:.1} MiB | {} |\n",
        planned.as_secs_f64(),
        convergence.len(),
        node_writes,
        installed.as_secs_f64(),
        reported.as_secs_f64(),
        steady.len(),
        hwm as f64 / 1024.0,
        reconciles,
    );
    ensure!(steady.is_empty(), "writes at steady state: {steady:?}");
    Ok(())
}
