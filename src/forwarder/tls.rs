//! Mutual TLS between CAA (client) and the forwarder (server): the forwarder presents the
//! per-VM server certificate and accepts only clients whose certificate chains to the CAA
//! CA; CAA checks that the server's certificate names the VM and chains to the same CA.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Bytes read from the TCP connection at once beneath TLS. rustls reads at most 4 KiB per
/// call, so without a buffer underneath every 4 KiB of a large message costs a system call.
pub(crate) const TCP_READ_BUFFER: usize = 64 << 10;

/// The TCP connection as TLS runs over it: reads buffered by [`TCP_READ_BUFFER`], writes
/// passed straight through.
pub(crate) type Transport = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps a connected TCP stream for TLS (see [`Transport`]).
pub(crate) fn transport(tcp: tokio::net::TcpStream) -> Transport {
    tokio::io::BufReader::with_capacity(TCP_READ_BUFFER, tcp)
}

/// Errors of building a TLS configuration (never carrying key material).
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsError(pub String);

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{what}: {e}")))?;
    if v.is_empty() {
        return Err(TlsError(format!("{what}: no certificate in PEM")));
    }
    Ok(v)
}

fn key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| TlsError(format!("{what}: not a PEM private key")))
}

fn roots(pem: &str, what: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(pem, what)? {
        store.add(c).map_err(|e| TlsError(format!("{what}: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// The forwarder's server configuration: its certificate, and client certificates required
/// and verified against `client_ca_pem`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_for(
        cert_pem,
        key_pem,
        client_ca_pem,
        crate::pki::aes_in_hardware(),
    )
}

/// [`server_config`] for a CPU with or without AES instructions.
fn server_config_for(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
    aes_in_hardware: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder(roots(client_ca_pem, "tls-client-ca")?)
        .build()
        .map_err(|e| TlsError(format!("client verifier: {e}")))?;
    let provider = crate::pki::tls_provider_for(aes_in_hardware);
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("protocol versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem, "tls-server-cert")?,
            key(key_pem, "tls-server-key")?,
        )
        .map_err(|e| TlsError(format!("server certificate: {e}")))?;
    // Without AES instructions in the VM the forwarder's order (ChaCha20 first) wins over
    // CAA's, whose CPU has them and so asks for AES-GCM first.
    cfg.ignore_client_order = !aes_in_hardware;
    Ok(Arc::new(cfg))
}

/// CAA's client configuration: trusts `ca_pem` for servers, presents its client certificate.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots(ca_pem, "CAA CA")?)
        .with_client_auth_cert(
            certs(cert_pem, "CAA client certificate")?,
            key(key_pem, "CAA client key")?,
        )
        .map_err(|e| TlsError(format!("client certificate: {e}")))?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Usage};

    /// The suite a handshake between the forwarder (for a CPU with or without AES
    /// instructions) and CAA's client agrees on.
    async fn negotiated(aes_in_hardware: bool) -> rustls::CipherSuite {
        let ca = Ca::new("forwarder-tls-test", time::Duration::hours(1)).unwrap();
        let day = time::Duration::days(1);
        let server = ca
            .issue("podvm-x", &[], &["podvm-x"], Usage::Server, day)
            .unwrap();
        let client = ca.issue("caa", &[], &[], Usage::Client, day).unwrap();
        let scfg = server_config_for(
            &server.cert_pem,
            &server.key_pem,
            &ca.cert_pem(),
            aes_in_hardware,
        )
        .unwrap();
        let ccfg = client_config(&ca.cert_pem(), &client.cert_pem, &client.key_pem).unwrap();
        let (a, b) = tokio::io::duplex(64 << 10);
        let name = rustls_pki_types::ServerName::try_from("podvm-x").unwrap();
        let (s, c) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(scfg).accept(a),
            tokio_rustls::TlsConnector::from(ccfg).connect(name, b)
        );
        let (s, _c) = (s.unwrap(), c.unwrap());
        s.get_ref().1.negotiated_cipher_suite().unwrap().suite()
    }

    #[tokio::test]
    async fn a_vm_without_aes_instructions_speaks_chacha20_even_to_a_client_preferring_aes_gcm() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        assert_eq!(
            negotiated(false).await,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        // With AES instructions the client's first choice stands (ring's order: AES-GCM).
        assert_eq!(
            negotiated(true).await,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }
}
