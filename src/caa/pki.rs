//! CAA's certificates: its CA and client certificate live in a Secret (`CAA_TLS_SECRET`,
//! default [`names::CAA_TLS_SECRET`], in `POD_NAMESPACE`) so they survive restarts; each VM
//! gets a short-lived server certificate for its name, delivered with its forwarder config
//! in the VM's user data. The CA is rotated at 2/3 of its life with overlap: the previous
//! CA stays trusted, and its client certificate is presented to the VMs that trust only it,
//! until it expires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::api::names;
use crate::pki::{Ca, CertKey, Usage, Validity};

// The keys of the Secret.
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

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki { .. }")
    }
}

/// Validity of CAA's CA. It is renewed at 2/3 of its life; the old CA stays trusted (and
/// its client certificate presented to the VMs that trust it) until it expires.
pub(crate) const CA_VALIDITY: time::Duration = time::Duration::days(365);
/// Validity of a pod VM's server certificate (never beyond its CA's): CAA checks it when it
/// dials the forwarder, at StartVM and for each agent connection of the sandbox (kata's
/// shim keeps one for the sandbox's life).
pub(crate) const VM_CERT_VALIDITY: time::Duration = time::Duration::days(30);
const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
const PREVIOUS_CLIENT_CERT: &str = "previous-tls.crt";
const PREVIOUS_CLIENT_KEY: &str = "previous-tls.key";

/// CAA's certificates could not be made, read or stored.
#[derive(Debug, thiserror::Error)]
#[error("CAA certificates: {0}")]
pub struct PkiError(pub String);

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
pub(crate) fn ca_renew_at(validity: &Validity) -> OffsetDateTime {
    validity.renew_at(CA_VALIDITY)
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

fn certified(ck: &CertKey) -> Result<Arc<rustls::sign::CertifiedKey>, PkiError> {
    let p = |what: &str, e: &dyn std::fmt::Display| PkiError(format!("{what}: {e}"));
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

/// The TLS client configuration towards forwarders: `ca_pem` (and the previous CA) trusted,
/// the client certificate each forwarder accepts presented.
fn client_config_of(
    ca_pem: &str,
    client: &CertKey,
    previous: Option<(&str, &CertKey)>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in std::iter::once(ca_pem).chain(previous.map(|p| p.0)) {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let c = c.map_err(|e| PkiError(format!("CA certificate: {e}")))?;
            roots
                .add(c)
                .map_err(|e| PkiError(format!("CA certificate: {e}")))?;
        }
    }
    let resolver = ClientCerts {
        current: certified(client)?,
        current_subjects: subject_forms(ca_pem),
        previous: match previous {
            Some((ca, ck)) => Some((certified(ck)?, subject_forms(ca))),
            None => None,
        },
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(resolver));
    Ok(Arc::new(config))
}

/// CAA's client side of the mTLS to the forwarders, without the CA's key: what the node
/// agent relay needs to dial them (handed over a root-only unix socket, kept in memory).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ClientIdentity {
    /// The current CA certificate (trusted for the VMs' server certificates).
    pub(crate) ca_pem: String,
    /// The client certificate and key the current CA signed.
    pub(crate) client: CertKey,
    /// During a CA rotation: the previous CA and its client certificate.
    pub(crate) previous: Option<(String, CertKey)>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity { .. }")
    }
}

impl ClientIdentity {
    /// The TLS client configuration of this identity (as [`Pki::client_config`]).
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        client_config_of(
            &self.ca_pem,
            &self.client,
            self.previous.as_ref().map(|(ca, ck)| (ca.as_str(), ck)),
        )
    }
}

impl Material {
    fn build(
        ca: Ca,
        client: CertKey,
        previous: Option<Previous>,
        now: OffsetDateTime,
    ) -> Result<Self, PkiError> {
        let ca_pem = ca.cert_pem();
        let ca_validity = Validity::of(&ca_pem)
            .ok_or_else(|| PkiError("the CA certificate does not parse".into()))?;
        // The previous CA only while it is valid.
        let previous = previous.filter(|p| now < p.ca_validity.not_after);
        let config = client_config_of(
            &ca_pem,
            &client,
            previous.as_ref().map(|p| (p.ca_pem.as_str(), &p.client)),
        )?;
        Ok(Self {
            ca,
            ca_pem,
            ca_validity,
            client,
            previous,
            config,
        })
    }

