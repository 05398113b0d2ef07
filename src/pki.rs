//! A small certificate authority: the webhook's serving certificates, the CAA's mutual TLS
//! between node and pod VM, and the test control plane all use it. Keys stay in memory;
//! callers decide what is written where.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The process's TLS provider: ring, its cipher suites in the order this CPU runs them
/// fastest. With AES instructions that is ring's own order (AES-GCM first); without them
/// (an emulated CPU, an old one) ChaCha20-Poly1305 goes first, being several times faster
/// than AES-GCM in software. Go's and BoringSSL's TLS choose the same way, and a Go server
/// (a registry) follows a client that lists ChaCha20 first.
pub fn tls_provider() -> rustls::crypto::CryptoProvider {
    tls_provider_for(aes_in_hardware())
}

/// [`tls_provider`] for a CPU with or without AES instructions.
pub(crate) fn tls_provider_for(aes_in_hardware: bool) -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    if !aes_in_hardware {
        p.cipher_suites.sort_by_key(|s| {
            !matches!(
                s.suite(),
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        });
    }
    p
}

/// Whether this CPU has what AES-GCM needs to be fast: AES and carry-less multiplication
/// instructions. Cloud VMs' CPUs have them.
pub(crate) fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// Errors issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused the parameters or failed to sign.
    #[error("issuing certificate {subject:?}: {source}")]
    Issue {
        /// The subject's common name.
        subject: String,
        /// Why.
        source: rcgen::Error,
    },
    /// A PEM key or certificate could not be parsed.
    #[error("parsing {what}: {source}")]
    Parse {
        /// What was being parsed (never its content).
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Issue { .. } => "issue",
            Error::Parse { .. } => "parse",
        }
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertKey {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key. Never logged.
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// TLS server authentication.
    Server,
    /// TLS client authentication.
    Client,
    /// Both.
    ServerAndClient,
}

/// A certificate authority held in memory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    /// A new self-signed CA valid for `validity` from now.
    pub fn new(common_name: &str, validity: Duration) -> Result<Self, Error> {
        let issue = |source| Error::Issue {
            subject: common_name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(issue)?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(issue)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);
        let cert_pem = params.self_signed(&key).map_err(issue)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// Loads a CA from its PEM certificate and key (e.g. from a Secret).
    pub(crate) fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| Error::Parse {
            what: "CA private key",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| Error::Parse {
            what: "CA certificate",
            source,
        })?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate and key.
    pub(crate) fn cert_key(&self) -> CertKey {
        CertKey {
            cert_pem: self.cert_pem(),
            key_pem: self.key_pem.clone(),
        }
    }

    /// Issues a leaf certificate for `common_name` with `organizations` and the DNS names or
    /// IP addresses in `sans`, valid for `validity` from now.
    pub fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        sans: &[&str],
        usage: Usage,
        validity: Duration,
    ) -> Result<CertKey, Error> {
        let issue = |source| Error::Issue {
            subject: common_name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(issue)?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<String>>())
                .map_err(issue)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for org in organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer).map_err(issue)?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Validity {
    /// Not valid before.
    pub(crate) not_before: OffsetDateTime,
    /// Not valid after.
    pub(crate) not_after: OffsetDateTime,
}

impl Validity {
    /// The validity of the first certificate in `pem`, `None` when it is not a certificate.
    pub(crate) fn of(pem: &str) -> Option<Self> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let v = cert.validity();
        Some(Self {
            not_before: v.not_before.to_datetime(),
            not_after: v.not_after.to_datetime(),
        })
    }

    /// When a certificate issued for `configured` is renewed: once less than a third of its
    /// life is left, that life counted as at most `configured` (so the back-dated start of
    /// what this module issues does not make it renew early).
    pub(crate) fn renew_at(&self, configured: Duration) -> OffsetDateTime {
        let span = (self.not_after - self.not_before).min(configured);
        self.not_after - span / 3
    }
}

/// A fresh key pair (ECDSA P-256) as `(PKCS#8 private key PEM, SubjectPublicKeyInfo PEM)`,
/// e.g. for signing service-account tokens.
#[cfg(feature = "dev")]
pub(crate) fn key_pair_pem() -> Result<(String, String), Error> {
    KeyPair::generate()
        .map(|k| (k.serialize_pem(), k.public_key_pem()))
        .map_err(|source| Error::Issue {
            subject: "key".into(),
            source,
        })
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    // Back-date a little so clocks slightly behind still accept the certificate.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + validity;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_aes_instructions_clients_ask_for_chacha20_first_and_keep_every_suite() {
        let names = |aes| -> Vec<rustls::CipherSuite> {
            tls_provider_for(aes)
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect()
        };
        let ring: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(names(true), ring);
        let soft = names(false);
        assert_eq!(soft[0], rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        let (mut a, mut b) = (soft.clone(), ring.clone());
        a.sort_by_key(|s| u16::from(*s));
        b.sort_by_key(|s| u16::from(*s));
        assert_eq!(a, b, "the same suites, reordered");
    }

    #[test]
    fn leaf_is_signed_by_the_ca_and_debug_hides_the_key() {
        let ca = Ca::new("test-ca", Duration::days(1)).unwrap();
        let leaf = ca
            .issue(
                "svc",
                &["org"],
                &["svc.ns.svc", "127.0.0.1"],
                Usage::Server,
                Duration::hours(1),
            )
            .unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{leaf:?}").contains("PRIVATE KEY"));

        // rustls accepts the chain for the IP SAN.
        let mut roots = rustls::RootCertStore::empty();
        let ca_der =
            rustls_pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        roots.add(ca_der).unwrap();
        let leaf_der: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        verifier
            .verify_server_cert(
                &leaf_der,
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        let wrong = rustls_pki_types::ServerName::try_from("other.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &leaf_der,
                    &[],
                    &wrong,
                    &[],
                    rustls_pki_types::UnixTime::now()
                )
                .is_err()
        );
    }

    #[test]
    fn a_ca_reloaded_from_pem_issues_certificates() {
        let ca = Ca::new("test-ca", Duration::days(1)).unwrap();
        let ck = ca.cert_key();
        let again = Ca::from_pem(&ck.cert_pem, &ck.key_pem).unwrap();
        again
            .issue("c", &[], &[], Usage::Client, Duration::hours(1))
            .unwrap();
        assert!(Ca::from_pem(&ck.cert_pem, "garbage").is_err());
    }
}
