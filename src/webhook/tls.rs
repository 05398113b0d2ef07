//! The webhook's TLS: a rustls server configuration whose certificate comes from a
//! directory (`tls.crt`, `tls.key`, as a `kubernetes.io/tls` Secret mounts them) and is
//! swapped in place when the files change, so rotation never drops a connection or a
//! handshake.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// Certificate file name inside the certificate directory.
pub(crate) const CERT_FILE: &str = "tls.crt";
/// Key file name inside the certificate directory.
pub(crate) const KEY_FILE: &str = "tls.key";

/// Errors of the TLS setup and certificate loading.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The files do not hold a usable certificate chain and matching key.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `TLS_MIN_VERSION` names no version this server speaks.
    #[error(
        "unsupported TLS minimum version {0:?} (expected VersionTLS12 or VersionTLS13; \
         TLS 1.0 and 1.1 are not offered)"
    )]
    MinVersion(String),
    /// `TLS_CIPHER_SUITES` names a suite this server does not implement.
    #[error("unsupported TLS cipher suite {name:?}; supported: {supported}")]
    CipherSuite {
        /// The name given.
        name: String,
        /// The names that would be accepted.
        supported: String,
    },
    /// The options leave no usable cipher suite for the allowed versions.
    #[error("no cipher suite in TLS_CIPHER_SUITES is usable with TLS {0} or later")]
    NoUsableSuite(&'static str),
    /// rustls refused the configuration.
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Certificate { .. } => "certificate",
            Error::MinVersion(_) => "min_version",
            Error::CipherSuite { .. } => "cipher_suite",
            Error::NoUsableSuite(_) => "no_usable_suite",
            Error::Rustls(_) => "rustls",
        }
    }
}

/// Protocol versions and cipher suites, as `TLS_MIN_VERSION` / `TLS_CIPHER_SUITES` give them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    /// `VersionTLS12` (default) or `VersionTLS13` (`1.2` / `1.3` also accepted).
    pub(crate) min_version: Option<String>,
    /// IANA (Go) names of the allowed suites. TLS 1.2 suites are limited to the listed ones;
    /// TLS 1.3 suites too when any is listed (Go does not let TLS 1.3 suites be chosen, so
    /// a Go-style list keeps all of them).
    pub(crate) cipher_suites: Vec<String>,
}

/// The name Go and IANA use for a suite (rustls prefixes TLS 1.3 suites with `TLS13_`).
fn iana_name(suite: &SupportedCipherSuite) -> String {
    let name = format!("{:?}", suite.suite());
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name,
    }
}

fn is_tls13(suite: &SupportedCipherSuite) -> bool {
    matches!(suite, SupportedCipherSuite::Tls13(_))
}

impl TlsOptions {
    fn tls13_only(&self) -> Result<bool, Error> {
        match self.min_version.as_deref().map(str::trim) {
            None | Some("") => Ok(false),
            Some("VersionTLS12" | "1.2" | "TLS12" | "tls1.2") => Ok(false),
            Some("VersionTLS13" | "1.3" | "TLS13" | "tls1.3") => Ok(true),
            Some(other) => Err(Error::MinVersion(other.to_string())),
        }
    }

