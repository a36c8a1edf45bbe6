//! The head parser against the framing hazards of RFC 9112 and the
//! research notes' list (section 1.4): every refusal, the original lines
//! kept, and the lines a relay must not pass on.

use super::*;
use proptest::prelude::*;

fn request(raw: &[u8]) -> Result<Option<(Framing, Vec<String>)>, HeadError> {
    let mut headers = header_slots();
    let Some(head) = parse_request(raw, &mut headers)? else {
        return Ok(None);
    };
    let lines = head
        .forwarded_lines()
        .map(|r| String::from_utf8_lossy(&raw[r]).into_owned())
        .collect();
    Ok(Some((head.framing, lines)))
}

fn refused(raw: &[u8]) -> HeadError {
    match request(raw) {
        Err(e) => e,
        Ok(r) => panic!("{:?} accepted: {r:?}", String::from_utf8_lossy(raw)),
    }
}

#[test]
fn a_plain_request_keeps_its_lines() {
    let raw = b"PUT /kv/a?x=1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 7\r\nContent-Length: 5\r\nX-A:  b \r\n\r\nhello";
    let mut headers = header_slots();
    let head = parse_request(raw, &mut headers).unwrap().unwrap();
    assert_eq!(head.method, "PUT");
    assert_eq!(head.path(), "/kv/a");
    assert_eq!(head.path_and_query(), "/kv/a?x=1");
    assert_eq!(head.len, raw.len() - 5);
    assert_eq!(head.framing, Framing::Length(5));
    assert!(head.keep_alive());
    assert_eq!(head.token(), Some(Ok("7")));
    assert!(head.resource().is_none());
    let lines: Vec<&[u8]> = head.forwarded_lines().map(|r| &raw[r]).collect();
    assert_eq!(
        lines,
        [
            &b"Fencing-Token: 7\r\n"[..],
            b"Content-Length: 5\r\n",
            b"X-A:  b \r\n"
        ]
    );
}

#[test]
fn incomplete_heads_wait_for_more() {
    for cut in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n"[..],
        b"GET / HTTP/1.1\r",
        b"GE",
        b"",
    ] {
        assert_eq!(request(cut), Ok(None), "{:?}", String::from_utf8_lossy(cut));
    }
}

