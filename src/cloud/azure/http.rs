//! The HTTP client of every Azure call (ARM, Entra ID, storage): behind a corporate proxy
//! it honours `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY`, and trusts the system's CA bundle
//! (where OpenShift's cluster-wide trusted CA bundle lands) as well as the built-in roots.
//! The managed identity endpoint (IMDS) is link-local and never goes through a proxy.
//!
//! Only fixed system paths are read for CA bundles: no setting can make sandboxd trust a
//! file it names (a ConfigMap reaches CAA through `envFrom`).

use std::path::PathBuf;
use std::sync::Arc;

use azure_core::HttpClient;

/// Where Linux distributions keep the system CA bundle (Debian/Ubuntu, RHEL/Fedora
/// (OpenShift's injected trusted CA bundle), SUSE, Alpine): the first that exists is read.
pub(crate) const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// How Azure HTTPS calls leave the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct HttpSettings {
    /// Proxy for `https` URLs (`HTTPS_PROXY`).
    pub(crate) https_proxy: Option<String>,
    /// Proxy for `http` URLs (`HTTP_PROXY`).
    pub(crate) http_proxy: Option<String>,
    /// Hosts, domains and CIDRs reached directly (`NO_PROXY`).
    pub(crate) no_proxy: Option<String>,
    /// PEM bundles trusted in addition to the built-in roots.
    pub(crate) ca_bundles: Vec<PathBuf>,
}

fn env(names: [&str; 2]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The proxy variables of this process, upper-case names (from either spelling).
pub(crate) fn proxy_env() -> Vec<(String, String)> {
    [
        ["HTTPS_PROXY", "https_proxy"],
        ["HTTP_PROXY", "http_proxy"],
        ["NO_PROXY", "no_proxy"],
    ]
    .into_iter()
    .filter_map(|names| env(names).map(|v| (names[0].to_string(), v)))
    .collect()
}

impl HttpSettings {
    /// The process environment's proxy variables (upper or lower case) and the first
    /// system CA bundle that exists.
    pub(crate) fn from_env() -> Self {
        Self {
            https_proxy: env(["HTTPS_PROXY", "https_proxy"]),
            http_proxy: env(["HTTP_PROXY", "http_proxy"]),
            no_proxy: env(["NO_PROXY", "no_proxy"]),
            ca_bundles: SYSTEM_CA_BUNDLES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .into_iter()
                .collect(),
        }
    }

    /// The client for ARM, Entra ID and storage.
    pub(crate) fn client(&self) -> Result<Arc<dyn HttpClient>, String> {
        // No idle pooling, as azure_core's own client (a hyper hang with pooled
        // connections it works around).
        let mut b = reqwest::ClientBuilder::new()
            .pool_max_idle_per_host(0)
            .no_proxy();
        let no_proxy = self
            .no_proxy
            .as_deref()
            .and_then(reqwest::NoProxy::from_string);
        for (url, https) in [(&self.https_proxy, true), (&self.http_proxy, false)] {
            let Some(url) = url else { continue };
            let proxy = if https {
                reqwest::Proxy::https(url.as_str())
            } else {
                reqwest::Proxy::http(url.as_str())
            }
            .map_err(|e| {
                format!(
                    "{} {url:?} is not a proxy URL: {e}",
                    if https { "HTTPS_PROXY" } else { "HTTP_PROXY" }
                )
            })?;
            b = b.proxy(proxy.no_proxy(no_proxy.clone()));
        }
        for path in &self.ca_bundles {
            let certs = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())
                });
            match certs {
                Ok(certs) => {
                    for c in certs {
                        b = b.add_root_certificate(c);
                    }
                }
                // A broken system bundle leaves the built-in roots.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "CA bundle not usable")
                }
            }
        }
        let client = b
            .build()
            .map_err(|e| format!("building the HTTPS client: {e}"))?;
        Ok(Arc::new(client))
    }

    /// The client for the managed identity endpoint: direct, never through a proxy.
    pub(crate) fn imds_client(&self) -> Result<Arc<dyn HttpClient>, String> {
        let client = reqwest::ClientBuilder::new()
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .map_err(|e| format!("building the IMDS client: {e}"))?;
        Ok(Arc::new(client))
    }
}
