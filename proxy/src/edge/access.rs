//! Who is calling the elector or the admin API, and what they may do.
//!
//! Two ways to be someone (see docs/security.md):
//! - a **client token**: a `[[elector.clients]]` (or `[[admin.clients]]`)
//!   entry names the client and stores the SHA-256 of its bearer token
//!   ([`TokenHash`]); the caller sends the token itself;
//! - a **client certificate**: the TLS layer verified it against
//!   `tls_client_ca` and put a [`PeerCertificate`] into the request; any of
//!   its names (subject CN, DNS and URI SANs) is the caller.
//!
//! A bearer token, when one is sent, decides: a token that is no client's
//! is refused (401) even over a verified certificate, so a wrong secret is
//! never silently ignored. What an identity may do is a separate table:
//! [`Grant`]s for the elector (resources by exact name or prefix, and the
//! holder names it may use), a [`Role`] for the admin API. All of it is
//! pure (no I/O), so the decisions are unit-tested here, certificate
//! identities included, before any TLS listener exists.

use std::fmt;
use std::str::FromStr;

use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::bearer;
use super::peer::PeerCertificate;

/// What `{identity}` in a grant's `holders` stands for: the caller's name.
pub const OWN_NAME: &str = "{identity}";
/// Longest identity name, in characters (a long SPIFFE URI fits).
pub const MAX_NAME_CHARS: usize = 256;

// ------------------------------------------------------------ token hash

/// The SHA-256 of a client's bearer token, written `sha256:<64 hex>`.
///
/// Why a plain SHA-256 and not a password hash (argon2, bcrypt, scrypt):
/// client tokens are 256-bit random strings (`fencepost keygen
/// client-token`), not passwords a person chose. A slow hash protects a
/// guessable secret whose hash leaked; against 2^256 candidates it adds
/// nothing, while it would cost every elector call milliseconds of CPU,
/// an easy way to make the elector too busy to renew leases. What the
/// hash does buy: a config file, its backups and the process's memory
/// hold no token that would be accepted. Tokens are compared by hash in
/// constant time ([`identify`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

const HASH_PREFIX: &str = "sha256:";

impl TokenHash {
    /// The hash of a presented (or freshly generated) token.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    fn matches(&self, other: &TokenHash) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HASH_PREFIX}{}", fencing::audit_chain::to_hex(&self.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for TokenHash {
    type Err = String;

    fn from_str(s: &str) -> Result<TokenHash, String> {
        let hex = s.strip_prefix(HASH_PREFIX).ok_or_else(|| {
            format!(
                "a token hash is \"sha256:\" and 64 hex digits (from `fencepost keygen client-token`), not {:?}",
                shorten(s)
            )
        })?;
        fencing::audit_chain::from_hex(&hex.to_ascii_lowercase())
            .map(TokenHash)
            .ok_or_else(|| {
                format!(
                    "{:?}: a token hash is \"sha256:\" and 64 hex digits",
                    shorten(s)
                )
            })
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A config value quoted in an error, cut short: it may be a pasted token.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 12 {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(8).collect::<String>())
    }
}

// ------------------------------------------------------------- identity

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A configured client that presented its own bearer token.
    Client(String),
    /// A client certificate the TLS layer verified.
    Certificate(PeerCertificate),
}

impl Identity {
    /// Whether `name`, as a grant or an admin client writes it, is this
    /// caller: a client by its exact name, a certificate by any of its
    /// names ([`PeerCertificate::is`]).
    pub fn is(&self, name: &str) -> bool {
        match self {
            Identity::Client(n) => n == name,
            Identity::Certificate(c) => c.is(name),
        }
    }

    /// The name logs and the audit show when no grant picked one: the
    /// client's, or the certificate's first (its subject CN if it has one).
    pub fn name(&self) -> &str {
        match self {
            Identity::Client(n) => n,
            Identity::Certificate(c) => c
                .names
                .first()
                .map_or("(certificate without names)", String::as_str),
        }
    }
}

/// What a request's credentials come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Known(Identity),
    /// A bearer token that is no configured client's.
    UnknownToken,
    /// Neither a bearer token nor a verified certificate.
    Anonymous,
}

