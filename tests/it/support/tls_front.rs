//! TLS for tests: a throwaway CA with leaf certificates (rcgen), and a
//! TLS-only Postgres front: the machine's Postgres has no TLS and its
//! configuration is not the tests' to change, so the front answers
//! SSLRequest itself, does the handshake with a leaf of the test CA and
//! relays the decrypted bytes to the real server, as a Postgres with
//! `ssl = on` and only `hostssl` lines would behave.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A CA of its own, so a test can tell "signed by the CA I trust" from
/// "signed by another".
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key, in PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/name`, for `upstream_ca`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).expect("write CA file");
        path
    }

    /// A server certificate for `names` (DNS names, or IP addresses,
    /// which become IP SANs), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Leaf {
    /// A TLS server config presenting this certificate; `alpn` the
    /// protocols it agrees to (empty: no ALPN).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("cert")];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// How a [`PgTlsFront`] answers SSLRequest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SslAnswer {
    /// `S`, then the handshake and the relay.
    Yes,
    /// `N`, as a server with `ssl = off`; then it relays in plain text.
    No,
}

/// A Postgres that speaks only TLS: SSLRequest answered, the handshake,
/// then every byte relayed to `target`. A connection that does not begin
/// with SSLRequest is closed unanswered (so a plain-text cancel request
/// would be lost, as it is to a `hostssl`-only server behind a TLS
/// terminator). Counts its completed handshakes, so a test can tell
/// which connections were encrypted.
pub struct PgTlsFront {
    pub addr: SocketAddr,
    pub handshakes: Arc<AtomicUsize>,
    /// Connections that did not begin with SSLRequest.
    pub plain: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl PgTlsFront {
    pub async fn start(target: SocketAddr, leaf: &Leaf, answer: SslAnswer) -> PgTlsFront {
        let acceptor = leaf.acceptor(&[&b"postgresql"[..]]);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let addr = listener.local_addr().expect("front addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let plain = Arc::new(AtomicUsize::new(0));
        let (h, p) = (handshakes.clone(), plain.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, h, p) = (acceptor.clone(), h.clone(), p.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 8];
                    if client.read_exact(&mut first).await.is_err() {
                        return;
                    }
                    if first != SSL_REQUEST {
                        p.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    if answer == SslAnswer::No {
                        if client.write_all(b"N").await.is_ok() {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                        return;
                    }
                    if client.write_all(b"S").await.is_err() {
                        return;
                    }
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        PgTlsFront {
            addr,
            handshakes,
            plain,
            task,
        }
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for PgTlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
