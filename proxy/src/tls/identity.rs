//! The names a client certificate carries, read once per connection after
//! the handshake verified it.
//!
//! The subject alternative names come from webpki's own parser (the one
//! that verified the chain); the subject's common name, which webpki
//! exposes only as raw DER, from the small walker below: `Name` is a
//! SEQUENCE OF SET OF SEQUENCE { OID, value }, and only the
//! common name's OID (2.5.4.3) with a string value is taken. Nothing here
//! can panic on any input: every length is checked against what is left.

use rustls::server::ServerConnection;

use crate::edge::peer::PeerCertificate;

/// OID 2.5.4.3, `id-at-commonName`, DER-encoded.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// DER tags.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

/// The verified client certificate's names: subject CN first, then DNS
/// SANs, then URI SANs. `None` when the client presented none (a listener
/// without `tls_client_ca` asks for none) or it has no name at all.
pub fn peer_certificate(conn: &ServerConnection) -> Option<PeerCertificate> {
    let der = conn.peer_certificates()?.first()?;
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let mut names = Vec::new();
    if let Some(cn) = common_name(cert.subject()) {
        names.push(cn);
    }
    names.extend(cert.valid_dns_names().map(str::to_owned));
    names.extend(cert.valid_uri_names().map(str::to_owned));
    (!names.is_empty()).then_some(PeerCertificate { names })
}

/// One DER element at the start of `der`: its tag, its contents and what
/// follows it. `None` on anything malformed or truncated.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The first common name in a `Name`'s contents (webpki gives the
/// subject without its outer SEQUENCE), if it is a string.
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (tag, set, rest) = tlv(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        let mut attrs = set;
        while !attrs.is_empty() {
            let (tag, attr, rest) = tlv(attrs)?;
            attrs = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = tlv(attr)?;
            if tag != OID || oid != COMMON_NAME {
                continue;
            }
            let (tag, text, _) = tlv(value)?;
            if matches!(tag, UTF8_STRING | PRINTABLE_STRING | IA5_STRING) {
                return std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subject of a certificate rcgen made, as webpki hands it over.
    fn subject_of(params: rcgen::CertificateParams) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        ee.subject().to_vec()
    }

    #[test]
    fn the_common_name_is_found_among_other_attributes() {
        let mut p = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "scheduler-a");
        assert_eq!(common_name(&subject_of(p)).as_deref(), Some("scheduler-a"));

        let mut none = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        none.distinguished_name = rcgen::DistinguishedName::new();
        none.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        assert_eq!(common_name(&subject_of(none)), None);
    }

    #[test]
    fn malformed_der_is_no_name_and_no_panic() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[SET]), None);
        assert_eq!(common_name(&[SET, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(common_name(&[SET, 0x82, 0xff]), None);
        assert_eq!(common_name(&[SET, 10, SEQUENCE, 8, OID, 3]), None);
        // Every prefix of a real subject.
        let mut p = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "client-x");
        let s = subject_of(p);
        for n in 0..s.len() {
            let _ = common_name(&s[..n]);
        }
        assert_eq!(common_name(&s).as_deref(), Some("client-x"));
    }
}
