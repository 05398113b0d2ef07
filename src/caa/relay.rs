//! The agent relay and the rest of the pod data path on the CAA side.
//!
//! - PKI: CAA's CA and client certificate live in a Secret (`CAA_TLS_SECRET`, default
//!   `peerpod-caa-tls`, in `POD_NAMESPACE`) so they survive restarts; each VM gets a server
//!   certificate for its name, delivered with its forwarder config in the VM's user data.
//! - Agent socket: `/run/peerpod/pods/<id>/agent.ttrpc`; each connection the shim opens is
//!   relayed frame by frame (no decoding) over its own mutual-TLS connection to
//!   `<vm-ip>:15150`, so every ttrpc stream on it reaches the forwarder unchanged. The dial
//!   retries with backoff, bounded by `PROXY_TIMEOUT`.
//! - Readiness `agent`: StartVM returns once the kata agent answers `grpc.Health/Check`
//!   through the forwarder.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use time::OffsetDateTime;
use tokio::net::UnixListener;
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

/// CAA's certificate authority and client identity, shared by every clone (a background
/// task swaps in the rotated material, see [`Pki::keep_fresh`]).
#[derive(Clone)]
pub struct Pki {
    inner: Arc<std::sync::RwLock<Arc<Material>>>,
}

/// One generation of CAA's PKI: the current CA and its client certificate, and during a
/// rotation the previous CA (still trusted) and the client certificate it signed (still
/// presented to the VMs that trust only it).
struct Material {
    ca: Ca,
    ca_pem: String,
    ca_validity: Validity,
    client: CertKey,
    previous: Option<Previous>,
    config: Arc<rustls::ClientConfig>,
}

struct Previous {
    ca_pem: String,
    ca_validity: Validity,
    client: CertKey,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki { .. }")
    }
}

/// Validity of CAA's CA. It is renewed at 2/3 of its life; the old CA stays trusted (and
/// its client certificate presented to the VMs that trust it) until it expires.
pub const CA_VALIDITY: time::Duration = time::Duration::days(365);
/// Validity of a pod VM's server certificate (never beyond its CA's): CAA checks it when it
/// dials the forwarder, at StartVM and for each agent connection of the sandbox (kata's
/// shim keeps one for the sandbox's life).
pub const VM_CERT_VALIDITY: time::Duration = time::Duration::days(30);
const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
const PREVIOUS_CLIENT_CERT: &str = "previous-tls.crt";
const PREVIOUS_CLIENT_KEY: &str = "previous-tls.key";
/// The label on the Secret: the operator removes it with CAA on uninstall.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "sandboxd");

/// Errors of the data path.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Certificates could not be made or stored.
    #[error("CAA certificates: {0}")]
    Pki(String),
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

impl RelayError {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RelayError::Pki(_) => "pki",
            RelayError::Unreachable { .. } => "forwarder_unreachable",
            RelayError::AgentSilent { .. } => "agent_silent",
            RelayError::Socket { .. } => "agent_socket",
        }
    }
}

fn validity_of(pem: &str) -> Option<Validity> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = cert.validity();
    Some(Validity {
        not_before: v.not_before.to_datetime(),
        not_after: v.not_after.to_datetime(),
    })
}

/// The subject of the first certificate in `pem`, DER, with and without its outer SEQUENCE
/// header (a TLS server's acceptable-CA hints carry one form or the other).
fn subject_forms(pem: &str) -> Vec<Vec<u8>> {
    let Ok(der) = CertificateDer::from_pem_slice(pem.as_bytes()) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let raw = cert.subject().as_raw().to_vec();
    let mut out = vec![raw.clone()];
    // Tag, then a short or long form length.
    if raw.len() > 2 {
        let header = match raw[1] {
            l if l < 0x80 => 2,
            l => 2 + usize::from(l & 0x7f),
        };
        if header < raw.len() {
            out.push(raw[header..].to_vec());
        }
    }
    out
}

/// When a CA with `validity` is renewed: once a third of its life is left.
pub fn ca_renew_at(validity: &Validity) -> OffsetDateTime {
    validity.not_after - (validity.not_after - validity.not_before) / 3
}

