//! TLS for every listener fencepost opens (elector, admin, HTTP proxy,
//! Postgres proxy): one server config per listener, built from its PEM
//! files (`tls_cert`, `tls_key`, `tls_client_ca`), reloaded in place.
//!
//! - [`ServerTls`] holds the listener's current `rustls::ServerConfig`
//!   behind an `ArcSwap`. Each handshake takes the config current at that
//!   instant (one atomic load and an `Arc` clone); a reload swaps in a new
//!   one, so new connections get the new certificate while every open
//!   connection keeps the session it has (its `Arc` of the old config).
//!   A config is the whole of it: certificate, key and client CA are
//!   reloaded together, and a new client CA applies to new handshakes.
//! - [`reload`]: SIGHUP and file changes (polled, see there for why)
//!   trigger a reload; a file that does not load keeps the old config,
//!   logs an error and counts `fencepost_tls_reloads_total{outcome="error"}`.
//! - [`identity`]: the names a verified client certificate carries, as
//!   [`PeerCertificate`], which the HTTP listeners put into every
//!   request's extensions.
//!
//! The crypto provider is named (ring) rather than taken from a process
//! default, so the choice never depends on which other crates enabled which
//! rustls features.
//!
//! Plaintext costs nothing extra: a listener without `tls_cert` has no
//! `ServerTls`, and its connections take the same code path, with the same
//! stream type, as before TLS existed (the TLS one is a separate
//! monomorphisation, boxed).

mod identity;
mod reload;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use metrics::Counter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub use self::identity::peer_certificate;
use crate::config::{ConfigError, ListenerTls};
use crate::edge::http1::{problem_bytes, HEAD_END};
use crate::edge::peer::PeerCertificate;
use crate::edge::problem::{self, Problem};
use crate::error::Error;
use crate::metrics::{TLS_HANDSHAKE_FAILURES, TLS_RELOADS};

/// A TLS handshake's first byte: a TLS record of type "handshake".
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// How long a plaintext client on a TLS port may keep sending before it is
/// closed: enough to read its request head and have it read the 400.
const PLAINTEXT_LINGER: Duration = Duration::from_secs(1);
/// Bytes read (and dropped) from such a client at most.
const PLAINTEXT_LINGER_BYTES: usize = 64 * 1024;

/// A certificate, key or CA file that does not make a server config.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Which application protocol a listener names in ALPN. A client that
/// offers ALPN gets it confirmed; one that offers none is served as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `http/1.1`: the HTTP proxy and the APIs speak HTTP/1.1 only, so a
    /// client offering `h2` too (curl does) settles on HTTP/1.1.
    Http1,
    /// `postgresql`, what libpq 17 offers.
    Postgres,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::Postgres => vec![b"postgresql".to_vec()],
        }
    }
}

/// Why a connection to a TLS listener ended before its handshake did; the
/// `reason` label of `fencepost_tls_handshake_failures_total`.
struct Failures {
    /// The handshake did not finish within the handshake timeout.
    timeout: Counter,
    /// The handshake failed: bad ClientHello, no shared cipher, a client
    /// certificate missing, from an unknown CA or expired, the client
    /// refusing our certificate, or the client leaving.
    error: Counter,
    /// The client spoke plaintext to a TLS-only listener.
    plaintext: Counter,
}

/// The TLS of a listener whose config names `files`, or `None` for a
/// plaintext one. A file that does not load is a config error naming the
/// listener, at start-up.
pub fn for_listener(
    protocol: &'static str,
    listen: SocketAddr,
    files: Option<ListenerTls>,
    alpn: Alpn,
    handshake_timeout: Duration,
) -> Result<Option<Arc<ServerTls>>, Error> {
    let Some(files) = files else {
        return Ok(None);
    };
    ServerTls::new(protocol, listen, files, alpn, handshake_timeout)
        .map(Some)
        .map_err(|e| Error::Config(ConfigError::Invalid(format!("{protocol} {listen}: {e}"))))
}

/// One listener's TLS: its files, its current config, its counters.
pub struct ServerTls {
    files: ListenerTls,
    alpn: Alpn,
    current: ArcSwap<ServerConfig>,
    handshake_timeout: Duration,
    /// `protocol listen`, in logs.
    name: String,
    failures: Failures,
    reloaded: Counter,
    reload_failed: Counter,
    /// The reload watcher's view of the files, shared with SIGHUP reloads
    /// so a reload by signal is not repeated by the poller.
    seen: Mutex<reload::Stamps>,
}