    /// A new CA (distinct subject per generation) and its client certificate; `previous`
    /// becomes the previous generation.
    fn fresh(previous: Option<Previous>, now: OffsetDateTime) -> Result<Self, PkiError> {
        let p = |e: crate::pki::Error| PkiError(e.to_string());
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
    fn rotated(&self, now: OffsetDateTime) -> Result<Option<Self>, PkiError> {
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
    ) -> Result<Self, PkiError> {
        let get = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).to_string())
                .ok_or_else(|| PkiError(format!("secret {what} lacks {key}")))
        };
        let ca =
            Ca::from_pem(&get(CA_CERT)?, &get(CA_KEY)?).map_err(|e| PkiError(e.to_string()))?;
        let client = CertKey {
            cert_pem: get(CLIENT_CERT)?,
            key_pem: get(CLIENT_KEY)?,
        };
        let previous = match (
            get(PREVIOUS_CA_CERT),
            get(PREVIOUS_CLIENT_CERT),
            get(PREVIOUS_CLIENT_KEY),
        ) {
            (Ok(ca_pem), Ok(cert_pem), Ok(key_pem)) => Validity::of(&ca_pem).map(|v| Previous {
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
    pub fn generate() -> Result<Self, PkiError> {
        Material::fresh(None, OffsetDateTime::now_utc()).map(Self::wrap)
    }

    /// Reads the Secret `ns/name`, creating it with fresh material when absent and rotating
    /// the CA when it is due (the previous one kept while it is valid). Concurrent CAAs
    /// agree through the Secret's resourceVersion.
    pub(crate) async fn load_or_create(
        client: &Client,
        ns: &str,
        name: &str,
    ) -> Result<Self, PkiError> {
        Self::load_at(client, ns, name, OffsetDateTime::now_utc())
            .await
            .map(Self::wrap)
    }

    async fn load_at(
        client: &Client,
        ns: &str,
        name: &str,
        now: OffsetDateTime,
    ) -> Result<Material, PkiError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let what = format!("{ns}/{name}");
        let k = |e: kube::Error| PkiError(format!("secret {what}: {e}"));
        for _ in 0..5 {
            let Some(s) = api.get_opt(name).await.map_err(k)? else {
                let fresh = Material::fresh(None, now)?;
                let mut secret = Secret::default();
                secret.metadata.name = Some(name.into());
                secret.metadata.namespace = Some(ns.into());
                // Marked as sandboxd's: the operator removes it with CAA on uninstall.
                secret.metadata.labels = Some(BTreeMap::from([(
                    names::LABEL_MANAGED_BY.to_string(),
                    names::MANAGED_BY.to_string(),
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
        Err(PkiError(format!(
            "secret {what} could not be created or rotated"
        )))
    }

    /// Re-reads (and when due rotates) the Secret before the CA's renewal time, for as long
    /// as `stop` is not cancelled; each pass swaps in the material of all CAAs' agreement.
    pub(crate) async fn keep_fresh(
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
    pub fn server_cert(&self, name: &str) -> Result<CertKey, PkiError> {
        let m = self.current();
        let left = m.ca_validity.not_after - OffsetDateTime::now_utc();
        m.ca.issue(
            name,
            &["sandboxd"],
            &[name],
            Usage::Server,
            VM_CERT_VALIDITY.min(left),
        )
        .map_err(|e| PkiError(e.to_string()))
    }

    /// The TLS client configuration towards forwarders: the current and previous CA
    /// trusted, the client certificate each forwarder accepts presented.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.current().config.clone()
    }

    /// The client identity alone (no CA key), for the node agent relay.
    pub(crate) fn client_identity(&self) -> ClientIdentity {
        let m = self.current();
        ClientIdentity {
            ca_pem: m.ca_pem.clone(),
            client: m.client.clone(),
            previous: m
                .previous
                .as_ref()
                .map(|p| (p.ca_pem.clone(), p.client.clone())),
        }
    }
}

#[cfg(test)]
impl Pki {
    /// The next generation, made now, with this one as its previous (what a rotation of the
    /// Secret makes).
    pub(crate) fn next_generation(&self) -> Self {
        let m = self.current();
        let previous = Previous {
            ca_pem: m.ca_pem.clone(),
            ca_validity: m.ca_validity,
            client: m.client.clone(),
        };
        Self::wrap(Material::fresh(Some(previous), OffsetDateTime::now_utc()).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_rotates_at_two_thirds_of_its_life_keeping_the_previous_generation() {
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
    }

    #[test]
    fn vm_certificates_are_short_lived_and_an_expired_previous_ca_is_dropped() {
        let now = OffsetDateTime::now_utc();
        let pki = Pki::generate().unwrap();
        let v = Validity::of(&pki.server_cert("podvm-x-01234567").unwrap().cert_pem).unwrap();
        assert!(v.not_after <= now + VM_CERT_VALIDITY + time::Duration::minutes(1));
        assert!(v.not_after >= now + VM_CERT_VALIDITY - time::Duration::minutes(10));
        let ca = Validity::of(&pki.ca_pem()).unwrap();
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
}
