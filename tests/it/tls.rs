//! TLS on every listener (`tls_cert`, `tls_key`, `tls_client_ca`), with
//! certificates from the real `fencepost keygen tls` and real clients:
//! curl, `openssl s_client`, psql (`sslmode=verify-full`) and rustls.
//!
//! - The server's certificate is verified by its clients: the right CA
//!   and name pass, another CA or another name fail.
//! - Plaintext to a TLS listener is refused: HTTP gets a 400 problem (as
//!   nginx answers), Postgres a `28000` error.
//! - With `tls_client_ca`, a client certificate is required, and one from
//!   another CA or out of date is refused, on every listener kind.
//! - Rotation: a new certificate (SIGHUP, or a file change alone) reaches
//!   new connections while an open keep-alive connection keeps working; a
//!   bad file keeps the old certificate, logged and counted.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::tls::{self, curl, foreign_ca, s_client, Pki};
use crate::support::{
    direct, eventually, opts, Conf, InProc, Section, Server, TempDir, TestDb, Upstream,
};

/// `psql` with `conninfo` running `sql`: (exit code, output).
fn psql(conninfo: &str, sql: &str) -> (i32, String) {
    let out = Command::new("psql")
        .arg(conninfo)
        .args(crate::support::PSQL_STRICT)
        .args(["-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn conninfo(host: &str, pg: SocketAddr, db: &TestDb, extra: &str) -> String {
    format!(
        "host={host} port={} dbname={} user=postgres {extra}",
        pg.port(),
        db.name
    )
}

/// A plaintext HTTP request on `addr`: what comes back, whole.
async fn plaintext_http(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("send");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

/// The last line curl printed (`-w %{http_code}`).
fn status(out: &str) -> &str {
    out.lines().last().unwrap_or("")
}

/// The sum of the series of `prefix` (a name and `{`) whose labels
/// include all of `labels`, in Prometheus text.
fn labelled(text: &str, prefix: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem)
        .expect("a certificate in the file")
        .to_vec()
}

#[tokio::test]
async fn every_listener_speaks_tls_verified_by_its_clients_and_refuses_plaintext() {
    let dir = TempDir::new("fp-tls-all");
    let pki = Pki::keygen(&dir.path().join("pki"), &[]);
    let (other_ca, _, _) = foreign_ca(&dir.path().join("other"), "x");
    let db = TestDb::create("fp_tls_all").await;
    direct(&db)
        .await
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .expect("create table");
    let up = Upstream::start().await;
    let mut conf = Conf::sqlite(dir.path());
    let admin = conf.admin(pki.section(Section::new(), false));
    let elector = conf.elector(pki.section(Section::new(), false));
    let http = conf.http(pki.section(Section::to(format!("http://{}", up.addr)), false));
    let hyper = conf.http(pki.section(
        Section::to(format!("http://{}", up.addr)).set("data_path", "hyper"),
        false,
    ));
    // The relay on worker threads: each accepts (and handshakes) on its
    // own copy of the listening socket.
    let workers = conf.http(pki.section(
        Section::to(format!("http://{}", up.addr)).set("workers", 2),
        false,
    ));
    let pg = conf.postgres(pki.section(Section::to("127.0.0.1:5432"), false));
    let _server = InProc::start(conf).await;
    let ca = pki.ca.display().to_string();
    let other = other_ca.display().to_string();

    // Every HTTP listener: verified with the CA, by name.
    for (what, addr, path) in [
        ("admin", admin, "/healthz"),
        ("elector", elector, "/v1/leases"),
        ("http relay", http, "/orders/1"),
        ("http hyper", hyper, "/orders/1"),
        ("http relay workers", workers, "/orders/1"),
    ] {
        let (code, out) = curl(&["--cacert", &ca, &https(addr, path)]).await;
        assert_eq!((code, status(&out)), (0, "200"), "{what}: {out}");
        // Another CA: the client refuses the server (curl: 60).
        let (code, out) = curl(&["--cacert", &other, &https(addr, path)]).await;
        assert_eq!(
            code, 60,
            "{what} with a foreign CA must fail verification: {out}"
        );
        // Another name: not in the certificate's SANs.
        let resolve = format!("wrong.example:{}:127.0.0.1", addr.port());
        let url = format!("https://wrong.example:{}{path}", addr.port());
        let (code, out) = curl(&["--cacert", &ca, "--resolve", &resolve, &url]).await;
        assert_eq!(code, 60, "{what} under a name it does not carry: {out}");
        // Plaintext: a 400 problem saying to use https, then a close.
        let plain = plaintext_http(addr).await;
        assert!(
            plain.starts_with("HTTP/1.1 400 ") && plain.contains("https://"),
            "{what}: plaintext must get a 400: {plain:?}"
        );
        let (_, out) = curl(&[&format!("http://127.0.0.1:{}{path}", addr.port())]).await;
        assert_eq!(status(&out), "400", "{what}: curl over http://: {out}");
        // openssl s_client verifies the chain and the name.
        let (code, out) = s_client(
            addr,
            &[
                "-CAfile",
                &ca,
                "-verify_return_error",
                "-verify_hostname",
                "localhost",
            ],
        )
        .await;
        assert!(
            code == 0 && out.contains("Verification: OK"),
            "{what}: {out}"
        );
        let (code, out) = s_client(addr, &["-CAfile", &other, "-verify_return_error"]).await;
        assert_ne!(code, 0, "{what}: s_client with a foreign CA: {out}");
    }

    // Fencing works over TLS: a write admitted, an older token refused.
    for addr in [http, hyper, workers] {
        for (token, expect) in [("5", "200"), ("4", "409")] {
            let (_, out) = curl(&[
                "--cacert",
                &ca,
                "-X",
                "PUT",
                "-H",
                &format!("Fencing-Token: {token}"),
                "-H",
                "Fencing-Resource: orders",
                "--data",
                "v",
                &https(addr, "/orders/1"),
            ])
            .await;
            assert_eq!(status(&out), expect, "{out}");
            if expect == "409" {
                assert!(out.contains("urn:fencepost:stale-token"), "{out}");
            }
        }
    }
    let (_, out) = curl(&[
        "--cacert",
        &ca,
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"holder":"a","ttl_ms":5000}"#,
        &https(elector, "/v1/leases/jobs/acquire"),
    ])
    .await;
    assert_eq!(status(&out), "200", "acquire over TLS: {out}");

    // Postgres: psql verifies the server (verify-full, by name and by IP
    // SAN), fencing works through the encrypted session, plaintext and a
    // foreign CA are refused.
    let root = format!("sslmode=verify-full sslrootcert={ca}");
    for host in ["localhost", "127.0.0.1"] {
        let (code, out) = psql(&conninfo(host, pg, &db, &root), "\\conninfo");
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("SSL connection"), "not encrypted: {out}");
    }
    let with = |token: u64| {
        conninfo(
            "localhost",
            pg,
            &db,
            &format!("{root} options='{}'", opts(token, "r")),
        )
    };
    let (code, out) = psql(&with(5), "INSERT INTO t VALUES (5)");
    assert_eq!(code, 0, "{out}");
    let (code, out) = psql(&with(4), "INSERT INTO t VALUES (4)");
    assert_ne!(code, 0);
    assert!(out.contains("ZF001"), "{out}");
    let (code, out) = psql(
        &conninfo("localhost", pg, &db, "sslmode=disable"),
        "SELECT 1",
    );
    assert_ne!(code, 0, "plaintext must be refused: {out}");
    assert!(out.contains("TLS connections only"), "{out}");
    // psql does not print a connection error's SQLSTATE: read it raw.
    let mut raw = TcpStream::connect(pg).await.expect("connect");
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0postgres\0\0");
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&startup);
    raw.write_all(&packet).await.expect("send startup");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    assert!(
        answer.first() == Some(&b'E') && answer.windows(6).any(|w| w == b"C28000"),
        "a plaintext startup must get ErrorResponse 28000: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let (code, out) = psql(
        &conninfo(
            "localhost",
            pg,
            &db,
            &format!("sslmode=verify-full sslrootcert={other}"),
        ),
        "SELECT 1",
    );
    assert_ne!(code, 0, "a foreign CA must fail: {out}");
    let (code, out) = psql(
        &conninfo(
            "wrong.example",
            pg,
            &db,
            &format!("hostaddr=127.0.0.1 {root}"),
        ),
        "SELECT 1",
    );
    assert_ne!(code, 0, "a name the certificate does not carry: {out}");
    assert!(out.contains("wrong.example"), "{out}");
    let rows: Vec<i32> = direct(&db)
        .await
        .query("SELECT v FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![5]);
}

