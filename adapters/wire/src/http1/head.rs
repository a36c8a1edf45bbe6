//! Request and response heads: parsed once (`httparse`), checked against
//! RFC 9112's framing rules, with every header line kept as the bytes the
//! peer sent so a relay can pass them on unchanged.
//!
//! Nothing here allocates on the common path: the caller lends the header
//! array ([`header_slots`], left uninitialised: `httparse` writes only the
//! slots a head fills, so nobody pays for setting 100 empty headers per
//! parse, 3.2 KB of stores twice per proxied request), the head borrows the
//! read buffer, and classification is a fixed array of [`Kind`]s. A
//! repeated or non-text fencing header is a typed error, as
//! [`crate::http::header_text`] gives it.
//!
//! What is refused and why (each a test below):
//! - bare LF or CR line endings: `httparse` accepts LF alone, but a peer
//!   that does not would read the lines differently;
//! - obs-fold and whitespace before the colon (`httparse` refuses both);
//! - `Content-Length` that is not `1*DIGIT` (a `+`, spaces inside, a
//!   comma list, overflow) or appears twice, even with equal values;
//! - `Transfer-Encoding` other than exactly `chunked`, repeated, on
//!   HTTP/1.0, or together with `Content-Length` (RFC 9112 section 6.1);
//! - no `Host` on HTTP/1.1, or more than one (section 3.2);
//! - `CONNECT` and the authority form, `*` except with `OPTIONS`;
//! - a `Connection` header naming a header the proxy must forward or
//!   frame by (`Content-Length`, `Transfer-Encoding`, `Host`, the fencing
//!   headers): honouring it would drop the token, or the framing, on the
//!   way to the upstream;
//! - `Expect` other than `100-continue`;
//! - in responses: a 101 (the proxy never asks for an upgrade), an
//!   invalid or repeated `Content-Length`, `Transfer-Encoding` on
//!   HTTP/1.0; `Content-Length` with `Transfer-Encoding: chunked` is read
//!   as chunked, its `Content-Length` line dropped and the upstream
//!   connection not reused (section 6.3 rule 3).

use std::mem::MaybeUninit;
use std::ops::Range;

use fencing::InputError;

use super::body::Framing;

/// Header lines per head; more is refused (431). hyper's default too: the
/// header array stays on the stack.
pub const MAX_HEADERS: usize = 100;