/// Presents the previous CA's client certificate to a forwarder that names only that CA
/// among the CAs it accepts (a VM created before the rotation), else the current one.
#[derive(Debug)]
struct ClientCerts {
    current: Arc<rustls::sign::CertifiedKey>,
    current_subjects: Vec<Vec<u8>>,
    previous: Option<(Arc<rustls::sign::CertifiedKey>, Vec<Vec<u8>>)>,
}

impl rustls::client::ResolvesClientCert for ClientCerts {
    fn resolve(
        &self,
        hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let names = |subjects: &[Vec<u8>]| {
            hints
                .iter()
                .any(|h| subjects.iter().any(|s| s.as_slice() == *h))
        };
        if let Some((key, subjects)) = &self.previous
            && names(subjects)
            && !names(&self.current_subjects)
        {
            return Some(key.clone());
        }
        Some(self.current.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified(ck: &CertKey) -> Result<Arc<rustls::sign::CertifiedKey>, RelayError> {
    let p = |what: &str, e: &dyn std::fmt::Display| RelayError::Pki(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(ck.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| p("client certificate", &e))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(ck.key_pem.as_bytes())
        .map_err(|e| p("client key", &e))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| p("client key", &e))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, signer)))
}

impl Material {
    fn build(
        ca: Ca,
        client: CertKey,
        previous: Option<Previous>,
        now: OffsetDateTime,
    ) -> Result<Self, RelayError> {
        let ca_pem = ca.cert_pem();
        let ca_validity = validity_of(&ca_pem)
            .ok_or_else(|| RelayError::Pki("the CA certificate does not parse".into()))?;
        // The previous CA only while it is valid.
        let previous = previous.filter(|p| now < p.ca_validity.not_after);
        let mut roots = rustls::RootCertStore::empty();
        for pem in std::iter::once(&ca_pem).chain(previous.iter().map(|p| &p.ca_pem)) {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| RelayError::Pki(format!("CA certificate: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| RelayError::Pki(format!("CA certificate: {e}")))?;
            }
        }
        let resolver = ClientCerts {
            current: certified(&client)?,
            current_subjects: subject_forms(&ca_pem),
            previous: match &previous {
                Some(p) => Some((certified(&p.client)?, subject_forms(&p.ca_pem))),
                None => None,
            },
        };
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(resolver));
        Ok(Self {
            ca,
            ca_pem,
            ca_validity,
            client,
            previous,
            config: Arc::new(config),
        })
    }

    /// A new CA (distinct subject per generation) and its client certificate; `previous`
    /// becomes the previous generation.
    fn fresh(previous: Option<Previous>, now: OffsetDateTime) -> Result<Self, RelayError> {
        let p = |e: crate::pki::Error| RelayError::Pki(e.to_string());
        // Generations must differ by subject: a forwarder names the CA it accepts by it.
        let ca = Ca::new(
            &format!(
                "sandboxd-caa {}",
                OffsetDateTime::now_utc().unix_timestamp_nanos()
            ),
            CA_VALIDITY,
        )
        .map_err(p)?;
        let client = ca
            .issue(
                "sandboxd-caa",
                &["sandboxd"],
                &[],
                Usage::Client,
                CA_VALIDITY,
            )
            .map_err(p)?;
        Self::build(ca, client, previous, now)
    }

    /// The next generation when the CA is due, keeping this one as the previous.
    fn rotated(&self, now: OffsetDateTime) -> Result<Option<Self>, RelayError> {
        if now < ca_renew_at(&self.ca_validity) {
            return Ok(None);
        }
        let previous = Previous {
            ca_pem: self.ca_pem.clone(),
            ca_validity: self.ca_validity,
            client: self.client.clone(),
        };
        Self::fresh(Some(previous), now).map(Some)
    }

    fn data(&self) -> BTreeMap<String, ByteString> {
        let ck = self.ca.cert_key();
        let mut out: Vec<(&str, String)> = vec![
            (CA_CERT, ck.cert_pem),
            (CA_KEY, ck.key_pem),
            (CLIENT_CERT, self.client.cert_pem.clone()),
            (CLIENT_KEY, self.client.key_pem.clone()),
        ];
        if let Some(p) = &self.previous {
            out.extend([
                (PREVIOUS_CA_CERT, p.ca_pem.clone()),
                (PREVIOUS_CLIENT_CERT, p.client.cert_pem.clone()),
                (PREVIOUS_CLIENT_KEY, p.client.key_pem.clone()),
            ]);
        }
        out.into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
            .collect()
    }

