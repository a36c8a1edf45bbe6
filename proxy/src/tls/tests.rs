//! The TLS layer on its own: the client certificate's names reach each
//! request's extensions (what the elector's and admin API's authorization
//! read), and a reload that fails keeps the config that works.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::edge::http1::{conn_limit, serve};
use crate::shutdown;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, a server certificate for localhost and a client certificate
/// (CN `worker-a`, DNS `worker-a.example`, URI `spiffe://t/a`), as PEM
/// files in a fresh directory.
fn pki() -> Dir {
    let dir = std::env::temp_dir().join(format!("fp-tls-unit-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let leaf = |file: &str, cn: &str, sans: Vec<rcgen::SanType>| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    let dns = |s: &str| rcgen::SanType::DnsName(s.try_into().unwrap());
    leaf("server", "localhost", vec![dns("localhost")]);
    leaf(
        "client",
        "worker-a",
        vec![
            dns("worker-a.example"),
            rcgen::SanType::URI("spiffe://t/a".try_into().unwrap()),
        ],
    );
    Dir(dir)
}

fn files(dir: &Path, mtls: bool) -> ListenerTls {
    ListenerTls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: mtls.then(|| dir.join("ca.pem")),
    }
}

/// Serves, over `tls`, a service that answers with the names of the
/// request's `PeerCertificate` (or `none`), until the trigger drops.
async fn names_server(tls: Arc<ServerTls>) -> (SocketAddr, shutdown::Trigger) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, sd) = shutdown::channel();
    tokio::spawn(async move {
        let limit = conn_limit("test", addr, 16, "full");
        let http = http1::Builder::new();
        serve("test", listener, &sd, &limit, &http, Some(&tls), |_| {
            service_fn(|req: Request<Incoming>| async move {
                let names = req
                    .extensions()
                    .get::<PeerCertificate>()
                    .map_or("none".to_owned(), |p| p.names.join(","));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(names))))
            })
        })
        .await;
    });
    (addr, trigger)
}

async fn ask(addr: SocketAddr, dir: &Path, with_cert: bool) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = if with_cert {
        b.with_client_auth_cert(
            vec![CertificateDer::from_pem_file(dir.join("client.pem")).unwrap()],
            PrivateKeyDer::from_pem_file(dir.join("client.key")).unwrap(),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text)
}

#[tokio::test]
async fn the_client_certificate_names_ride_in_every_request() {
    let dir = pki();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let tls = ServerTls::new(
        "test",
        addr,
        files(&dir.0, true),
        Alpn::Http1,
        Duration::from_secs(5),
    )
    .unwrap();
    let (at, _stop) = names_server(tls).await;
    assert_eq!(
        ask(at, &dir.0, true).await,
        "worker-a,worker-a.example,spiffe://t/a"
    );

    // Without tls_client_ca no certificate is asked for: no identity.
    let tls = ServerTls::new(
        "test",
        addr,
        files(&dir.0, false),
        Alpn::Http1,
        Duration::from_secs(5),
    )
    .unwrap();
    let (at, _stop) = names_server(tls).await;
    assert_eq!(ask(at, &dir.0, false).await, "none");
}

#[test]
fn a_reload_that_fails_keeps_the_config_that_works() {
    let dir = pki();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let tls = ServerTls::new(
        "test",
        addr,
        files(&dir.0, true),
        Alpn::Http1,
        Duration::from_secs(5),
    )
    .unwrap();
    let before = tls.current.load_full();
    std::fs::write(dir.0.join("server.pem"), "garbage").unwrap();
    assert!(!tls.reload("test"));
    assert!(Arc::ptr_eq(&before, &tls.current.load_full()));
    // A key that does not match the certificate is refused as well.
    let other = pki();
    std::fs::copy(other.0.join("server.pem"), dir.0.join("server.pem")).unwrap();
    assert!(!tls.reload("test"));
    assert!(Arc::ptr_eq(&before, &tls.current.load_full()));
    std::fs::copy(other.0.join("server.key"), dir.0.join("server.key")).unwrap();
    assert!(tls.reload("test"));
    assert!(!Arc::ptr_eq(&before, &tls.current.load_full()));
    // Loading at start-up says which file is bad.
    std::fs::write(dir.0.join("ca.pem"), "").unwrap();
    let e = ServerTls::new(
        "test",
        addr,
        files(&dir.0, true),
        Alpn::Http1,
        Duration::from_secs(5),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("tls_client_ca"), "{e}");
}