/// Who `headers` and `peer` say the caller is, among the token clients
/// `clients` (name, hash). Every client's hash is compared, each in
/// constant time, so neither which client matched nor how much of a hash
/// did shows in the time taken (and what is compared is a hash of the
/// presented token, never the token itself).
pub fn identify<'a>(
    headers: &HeaderMap,
    peer: Option<&PeerCertificate>,
    clients: impl IntoIterator<Item = (&'a str, &'a TokenHash)>,
) -> Caller {
    if let Some(token) = bearer::presented(headers) {
        let got = TokenHash::of(token);
        let mut found = None;
        for (name, hash) in clients {
            let hit = got.matches(hash);
            if hit && found.is_none() {
                found = Some(name);
            }
        }
        return match found {
            Some(name) => Caller::Known(Identity::Client(name.to_owned())),
            None => Caller::UnknownToken,
        };
    }
    match peer {
        Some(cert) => Caller::Known(Identity::Certificate(cert.clone())),
        None => Caller::Anonymous,
    }
}

/// An identity name as a config writes it: not empty, no control
/// characters, not the `{identity}` placeholder, at most
/// [`MAX_NAME_CHARS`].
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("{what} is longer than {MAX_NAME_CHARS} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} {name:?} contains a control character"));
    }
    if name.contains(OWN_NAME) {
        return Err(format!(
            "{what} {name:?} contains {OWN_NAME}, which only holders may use"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- grants

/// One `[[elector.grants]]` entry: these identities may acquire, renew and
/// release these resources under these holder names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Client names and certificate names (CN, DNS or URI SAN).
    pub identities: Vec<String>,
    /// Resources by exact name; `"*"` is every resource.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Resources by name prefix (`"jobs/"` covers `jobs/a` and `jobs/b/c`).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Holder names the identities may use: exact names, `{identity}` for
    /// the caller's own name (inside a longer name too:
    /// `"{identity}-standby"`), and a trailing `*` for any ending
    /// (`"{identity}:*"`). Default: `["{identity}"]`, the caller's own
    /// name only.
    #[serde(default = "own_name_only")]
    pub holders: Vec<String>,
}

fn own_name_only() -> Vec<String> {
    vec![OWN_NAME.to_owned()]
}

impl Grant {
    /// Checks the entry at load (`at`: how errors name it).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.identities.is_empty() {
            return Err(format!(
                "{at}.identities is empty: name who the grant is for"
            ));
        }
        for id in &self.identities {
            check_name(&format!("{at}.identities entry"), id)?;
        }
        if self.resources.is_empty() && self.prefixes.is_empty() {
            return Err(format!(
                "{at} grants no resource: set resources (exact names, \"*\" for all) or prefixes"
            ));
        }
        for r in &self.resources {
            if r != "*" {
                fencing::resource::validate(r)
                    .map_err(|e| format!("{at}.resources entry {r:?}: {e}"))?;
            }
        }
        for p in &self.prefixes {
            // A prefix is a resource name's beginning: the same alphabet.
            fencing::resource::validate(p)
                .map_err(|e| format!("{at}.prefixes entry {p:?}: {e}"))?;
        }
        if self.holders.is_empty() {
            return Err(format!(
                "{at}.holders is empty: leave it out for the caller's own name ({OWN_NAME})"
            ));
        }
        for h in &self.holders {
            let body = h.strip_suffix('*').unwrap_or(h.as_str());
            if body.contains('*') {
                return Err(format!(
                    "{at}.holders entry {h:?}: '*' may only end a holder pattern"
                ));
            }
            if h.is_empty() || h.chars().any(char::is_control) {
                return Err(format!(
                    "{at}.holders entry {h:?} is empty or contains a control character"
                ));
            }
        }
        Ok(())
    }

    /// The name under which `who` is one of this grant's identities.
    fn names<'g>(&'g self, who: &Identity) -> Option<&'g str> {
        self.identities
            .iter()
            .find(|id| who.is(id))
            .map(String::as_str)
    }

    fn covers(&self, resource: &str) -> bool {
        self.resources.iter().any(|r| r == "*" || r == resource)
            || self
                .prefixes
                .iter()
                .any(|p| resource.starts_with(p.as_str()))
    }

    /// Whether `holder` is one of this grant's holders for the caller
    /// called `me`.
    fn allows_holder(&self, me: &str, holder: &str) -> bool {
        self.holders.iter().any(|pattern| {
            let pattern = pattern.replace(OWN_NAME, me);
            match pattern.strip_suffix('*') {
                Some(start) => holder.starts_with(start),
                None => holder == pattern,
            }
        })
    }
}

/// What a denied call was refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No grant of the identity covers the resource.
    Resource,
    /// Grants cover the resource, but none lets the identity use the
    /// holder name.
    Holder,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Resource => "resource",
            Refused::Holder => "holder",
        }
    }
}

/// A call outside the caller's grants: who (by the name a grant gave it,
/// or [`Identity::name`]) and what was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub identity: String,
    pub refused: Refused,
}