    fn from_data(
        data: &BTreeMap<String, ByteString>,
        what: &str,
        now: OffsetDateTime,
    ) -> Result<Self, RelayError> {
        let get = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).to_string())
                .ok_or_else(|| RelayError::Pki(format!("secret {what} lacks {key}")))
        };
        let ca = Ca::from_pem(&get(CA_CERT)?, &get(CA_KEY)?)
            .map_err(|e| RelayError::Pki(e.to_string()))?;
        let client = CertKey {
            cert_pem: get(CLIENT_CERT)?,
            key_pem: get(CLIENT_KEY)?,
        };
        let previous = match (
            get(PREVIOUS_CA_CERT),
            get(PREVIOUS_CLIENT_CERT),
            get(PREVIOUS_CLIENT_KEY),
        ) {
            (Ok(ca_pem), Ok(cert_pem), Ok(key_pem)) => validity_of(&ca_pem).map(|v| Previous {
                ca_pem,
                ca_validity: v,
                client: CertKey { cert_pem, key_pem },
            }),
            _ => None,
        };
        Self::build(ca, client, previous, now)
    }
}

impl Pki {
    fn wrap(m: Material) -> Self {
        Self {
            inner: Arc::new(std::sync::RwLock::new(Arc::new(m))),
        }
    }

    fn current(&self) -> Arc<Material> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A fresh CA and client certificate, in memory.
    pub fn generate() -> Result<Self, RelayError> {
        Material::fresh(None, OffsetDateTime::now_utc()).map(Self::wrap)
    }

    /// Reads the Secret `ns/name`, creating it with fresh material when absent and rotating
    /// the CA when it is due (the previous one kept while it is valid). Concurrent CAAs
    /// agree through the Secret's resourceVersion.
    pub async fn load_or_create(client: &Client, ns: &str, name: &str) -> Result<Self, RelayError> {
        Self::load_at(client, ns, name, OffsetDateTime::now_utc())
            .await
            .map(Self::wrap)
    }

    async fn load_at(
        client: &Client,
        ns: &str,
        name: &str,
        now: OffsetDateTime,
    ) -> Result<Material, RelayError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let what = format!("{ns}/{name}");
        let k = |e: kube::Error| RelayError::Pki(format!("secret {what}: {e}"));
        for _ in 0..5 {
            let Some(s) = api.get_opt(name).await.map_err(k)? else {
                let fresh = Material::fresh(None, now)?;
                let mut secret = Secret::default();
                secret.metadata.name = Some(name.into());
                secret.metadata.namespace = Some(ns.into());
                secret.metadata.labels = Some(BTreeMap::from([(
                    MANAGED_BY.0.to_string(),
                    MANAGED_BY.1.to_string(),
                )]));
                secret.type_ = Some("Opaque".into());
                secret.data = Some(fresh.data());
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => return Ok(fresh),
                    // A concurrent CAA won: read theirs.
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(k(e)),
                }
            };
            let data = s.data.clone().unwrap_or_default();
            let stored = Material::from_data(&data, &what, now)?;
            let dropped_previous = data.contains_key(PREVIOUS_CA_CERT) && stored.previous.is_none();
            let next = match stored.rotated(now)? {
                Some(next) => next,
                None if dropped_previous => stored,
                None => return Ok(stored),
            };
            // Write the new generation (or the bundle without the expired previous CA)
            // only over the version read.
            let mut secret = s.clone();
            secret.data = Some(next.data());
            secret.string_data = None;
            match api.replace(name, &PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(
                        secret = %what,
                        overlap = next.previous.is_some(),
                        "CAA certificate authority rotated"
                    );
                    return Ok(next);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(k(e)),
            }
        }
        Err(RelayError::Pki(format!(
            "secret {what} could not be created or rotated"
        )))
    }

    /// Re-reads (and when due rotates) the Secret before the CA's renewal time, for as long
    /// as `stop` is not cancelled; each pass swaps in the material of all CAAs' agreement.
    pub async fn keep_fresh(
        self,
        client: Client,
        ns: String,
        name: String,
        stop: CancellationToken,
    ) {
        loop {
            let m = self.current();
            let now = OffsetDateTime::now_utc();
            let due = ca_renew_at(&m.ca_validity).min(m.previous.as_ref().map_or(
                OffsetDateTime::now_utc() + time::Duration::days(3650),
                |p| p.ca_validity.not_after,
            ));
            let wait = Duration::try_from(due - now)
                .unwrap_or_default()
                .clamp(Duration::from_secs(60), Duration::from_secs(6 * 3600));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match Self::load_at(&client, &ns, &name, OffsetDateTime::now_utc()).await {
                Ok(next) => {
                    *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
                }
                Err(e) => tracing::warn!(error = %e, "refreshing CAA certificates"),
            }
        }
    }

    /// The CA certificate the forwarder trusts for clients.
    pub fn ca_pem(&self) -> String {
        self.current().ca_pem.clone()
    }

    /// A server certificate for the VM `name`: short-lived ([`VM_CERT_VALIDITY`]), never
    /// beyond its CA.
    pub fn server_cert(&self, name: &str) -> Result<CertKey, RelayError> {
        let m = self.current();
        let left = m.ca_validity.not_after - OffsetDateTime::now_utc();
        m.ca.issue(
            name,
            &["sandboxd"],
            &[name],
            Usage::Server,
            VM_CERT_VALIDITY.min(left),
        )
        .map_err(|e| RelayError::Pki(e.to_string()))
    }

    /// The TLS client configuration towards forwarders: the current and previous CA
    /// trusted, the client certificate each forwarder accepts presented.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.current().config.clone()
    }
}

