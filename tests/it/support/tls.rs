//! TLS for the tests: certificates made by the real `fencepost keygen tls`
//! (and, for what that command must never make, such as an expired or a
//! foreign-CA certificate, by rcgen), and real TLS clients: rustls under
//! hyper for keep-alive and byte-exact checks, curl, `openssl s_client`
//! and psql for what users run.
//!
//! Why not reqwest with rustls: the workspace builds reqwest without a TLS
//! backend, and turning one on for the tests would rebuild reqwest and
//! everything above it for every test build; curl and a rustls client
//! cover the same ground.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::run_cli;

/// What `fencepost keygen tls --out DIR --client good` wrote.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    /// Runs the real `fencepost keygen tls` into `dir`, with a client
    /// certificate for each of `clients`.
    pub fn keygen(dir: &Path, clients: &[&str]) -> Pki {
        let out = dir.display().to_string();
        let mut args = vec!["keygen", "tls", "--out", &out];
        for c in clients {
            args.extend(["--client", c]);
        }
        let (code, stdout, stderr) = run_cli(&args, &[]);
        assert_eq!(code, 0, "keygen tls: {stdout}{stderr}");
        Pki {
            dir: dir.to_owned(),
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// `(cert, key)` of the client certificate keygen made for `name`.
    pub fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("client-{name}.pem")),
            self.dir.join(format!("client-{name}.key")),
        )
    }

    /// A section's three TLS keys: the server certificate, and with
    /// `mtls` the CA as `tls_client_ca`.
    pub fn section(&self, s: super::Section, mtls: bool) -> super::Section {
        let s = s
            .set("tls_cert", self.server_cert.display().to_string())
            .set("tls_key", self.server_key.display().to_string());
        if mtls {
            s.set("tls_client_ca", self.ca.display().to_string())
        } else {
            s
        }
    }

    /// The issuer `keygen tls` made, re-created from `ca.key` (its name is
    /// fixed), to sign what keygen itself would not: an expired client
    /// certificate, a server certificate for a rotation.
    fn issuer(&self) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&self.ca_key).unwrap())
            .expect("ca.key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "fencepost test CA");
        p.distinguished_name = dn;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        (p.self_signed(&key).unwrap(), key)
    }

    /// Writes a certificate for `cn` (DNS SAN too) signed by this CA,
    /// valid between the two dates, as `DIR/<file>.pem` and `.key`.
    pub fn sign(
        &self,
        file: &str,
        cn: &str,
        client: bool,
        from: (i32, u8, u8),
        until: (i32, u8, u8),
    ) -> (PathBuf, PathBuf) {
        let (ca, ca_key) = self.issuer();
        leaf(&self.dir, file, cn, client, from, until, &ca, &ca_key)
    }

    /// A new server certificate and key for `localhost`/127.0.0.1 from
    /// this CA, written over `server.pem`/`server.key` by rename (as a
    /// deploy tool would), key first.
    pub fn rotate_server(&self, tag: &str) {
        let (cert, key) = self.sign(
            &format!("server-{tag}"),
            "localhost",
            false,
            (2020, 1, 1),
            (2090, 1, 1),
        );
        std::fs::rename(key, &self.server_key).unwrap();
        std::fs::rename(cert, &self.server_cert).unwrap();
    }
}

/// A CA of its own (not the listener's) with one client certificate:
/// `(ca.pem, client.pem, client.key)` in `dir`.
pub fn foreign_ca(dir: &Path, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "fencepost test CA");
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = p.self_signed(&key).unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let (cert, k) = leaf(
        dir,
        "client",
        cn,
        true,
        (2020, 1, 1),
        (2090, 1, 1),
        &ca,
        &key,
    );
    (ca_pem, cert, k)
}

#[allow(clippy::too_many_arguments)]
fn leaf(
    dir: &Path,
    file: &str,
    cn: &str,
    client: bool,
    from: (i32, u8, u8),
    until: (i32, u8, u8),
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> (PathBuf, PathBuf) {
    let mut names = vec![cn.to_owned()];
    if !client {
        names.push("127.0.0.1".into());
    }
    let mut p = rcgen::CertificateParams::new(names).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    p.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    p.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    p.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca, ca_key).unwrap();
    let (c, k) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    set_mode_600(&k);
    (c, k)
}

fn set_mode_600(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A rustls client config trusting `ca`, presenting `client` (cert, key)
/// if given, offering ALPN `http/1.1`.
pub fn client_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` as `name` (the name the server certificate
/// must carry).
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let tls = TlsConnector::from(Arc::clone(config)).connect(name, tcp);
    match tokio::time::timeout(Duration::from_secs(10), tls).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::other("TLS handshake timed out")),
    }
}

/// The DER of the certificate the server at `addr` presents.
pub async fn server_cert(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tls = connect(addr, "localhost", config)
        .await
        .expect("TLS connect");
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("a server certificate")
}

/// A keep-alive HTTP/1.1 connection over TLS.
pub async fn https_conn(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let tls = connect(addr, "localhost", config).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends `method path` (with fencing headers when `token` is given) on a
/// connection and returns (status, body).
pub async fn send(
    conn: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), hyper::Error> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        req = req
            .header("fencing-token", t)
            .header("fencing-resource", "orders");
    }
    // A body on a read would make it a write: only writes carry one.
    let body = if token.is_some() {
        Bytes::from_static(b"v")
    } else {
        Bytes::new()
    };
    let req = req.body(Full::new(body)).unwrap();
    conn.ready().await?;
    let resp = conn.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One GET over a fresh TLS connection: (status, body), or the error.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(u16, String), String> {
    let mut c = https_conn(addr, config).await.map_err(|e| e.to_string())?;
    send(&mut c, "GET", path, None)
        .await
        .map_err(|e| format!("{e:?}"))
}

/// curl's exit code and output: stderr, then stdout, whose last line is
/// the status code (`-w %{http_code}`, `000` when there was no answer).
/// Async (a child process of tokio's), so a test upstream on the test's
/// own runtime keeps answering while curl waits for it.
pub async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    )
}

/// `openssl s_client` against `addr` with `args`; (exit code, output).
/// Input is closed at once, so it ends after the handshake.
pub async fn s_client(addr: SocketAddr, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-brief"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run openssl");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