#[tokio::test]
async fn client_certificates_are_required_and_must_come_from_the_ca_and_be_in_date() {
    let dir = TempDir::new("fp-tls-mtls");
    let pki = Pki::keygen(&dir.path().join("pki"), &["worker-a"]);
    let (good_cert, good_key) = pki.client("worker-a");
    let (old_cert, old_key) = pki.sign("expired", "worker-a", true, (2020, 1, 1), (2021, 1, 1));
    let (soon_cert, soon_key) = pki.sign("future", "worker-a", true, (2090, 1, 1), (2091, 1, 1));
    let (_, alien_cert, alien_key) = foreign_ca(&dir.path().join("other"), "worker-a");
    let db = TestDb::create("fp_tls_mtls").await;
    let up = Upstream::start().await;
    let mut conf = Conf::sqlite(dir.path());
    let admin = conf.admin(pki.section(Section::new(), true));
    let elector = conf.elector(pki.section(Section::new(), true));
    let http = conf.http(pki.section(Section::to(format!("http://{}", up.addr)), true));
    let hyper = conf.http(pki.section(
        Section::to(format!("http://{}", up.addr)).set("data_path", "hyper"),
        true,
    ));
    let pg = conf.postgres(pki.section(Section::to("127.0.0.1:5432"), true));
    let _server = InProc::start(conf).await;
    let ca = pki.ca.display().to_string();
    let p = |x: &Path| x.display().to_string();

    for (what, addr, path) in [
        ("admin", admin, "/healthz"),
        ("elector", elector, "/v1/leases"),
        ("http relay", http, "/orders/1"),
        ("http hyper", hyper, "/orders/1"),
    ] {
        let url = https(addr, path);
        let (code, out) = curl(&[
            "--cacert",
            &ca,
            "--cert",
            &p(&good_cert),
            "--key",
            &p(&good_key),
            &url,
        ])
        .await;
        assert_eq!(
            (code, status(&out)),
            (0, "200"),
            "{what} with its client certificate: {out}"
        );
        // No certificate, one from another CA (same name), one expired,
        // one not yet valid: no HTTP answer at all.
        for (case, args) in [
            ("none", vec![]),
            (
                "foreign CA",
                vec![
                    "--cert",
                    alien_cert.to_str().unwrap(),
                    "--key",
                    alien_key.to_str().unwrap(),
                ],
            ),
            (
                "expired",
                vec![
                    "--cert",
                    old_cert.to_str().unwrap(),
                    "--key",
                    old_key.to_str().unwrap(),
                ],
            ),
            (
                "not yet valid",
                vec![
                    "--cert",
                    soon_cert.to_str().unwrap(),
                    "--key",
                    soon_key.to_str().unwrap(),
                ],
            ),
        ] {
            let mut all = vec!["--cacert", ca.as_str()];
            all.extend(args);
            all.push(&url);
            let (code, out) = curl(&all).await;
            assert!(
                code != 0 && status(&out) == "000",
                "{what}: a client certificate that is {case} must be refused: {code} {out}"
            );
        }
        // s_client over TLS 1.2, where the refusal is inside the handshake.
        let (code, out) = s_client(
            addr,
            &[
                "-CAfile",
                &ca,
                "-tls1_2",
                "-cert",
                &p(&alien_cert),
                "-key",
                &p(&alien_key),
            ],
        )
        .await;
        assert_ne!(
            code, 0,
            "{what}: s_client with a foreign client certificate: {out}"
        );
        let (code, out) = s_client(
            addr,
            &[
                "-CAfile",
                &ca,
                "-tls1_2",
                "-cert",
                &p(&good_cert),
                "-key",
                &p(&good_key),
            ],
        )
        .await;
        assert_eq!(
            code, 0,
            "{what}: s_client with its client certificate: {out}"
        );
    }

    // Postgres: sslcert/sslkey, verify-full.
    let base = format!("sslmode=verify-full sslrootcert={ca}");
    let (code, out) = psql(
        &conninfo(
            "localhost",
            pg,
            &db,
            &format!("{base} sslcert={} sslkey={}", p(&good_cert), p(&good_key)),
        ),
        "SELECT 1",
    );
    assert_eq!(code, 0, "psql with its client certificate: {out}");
    for (case, cert, key) in [
        ("none", None, None),
        ("foreign CA", Some(&alien_cert), Some(&alien_key)),
        ("expired", Some(&old_cert), Some(&old_key)),
    ] {
        // libpq reads ~/.postgresql/postgresql.crt when sslcert is unset:
        // point it at nothing.
        let files = match (cert, key) {
            (Some(c), Some(k)) => format!("sslcert={} sslkey={}", p(c), p(k)),
            _ => "sslcert=/nonexistent sslkey=/nonexistent".to_owned(),
        };
        let (code, out) = psql(
            &conninfo("localhost", pg, &db, &format!("{base} {files}")),
            "SELECT 1",
        );
        assert_ne!(
            code, 0,
            "psql with a client certificate that is {case}: {out}"
        );
    }

    // Each refused handshake was counted, per listener.
    let cfg = tls::client_config(&pki.ca, Some((&good_cert, &good_key)));
    let (s, text) = tls::get(admin, "/metrics", &cfg)
        .await
        .expect("metrics over mTLS");
    assert_eq!(s, 200);
    for addr in [admin, elector, http, hyper, pg] {
        let failures = labelled(
            &text,
            "fencepost_tls_handshake_failures_total{",
            &[&format!("listener=\"{addr}\""), "reason=\"error\""],
        );
        assert!(
            failures >= 3.0,
            "handshake failures on {addr}: {failures}\n{text}"
        );
    }
}

