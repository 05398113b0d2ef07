//! The agent relay on the CAA side, over the mutual TLS of [`super::pki`]:
//!
//! - Agent socket: `/run/peerpod/pods/<id>/agent.ttrpc`; each connection the shim opens is
//!   relayed frame by frame (no decoding) over its own mutual-TLS connection to
//!   `<vm-ip>:15150`, so every ttrpc stream on it reaches the forwarder unchanged. The dial
//!   retries with backoff, bounded by `PROXY_TIMEOUT`.
//! - Readiness `agent`: StartVM returns once the kata agent answers `grpc.Health/Check`
//!   through the forwarder.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::UnixListener;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::pki::PkiError;
use crate::forwarder::tls as ftls;

/// Errors of the data path.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Certificates could not be made or stored.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The forwarder did not answer in time.
    #[error("forwarder at {addr} not reachable within {} s: {last}", .timeout.as_secs_f64().round())]
    Unreachable {
        /// Where it was dialled.
        addr: SocketAddr,
        /// The bound.
        timeout: Duration,
        /// The last error.
        last: String,
    },
    /// The forwarder answered but the kata agent behind it did not pass a health check.
    #[error(
        "the kata agent in VM {vm} did not answer a health check through its forwarder within {} s: {last}",
        .timeout.as_secs()
    )]
    AgentSilent {
        /// The VM.
        vm: String,
        /// The bound.
        timeout: Duration,
        /// The last failure.
        last: String,
    },
    /// Serving the agent socket failed.
    #[error("agent socket {path}: {detail}")]
    Socket {
        /// The socket.
        path: String,
        /// What failed.
        detail: String,
    },
}

