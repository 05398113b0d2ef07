//! The agent relay and the rest of the pod data path on the CAA side.
//!
//! - PKI: CAA's CA and client certificate live in a Secret (`CAA_TLS_SECRET`, default
//!   `peerpod-caa-tls`, in `POD_NAMESPACE`) so they survive restarts; each VM gets a server
//!   certificate for its name, delivered with its forwarder config in the VM's user data.
//! - Agent socket: `/run/peerpod/pods/<id>/agent.ttrpc`; each connection the shim opens is
//!   relayed frame by frame (no decoding) over its own mutual-TLS connection to
//!   `<vm-ip>:15150`, so every ttrpc stream on it reaches the forwarder unchanged. The dial
//!   retries with backoff, bounded by `PROXY_TIMEOUT`.
//! - Readiness `agent`: StartVM returns once a TLS handshake with the forwarder succeeded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixListener};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::forwarder::tls as ftls;
use crate::pki::{Ca, CertKey, Usage};

/// Default name of the Secret with CAA's CA and client certificate.
pub const DEFAULT_SECRET: &str = "peerpod-caa-tls";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CLIENT_CERT: &str = "tls.crt";
const CLIENT_KEY: &str = "tls.key";

/// CAA's certificate authority and client identity.
pub struct Pki {
    ca: Ca,
    ca_pem: String,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki { .. }")
    }
}

/// Errors of the data path.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Certificates could not be made or stored.
    #[error("CAA certificates: {0}")]
    Pki(String),
    /// The forwarder did not answer in time.
    #[error("forwarder at {addr} not reachable within {timeout:?}: {last}")]
    Unreachable {
        /// Where it was dialled.
        addr: SocketAddr,
        /// The bound.
        timeout: Duration,
        /// The last error.
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

impl RelayError {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RelayError::Pki(_) => "pki",
            RelayError::Unreachable { .. } => "forwarder_unreachable",
            RelayError::Socket { .. } => "agent_socket",
        }
    }
}

impl Pki {
    fn from_parts(ca: Ca, client: CertKey) -> Result<Self, RelayError> {
        let ca_pem = ca.cert_pem();
        let client = ftls::client_config(&ca_pem, &client.cert_pem, &client.key_pem)
            .map_err(|e| RelayError::Pki(e.to_string()))?;
        Ok(Self { ca, ca_pem, client })
    }

    /// A fresh CA and client certificate, in memory.
    pub fn generate() -> Result<Self, RelayError> {
        let p = |e: crate::pki::Error| RelayError::Pki(e.to_string());
        let ca = Ca::new("sandboxd-caa", time::Duration::days(3650)).map_err(p)?;
        let client = ca
            .issue(
                "sandboxd-caa",
                &["sandboxd"],
                &[],
                Usage::Client,
                time::Duration::days(3650),
            )
            .map_err(p)?;
        Self::from_parts(ca, client)
    }

    /// Reads the Secret `ns/name`, creating it with fresh material when absent.
    pub async fn load_or_create(client: &Client, ns: &str, name: &str) -> Result<Self, RelayError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let k = |e: kube::Error| RelayError::Pki(format!("secret {ns}/{name}: {e}"));
        for _ in 0..3 {
            if let Some(s) = api.get_opt(name).await.map_err(k)? {
                let data = s.data.unwrap_or_default();
                let get = |key: &str| {
                    data.get(key)
                        .map(|b| String::from_utf8_lossy(&b.0).to_string())
                        .ok_or_else(|| RelayError::Pki(format!("secret {ns}/{name} lacks {key}")))
                };
                let ca = Ca::from_pem(&get(CA_CERT)?, &get(CA_KEY)?)
                    .map_err(|e| RelayError::Pki(e.to_string()))?;
                let client = CertKey {
                    cert_pem: get(CLIENT_CERT)?,
                    key_pem: get(CLIENT_KEY)?,
                };
                return Self::from_parts(ca, client);
            }
            let fresh = Self::generate()?;
            let ck = fresh.ca.cert_key();
            let client_ck = fresh
                .ca
                .issue(
                    "sandboxd-caa",
                    &["sandboxd"],
                    &[],
                    Usage::Client,
                    time::Duration::days(3650),
                )
                .map_err(|e| RelayError::Pki(e.to_string()))?;
            let mut secret = Secret::default();
            secret.metadata.name = Some(name.into());
            secret.metadata.namespace = Some(ns.into());
            secret.type_ = Some("Opaque".into());
            secret.data = Some(
                [
                    (CA_CERT, ck.cert_pem),
                    (CA_KEY, ck.key_pem),
                    (CLIENT_CERT, client_ck.cert_pem),
                    (CLIENT_KEY, client_ck.key_pem),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
            );
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => continue, // read it back, as a concurrent CAA may have won
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(k(e)),
            }
        }
        Err(RelayError::Pki(format!(
            "secret {ns}/{name} could not be created"
        )))
    }

    /// The CA certificate the forwarder trusts for clients.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A server certificate for the VM `name`.
    pub fn server_cert(&self, name: &str) -> Result<CertKey, RelayError> {
        self.ca
            .issue(
                name,
                &["sandboxd"],
                &[name],
                Usage::Server,
                time::Duration::days(3650),
            )
            .map_err(|e| RelayError::Pki(e.to_string()))
    }

    /// The TLS client configuration towards forwarders.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }
}

/// Dials the forwarder of `vm_name` at `addr` over mutual TLS, retrying with backoff until
/// `timeout` passes.
pub async fn dial(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    vm_name: &str,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, RelayError> {
    let name =
        ServerName::try_from(vm_name.to_string()).map_err(|e| RelayError::Pki(e.to_string()))?;
    let connector = TlsConnector::from(cfg.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            let tcp = crate::forwarder::net::connect_from_node(addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            connector
                .connect(name.clone(), tcp)
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

/// One VM's agent socket being served.
struct Served {
    stop: CancellationToken,
    path: PathBuf,
}

/// The agent sockets CAA serves.
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
                let (cfg, vm, token) = (cfg.clone(), vm.clone(), token.clone());
                tokio::spawn(async move {
                    let upstream = match dial(&cfg, addr, &vm, timeout).await {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::warn!(vm = %vm, error = %e, "agent connection dropped");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        r = crate::forwarder::relay::relay(conn, upstream, None) => {
                            if let Err(e) = r {
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
    pub fn stop(&self, id: &str) {
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

    #[tokio::test]
    async fn a_forwarder_accepts_the_caa_client_and_refuses_others() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = Pki::generate().unwrap();
        let vm = "podvm-web-0123abcd";
        let s = pki.server_cert(vm).unwrap();
        let cfg = ftls::server_config(&s.cert_pem, &s.key_pem, pki.ca_pem()).unwrap();
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
        let foreign = ftls::client_config(pki.ca_pem(), &ck.cert_pem, &ck.key_pem).unwrap();
        assert!(
            handshake(&foreign, addr, vm, Duration::from_millis(500))
                .await
                .is_err()
        );
    }
}