/// Rotation on the real binary (SIGHUP is a process's): through the HTTP
/// proxy's relay, a keep-alive connection opened before any rotation
/// serves requests after each one; new connections see the new
/// certificate; a bad file keeps the old one.
#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_and_open_ones_keep_working() {
    let dir = TempDir::new("fp-tls-rotate");
    let pki = Pki::keygen(&dir.path().join("pki"), &[]);
    let up = Upstream::start().await;
    let mut conf = Conf::sqlite(dir.path());
    let admin = conf.admin(Section::new());
    let http = conf.http(
        pki.section(
            Section::to(format!("http://{}", up.addr))
                .set("header_read_timeout", "60s")
                .set("idle_timeout", "60s"),
            false,
        ),
    );
    let mut server = Server::run(dir.path(), conf).await;
    let pid = server.child.as_ref().expect("running").id();
    let cfg = tls::client_config(&pki.ca, None);
    let reloads = |outcome: &'static str| async move {
        let (_, text) = crate::support::get(&format!("http://{admin}/metrics"), None).await;
        labelled(
            &text,
            "fencepost_tls_reloads_total{",
            &[
                &format!("listener=\"{http}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };

    let mut kept = tls::https_conn(http, &cfg).await.expect("connect");
    assert_eq!(
        tls::send(&mut kept, "GET", "/a", None).await.unwrap().0,
        200
    );
    let first = tls::server_cert(http, &cfg).await;
    assert_eq!(first, der_of(&pki.server_cert));

    // 1. New files, then SIGHUP.
    pki.rotate_server("b");
    let second = der_of(&pki.server_cert);
    assert_ne!(first, second);
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let seen = eventually(5, || async {
        let now = tls::server_cert(http, &cfg).await;
        (now == second).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "SIGHUP did not reload\n{}",
        server.log_text()
    );
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("TLS certificate reloaded") && l.contains("SIGHUP")),
        "the reload was not SIGHUP's: {log}"
    );
    assert_eq!(
        tls::send(&mut kept, "GET", "/b", None).await.unwrap().0,
        200
    );

    // 2. New files alone: the poller notices.
    pki.rotate_server("c");
    let third = der_of(&pki.server_cert);
    let seen = eventually(10, || async {
        let now = tls::server_cert(http, &cfg).await;
        (now == third).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "a file change was not picked up\n{}",
        server.log_text()
    );
    assert!(server.log_text().contains("file change"));
    assert_eq!(
        tls::send(&mut kept, "GET", "/c", None).await.unwrap().0,
        200
    );
    assert!(reloads("ok").await >= 2.0);

    // 3. A bad file: the old certificate stays, an error is logged and
    // counted; on SIGHUP too; the process serves on.
    std::fs::write(&pki.server_cert, "not a certificate\n").unwrap();
    let failed = eventually(10, || async {
        (reloads("error").await >= 1.0).then_some(())
    })
    .await;
    assert!(
        failed.is_some(),
        "a bad file was not counted\n{}",
        server.log_text()
    );
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    let failed = eventually(5, || async {
        (reloads("error").await >= 2.0).then_some(())
    })
    .await;
    assert!(failed.is_some(), "SIGHUP with a bad file was not counted");
    assert_eq!(tls::server_cert(http, &cfg).await, third);
    assert_eq!(
        tls::send(&mut kept, "GET", "/d", None).await.unwrap().0,
        200
    );
    let log = server.log_text();
    assert!(log.contains("TLS reload failed"), "{log}");

    // 4. Fixed: picked up again.
    pki.rotate_server("d");
    let fourth = der_of(&pki.server_cert);
    let seen = eventually(10, || async {
        (tls::server_cert(http, &cfg).await == fourth).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the fixed file was not picked up\n{}",
        server.log_text()
    );
    assert_eq!(
        tls::send(&mut kept, "GET", "/e", None).await.unwrap().0,
        200
    );
    let exit = server.terminate().expect("running");
    assert!(exit.success(), "{}", server.log_text());
}

/// `fencepost keygen tls` run again adds clients under the same CA (a
/// client made later is accepted by a listener started before), keeps
/// keys private, and refuses to overwrite without `--force`.
#[tokio::test]
async fn keygen_tls_reuses_its_ca_to_add_clients_and_keeps_keys_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("fp-tls-keygen");
    let pki = Pki::keygen(&dir.path().join("pki"), &["a"]);
    let ca_before = std::fs::read(&pki.ca).unwrap();
    for key in [&pki.ca_key, &pki.server_key, &pki.client("a").1] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let mut conf = Conf::sqlite(dir.path());
    let admin = conf.admin(pki.section(Section::new(), true));
    let _server = InProc::start(conf).await;

    // Again, with a new client and a URI name: the CA stays.
    let out = pki.dir.display().to_string();
    let (code, _, err) = crate::support::run_cli(
        &[
            "keygen",
            "tls",
            "--out",
            &out,
            "--client",
            "b",
            "--client",
            "spiffe://test/b",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(&pki.ca).unwrap(),
        ca_before,
        "the CA was replaced"
    );
    for name in ["b", "spiffe___test_b"] {
        let (cert, key) = pki.client(name);
        let cfg = tls::client_config(&pki.ca, Some((&cert, &key)));
        let (s, _) = tls::get(admin, "/healthz", &cfg)
            .await
            .expect("a later client is accepted");
        assert_eq!(s, 200);
    }
    // Without --force an existing file is kept.
    let (code, _, err) =
        crate::support::run_cli(&["keygen", "tls", "--out", &out, "--client", "a"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");
}

/// The leaders' side of TLS: `fencepost lease` (and the client crate's
/// reqwest, built the same way) reaches an elector that speaks TLS only,
/// trusting the system's CAs and `SSL_CERT_FILE` (read by
/// `rustls-native-certs`), and refuses it when the CA is not trusted.
#[tokio::test]
async fn the_cli_reaches_a_tls_elector_through_ssl_cert_file() {
    let dir = TempDir::new("fp-tls-cli");
    let pki = Pki::keygen(&dir.path().join("pki"), &[]);
    let mut conf = Conf::sqlite(dir.path());
    let elector = conf.elector(pki.section(Section::new(), false));
    let _server = InProc::start(conf).await;
    let url = https(elector, "");
    let ca = pki.ca.display().to_string();
    let args = [
        "lease",
        "acquire",
        "--elector",
        url.as_str(),
        "--resource",
        "jobs/tls",
        "--holder",
        "a",
    ];

    let (code, out, err) = crate::support::run_cli(&args, &[("SSL_CERT_FILE", ca.as_str())]);
    assert_eq!(code, 0, "lease acquire over TLS: {out}{err}");
    let token: u64 = out.trim().parse().expect("the token alone on stdout");
    assert!(token >= 1, "{out}");

    // Without the test CA the elector's certificate is not trusted.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let (code, out, err) = crate::support::run_cli(
        &args,
        &[("SSL_CERT_FILE", empty.display().to_string().as_str())],
    );
    assert_ne!(code, 0, "an untrusted elector was accepted: {out}{err}");
    assert!(out.trim().is_empty(), "no token printed: {out}");
}