/// Dials the forwarder of `vm_name` at `addr` over mutual TLS, retrying with backoff until
/// `timeout` passes.
pub async fn dial(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    vm_name: &str,
    timeout: Duration,
) -> Result<TlsStream<ftls::Transport>, RelayError> {
    let name =
        ServerName::try_from(vm_name.to_string()).map_err(|e| RelayError::Pki(e.to_string()))?;
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
pub async fn agent_health(
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
                crate::forwarder::relay::enlarge_send_buffer(&conn);
                let (cfg, vm, token) = (cfg.clone(), vm.clone(), token.clone());
                tokio::spawn(async move {
                    let metrics = &super::metrics::METRICS;
                    let _active = metrics.relay_started();
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
        let now = OffsetDateTime::now_utc();
        let old = Material::fresh(None, now).unwrap();
        // Not due before 2/3 of its life; due after.
        assert!(
            old.rotated(now + time::Duration::days(200))
                .unwrap()
                .is_none()
        );
        let due = old
            .rotated(now + time::Duration::days(250))
            .unwrap()
            .unwrap();
        assert!(due.previous.is_some());
        assert_ne!(due.ca_pem, old.ca_pem);
        // The rotation as it happens now (certificates valid at the real clock).
        let old_pki = Pki::wrap(Material::fresh(None, now).unwrap());
        let old_vm = "podvm-old-0123abcd";
        let old_addr = forwarder(&old_pki.server_cert(old_vm).unwrap(), &old_pki.ca_pem()).await;
        let m = old_pki.current();
        let previous = Previous {
            ca_pem: m.ca_pem.clone(),
            ca_validity: m.ca_validity,
            client: m.client.clone(),
        };
        let pki = Pki::wrap(Material::fresh(Some(previous), now).unwrap());
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

    #[test]
    fn vm_certificates_are_short_lived_and_an_expired_previous_ca_is_dropped() {
        let now = OffsetDateTime::now_utc();
        let pki = Pki::generate().unwrap();
        let v = validity_of(&pki.server_cert("podvm-x-01234567").unwrap().cert_pem).unwrap();
        assert!(v.not_after <= now + VM_CERT_VALIDITY + time::Duration::minutes(1));
        assert!(v.not_after >= now + VM_CERT_VALIDITY - time::Duration::minutes(10));
        let ca = validity_of(&pki.ca_pem()).unwrap();
        assert!(ca.not_after <= now + CA_VALIDITY + time::Duration::minutes(1));
        // A previous CA that expired is not kept.
        let m = pki.current();
        let previous = Previous {
            ca_pem: m.ca_pem.clone(),
            ca_validity: m.ca_validity,
            client: m.client.clone(),
        };
        let later = now + CA_VALIDITY + time::Duration::days(1);
        let next = Material::fresh(Some(previous), later).unwrap();
        assert!(next.previous.is_none());
        assert!(!next.data().contains_key(PREVIOUS_CA_CERT));
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