#[test]
fn bare_line_endings_are_refused() {
    for raw in [
        &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n",
        b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        assert_eq!(
            request(raw),
            Err(HeadError::BareLineEnding),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // httparse itself refuses a bare CR inside a line.
    assert!(request(b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n").is_err());
}

#[test]
fn obs_fold_and_space_before_colon_are_refused() {
    assert!(matches!(
        refused(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
        HeadError::Malformed(_)
    ));
    assert!(matches!(
        refused(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
        HeadError::Malformed(_)
    ));
}

#[test]
fn content_length_is_digits_once() {
    for bad in [
        "+5",
        "-1",
        "5 5",
        "0x5",
        "",
        "5,5",
        "99999999999999999999",
        "1_0",
    ] {
        let raw = format!("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: {bad}\r\n\r\n");
        assert_eq!(
            refused(raw.as_bytes()),
            HeadError::BadContentLength,
            "{bad}"
        );
    }
    assert_eq!(
        refused(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
        HeadError::RepeatedContentLength
    );
    assert_eq!(
        refused(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n"),
        HeadError::RepeatedContentLength
    );
    assert_eq!(parse_content_length(b" 00042 "), Some(42));
    assert_eq!(parse_content_length(b"18446744073709551615"), None);
}

#[test]
fn transfer_encoding_is_exactly_chunked() {
    let ok = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ChUnKeD\r\n\r\n";
    assert_eq!(request(ok).unwrap().unwrap().0, Framing::Chunked);
    for bad in [
        "gzip",
        "gzip, chunked",
        "chunked, chunked",
        "chunked;q=1",
        "identity",
        "",
    ] {
        let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {bad}\r\n\r\n");
        assert_eq!(
            refused(raw.as_bytes()),
            HeadError::BadTransferEncoding,
            "{bad}"
        );
    }
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
        HeadError::BadTransferEncoding
    );
    assert_eq!(
        refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        HeadError::TransferEncodingOnHttp10
    );
    // CL and TE together, either order: refused, never one of them guessed.
    for raw in [
        &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    ] {
        assert_eq!(refused(raw), HeadError::LengthAndChunked);
    }
}

#[test]
fn host_exactly_once_on_http11() {
    assert_eq!(refused(b"GET / HTTP/1.1\r\n\r\n"), HeadError::MissingHost);
    assert_eq!(
        refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        HeadError::RepeatedHost
    );
    assert_eq!(
        refused(b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n"),
        HeadError::RepeatedHost
    );
    assert!(request(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
}

#[test]
fn connect_and_odd_targets_are_refused() {
    let e = refused(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
    assert_eq!((e.clone(), e.status()), (HeadError::Connect, 405));
    assert_eq!(
        refused(b"GET a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
        HeadError::BadTarget
    );
    assert_eq!(
        refused(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
        HeadError::BadTarget
    );
    assert!(request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap()
        .is_some());
    let raw = b"GET http://a/kv/1?q HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut headers = header_slots();
    let head = parse_request(raw, &mut headers).unwrap().unwrap();
    assert_eq!((head.path(), head.path_and_query()), ("/kv/1", "/kv/1?q"));
    let raw = b"GET http://a HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut headers = header_slots();
    let head = parse_request(raw, &mut headers).unwrap().unwrap();
    assert_eq!(head.path(), "/");
}

/// Found by AFL (`fuzz/regressions/http1/non-ascii-target-*`): the check
/// for an absolute form cut the target as a `str` at byte 7, which
/// panicked when a multi-byte character straddled it, for any target,
/// origin form too. httparse passes such bytes through; the head must be
/// decided, not panic.
#[test]
fn non_ascii_targets_are_decided_not_panicked_on() {
    // `é` is bytes 6..8: byte 7 is inside it.
    let raw = "GET /abcdeé HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes();
    assert!(request(raw).unwrap().is_some());
    let raw = "GET abcdef\u{44c7} HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes();
    assert_eq!(refused(raw), HeadError::BadTarget);
    // And at byte 8, where `https://` is looked for.
    let raw = "GET https:/\u{44c7} HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes();
    assert_eq!(refused(raw), HeadError::BadTarget);
}

/// The issue's finding: `Connection: Fencing-Token` made the proxy drop
/// the token on its way upstream. Naming a header the proxy must forward
/// or frame by is refused.
#[test]
fn connection_may_not_name_fencing_or_framing_headers() {
    for name in [
        "Fencing-Token",
        "fencing-resource",
        "Content-Length",
        "Transfer-Encoding",
        "host",
    ] {
        let raw = format!("PUT / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, {name}\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            refused(raw.as_bytes()),
            HeadError::ConnectionNamesProtected(name.to_owned())
        );
    }
}

#[test]
fn hop_by_hop_and_connection_named_lines_stay_behind() {
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Connection: x\r\nTrailer: x\r\nX-Secret: 1\r\nProxy-Authorization: Basic eDp5\r\nX-Kept: 2\r\nExpect: 100-continue\r\n\r\n";
    let (framing, lines) = request(raw).unwrap().unwrap();
    assert_eq!(framing, Framing::Length(0));
    assert_eq!(lines, ["X-Kept: 2\r\n"]);
    let mut headers = header_slots();
    let head = parse_request(raw, &mut headers).unwrap().unwrap();
    assert!(head.expect_continue && !head.keep_alive());
    assert!(!head.options.upgrade);
    assert_eq!(
        refused(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: tea\r\n\r\n").status(),
        417
    );
}

#[test]
fn http10_closes_unless_asked() {
    let mut headers = header_slots();
    let raw = b"GET / HTTP/1.0\r\n\r\n";
    assert!(!parse_request(raw, &mut headers)
        .unwrap()
        .unwrap()
        .keep_alive());
    let mut headers = header_slots();
    let raw = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
    assert!(parse_request(raw, &mut headers)
        .unwrap()
        .unwrap()
        .keep_alive());
}

#[test]
fn too_many_headers_is_431() {
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    assert_eq!(refused(&raw).status(), 431);
}

#[test]
fn repeated_and_binary_fencing_headers_never_validate() {
    let raw = b"PUT / HTTP/1.1\r\nHost: a\r\nFencing-Token: 5\r\nfencing-token: 5\r\nFencing-Resource: ord\xffers\r\n\r\n";
    let mut headers = header_slots();
    let head = parse_request(raw, &mut headers).unwrap().unwrap();
    assert_eq!(head.token(), Some(Err(InputError::Repeated)));
    assert_eq!(head.resource(), Some(Err(InputError::NotText)));
}

fn response(
    raw: &[u8],
    method: &str,
) -> Result<(u16, ResponseKind, Framing, bool, Vec<String>), HeadError> {
    let mut headers = header_slots();
    let head = parse_response(raw, &mut headers, method)?.expect("complete");
    let lines = head
        .forwarded_lines()
        .map(|r| String::from_utf8_lossy(&raw[r]).into_owned())
        .collect();
    Ok((head.status, head.kind, head.framing, head.reusable(), lines))
}

#[test]
fn response_framing() {
    let r = response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET").unwrap();
    assert_eq!((r.2, r.3), (Framing::Length(2), true));
    // No length: to the close, and the connection is not reused.
    let r = response(b"HTTP/1.1 200 OK\r\n\r\nok", "GET").unwrap();
    assert_eq!((r.2, r.3), (Framing::UntilClose, false));
    // 1xx, 204, 304 and HEAD answers have no body, whatever they say.
    for (raw, method) in [
        (
            &b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"[..],
            "PUT",
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            "GET",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HEAD",
        ),
        (b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n", "GET"),
    ] {
        let r = response(raw, method).unwrap();
        assert_eq!(
            r.2,
            Framing::Length(0),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let r = response(b"HTTP/1.1 100 Continue\r\n\r\n", "PUT").unwrap();
    assert_eq!(r.1, ResponseKind::Interim);
    // A coding other than chunked last: runs to the close.
    let r = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "GET").unwrap();
    assert_eq!((r.2, r.3), (Framing::UntilClose, false));
    let r = response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", "GET").unwrap();
    assert!(!r.3);
    let r = response(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
        "GET",
    )
    .unwrap();
    assert!(r.3);
}

/// The issue's finding: an answer with both Content-Length and chunked was
/// relayed with the length and a truncated body. Chunked wins (its bytes
/// are relayed as they came, with their `Transfer-Encoding` line), the
/// length line stays behind, the connection is not reused.
#[test]
fn response_length_with_chunked_is_read_as_chunked() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n";
    let (_, _, framing, reusable, lines) = response(raw, "GET").unwrap();
    assert_eq!((framing, reusable), (Framing::Chunked, false));
    assert_eq!(lines, ["Transfer-Encoding: chunked\r\n", "X: y\r\n"]);
}

#[test]
fn bad_responses_are_refused() {
    for (raw, want) in [
        (
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"[..],
            HeadError::UnexpectedUpgrade,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            HeadError::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            HeadError::RepeatedContentLength,
        ),
        (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::TransferEncodingOnHttp10,
        ),
        (
            b"HTTP/1.1 200 OK\nContent-Length: 3\r\n\r\n",
            HeadError::BareLineEnding,
        ),
    ] {
        assert_eq!(
            response(raw, "GET").map(|_| ()),
            Err(want.clone()),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(HeadError::UnexpectedUpgrade.status(), 502);
}

proptest! {
    /// Any bytes: no panic; a complete head's forwarded lines are inside
    /// it, in order, disjoint, each ending in CRLF, and never a Host,
    /// hop-by-hop or Connection line.
    #[test]
    fn forwarded_lines_are_whole_lines_of_the_head(raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut headers = header_slots();
        if let Ok(Some(head)) = parse_request(&raw, &mut headers) {
            check_lines(&raw, head.len, head.forwarded_lines(), true)?;
        }
        let mut headers = header_slots();
        if let Ok(Some(head)) = parse_response(&raw, &mut headers, "GET") {
            check_lines(&raw, head.len, head.forwarded_lines(), false)?;
        }
    }

    /// Generated requests with arbitrary headers: the forwarded lines are
    /// exactly the end-to-end ones, byte for byte.
    #[test]
    fn generated_requests_forward_their_end_to_end_lines(
        names in prop::collection::vec("(X-[a-z]{1,6}|Keep-Alive|TE|Upgrade|Fencing-Token|Host)", 0..8),
        values in prop::collection::vec("[ -~]{0,10}", 8),
    ) {
        let mut raw = b"GET /p HTTP/1.1\r\nHost: h\r\n".to_vec();
        let mut want = Vec::new();
        for (n, v) in names.iter().zip(&values) {
            let line = format!("{n}: {}\r\n", v.trim());
            raw.extend_from_slice(line.as_bytes());
            if n.starts_with("X-") || n == "Fencing-Token" {
                want.push(line);
            }
        }
        raw.extend_from_slice(b"\r\n");
        let mut headers = header_slots();
        match parse_request(&raw, &mut headers) {
            Ok(Some(head)) => {
                let got: Vec<String> = head.forwarded_lines().map(|r| String::from_utf8_lossy(&raw[r]).into_owned()).collect();
                prop_assert_eq!(got, want);
            }
            Err(HeadError::RepeatedHost) => prop_assert!(names.iter().any(|n| n == "Host")),
            other => prop_assert!(false, "{:?}", other.map(|h| h.map(|h| h.len))),
        }
    }
}

fn check_lines(
    raw: &[u8],
    len: usize,
    lines: impl Iterator<Item = Range<usize>>,
    request: bool,
) -> Result<(), TestCaseError> {
    let mut last = 0;
    for r in lines {
        prop_assert!(r.start >= last && r.end <= len && r.start < r.end);
        prop_assert!(raw[r.clone()].ends_with(b"\r\n"));
        let line = &raw[r.clone()];
        let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
        let kind = Kind::of(std::str::from_utf8(&line[..name_end]).unwrap_or(""));
        prop_assert!(!matches!(kind, Kind::HopByHop | Kind::Connection));
        prop_assert!(!request || kind != Kind::Host);
        last = r.end;
    }
    Ok(())
}

/// `Kind::of` knows each special header by name in any ASCII case, and
/// nothing else: names one letter off or of another length are end to end.
#[test]
fn kind_of_knows_each_special_name_and_nothing_else() {
    let table = [
        ("host", Kind::Host),
        ("content-length", Kind::ContentLength),
        ("transfer-encoding", Kind::TransferEncoding),
        ("connection", Kind::Connection),
        ("fencing-token", Kind::FencingToken),
        ("fencing-resource", Kind::FencingResource),
        ("expect", Kind::Expect),
        ("keep-alive", Kind::HopByHop),
        ("proxy-connection", Kind::HopByHop),
        ("te", Kind::HopByHop),
        ("trailer", Kind::HopByHop),
        ("upgrade", Kind::HopByHop),
        ("proxy-authorization", Kind::HopByHop),
        ("proxy-authenticate", Kind::HopByHop),
    ];
    for (name, kind) in table {
        assert_eq!(Kind::of(name), kind, "{name}");
        assert_eq!(Kind::of(&name.to_ascii_uppercase()), kind, "{name}");
        let mut mixed: Vec<u8> = name.bytes().collect();
        mixed[0] = mixed[0].to_ascii_uppercase();
        assert_eq!(Kind::of(std::str::from_utf8(&mixed).unwrap()), kind);
        // One letter off, one longer, one shorter: not special.
        let mut off = name.as_bytes().to_vec();
        let last = off.len() - 1;
        off[last] = if off[last] == b'x' { b'y' } else { b'x' };
        assert_eq!(Kind::of(std::str::from_utf8(&off).unwrap()), Kind::EndToEnd);
        assert_eq!(Kind::of(&format!("{name}s")), Kind::EndToEnd, "{name}s");
        assert_eq!(Kind::of(&name[1..]), Kind::EndToEnd, "{name}");
    }
    for name in ["", "x", "content-type", "server", "date", "x-forwarded-for"] {
        assert_eq!(Kind::of(name), Kind::EndToEnd, "{name}");
    }
}
