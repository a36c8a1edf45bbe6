//! TLS from fencepost to its upstreams: `https://` HTTP upstreams and
//! `upstream_sslmode` towards a Postgres server. One rustls client config
//! per listener, built once at start-up from the config (a CA file that
//! cannot be read stops `serve` rather than the first connection), and
//! the server name to present and check, taken from the upstream's host.
//!
//! The crypto provider is named (ring), as for the listeners, so the
//! choice never depends on which other crates enabled which rustls
//! features.
//!
//! What is checked, by mode:
//! - [`Verify::Full`]: the chain to the trusted roots and the host name
//!   (DNS name or IP address SAN): `https://` upstreams and
//!   `verify-full`;
//! - [`Verify::Chain`]: the chain only, any name (`verify-ca`, as libpq
//!   does it: the CA is trusted to issue only the database's certificates);
//! - [`Verify::Nothing`]: encryption only (`require`): a man in the middle
//!   can read the session, but a passive listener cannot. The handshake's
//!   signatures are still checked, so the key exchange is with whoever
//!   holds the presented certificate's key.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What the server's certificate is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain to the roots, and valid for the host name.
    Full,
    /// Chain to the roots; any name.
    Chain,
    /// Nothing (encryption against passive listeners only).
    Nothing,
}

/// Where the trusted roots come from.
pub enum Roots<'a> {
    /// A PEM file of CA certificates (`upstream_ca`).
    File(&'a Path),
    /// The system's store (what `openssl` on this machine would trust;
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
    System,
}

/// A TLS client towards one upstream: the config and the name.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// A client for the server at `host` (a DNS name or an IP address,
    /// IPv6 with or without brackets), checking what `verify` says
    /// against `roots` (not read for [`Verify::Nothing`]), offering
    /// `alpn` (empty: no ALPN).
    pub fn new(
        host: &str,
        verify: Verify,
        roots: Roots<'_>,
        alpn: &[&[u8]],
    ) -> Result<UpstreamTls, String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = match verify {
            Verify::Full => builder
                .with_root_certificates(load_roots(roots)?)
                .with_no_client_auth(),
            Verify::Chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoName {
                    roots: Some(load_roots(roots)?),
                    provider,
                }))
                .with_no_client_auth(),
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoName {
                    roots: None,
                    provider,
                }))
                .with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The handshake on a connected socket, within `timeout`. The error
    /// says what failed in words a person can act on ("invalid peer
    /// certificate: UnknownIssuer", "... not valid for name ...").
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> io::Result<TlsStream<TcpStream>> {
        match tokio::time::timeout(timeout, self.connector.connect(self.name.clone(), tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {timeout:?}"),
            )),
        }
    }
}

fn load_roots(roots: Roots<'_>) -> Result<RootCertStore, String> {
    match roots {
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in it", path.display()));
            }
            let mut store = RootCertStore::empty();
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(store)
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "a system CA certificate could not be loaded");
            }
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no CA certificates found in the system's store: set upstream_ca to a PEM file of the CAs to trust"
                        .to_owned(),
                );
            }
            Ok(store)
        }
    }
}

/// The two modes that do not check the host name: `verify-ca` (`roots`
/// set: the chain to them, as webpki checks it for any server: validity
/// period, key usage, signatures) and `require` (`None`: any
/// certificate). Both still check the handshake's signatures.
#[derive(Debug)]
struct NoName {
    roots: Option<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_hosts() {
        let none = Roots::System;
        let t = UpstreamTls::new("[::1]", Verify::Nothing, none, &[]).unwrap();
        assert!(matches!(t.name, ServerName::IpAddress(_)), "{t:?}");
        let t = UpstreamTls::new("db.example", Verify::Nothing, Roots::System, &[]).unwrap();
        assert!(matches!(t.name, ServerName::DnsName(_)), "{t:?}");
        assert!(UpstreamTls::new("bad name!", Verify::Nothing, Roots::System, &[]).is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("fp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = UpstreamTls::new("h", Verify::Full, Roots::File(&empty), &[]).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let missing = dir.join("missing.pem");
        let e = UpstreamTls::new("h", Verify::Chain, Roots::File(&missing), &[]).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
