//! `make bench-relay`: the cost of the agent relay. Small ttrpc calls and large echoed
//! messages through CAA's agent socket → mutual TLS over loopback → the forwarder relay →
//! the test agent, against the same calls straight to the agent's unix socket and through a
//! plain TLS tunnel over loopback (byte copies on both ends, no frame handling: what any TLS
//! hop pair costs); large messages also against a plain TLS echo, with the same certificates.

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

async fn small_latencies(socket: &std::path::Path, n: usize) -> Result<Vec<Duration>> {
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
    for _ in 0..300 {
        super::agent::call(&client, "StartContainer", vec![0x0a, 2, b'c', b'1']).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        super::agent::call(&client, "StartContainer", vec![0x0a, 2, b'c', b'1']).await?;
        v.push(t.elapsed());
    }
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
async fn tls_echo_throughput(pki: &sandboxd::caa::pki::Pki) -> Result<f64> {
    let vm = "podvm-bench-0";
    let server = pki.server_cert(vm)?;
    let cfg = tls::server_config(&server.cert_pem, &server.key_pem, &pki.ca_pem())?;
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

/// The same calls over TLS on loopback with nothing frame-aware in the way: a unix socket
/// whose connections are copied byte for byte (64 KiB buffers) into a mutual-TLS loopback
/// connection, copied on the far side into the agent's socket. What any TLS tunnel between
/// the shim and the agent costs: the baseline the relay's throughput is held to.
async fn tls_tunnel(
    pki: &sandboxd::caa::pki::Pki,
    agent: &std::path::Path,
    socket: &std::path::Path,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    const BUF: usize = 64 << 10;
    let vm = "podvm-tunnel-0";
    let server = pki.server_cert(vm)?;
    let cfg = tls::server_config(&server.cert_pem, &server.key_pem, &pki.ca_pem())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let agent = agent.to_path_buf();
    let far = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (cfg, agent) = (cfg.clone(), agent.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(mut s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                    return;
                };
                let Ok(mut a) = tokio::net::UnixStream::connect(&agent).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut s, &mut a, BUF, BUF).await;
            });
        }
    });
    let _ = std::fs::remove_file(socket);
    let local = tokio::net::UnixListener::bind(socket)?;
    let client = pki.client_config();
    let near = tokio::spawn(async move {
        while let Ok((mut u, _)) = local.accept().await {
            let client = client.clone();
            tokio::spawn(async move {
                let Ok(mut s) = dial(&client, addr, vm, Duration::from_secs(5)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut u, &mut s, BUF, BUF).await;
            });
        }
    });
    Ok(vec![far, near])
}

/// Rounds of every measurement, the paths alternating within each round so that this
/// machine's drift hits them alike.
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
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
    let tunnel = direct.with_file_name("tunnel.sock");
    let tunnel_tasks = tls_tunnel(&r.pki, &direct, &tunnel).await?;
    let (mut d, mut rl, mut tl) = (Vec::new(), Vec::new(), Vec::new());
    let (mut d_tp, mut r_tp, mut t_tp, mut e_tp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.extend(
            small_latencies(&direct, SMALL_CALLS / ROUNDS)
                .await
                .context("direct calls")?,
        );
        r.log.lock().unwrap().clear();
        rl.extend(
            small_latencies(&r.socket, SMALL_CALLS / ROUNDS)
                .await
                .context("relayed calls")?,
        );
        r.log.lock().unwrap().clear();
        tl.extend(
            small_latencies(&tunnel, SMALL_CALLS / ROUNDS)
                .await
                .context("tunnelled calls")?,
        );
        r.log.lock().unwrap().clear();
        d_tp.push(large_throughput(&direct, &r.log).await?);
        r_tp.push(large_throughput(&r.socket, &r.log).await?);
        t_tp.push(large_throughput(&tunnel, &r.log).await?);
        e_tp.push(tls_echo_throughput(&r.pki).await?);
    }
    for t in tunnel_tasks {
        t.abort();
    }
    d.sort();
    rl.sort();
    tl.sort();
    // Each round's relay throughput against the same round's baselines.
    let vs_tunnel: Vec<f64> = r_tp.iter().zip(&t_tp).map(|(r, t)| 100.0 * r / t).collect();
    let vs_echo: Vec<f64> = r_tp.iter().zip(&e_tp).map(|(r, t)| 100.0 * r / t).collect();
    let vs_direct: Vec<f64> = r_tp.iter().zip(&d_tp).map(|(r, t)| 100.0 * r / t).collect();
    let us = |x: Duration| x.as_secs_f64() * 1e6;
    let mbs = |v: &[f64]| {
        let (lo, hi) = range(v);
        format!("{:.0} MB/s ({lo:.0}–{hi:.0})", median(v.to_vec()))
    };
    let ratio = |v: &[f64]| {
        let (lo, hi) = range(v);
        format!("{:.0} % (rounds {lo:.0}–{hi:.0} %)", median(v.to_vec()))
    };
    println!(
        "\n{ROUNDS} rounds, paths alternating; throughput median (range)\n\n\
         | path | small call p50 | p99 | 1 MiB echo throughput |\n|---|---|---|---|\n\
         | direct unix socket to the agent | {:.0} µs | {:.0} µs | {} |\n\
         | CAA relay + mTLS loopback + forwarder | {:.0} µs | {:.0} µs | {} |\n\
         | plain mTLS tunnel over loopback (byte copies) | {:.0} µs | {:.0} µs | {} |\n\
         | plain mTLS echo over loopback (no ttrpc) | | | {} |\n\
         \nadded p50 {:.0} µs, p99 {:.0} µs (the TLS tunnel adds p50 {:.0} µs, p99 {:.0} µs); \
         relay throughput = {} of the same calls through a \
         TLS tunnel over loopback, {} of a TLS echo, {} of direct\n",
        us(pct(&d, 0.5)),
        us(pct(&d, 0.99)),
        mbs(&d_tp),
        us(pct(&rl, 0.5)),
        us(pct(&rl, 0.99)),
        mbs(&r_tp),
        us(pct(&tl, 0.5)),
        us(pct(&tl, 0.99)),
        mbs(&t_tp),
        mbs(&e_tp),
        us(pct(&rl, 0.5)) - us(pct(&d, 0.5)),
        us(pct(&rl, 0.99)) - us(pct(&d, 0.99)),
        us(pct(&tl, 0.5)) - us(pct(&d, 0.5)),
        us(pct(&tl, 0.99)) - us(pct(&d, 0.99)),
        ratio(&vs_tunnel),
        ratio(&vs_echo),
        ratio(&vs_direct),
    );
    Ok(())
}