/// The header array a parse borrows, on the caller's stack, uninitialised
/// (`httparse` writes a slot before the parsed head exposes it).
pub type HeaderSlots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// A [`HeaderSlots`] to lend [`parse_request`] or [`parse_response`].
pub fn header_slots<'b>() -> HeaderSlots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// What a header line is to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Forwarded as sent.
    EndToEnd,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`:
    /// about this connection, never forwarded (RFC 9110 section 7.6.1);
    /// `Proxy-Authorization` and `Proxy-Authenticate`: credentials and
    /// challenges between a client and a proxy, not the origin's.
    HopByHop,
    Expect,
    FencingToken,
    FencingResource,
}

impl Kind {
    /// The kind of a header named `name` (ASCII case ignored). Dispatched
    /// on the length first, so most names are compared with none or one
    /// candidate rather than the whole list (every header line of every
    /// request and answer comes through here).
    pub fn of(name: &str) -> Kind {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        match name.len() {
            2 if is("te") => Kind::HopByHop,
            4 if is("host") => Kind::Host,
            6 if is("expect") => Kind::Expect,
            7 if is("trailer") || is("upgrade") => Kind::HopByHop,
            10 if is("connection") => Kind::Connection,
            10 if is("keep-alive") => Kind::HopByHop,
            13 if is("fencing-token") => Kind::FencingToken,
            14 if is("content-length") => Kind::ContentLength,
            16 if is("fencing-resource") => Kind::FencingResource,
            16 if is("proxy-connection") => Kind::HopByHop,
            17 if is("transfer-encoding") => Kind::TransferEncoding,
            18 if is("proxy-authenticate") => Kind::HopByHop,
            19 if is("proxy-authorization") => Kind::HopByHop,
            _ => Kind::EndToEnd,
        }
    }

    /// Headers a `Connection` header may not name: the proxy forwards them
    /// (fencing), frames by them, or sets them itself.
    fn protected(self) -> bool {
        matches!(
            self,
            Kind::Host
                | Kind::ContentLength
                | Kind::TransferEncoding
                | Kind::FencingToken
                | Kind::FencingResource
        )
    }
}

/// The HTTP version of a message (`httparse` parses only 1.0 and 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Why a head is refused; [`HeadError::status`] is the answer to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Malformed(httparse::Error),
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("a line ends in a bare LF or contains a bare CR")]
    BareLineEnding,
    #[error("no Host header on an HTTP/1.1 request")]
    MissingHost,
    #[error("more than one Host header")]
    RepeatedHost,
    #[error("Content-Length is not a decimal number")]
    BadContentLength,
    #[error("Content-Length appears more than once")]
    RepeatedContentLength,
    #[error("Transfer-Encoding is not exactly `chunked`")]
    BadTransferEncoding,
    #[error("Transfer-Encoding on an HTTP/1.0 message")]
    TransferEncodingOnHttp10,
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    #[error("CONNECT is not proxied")]
    Connect,
    #[error("the request target is not an origin-form path")]
    BadTarget,
    #[error("Connection names a header the proxy must forward: {0}")]
    ConnectionNamesProtected(String),
    #[error("Expect other than 100-continue")]
    Expectation,
    #[error("the upstream switched protocols, which was not asked for")]
    UnexpectedUpgrade,
}

impl HeadError {
    /// The status a proxy answers a refused request with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooManyHeaders => 431,
            HeadError::Connect => 405,
            HeadError::Expectation => 417,
            HeadError::UnexpectedUpgrade => 502,
            _ => 400,
        }
    }
}

fn malformed(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        e => HeadError::Malformed(e),
    }
}

/// Every LF preceded by CR, every CR followed by LF. Only the line ends
/// are looked at (found with `memchr`), not every byte of the head.
fn crlf_only(head: &[u8]) -> bool {
    memchr::memchr2_iter(b'\r', b'\n', head).all(|i| match head[i] {
        b'\n' => i > 0 && head[i - 1] == b'\r',
        _ => head.get(i + 1) == Some(&b'\n'),
    })
}

/// Connection options, from every `Connection` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionOptions {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
}

/// The comma-separated elements of a list header, trimmed, empties skipped.
fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

/// The first header a `Connection` value names that the proxy must
/// forward or frame by (`Fencing-Token`, `Content-Length`, ...), if any:
/// such a request is refused, for honouring it would drop the token or
/// the framing on the way to the upstream.
pub fn connection_names_protected(value: &[u8]) -> Option<&str> {
    elements(value).find_map(protected_option)
}

fn protected_option(opt: &[u8]) -> Option<&str> {
    std::str::from_utf8(opt)
        .ok()
        .filter(|name| Kind::of(name).protected())
}

/// `1*DIGIT`, as u64; no sign, no spaces inside, no overflow.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// What the framing and connection headers of a head say, checked.
#[derive(Debug, Clone, Copy)]
struct Facts {
    framing: Framing,
    length_and_chunked: bool,
    options: ConnectionOptions,
    /// Some `Connection` option may name an end-to-end header line (any
    /// but `keep-alive` and `upgrade`, which name hop-by-hop ones).
    names_lines: bool,
    hosts: usize,
}

fn facts(
    headers: &[httparse::Header<'_>],
    kinds: &[Kind],
    version: Version,
    request: bool,
) -> Result<Facts, HeadError> {
    let mut length = None;
    let mut chunked = None;
    let mut options = ConnectionOptions::default();
    let mut names_lines = false;
    let mut hosts = 0;
    for (h, kind) in headers.iter().zip(kinds) {
        match kind {
            Kind::Host => hosts += 1,
            Kind::ContentLength => {
                if length.is_some() {
                    return Err(HeadError::RepeatedContentLength);
                }
                length = Some(parse_content_length(h.value).ok_or(HeadError::BadContentLength)?);
            }
            Kind::TransferEncoding => {
                if version == Version::Http10 {
                    return Err(HeadError::TransferEncodingOnHttp10);
                }
                if chunked.is_some() {
                    return Err(HeadError::BadTransferEncoding);
                }
                let mut codings = elements(h.value);
                let only_chunked = codings
                    .next()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                    && codings.next().is_none();
                // A request's body must be chunked to be framed at all; a
                // response with another coding runs to the close.
                if !only_chunked && request {
                    return Err(HeadError::BadTransferEncoding);
                }
                chunked = Some(only_chunked);
            }
            Kind::Connection => {
                for opt in elements(h.value) {
                    if opt.eq_ignore_ascii_case(b"close") {
                        options.close = true;
                        names_lines = true;
                    } else if opt.eq_ignore_ascii_case(b"keep-alive") {
                        options.keep_alive = true;
                    } else if opt.eq_ignore_ascii_case(b"upgrade") {
                        options.upgrade = true;
                    } else if let Some(name) = protected_option(opt) {
                        return Err(HeadError::ConnectionNamesProtected(name.to_owned()));
                    } else {
                        names_lines = true;
                    }
                }
            }
            _ => {}
        }
    }
    let (framing, length_and_chunked) = match (chunked, length) {
        (Some(true), None) => (Framing::Chunked, false),
        (Some(_), Some(_)) if request => return Err(HeadError::LengthAndChunked),
        (Some(true), Some(_)) => (Framing::Chunked, true),
        (Some(false), _) => (Framing::UntilClose, false),
        (None, Some(n)) => (Framing::Length(n), false),
        (None, None) if request => (Framing::Length(0), false),
        (None, None) => (Framing::UntilClose, false),
    };
    Ok(Facts {
        framing,
        length_and_chunked,
        options,
        names_lines,
        hosts,
    })
}

fn version_of(v: Option<u8>) -> Version {
    if v == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    }
}

fn classify(headers: &[httparse::Header<'_>]) -> [Kind; MAX_HEADERS] {
    let mut kinds = [Kind::EndToEnd; MAX_HEADERS];
    for (k, h) in kinds.iter_mut().zip(headers) {
        *k = Kind::of(h.name);
    }
    kinds
}

/// The byte range of each header line (name to CRLF, inclusive) in `buf`.
fn line_spans<'a>(
    buf: &'a [u8],
    headers: &'a [httparse::Header<'a>],
    head_len: usize,
) -> impl Iterator<Item = Range<usize>> + 'a {
    let base = buf.as_ptr() as usize;
    let start = move |h: &httparse::Header<'_>| h.name.as_ptr() as usize - base;
    // The last line ends where the blank line that closes the head starts.
    let end_of_last = head_len.saturating_sub(2);
    (0..headers.len()).map(move |i| {
        let from = start(&headers[i]);
        let to = headers.get(i + 1).map_or(end_of_last, start);
        from..to
    })
}

/// Whether `name` is listed by any `Connection` line (so it is hop-by-hop).
fn named_by_connection(
    headers: &[httparse::Header<'_>],
    kinds: &[Kind],
    listed: bool,
    name: &str,
) -> bool {
    listed
        && headers.iter().zip(kinds).any(|(h, k)| {
            *k == Kind::Connection
                && elements(h.value).any(|opt| opt.eq_ignore_ascii_case(name.as_bytes()))
        })
}

/// A fencing header's value as [`crate::http::header_text`] would give it.
fn fencing_text<'b>(
    headers: &[httparse::Header<'b>],
    kinds: &[Kind],
    want: Kind,
) -> Option<Result<&'b str, InputError>> {
    let mut values = headers
        .iter()
        .zip(kinds)
        .filter(|(_, k)| **k == want)
        .map(|(h, _)| h.value);
    let first = values.next()?;
    if values.next().is_some() {
        return Some(Err(InputError::Repeated));
    }
    // `http::HeaderValue::to_str` accepts visible ASCII, space and tab.
    let text = first
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
    Some(match std::str::from_utf8(first) {
        Ok(s) if text => Ok(s),
        _ => Err(InputError::NotText),
    })
}

/// A request head, checked; everything borrows the read buffer.
#[derive(Debug)]
pub struct RequestHead<'b, 'h> {
    buf: &'b [u8],
    pub method: &'b str,
    /// As sent: origin form (`/p?q`), absolute form or `*`.
    pub target: &'b str,
    pub version: Version,
    /// Bytes of the head, blank line included; the body starts here.
    pub len: usize,
    headers: &'h [httparse::Header<'b>],
    kinds: [Kind; MAX_HEADERS],
    /// How the body is framed; no framing header means no body.
    pub framing: Framing,
    pub options: ConnectionOptions,
    /// See `Facts::names_lines`: without it no line is looked up in the
    /// `Connection` lines (the common `keep-alive`, or none).
    names_lines: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete,
/// read more (the caller bounds how much).
pub fn parse_request<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut HeaderSlots<'b>,
) -> Result<Option<RequestHead<'b, 'h>>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req
        .parse_with_uninit_headers(buf, headers)
        .map_err(malformed)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            // A bare LF can already be seen in what has arrived.
            return if crlf_only(trim_partial_cr(buf)) {
                Ok(None)
            } else {
                Err(HeadError::BareLineEnding)
            };
        }
    };
    if !crlf_only(&buf[..len]) {
        return Err(HeadError::BareLineEnding);
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HeadError::Malformed(httparse::Error::Token));
    };
    let version = version_of(req.version);
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let kinds = classify(headers);
    let kinds_used = &kinds[..headers.len()];
    if method == "CONNECT" {
        return Err(HeadError::Connect);
    }
    let origin = target.starts_with('/');
    // Compared as bytes: httparse lets non-ASCII bytes through in the
    // target, and a `str` cut at byte 7 inside a multi-byte character
    // panics (a fuzzer found `GET /hz/m?\u{44c7}...`, a client could send it).
    let t = target.as_bytes();
    let absolute = t.len() > 7
        && (t[..7].eq_ignore_ascii_case(b"http://")
            || t.get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"https://")));
    let asterisk = target == "*" && method == "OPTIONS";
    if !(origin || absolute || asterisk) {
        return Err(HeadError::BadTarget);
    }
    let facts = facts(headers, kinds_used, version, true)?;
    match facts.hosts {
        0 if version == Version::Http11 => return Err(HeadError::MissingHost),
        0 | 1 => {}
        _ => return Err(HeadError::RepeatedHost),
    }
    let mut expect_continue = false;
    for (h, k) in headers.iter().zip(kinds_used) {
        if *k == Kind::Expect {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") || expect_continue {
                return Err(HeadError::Expectation);
            }
            expect_continue = true;
        }
    }
    Ok(Some(RequestHead {
        buf,
        method,
        target,
        version,
        len,
        headers,
        kinds,
        framing: facts.framing,
        options: facts.options,
        names_lines: facts.names_lines,
        expect_continue,
    }))
}

/// A partial head may end in the CR of a CRLF still on its way.
fn trim_partial_cr(buf: &[u8]) -> &[u8] {
    buf.strip_suffix(b"\r").unwrap_or(buf)
}

impl<'b> RequestHead<'b, '_> {
    /// The buffer the head was parsed from (the head, then what followed
    /// it): the ranges of [`RequestHead::forwarded_lines`] index it.
    pub fn buf(&self) -> &'b [u8] {
        self.buf
    }

    /// The header lines as parsed, with their kinds.
    pub fn headers(&self) -> impl Iterator<Item = (&httparse::Header<'b>, Kind)> + '_ {
        self.headers.iter().zip(self.kinds.iter().copied())
    }

    /// The target in origin form: as sent for an origin form, from the
    /// path on for an absolute form (`/` when it has none), `*` for `*`.
    pub fn path_and_query(&self) -> &'b str {
        let t = self.target;
        if t.starts_with('/') || t == "*" {
            return t;
        }
        let rest = t.split_once("://").map_or("", |(_, r)| r);
        match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => &rest[i..],
            _ => "/",
        }
    }

    /// The path of the target, without the query.
    pub fn path(&self) -> &'b str {
        let pq = self.path_and_query();
        pq.split_once('?').map_or(pq, |(p, _)| p)
    }

    /// Whether the connection may carry another request after this one.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.options.close,
            Version::Http10 => self.options.keep_alive && !self.options.close,
        }
    }

    /// The `Fencing-Token` header, as the fencer should see it.
    pub fn token(&self) -> Option<Result<&'b str, InputError>> {
        fencing_text(
            self.headers,
            &self.kinds[..self.headers.len()],
            Kind::FencingToken,
        )
    }

    /// The `Fencing-Resource` header, as the fencer should see it.
    pub fn resource(&self) -> Option<Result<&'b str, InputError>> {
        fencing_text(
            self.headers,
            &self.kinds[..self.headers.len()],
            Kind::FencingResource,
        )
    }

    /// The byte ranges (in the read buffer) of the header lines to pass on
    /// as sent, CRLF included: everything but `Host` (the proxy writes its
    /// own), the hop-by-hop lines and the lines `Connection` names.
    pub fn forwarded_lines(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let kinds = &self.kinds[..self.headers.len()];
        let listed = self.names_lines;
        line_spans(self.buf, self.headers, self.len)
            .zip(self.headers.iter().zip(kinds))
            .filter(move |(_, (h, k))| match k {
                Kind::Host | Kind::Connection | Kind::HopByHop | Kind::Expect => false,
                _ => !named_by_connection(self.headers, kinds, listed, h.name),
            })
            .map(|(span, _)| span)
    }
}

/// What a response head means for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// 1xx other than 101: another head follows.
    Interim,
    /// The final answer; its body is framed by [`ResponseHead::framing`].
    Final,
}

/// A response head, checked; everything borrows the read buffer.
#[derive(Debug)]
pub struct ResponseHead<'b, 'h> {
    buf: &'b [u8],
    pub status: u16,
    pub version: Version,
    pub len: usize,
    headers: &'h [httparse::Header<'b>],
    kinds: [Kind; MAX_HEADERS],
    pub kind: ResponseKind,
    pub framing: Framing,
    /// `Content-Length` came with `Transfer-Encoding: chunked`: the
    /// length line is not forwarded and the connection is not reused.
    pub length_dropped: bool,
    pub options: ConnectionOptions,
    /// See `Facts::names_lines`.
    names_lines: bool,
}

/// Parses a response head to a request whose method was `method`.
pub fn parse_response<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut HeaderSlots<'b>,
    method: &str,
) -> Result<Option<ResponseHead<'b, 'h>>, HeadError> {
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, headers)
        .map_err(malformed)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            return if crlf_only(trim_partial_cr(buf)) {
                Ok(None)
            } else {
                Err(HeadError::BareLineEnding)
            };
        }
    };
    if !crlf_only(&buf[..len]) {
        return Err(HeadError::BareLineEnding);
    }
    let status = resp
        .code
        .ok_or(HeadError::Malformed(httparse::Error::Status))?;
    let version = version_of(resp.version);
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let kinds = classify(headers);
    if status == 101 {
        return Err(HeadError::UnexpectedUpgrade);
    }
    let facts = facts(headers, &kinds[..headers.len()], version, false)?;
    let no_body =
        (100..200).contains(&status) || status == 204 || status == 304 || method == "HEAD";
    let kind = if (100..200).contains(&status) {
        ResponseKind::Interim
    } else {
        ResponseKind::Final
    };
    Ok(Some(ResponseHead {
        buf,
        status,
        version,
        len,
        headers,
        kinds,
        kind,
        framing: if no_body {
            Framing::Length(0)
        } else {
            facts.framing
        },
        length_dropped: facts.length_and_chunked,
        options: facts.options,
        names_lines: facts.names_lines,
    }))
}

impl<'b> ResponseHead<'b, '_> {
    /// The header lines as parsed, with their kinds.
    pub fn headers(&self) -> impl Iterator<Item = (&httparse::Header<'b>, Kind)> + '_ {
        self.headers.iter().zip(self.kinds.iter().copied())
    }

    /// Whether the upstream connection can carry another request after
    /// this answer's body.
    pub fn reusable(&self) -> bool {
        let persistent = match self.version {
            Version::Http11 => !self.options.close,
            Version::Http10 => self.options.keep_alive && !self.options.close,
        };
        persistent && self.framing != Framing::UntilClose && !self.length_dropped
    }

    /// The byte ranges of the header lines to pass on as sent: everything
    /// but the hop-by-hop lines, the lines `Connection` names, and a
    /// `Content-Length` overridden by chunked framing.
    pub fn forwarded_lines(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let kinds = &self.kinds[..self.headers.len()];
        let listed = self.names_lines;
        let dropped = self.length_dropped;
        line_spans(self.buf, self.headers, self.len)
            .zip(self.headers.iter().zip(kinds))
            .filter(move |(_, (h, k))| match k {
                Kind::Connection | Kind::HopByHop => false,
                Kind::ContentLength if dropped => false,
                _ => !named_by_connection(self.headers, kinds, listed, h.name),
            })
            .map(|(span, _)| span)
    }
}

#[cfg(test)]
mod tests;
