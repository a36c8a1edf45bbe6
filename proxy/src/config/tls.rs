//! `tls_cert`, `tls_key`, `tls_client_ca`: the same three keys on every
//! listener section (`[elector]`, `[admin]`, `[[http]]`, `[[postgres]]`).
//!
//! Kept as three plain fields on each section rather than a flattened
//! struct: serde cannot combine `flatten` with `deny_unknown_fields`, and a
//! misspelt key must stay an error.

use std::path::{Path, PathBuf};

/// The files a TLS listener serves from; see [`crate::tls::ServerTls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates: when set, every client must present a
    /// certificate that chains to one of them.
    pub client_ca: Option<PathBuf>,
}

impl ListenerTls {
    /// The files of one section, or `None` when it serves plain TCP.
    /// Call after [`check`], which refuses the incomplete combinations.
    pub fn from_keys(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Option<ListenerTls> {
        Some(ListenerTls {
            cert: cert?.to_owned(),
            key: key?.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        })
    }
}

/// `tls_cert` and `tls_key` go together; `tls_client_ca` needs them (a
/// client certificate is only asked for inside a TLS handshake). `what`
/// names the section in the message (`admin`, `http[0]`).
pub(super) fn check(
    what: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<(), String> {
    if cert.is_some() != key.is_some() {
        return Err(format!("{what}: tls_cert and tls_key go together"));
    }
    if client_ca.is_some() && cert.is_none() {
        return Err(format!(
            "{what}: tls_client_ca needs tls_cert and tls_key (client certificates are asked for in a TLS handshake)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_combinations_are_refused() {
        let p = |s: &'static str| Some(Path::new(s));
        assert!(check("admin", p("c"), p("k"), None).is_ok());
        assert!(check("admin", p("c"), p("k"), p("ca")).is_ok());
        assert!(check("admin", None, None, None).is_ok());
        let e = check("http[1]", p("c"), None, None).unwrap_err();
        assert!(e.contains("http[1]") && e.contains("tls_key"), "{e}");
        let e = check("elector", None, None, p("ca")).unwrap_err();
        assert!(e.contains("tls_client_ca"), "{e}");
        assert_eq!(ListenerTls::from_keys(p("c"), None, None), None);
        assert_eq!(
            ListenerTls::from_keys(p("c"), p("k"), p("ca")),
            Some(ListenerTls {
                cert: "c".into(),
                key: "k".into(),
                client_ca: Some("ca".into())
            })
        );
    }
}