/// Dials the forwarder of `vm_name` at `addr` over mutual TLS, retrying with backoff until
/// `timeout` passes.
pub async fn dial(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    vm_name: &str,
    timeout: Duration,
) -> Result<TlsStream<ftls::Transport>, RelayError> {
    let name = ServerName::try_from(vm_name.to_string()).map_err(|e| PkiError(e.to_string()))?;
    let connector = TlsConnector::from(cfg.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            let tcp = crate::cloud::net::connect_from_node(addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            connector
                .connect(name.clone(), ftls::transport(tcp))
                .await
                .map_err(|e| e.to_string())
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(left.max(Duration::from_millis(1)), attempt).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e,
            Err(_) => "timed out".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(RelayError::Unreachable {
                addr,
                timeout,
                last,
            });
        }
        tokio::time::sleep(
            delay.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Readiness `agent`: dials like [`dial`] and then waits briefly for the forwarder to
/// reject the client certificate (with TLS 1.3 the client finishes its handshake before
/// the server has checked the client's certificate).
pub async fn handshake(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    vm_name: &str,
    timeout: Duration,
) -> Result<(), RelayError> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut s = dial(cfg, addr, vm_name, left.max(Duration::from_millis(1))).await?;
        let mut b = [0u8; 1];
        let last = match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
            Err(_) => return Ok(()),
            Ok(Ok(_)) => "the forwarder closed the connection".to_string(),
            Ok(Err(e)) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(RelayError::Unreachable {
                addr,
                timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Readiness `agent`: the kata agent in the VM answers `grpc.Health/Check` with SERVING
/// through its forwarder (mutual TLS, the same path the shim's calls take), retried until
/// `timeout` passes. The kata shim's first agent call is this check with a fixed 30 s
/// deadline: answering StartVM only once it passes keeps a slowly booting agent from
/// failing the pod.
pub(crate) async fn agent_health(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    vm_name: &str,
    timeout: Duration,
) -> Result<(), RelayError> {
    /// One check's own deadline (the agent answers at once when it is up).
    const CHECK: Duration = Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // The forwarder not answering at all is reported as such by `dial`.
        let mut s = dial(cfg, addr, vm_name, left.max(Duration::from_millis(1))).await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(
            CHECK.min(left).max(Duration::from_millis(100)),
            health_check(&mut s, CHECK),
        )
        .await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} s", CHECK.as_secs()),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(RelayError::AgentSilent {
                vm: vm_name.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(
            Duration::from_millis(500)
                .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
}

/// One `grpc.Health/Check` call over `s` (ttrpc frames): Ok when the agent is SERVING.
async fn health_check<S>(s: &mut S, deadline: Duration) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use crate::protocol::{frame, health_wire as health};
    use protobuf::Message;
    let mut req = ttrpc::proto::Request::new();
    req.service = health::SERVICE.into();
    req.method = health::CHECK.into();
    // CheckRequest{service: ""}: no field set.
    req.payload = Vec::new();
    req.timeout_nano = deadline.as_nanos() as i64;
    let wire = frame::Frame {
        stream_id: 1,
        kind: frame::TYPE_REQUEST,
        flags: 0,
        payload: req.write_to_bytes().map_err(|e| e.to_string())?,
    };
    frame::write_frame(s, &wire)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let Some(f) = frame::read_frame(s).await.map_err(|e| e.to_string())? else {
            return Err("the forwarder closed the connection (is the agent up?)".into());
        };
        if f.stream_id != 1 || f.kind != frame::TYPE_RESPONSE {
            continue;
        }
        let resp = ttrpc::proto::Response::parse_from_bytes(&f.payload)
            .map_err(|e| format!("undecodable health answer: {e}"))?;
        if resp.status.code() != ttrpc::Code::OK {
            return Err(format!(
                "the agent answered the health check with {:?}: {}",
                resp.status.code(),
                resp.status.message
            ));
        }
        return match health::status(&resp.payload) {
            Some(health::SERVING) => Ok(()),
            Some(other) => Err(format!("the agent reports status {other}, not SERVING")),
            None => Err("undecodable HealthCheckResponse".into()),
        };
    }
}

/// One VM's agent socket being served.
struct Served {
    stop: CancellationToken,
    path: PathBuf,
}

/// Where each new connection takes its TLS client configuration from (the identity may
/// rotate while a socket is served).
pub(crate) type ClientSource = Arc<dyn Fn() -> Option<Arc<rustls::ClientConfig>> + Send + Sync>;

/// The agent sockets CAA (or the node agent relay) serves.
#[derive(Default)]
pub struct AgentSockets {
    served: Mutex<HashMap<String, Served>>,
}

impl AgentSockets {
    /// Serves `path` for sandbox `id`, relaying to the forwarder of `vm_name` at `addr`.
    pub fn serve(
        &self,
        id: &str,
        path: &Path,
        cfg: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        vm_name: &str,
        timeout: Duration,
    ) -> Result<(), RelayError> {
        self.serve_with(
            id,
            path,
            Arc::new(move || Some(cfg.clone())),
            addr,
            vm_name,
            timeout,
        )
    }

    /// The sandboxes served.
    pub(crate) fn ids(&self) -> Vec<String> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// [`AgentSockets::serve`] with the client configuration read per connection.
    pub(crate) fn serve_with(
        &self,
        id: &str,
        path: &Path,
        cfg: ClientSource,
        addr: SocketAddr,
        vm_name: &str,
        timeout: Duration,
    ) -> Result<(), RelayError> {
        use std::os::unix::fs::PermissionsExt;
        let serr = |d: &dyn std::fmt::Display| RelayError::Socket {
            path: path.display().to_string(),
            detail: d.to_string(),
        };
        self.stop(id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| serr(&e))?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| serr(&e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| serr(&e))?;
        let stop = CancellationToken::new();
        let vm = vm_name.to_string();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = token.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((conn, _)) = conn else { continue };
                crate::forwarder::relay::enlarge_send_buffer(&conn);
                let (cfg, vm, token) = (cfg.clone(), vm.clone(), token.clone());
                tokio::spawn(async move {
                    let metrics = &super::metrics::METRICS;
                    let _active = metrics.relay_started();
                    let Some(cfg) = cfg() else {
                        metrics.relay_error();
                        tracing::warn!(vm = %vm, "agent connection dropped: no client identity yet");
                        return;
                    };
                    let upstream = match dial(&cfg, addr, &vm, timeout).await {
                        Ok(u) => u,
                        Err(e) => {
                            metrics.relay_error();
                            tracing::warn!(vm = %vm, error = %e, "agent connection dropped");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        r = crate::forwarder::relay::relay(conn, upstream, None) => {
                            if let Err(e) = r {
                                metrics.relay_error();
                                tracing::warn!(vm = %vm, error = %e, kind = e.metric_label(), "agent relay ended");
                            }
                        }
                    }
                });
            }
        });
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.to_string(),
                Served {
                    stop,
                    path: path.to_path_buf(),
                },
            );
        Ok(())
    }

    /// Stops serving sandbox `id` and removes its socket and directory.
    pub(crate) fn stop(&self, id: &str) {
        if let Some(s) = self
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
        {
            s.stop.cancel();
            let _ = std::fs::remove_file(&s.path);
            if let Some(dir) = s.path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caa::pki::Pki;
    use crate::pki::CertKey;
    use crate::protocol::frame;

    #[tokio::test]
    async fn a_forwarder_accepts_the_caa_client_and_refuses_others() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = Pki::generate().unwrap();
        let vm = "podvm-web-0123abcd";
        let s = pki.server_cert(vm).unwrap();
        let cfg = ftls::server_config(&s.cert_pem, &s.key_pem, &pki.ca_pem()).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acc = tokio_rustls::TlsAcceptor::from(cfg);
        tokio::spawn(async move {
            loop {
                let (t, _) = l.accept().await.unwrap();
                let acc = acc.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acc.accept(t).await {
                        let mut b = [0u8; 1];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
                    }
                });
            }
        });
        handshake(&pki.client_config(), addr, vm, Duration::from_secs(3))
            .await
            .unwrap();
        let other = Pki::generate().unwrap();
        let ck = other.server_cert("x").unwrap();
        let foreign = ftls::client_config(&pki.ca_pem(), &ck.cert_pem, &ck.key_pem).unwrap();
        assert!(
            handshake(&foreign, addr, vm, Duration::from_millis(500))
                .await
                .is_err()
        );
    }

    /// A forwarder with `cert` that accepts clients of `client_ca`, answering handshakes.
    async fn forwarder(cert: &CertKey, client_ca: &str) -> SocketAddr {
        let cfg = ftls::server_config(&cert.cert_pem, &cert.key_pem, client_ca).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acc = tokio_rustls::TlsAcceptor::from(cfg);
        tokio::spawn(async move {
            while let Ok((t, _)) = l.accept().await {
                let acc = acc.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acc.accept(t).await {
                        let mut b = [0u8; 1];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_rotated_ca_still_reaches_vms_of_the_previous_one_and_new_vms_get_the_new_one() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The rotation as it happens now (certificates valid at the real clock).
        let old_pki = Pki::generate().unwrap();
        let old_vm = "podvm-old-0123abcd";
        let old_addr = forwarder(&old_pki.server_cert(old_vm).unwrap(), &old_pki.ca_pem()).await;
        let pki = old_pki.next_generation();
        // A VM created before the rotation trusts only the old CA: CAA presents the old
        // client certificate and trusts its old-CA server certificate.
        handshake(
            &pki.client_config(),
            old_addr,
            old_vm,
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        // A new VM: the new CA on both sides.
        let new_vm = "podvm-new-0123abcd";
        let new_addr = forwarder(&pki.server_cert(new_vm).unwrap(), &pki.ca_pem()).await;
        handshake(
            &pki.client_config(),
            new_addr,
            new_vm,
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        // Without the previous generation the old VM is unreachable: the overlap matters.
        let fresh = Pki::generate().unwrap();
        assert!(
            handshake(
                &fresh.client_config(),
                old_addr,
                old_vm,
                Duration::from_millis(500)
            )
            .await
            .is_err()
        );
    }

    /// A stand-in kata-agent: echoes every ttrpc frame back once it has read all of it.
    fn echo_agent(path: &Path) {
        let l = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
                    while let Ok(Some(f)) = frame::read_frame(&mut r).await {
                        if frame::write_frame(&mut w, &f).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// A ttrpc request frame of the agent service (not one the forwarder rewrites).
    fn request(payload_len: usize) -> Vec<u8> {
        let mut r = ttrpc::proto::Request::new();
        r.service = "grpc.AgentService".into();
        r.method = "ReadStdout".into();
        r.payload = (0..payload_len).map(|i| (i % 251) as u8).collect();
        frame::Frame {
            stream_id: 1,
            kind: frame::TYPE_REQUEST,
            flags: 0,
            payload: protobuf::Message::write_to_bytes(&r).unwrap(),
        }
        .encode()
    }

    async fn round(s: &mut tokio::net::UnixStream, wire: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let (r, mut w) = s.split();
        let mut r = r;
        let (a, b) = tokio::join!(w.write_all(wire), frame::read_frame(&mut r));
        a.unwrap();
        assert_eq!(
            b.unwrap().unwrap().payload.len(),
            wire.len() - frame::HEADER_LEN
        );
    }

    /// Sorted round-trip times of small calls.
    async fn small(path: &Path, n: usize) -> Vec<Duration> {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        let wire = request(4);
        for _ in 0..300 {
            round(&mut s, &wire).await;
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = std::time::Instant::now();
            round(&mut s, &wire).await;
            v.push(t.elapsed());
        }
        v.sort();
        v
    }

    /// CPU time of this process so far (user + system), in ms: throughput on a busy
    /// machine varies with what else runs, the CPU spent per byte much less.
    fn cpu_ms() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // utime and stime (fields 14 and 15) in clock ticks of 10 ms.
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) * 10.0
    }

    /// MB/s and CPU ms per MiB of `bytes` moved since `t`/`cpu`.
    fn rates(t: std::time::Instant, cpu: f64, bytes: usize) -> (f64, f64) {
        let mib = bytes as f64 / f64::from(1 << 20);
        (
            bytes as f64 / t.elapsed().as_secs_f64() / 1e6,
            (cpu_ms() - cpu) / mib,
        )
    }

    const LARGE: usize = 1 << 20;
    const LARGE_CALLS: usize = 64;

    /// MB/s of 1 MiB frames echoed (both directions counted).
    async fn large(path: &Path) -> (f64, f64) {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        let wire = request(LARGE);
        for _ in 0..4 {
            round(&mut s, &wire).await;
        }
        let (t, cpu) = (std::time::Instant::now(), cpu_ms());
        for _ in 0..LARGE_CALLS {
            round(&mut s, &wire).await;
        }
        rates(t, cpu, 2 * wire.len() * LARGE_CALLS)
    }

    /// MB/s of 1 MiB messages echoed over one mTLS loopback connection (the baseline of
    /// `make bench-relay`: same certificates, `tokio::io::copy` echo).
    async fn tls_echo(pki: &Pki) -> (f64, f64) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let vm = "podvm-echo-0";
        let s = pki.server_cert(vm).unwrap();
        let cfg = ftls::server_config(&s.cert_pem, &s.key_pem, &pki.ca_pem()).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let s = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(tcp)
                .await
                .unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let s = dial(&pki.client_config(), addr, vm, Duration::from_secs(5))
            .await
            .unwrap();
        let (mut r, mut w) = tokio::io::split(s);
        let msg: Vec<u8> = (0..LARGE).map(|i| (i % 251) as u8).collect();
        let mut buf = vec![0u8; LARGE];
        for _ in 0..4 {
            let (a, b) = tokio::join!(w.write_all(&msg), r.read_exact(&mut buf));
            a.unwrap();
            b.unwrap();
        }
        let (t, cpu) = (std::time::Instant::now(), cpu_ms());
        for _ in 0..LARGE_CALLS {
            let (a, b) = tokio::join!(w.write_all(&msg), r.read_exact(&mut buf));
            a.unwrap();
            b.unwrap();
        }
        let r = rates(t, cpu, 2 * LARGE * LARGE_CALLS);
        echo.abort();
        r
    }

    /// The relay pair of `make bench-relay` in-process without the ttrpc client and agent:
    /// a frame-echo agent behind the forwarder relay, reached through CAA's agent socket over
    /// mutual TLS on loopback. Run in release:
    /// `cargo test --release --lib caa::relay::tests::relay_costs -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "benchmark"]
    async fn relay_costs_against_a_direct_socket_and_tls_over_loopback() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent.sock");
        echo_agent(&agent);
        let pki = Pki::generate().unwrap();
        let vm = "podvm-bench-0123abcd";
        let s = pki.server_cert(vm).unwrap();
        let server = ftls::server_config(&s.cert_pem, &s.key_pem, &pki.ca_pem()).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(crate::forwarder::relay::serve(
            l,
            server,
            crate::forwarder::relay::RelayOptions {
                agent_socket: agent.clone(),
                netns: "/run/netns/podns".into(),
                agent_wait: Duration::from_secs(5),
            },
            stop.clone(),
        ));
        let sockets = AgentSockets::default();
        let relayed = dir.path().join("relay.sock");
        sockets
            .serve(
                "bench",
                &relayed,
                pki.client_config(),
                addr,
                vm,
                Duration::from_secs(5),
            )
            .unwrap();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
        println!(
            "| run | direct p50/p99 µs | relay p50/p99 µs | added p50 | direct MB/s | relay MB/s | TLS echo MB/s | relay/TLS | CPU ms/MiB direct, relay, TLS echo |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let runs = std::env::var("SANDBOXD_RELAY_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        for run in 1..=runs {
            let d = small(&agent, 3000).await;
            let r = small(&relayed, 3000).await;
            let (d_tp, d_cpu) = large(&agent).await;
            let (r_tp, r_cpu) = large(&relayed).await;
            let (t_tp, t_cpu) = tls_echo(&pki).await;
            println!(
                "| {run} | {:.0}/{:.0} | {:.0}/{:.0} | {:.0} | {d_tp:.0} | {r_tp:.0} | {t_tp:.0} | {:.0} % | {d_cpu:.2}, {r_cpu:.2}, {t_cpu:.2} |",
                us(pct(&d, 0.5)),
                us(pct(&d, 0.99)),
                us(pct(&r, 0.5)),
                us(pct(&r, 0.99)),
                us(pct(&r, 0.5)) - us(pct(&d, 0.5)),
                100.0 * r_tp / t_tp,
            );
        }
        sockets.stop("bench");
        stop.cancel();
    }
}