    /// The ring provider restricted to the allowed suites, and the protocol versions.
    pub(crate) fn provider(
        &self,
    ) -> Result<
        (
            CryptoProvider,
            &'static [&'static rustls::SupportedProtocolVersion],
        ),
        Error,
    > {
        let tls13_only = self.tls13_only()?;
        let mut provider = rustls::crypto::ring::default_provider();
        let wanted: Vec<String> = self
            .cipher_suites
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if !wanted.is_empty() {
            let all = provider.cipher_suites.clone();
            let names: Vec<String> = all.iter().map(iana_name).collect();
            for w in &wanted {
                // Go spells the ChaCha20 suites of TLS 1.2 without the hash, too.
                let w_full = format!("{w}_SHA256");
                if !names.iter().any(|n| n == w || *n == w_full) {
                    return Err(Error::CipherSuite {
                        name: w.clone(),
                        supported: names.join(", "),
                    });
                }
            }
            let listed = |s: &SupportedCipherSuite| {
                let n = iana_name(s);
                wanted.iter().any(|w| n == *w || n == format!("{w}_SHA256"))
            };
            let any13 = all.iter().any(|s| is_tls13(s) && listed(s));
            provider.cipher_suites = all
                .into_iter()
                .filter(|s| {
                    if is_tls13(s) {
                        !any13 || listed(s)
                    } else {
                        listed(s)
                    }
                })
                .collect();
        }
        if tls13_only {
            provider.cipher_suites.retain(is_tls13);
        }
        let has12 = provider.cipher_suites.iter().any(|s| !is_tls13(s));
        let has13 = provider.cipher_suites.iter().any(is_tls13);
        let versions: &'static [&'static rustls::SupportedProtocolVersion] =
            match (tls13_only, has12, has13) {
                // ALL_VERSIONS is [TLS 1.3, TLS 1.2]: 1.3 preferred.
                (true, _, true) | (false, false, _) => &rustls::ALL_VERSIONS[..1],
                (true, _, false) => return Err(Error::NoUsableSuite("1.3")),
                (false, true, true) => rustls::ALL_VERSIONS,
                (false, true, false) => &rustls::ALL_VERSIONS[1..],
            };
        Ok((provider, versions))
    }

    /// A server configuration serving whatever certificate `certs` holds at handshake time.
    pub(crate) fn server_config(&self, certs: Arc<CertReloader>) -> Result<ServerConfig, Error> {
        let (provider, versions) = self.provider()?;
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(certs);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The serving certificate, re-read from its directory when the files change.
#[derive(Debug)]
pub(crate) struct CertReloader {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
}

/// The file contents behind the served certificate, and the last contents that failed.
#[derive(Debug)]
struct Seen {
    cert: Vec<u8>,
    key: Vec<u8>,
    failed: Option<Vec<u8>>,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl CertReloader {
    /// Loads `tls.crt` and `tls.key` from `dir`; fails if they are missing or do not match.
    pub(crate) fn load(dir: &Path) -> Result<Arc<Self>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = read(&dir.join(CERT_FILE))?;
        let key = read(&dir.join(KEY_FILE))?;
        let certified = certified_key(dir, &cert, &key, &provider)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new(Seen {
                cert,
                key,
                failed: None,
            }),
        }))
    }

    /// The certificate currently served (leaf first).
    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("certificate lock").clone()
    }

    /// Re-reads the files; swaps the certificate in when they changed and are valid.
    /// Returns whether the served certificate changed. While the files are invalid (e.g. a
    /// rotation wrote the certificate but not yet the key) the old certificate stays.
    pub(crate) fn reload_if_changed(&self) -> Result<bool, Error> {
        let cert = read(&self.dir.join(CERT_FILE))?;
        let key = read(&self.dir.join(KEY_FILE))?;
        let mut seen = self.seen.lock().expect("certificate lock");
        if seen.cert == cert && seen.key == key {
            return Ok(false);
        }
        let mut both = cert.clone();
        both.extend_from_slice(&key);
        match certified_key(&self.dir, &cert, &key, &self.provider) {
            Ok(certified) => {
                *self.current.write().expect("certificate lock") = Arc::new(certified);
                *seen = Seen {
                    cert,
                    key,
                    failed: None,
                };
                Ok(true)
            }
            Err(e) => {
                let repeated = seen.failed.as_ref() == Some(&both);
                seen.failed = Some(both);
                if repeated {
                    // Already reported for these contents.
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Polls the files every `interval` until `shutdown`, logging each reload.
    pub(crate) async fn watch(
        self: Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
        on_reload: impl Fn(Result<(), &Error>) + Send + 'static,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Reading two small files takes microseconds and parsing happens only when they
            // changed, so this runs on the runtime's thread instead of keeping a blocking-pool
            // thread alive for it.
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(dir = %self.dir.display(), "serving a new certificate");
                    on_reload(Ok(()));
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "certificate files changed but cannot be used; still serving the previous certificate");
                    on_reload(Err(&e));
                }
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn certified_key(
    dir: &Path,
    cert: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Certificate {
            path: cert_path.clone(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if chain.is_empty() {
        return Err(Error::Certificate {
            path: cert_path,
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| Error::Certificate {
        path: key_path.clone(),
        reason: format!("no usable PEM private key: {e}"),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| Error::Certificate {
        path: key_path,
        reason: format!("the key does not fit the certificate: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Usage};

    fn issue(ca: &Ca, cn: &str) -> crate::pki::CertKey {
        ca.issue(
            cn,
            &[],
            &["localhost", "127.0.0.1"],
            Usage::Server,
            time::Duration::days(1),
        )
        .unwrap()
    }

    fn write(dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join(CERT_FILE), cert).unwrap();
        std::fs::write(dir.join(KEY_FILE), key).unwrap();
    }

    #[test]
    fn a_rotated_certificate_is_served_and_a_broken_one_is_not() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = Ca::new("test-ca", time::Duration::days(1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let first = issue(&ca, "first");
        write(dir.path(), &first.cert_pem, &first.key_pem);
        let r = CertReloader::load(dir.path()).unwrap();
        let served = r.current().cert[0].clone();
        assert!(
            !r.reload_if_changed().unwrap(),
            "unchanged files reload nothing"
        );

        // Half a rotation: new certificate, old key. Refused once, then quiet; still old.
        let second = issue(&ca, "second");
        write(dir.path(), &second.cert_pem, &first.key_pem);
        let e = r.reload_if_changed().unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(!r.reload_if_changed().unwrap());
        assert_eq!(r.current().cert[0], served);

        write(dir.path(), &second.cert_pem, &second.key_pem);
        assert!(r.reload_if_changed().unwrap());
        assert_ne!(r.current().cert[0], served);
    }

    #[test]
    fn missing_or_garbage_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = CertReloader::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("tls.crt"), "{e}");
        write(dir.path(), "not pem", "not pem");
        let e = CertReloader::load(dir.path()).unwrap_err();
        assert_eq!(e.metric_label(), "certificate");
    }

    #[test]
    fn tls_options_follow_go_names_and_refuse_unknown_ones() {
        let (p, v) = TlsOptions::default().provider().unwrap();
        assert_eq!(v.len(), 2, "TLS 1.2 and 1.3 by default");
        assert_eq!(
            v[0].version,
            rustls::ProtocolVersion::TLSv1_3,
            "1.3 preferred"
        );
        assert!(p.cipher_suites.len() > 3);

        let (_, v) = TlsOptions {
            min_version: Some("VersionTLS13".into()),
            ..Default::default()
        }
        .provider()
        .unwrap();
        assert_eq!(v.len(), 1);

        let e = TlsOptions {
            min_version: Some("VersionTLS10".into()),
            ..Default::default()
        }
        .provider()
        .unwrap_err();
        assert_eq!(e.metric_label(), "min_version");

        // A Go-style list of TLS 1.2 suites keeps every TLS 1.3 suite.
        let (p, v) = TlsOptions {
            min_version: None,
            cipher_suites: vec![
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305".into(),
            ],
        }
        .provider()
        .unwrap();
        let names: Vec<String> = p.cipher_suites.iter().map(iana_name).collect();
        assert_eq!(v.len(), 2);
        assert!(
            names.contains(&"TLS_AES_128_GCM_SHA256".to_string()),
            "{names:?}"
        );
        assert!(!names.contains(&"TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384".to_string()));
        assert_eq!(
            names.iter().filter(|n| n.starts_with("TLS_ECDHE")).count(),
            2
        );

        let e = TlsOptions {
            min_version: None,
            cipher_suites: vec!["TLS_RSA_WITH_RC4_128_SHA".into()],
        }
        .provider()
        .unwrap_err();
        assert!(e.to_string().contains("TLS_RSA_WITH_RC4_128_SHA"), "{e}");
        assert!(e.to_string().contains("TLS_AES_128_GCM_SHA256"), "{e}");

        let e = TlsOptions {
            min_version: Some("1.3".into()),
            cipher_suites: vec!["TLS_AES_128_GCM_SHA256".into()],
        }
        .provider()
        .map(|_| ());
        assert!(e.is_ok());
    }
}