impl ServerTls {
    /// Loads `files` for the listener `protocol` on `listen`. A handshake
    /// must finish within `handshake_timeout` (each listener passes its
    /// header-read or startup timeout), so a slow or silent client costs
    /// its own connection only, for that long.
    pub fn new(
        protocol: &'static str,
        listen: SocketAddr,
        files: ListenerTls,
        alpn: Alpn,
        handshake_timeout: Duration,
    ) -> Result<Arc<ServerTls>, TlsError> {
        let config = build(&files, alpn)?;
        let listener = listen.to_string();
        let failure = |reason: &'static str| {
            metrics::counter!(
                TLS_HANDSHAKE_FAILURES,
                "protocol" => protocol,
                "listener" => listener.clone(),
                "reason" => reason
            )
        };
        let reload = |outcome: &'static str| {
            metrics::counter!(
                TLS_RELOADS,
                "protocol" => protocol,
                "listener" => listener.clone(),
                "outcome" => outcome
            )
        };
        let seen = reload::Stamps::of(&files);
        Ok(Arc::new(ServerTls {
            failures: Failures {
                timeout: failure("timeout"),
                error: failure("error"),
                plaintext: failure("plaintext"),
            },
            reloaded: reload("ok"),
            reload_failed: reload("error"),
            name: format!("{protocol} {listen}"),
            current: ArcSwap::from_pointee(config),
            files,
            alpn,
            handshake_timeout,
            seen: Mutex::new(seen),
        }))
    }

    /// Builds the config from the files again and, if it loads, makes it
    /// the one new handshakes use. On failure the old config stays, an
    /// error is logged and counted. `why` says what asked, in the log.
    pub fn reload(&self, why: &str) -> bool {
        match build(&self.files, self.alpn) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                self.reloaded.increment(1);
                tracing::info!(listener = %self.name, cause = why, "TLS certificate reloaded");
                true
            }
            Err(e) => {
                self.reload_failed.increment(1);
                tracing::error!(listener = %self.name, cause = why, error = %e, "TLS reload failed; still serving the previous certificate");
                false
            }
        }
    }

    /// The TLS handshake on `tcp`, within the handshake timeout. `None`:
    /// it failed or timed out (logged at debug and counted); the
    /// connection is dropped. On success, the client certificate's names
    /// when the listener verifies clients.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TlsStream<TcpStream>, Option<PeerCertificate>)> {
        let acceptor = TlsAcceptor::from(self.current.load_full());
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let who = peer_certificate(tls.get_ref().1);
                Some((tls, who))
            }
            Ok(Err(e)) => {
                self.failures.error.increment(1);
                tracing::debug!(%peer, listener = %self.name, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.failures.timeout.increment(1);
                tracing::debug!(%peer, listener = %self.name, "TLS handshake timed out");
                None
            }
        }
    }

    /// An HTTP listener's handshake: first a look at the client's first
    /// byte (without taking it), so a plaintext request is answered the
    /// way nginx answers one, `400` with `connection: close` and a problem
    /// saying to use `https://`, instead of a handshake error the client
    /// cannot read. Anything else that is not a TLS record is closed.
    /// The TLS stream is boxed: the plaintext path's connection future
    /// keeps its size.
    pub async fn accept_http(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<(Box<TlsStream<TcpStream>>, Option<PeerCertificate>)> {
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.handshake_timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            Ok(_) => return None,
            Err(_) => {
                self.failures.timeout.increment(1);
                return None;
            }
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            self.failures.plaintext.increment(1);
            tracing::debug!(%peer, listener = %self.name, "plaintext on a TLS port");
            if first[0].is_ascii_uppercase() {
                plaintext_refusal(tcp).await;
            }
            return None;
        }
        self.handshake(tcp, peer)
            .await
            .map(|(tls, who)| (Box::new(tls), who))
    }

    /// Counts a plaintext client refused by the caller's own protocol
    /// (the Postgres proxy's `28000`).
    pub fn count_plaintext(&self) {
        self.failures.plaintext.increment(1);
    }
}

/// A server config from the files: the certificate chain and its key
/// (which must match: rustls checks), and with `client_ca` a verifier that
/// requires a client certificate chaining to it (expiry and usage checked
/// by webpki).
fn build(files: &ListenerTls, alpn: Alpn) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert, "tls_cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError(format!("tls_key {}: {e}", files.key.display())))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "tls_client_ca")? {
                roots
                    .add(c)
                    .map_err(|e| TlsError(format!("tls_client_ca {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError(format!("tls_client_ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError(format!(
            "tls_cert {} with tls_key {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = alpn.protocols();
    Ok(config)
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{key} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{key} {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// What a plaintext HTTP client on a TLS port reads: after its request
/// head (HTTP clients read an answer only after sending), a `400` problem
/// with `connection: close`; then our FIN, and its further input read and
/// dropped for a moment so the close does not become a reset that eats
/// the answer. Bounded in time and bytes; the connection's permit bounds
/// how many do this at once.
async fn plaintext_refusal(mut tcp: TcpStream) {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(PLAINTEXT_LINGER, async {
        while seen.len() < PLAINTEXT_LINGER_BYTES {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
            if seen.windows(HEAD_END.len()).any(|w| w == HEAD_END) {
                return;
            }
        }
    })
    .await;
    let p = Problem::new(
        StatusCode::BAD_REQUEST,
        problem::BAD_REQUEST,
        "TLS required",
        "this port speaks TLS only: use https://",
    );
    let mut out = Vec::new();
    problem_bytes(&p, true, false, &mut out);
    if !matches!(
        tokio::time::timeout(PLAINTEXT_LINGER, tcp.write_all(&out)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = tcp.shutdown().await;
    let _ = tokio::time::timeout(PLAINTEXT_LINGER, async {
        let mut drained = 0;
        while drained < PLAINTEXT_LINGER_BYTES {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests;