/// Whether `who` may act on `resource` as `holder` under `grants`; on
/// success, the name the allowing grant knows it by (what the audit
/// records). The resource and the holder must be allowed by the same
/// grant.
pub fn authorize(
    grants: &[Grant],
    who: &Identity,
    resource: &str,
    holder: &str,
) -> Result<String, Denial> {
    let mut first_name: Option<&str> = None;
    let mut covered = false;
    for grant in grants {
        let Some(me) = grant.names(who) else {
            continue;
        };
        if first_name.is_none() {
            first_name = Some(me);
        }
        if !grant.covers(resource) {
            continue;
        }
        covered = true;
        if grant.allows_holder(me, holder) {
            return Ok(me.to_owned());
        }
    }
    Err(Denial {
        identity: first_name.unwrap_or_else(|| who.name()).to_owned(),
        refused: if covered {
            Refused::Holder
        } else {
            Refused::Resource
        },
    })
}

// ------------------------------------------------------------ admin roles

/// What an admin API identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET and HEAD: metrics, fences, leases, audit, replicas, the
    /// console's data and event stream. For dashboards.
    Read,
    /// Every method.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

#[cfg(test)]
mod tests {
    use http::header::{HeaderValue, AUTHORIZATION};

    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    fn cert(names: &[&str]) -> PeerCertificate {
        PeerCertificate {
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn grant(ids: &[&str], resources: &[&str], prefixes: &[&str], holders: &[&str]) -> Grant {
        let v = |s: &[&str]| -> Vec<String> { s.iter().map(|x| x.to_string()).collect() };
        Grant {
            identities: v(ids),
            resources: v(resources),
            prefixes: v(prefixes),
            holders: if holders.is_empty() {
                own_name_only()
            } else {
                v(holders)
            },
        }
    }

    #[test]
    fn hashes_parse_print_and_refuse_what_is_not_one() {
        let h = TokenHash::of("s3cret");
        let text = h.to_string();
        // The SHA-256 of "s3cret", by another implementation (sha256sum).
        assert_eq!(
            text,
            "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
        );
        assert_eq!(text.parse::<TokenHash>(), Ok(h));
        assert_eq!(
            text.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<TokenHash>(),
            Ok(h)
        );
        for bad in [
            "",
            "s3cret",
            "sha256:",
            "sha256:abc",
            "md5:00",
            &text[..text.len() - 1],
        ] {
            let e = bad.parse::<TokenHash>().unwrap_err();
            assert!(e.contains("sha256:"), "{bad}: {e}");
        }
        // An error never quotes a long value whole: it may be a token.
        let e = "fp_aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .parse::<TokenHash>()
            .unwrap_err();
        assert!(!e.contains("aaaaaaaaaaaaaaaaaaaa"), "{e}");
    }

    #[test]
    fn a_token_names_its_client_and_a_wrong_one_is_refused_even_with_a_certificate() {
        let (a, b) = (TokenHash::of("token-a"), TokenHash::of("token-b"));
        let clients = [("sched-a", &a), ("sched-b", &b)];
        let c = cert(&["web-1"]);
        assert_eq!(
            identify(&bearer("token-b"), None, clients),
            Caller::Known(Identity::Client("sched-b".into()))
        );
        // The token decides over the certificate.
        assert_eq!(
            identify(&bearer("token-a"), Some(&c), clients),
            Caller::Known(Identity::Client("sched-a".into()))
        );
        assert_eq!(
            identify(&bearer("token-c"), Some(&c), clients),
            Caller::UnknownToken
        );
        assert_eq!(
            identify(&bearer("token-a "), None, clients),
            Caller::Known(Identity::Client("sched-a".into())),
            "blanks around a token are not part of it"
        );
        assert_eq!(
            identify(&bearer("token-"), None, clients),
            Caller::UnknownToken
        );
        // The hash is not a token.
        assert_eq!(
            identify(&bearer(&a.to_string()), None, clients),
            Caller::UnknownToken
        );
        assert_eq!(
            identify(&HeaderMap::new(), Some(&c), clients),
            Caller::Known(Identity::Certificate(c.clone()))
        );
        assert_eq!(
            identify(&HeaderMap::new(), None, clients),
            Caller::Anonymous
        );
    }

    #[test]
    fn a_client_gets_its_resources_under_its_own_name_only_by_default() {
        let grants = [grant(&["sched-a"], &["orders"], &["jobs/"], &[])];
        let a = Identity::Client("sched-a".into());
        assert_eq!(
            authorize(&grants, &a, "orders", "sched-a"),
            Ok("sched-a".into())
        );
        assert_eq!(
            authorize(&grants, &a, "jobs/x/1", "sched-a"),
            Ok("sched-a".into())
        );
        let refused = |r, h| authorize(&grants, &a, r, h).map_err(|d| d.refused);
        assert_eq!(refused("orders", "sched-b"), Err(Refused::Holder));
        assert_eq!(refused("orders2", "sched-a"), Err(Refused::Resource));
        assert_eq!(refused("jobs", "sched-a"), Err(Refused::Resource));
        // Another client is nobody here.
        let b = Identity::Client("sched-b".into());
        assert_eq!(
            authorize(&grants, &b, "orders", "sched-b"),
            Err(Denial {
                identity: "sched-b".into(),
                refused: Refused::Resource
            })
        );
    }

    #[test]
    fn holder_patterns() {
        let grants = [grant(
            &["a", "b"],
            &["*"],
            &[],
            &["{identity}:*", "shared", "{identity}-standby"],
        )];
        let a = Identity::Client("a".into());
        let ok = |h| authorize(&grants, &a, "any/thing", h).is_ok();
        assert!(ok("a:4242"));
        assert!(ok("a:"));
        assert!(ok("shared"));
        assert!(ok("a-standby"));
        assert!(!ok("a"));
        assert!(!ok("b:1"));
        assert!(!ok("b-standby"));
        assert!(!ok("shared2"));
        assert!(!ok("{identity}:1"), "the placeholder is not a literal");
    }

    #[test]
    fn resource_and_holder_must_come_from_the_same_grant() {
        let grants = [
            grant(&["a"], &["orders"], &[], &["a"]),
            grant(&["a"], &["billing"], &[], &["batch"]),
        ];
        let a = Identity::Client("a".into());
        assert!(authorize(&grants, &a, "orders", "a").is_ok());
        assert!(authorize(&grants, &a, "billing", "batch").is_ok());
        assert_eq!(
            authorize(&grants, &a, "orders", "batch").map_err(|d| d.refused),
            Err(Refused::Holder)
        );
    }

    /// The authorization a verified client certificate gets, as the TLS
    /// layer will hand it over (a `PeerCertificate` in the request).
    #[test]
    fn a_certificate_is_any_of_its_names_and_holds_under_the_one_granted() {
        let grants = [grant(
            &["spiffe://prod/ns/sched/sa/a", "sched-b.prod.internal"],
            &["orders"],
            &[],
            &[],
        )];
        let a = Identity::Certificate(cert(&["Scheduler A", "spiffe://prod/ns/sched/sa/a"]));
        assert_eq!(
            authorize(&grants, &a, "orders", "spiffe://prod/ns/sched/sa/a"),
            Ok("spiffe://prod/ns/sched/sa/a".into())
        );
        // Its other name is not the holder name the grant gives it.
        assert_eq!(
            authorize(&grants, &a, "orders", "Scheduler A"),
            Err(Denial {
                identity: "spiffe://prod/ns/sched/sa/a".into(),
                refused: Refused::Holder
            })
        );
        // DNS names compare without case, as DNS does.
        let b = Identity::Certificate(cert(&["SCHED-B.prod.internal"]));
        assert!(authorize(&grants, &b, "orders", "sched-b.prod.internal").is_ok());
        // A certificate no grant names: refused, shown by its first name.
        let c = Identity::Certificate(cert(&["intruder", "x.example"]));
        assert_eq!(
            authorize(&grants, &c, "orders", "intruder"),
            Err(Denial {
                identity: "intruder".into(),
                refused: Refused::Resource
            })
        );
    }

    #[test]
    fn grants_are_checked_at_load() {
        let ok = grant(&["a"], &["orders", "*"], &["jobs/"], &["{identity}:*"]);
        assert_eq!(ok.validate("g"), Ok(()));
        let cases = [
            (grant(&[], &["orders"], &[], &[]), "identities"),
            (grant(&[""], &["orders"], &[], &[]), "empty"),
            (grant(&["{identity}"], &["orders"], &[], &[]), "{identity}"),
            (grant(&["a"], &[], &[], &[]), "grants no resource"),
            (grant(&["a"], &["bad name"], &[], &[]), "resources entry"),
            (grant(&["a"], &[], &["ünï"], &[]), "prefixes entry"),
            (grant(&["a"], &["o"], &[], &["a*b"]), "may only end"),
            (grant(&["a"], &["o"], &[], &[""]), "holders entry"),
        ];
        for (g, needle) in cases {
            let e = g.validate("elector.grants[0]").unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
            assert!(e.starts_with("elector.grants[0]"), "{e}");
        }
        let mut empty_holders = ok.clone();
        empty_holders.holders.clear();
        assert!(empty_holders.validate("g").unwrap_err().contains("holders"));
    }
}
