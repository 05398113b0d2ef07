//! `make bench-relay`: the cost of the agent relay. Small ttrpc calls and large echoed
//! messages through CAA's agent socket → mutual TLS over loopback → the forwarder relay →
//! the test agent, against the same calls straight to the agent's unix socket; large
//! messages also against a plain TLS echo over loopback with the same certificates.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sandboxd::caa::relay::dial;
use sandboxd::forwarder::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::process::run_dir;

/// Runs only when asked (`SANDBOXD_BENCH_RELAY=1`).
pub fn skip() -> Option<String> {
    std::env::var_os("SANDBOXD_BENCH_RELAY")
        .is_none()
        .then(|| "benchmark: set SANDBOXD_BENCH_RELAY=1 (make bench-relay)".into())
}

const SMALL_CALLS: usize = 3000;
const LARGE: usize = 1 << 20;
const LARGE_CALLS: usize = 64;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn small_latencies(socket: &std::path::Path) -> Result<Vec<Duration>> {
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
    for _ in 0..300 {
        super::agent::call(&client, "StartContainer", vec![0x0a, 2, b'c', b'1']).await?;
    }
    let mut v = Vec::with_capacity(SMALL_CALLS);
    for _ in 0..SMALL_CALLS {
        let t = Instant::now();
        super::agent::call(&client, "StartContainer", vec![0x0a, 2, b'c', b'1']).await?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

/// MB/s of 1 MiB messages echoed by the agent (both directions counted).
async fn large_throughput(socket: &std::path::Path, log: &super::agent::Log) -> Result<f64> {
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
    let msg: Vec<u8> = (0..LARGE).map(|i| (i % 251) as u8).collect();
    for _ in 0..4 {
        super::agent::call(&client, "ReadStdout", msg.clone()).await?;
    }
    log.lock().unwrap().clear();
    let t = Instant::now();
    for _ in 0..LARGE_CALLS {
        let back = super::agent::call(&client, "ReadStdout", msg.clone()).await?;
        ensure!(back.len() == LARGE);
        log.lock().unwrap().clear();
    }
    Ok((2 * LARGE * LARGE_CALLS) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// MB/s of 1 MiB messages echoed over one mutual-TLS loopback connection (same certificates
/// and client configuration as the relay).
async fn tls_echo_throughput(pki: &sandboxd::caa::relay::Pki) -> Result<f64> {
    let vm = "podvm-bench-0";
    let server = pki.server_cert(vm)?;
    let cfg = tls::server_config(&server.cert_pem, &server.key_pem, pki.ca_pem())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let echo = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let s = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await?;
        let (mut r, mut w) = tokio::io::split(s);
        tokio::io::copy(&mut r, &mut w).await?;
        anyhow::Ok(())
    });
    let s = dial(&pki.client_config(), addr, vm, Duration::from_secs(5)).await?;
    let (mut r, mut w) = tokio::io::split(s);
    let msg: Vec<u8> = (0..LARGE).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; LARGE];
    let mut round = async |r: &mut tokio::io::ReadHalf<_>, w: &mut tokio::io::WriteHalf<_>| {
        let (a, b) = tokio::join!(w.write_all(&msg), r.read_exact(&mut buf));
        a?;
        b?;
        anyhow::Ok(())
    };
    for _ in 0..4 {
        round(&mut r, &mut w).await?;
    }
    let t = Instant::now();
    for _ in 0..LARGE_CALLS {
        round(&mut r, &mut w).await?;
    }
    let mbs = (2 * LARGE * LARGE_CALLS) as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop((r, w));
    echo.abort();
    Ok(mbs)
}

/// The benchmark: prints one Markdown table.
pub async fn run() -> Result<()> {
    let r = super::rig("bench").await?;
    let direct = run_dir()
        .join(format!("dp-bench-{}", std::process::id()))
        .join("agent.sock");
    ensure!(
        direct.exists(),
        "the test agent's socket is not where expected"
    );
    let d = small_latencies(&direct).await.context("direct calls")?;
    r.log.lock().unwrap().clear();
    let rl = small_latencies(&r.socket).await.context("relayed calls")?;
    r.log.lock().unwrap().clear();
    let d_tp = large_throughput(&direct, &r.log).await?;
    let r_tp = large_throughput(&r.socket, &r.log).await?;
    let tls_tp = tls_echo_throughput(&r.pki).await?;
    let us = |x: Duration| x.as_secs_f64() * 1e6;
    println!(
        "\n| path | small call p50 | p99 | 1 MiB echo throughput |\n|---|---|---|---|\n\
         | direct unix socket to the agent | {:.0} µs | {:.0} µs | {:.0} MB/s |\n\
         | CAA relay + mTLS loopback + forwarder | {:.0} µs | {:.0} µs | {:.0} MB/s |\n\
         | plain mTLS echo over loopback | | | {:.0} MB/s |\n\
         \nadded p50 {:.0} µs, p99 {:.0} µs; relay throughput = {:.0} % of TLS over loopback, {:.0} % of direct\n",
        us(pct(&d, 0.5)),
        us(pct(&d, 0.99)),
        d_tp,
        us(pct(&rl, 0.5)),
        us(pct(&rl, 0.99)),
        r_tp,
        tls_tp,
        us(pct(&rl, 0.5)) - us(pct(&d, 0.5)),
        us(pct(&rl, 0.99)) - us(pct(&d, 0.99)),
        100.0 * r_tp / tls_tp,
        100.0 * r_tp / d_tp,
    );
    Ok(())
}
