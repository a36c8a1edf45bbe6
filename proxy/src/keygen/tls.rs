//! `fencepost keygen tls`: a test CA and leaf certificates signed by it,
//! so a walkthrough (or a test) can switch TLS on in one step.
//!
//! The CA is ECDSA P-256 like the leaves (rcgen's default, and what every
//! TLS client fencepost meets accepts). Its subject is fixed, which is what
//! lets a later run re-create the issuer from `ca.key` alone and add
//! clients without replacing the CA: an issuer is its name and its key.

use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use super::write_file;
use crate::cli::KeygenTlsArgs;
use crate::error::Error;

/// The CA's subject common name (see the module doc for why it is fixed).
const CA_NAME: &str = "fencepost test CA";

pub fn run(args: KeygenTlsArgs) -> Result<ExitCode, Error> {
    let dir = &args.out;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let (ca_pem, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let validity = Validity::days_from_today(args.days)?;

    let reused = ca_key_path.exists();
    let (ca, ca_key) = if reused {
        let text = std::fs::read_to_string(&ca_key_path)
            .map_err(|e| Error::io(format!("cannot read {}", ca_key_path.display()), e))?;
        let key = KeyPair::from_pem(&text).map_err(|e| key_error(&ca_key_path, e))?;
        (
            ca_params(&validity)?
                .self_signed(&key)
                .map_err(rcgen_error)?,
            key,
        )
    } else {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let ca = ca_params(&validity)?
            .self_signed(&key)
            .map_err(rcgen_error)?;
        write_file(&ca_key_path, key.serialize_pem().trim_end(), true)?;
        write_file(&ca_pem, ca.pem().trim_end(), false)?;
        (ca, key)
    };
    println!(
        "CA: {}{}  (listeners: tls_client_ca; clients trust it: curl --cacert, sslrootcert)",
        ca_pem.display(),
        if reused { " (reused)" } else { "" }
    );

    if !reused || !args.sans.is_empty() {
        let sans = if args.sans.is_empty() {
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
        } else {
            args.sans.clone()
        };
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        leaf(&LeafSpec {
            cn: sans.first().map_or("localhost", String::as_str),
            sans: sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?,
            usage: ExtendedKeyUsagePurpose::ServerAuth,
            validity: &validity,
            cert: &cert,
            key: &key,
            force: args.force,
            issuer: (&ca, &ca_key),
        })?;
        println!(
            "server: {}, {}  (tls_cert, tls_key; valid for {})",
            cert.display(),
            key.display(),
            sans.join(", ")
        );
    }
    for name in &args.clients {
        let file = file_name(name);
        let (cert, key) = (
            dir.join(format!("client-{file}.pem")),
            dir.join(format!("client-{file}.key")),
        );
        leaf(&LeafSpec {
            cn: name,
            sans: vec![san(name)?],
            usage: ExtendedKeyUsagePurpose::ClientAuth,
            validity: &validity,
            cert: &cert,
            key: &key,
            force: args.force,
            issuer: (&ca, &ca_key),
        })?;
        println!(
            "client {name}: {}, {}  (curl --cert/--key; psql sslcert/sslkey)",
            cert.display(),
            key.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The CA's parameters: a CA for certificate signing only.
fn ca_params(validity: &Validity) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity.apply(&mut p);
    Ok(p)
}

struct LeafSpec<'a> {
    cn: &'a str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    validity: &'a Validity,
    cert: &'a Path,
    key: &'a Path,
    force: bool,
    issuer: (&'a Certificate, &'a KeyPair),
}

/// Signs and writes one leaf certificate and its new key.
fn leaf(spec: &LeafSpec<'_>) -> Result<(), Error> {
    for p in [spec.cert, spec.key] {
        if p.exists() && !spec.force {
            return Err(Error::Usage(format!(
                "{} exists; pass --force to overwrite",
                p.display()
            )));
        }
    }
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.cn);
    p.distinguished_name = dn;
    p.subject_alt_names = spec.sans.clone();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![spec.usage.clone()];
    p.use_authority_key_identifier_extension = true;
    spec.validity.apply(&mut p);
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = p
        .signed_by(&key, spec.issuer.0, spec.issuer.1)
        .map_err(rcgen_error)?;
    write_file(spec.key, key.serialize_pem().trim_end(), true)?;
    write_file(spec.cert, cert.pem().trim_end(), false)
}

/// A subject alternative name: an IP address, a URI (it has `://`), or
/// a DNS name.
fn san(name: &str) -> Result<SanType, Error> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let text = Ia5String::try_from(name.to_owned())
        .map_err(|e| Error::Usage(format!("{name:?} cannot be a certificate name: {e}")))?;
    Ok(if name.contains("://") {
        SanType::URI(text)
    } else {
        SanType::DnsName(text)
    })
}

/// `name` as a file name part: what is not `[A-Za-z0-9._-]` becomes `_`
/// (a URI's slashes and colons).
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// From yesterday (a client whose clock is a little behind still accepts
/// the certificates) to `days` from today, at midnight UTC.
struct Validity {
    from: (i32, u8, u8),
    until: (i32, u8, u8),
}

impl Validity {
    fn days_from_today(days: u32) -> Result<Validity, Error> {
        let today = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| Error::Usage("the system clock is before 1970".into()))?
            .as_secs()
            / 86_400;
        let today = i64::try_from(today).unwrap_or(i64::MAX / 2);
        Ok(Validity {
            from: civil(today - 1),
            until: civil(today + i64::from(days.max(1))),
        })
    }

    fn apply(&self, p: &mut CertificateParams) {
        let (y, m, d) = self.from;
        p.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = self.until;
        p.not_after = rcgen::date_time_ymd(y, m, d);
    }
}

/// The civil date (proleptic Gregorian) of day `z` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(9999),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::Usage(format!("cannot make the certificate: {e}"))
}

fn key_error(path: &Path, e: rcgen::Error) -> Error {
    Error::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(59), (1970, 3, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
    }

    #[test]
    fn names() {
        assert!(matches!(san("127.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("spiffe://prod/a"), Ok(SanType::URI(_))));
        assert!(matches!(san("worker-a"), Ok(SanType::DnsName(_))));
        assert!(san("naïve").is_err());
        assert_eq!(file_name("spiffe://prod/a"), "spiffe___prod_a");
    }
}
