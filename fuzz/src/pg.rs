//! The Postgres frame codec (`wire::pg::frame`): typed frames and the
//! startup packet.
//!
//! Input of [`frames`]: byte 0 picks the frame size limit, byte 1 the size
//! of the chunks the stream arrives in, the rest is the stream. Input of
//! [`startup`]: a connection's first bytes as a client sends them, a
//! startup packet and then typed frames.

use bytes::{BufMut, BytesMut};
use fencepost_wire::pg::frame::{
    option_settings, shift_position, split_frame, split_startup, BackendMsg, ClientMsg, Frame,
    FrameError, StartupKind, MAX_STARTUP_LEN,
};

/// The frame limit the startup target uses for what follows the packet.
pub const STARTUP_FRAME_MAX: usize = 4096;

/// Fuzz target `pg_frame`.
pub fn frames(data: &[u8]) {
    let [m, c, stream @ ..] = data else {
        return;
    };
    // Small limits, so both sides of the bound are reached: 0..=4080.
    let max = usize::from(*m) * 16;
    let chunk = usize::from(*c % 64) + 1;
    split_stream(stream, max, chunk);
}

/// Fuzz target `pg_startup`.
pub fn startup(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let result = split_startup(&mut buf);
    let consumed = data.len() - buf.len();
    let announced = data
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    match result {
        Ok(None) => {
            assert_eq!(consumed, 0);
            if let Some(len) = announced {
                assert!(data.len() < len && (8..=MAX_STARTUP_LEN).contains(&len));
            }
        }
        Err(e) => {
            // A length error is found before the packet is cut off; a bad
            // body after (the connection ends either way).
            assert!(consumed == 0 || Some(consumed) == announced);
            if let FrameError::TooLong { len, max } = e {
                assert_eq!(max, MAX_STARTUP_LEN);
                assert!(len as usize > MAX_STARTUP_LEN);
            }
        }
        Ok(Some(p)) => {
            assert_eq!(p.raw.len(), consumed);
            assert_eq!(&p.raw[..], &data[..consumed]);
            assert_eq!(announced, Some(consumed));
            assert!((8..=MAX_STARTUP_LEN).contains(&consumed));
            match &p.kind {
                StartupKind::Startup { version, params } => {
                    // Nothing in the packet is ignored: it re-encodes to
                    // exactly the bytes it was cut from.
                    assert_eq!(encode_startup(*version, params), &p.raw[..]);
                    for (k, v) in params {
                        assert_eq!(p.param(k).map(|_| ()), Some(()));
                        assert!(!k.contains('\0') && !v.contains('\0'));
                    }
                    if let Some(options) = p.param("options") {
                        check_options(options);
                    }
                }
                StartupKind::Ssl | StartupKind::GssEnc => {
                    assert_eq!(consumed, 8);
                    assert_eq!(p.param("options"), None);
                }
                StartupKind::Cancel => assert!(consumed >= 16),
            }
            // The session goes on with typed frames.
            split_stream(&data[consumed..], STARTUP_FRAME_MAX, 7);
        }
    }
}

/// A startup packet from its parts, as a client encodes one.
pub fn encode_startup(version: u32, params: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u32(version);
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.put_u32(body.len() as u32 + 4);
    out.extend(body);
    out
}

/// Feeds `stream` in chunks of `chunk` bytes and cuts frames as they
/// complete, checking every frame and every wait. Returns how many bytes
/// were cut into frames.
pub fn split_stream(stream: &[u8], max: usize, chunk: usize) -> usize {
    let mut buf = BytesMut::new();
    let mut cut = 0;
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let announced = (before >= 5)
                .then(|| u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize);
            match split_frame(&mut buf, max) {
                Ok(Some(f)) => {
                    let raw = f.raw().clone();
                    // The frame is exactly what was consumed, in order.
                    assert_eq!(before - buf.len(), raw.len());
                    assert_eq!(&raw[..], &stream[cut..cut + raw.len()]);
                    assert_eq!(announced, Some(raw.len() - 1));
                    assert!(raw.len() >= 5 && raw.len() - 1 <= max);
                    cut += raw.len();
                    check_frame(&f);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "a wait consumes nothing");
                    if let Some(len) = announced {
                        assert!(before < len + 1 && (4..=max).contains(&len));
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.len(), before, "an error consumes nothing");
                    match (e, announced) {
                        (FrameError::TooShort { len }, Some(a)) => {
                            assert!(len < 4 && len as usize == a)
                        }
                        (FrameError::TooLong { len, max: m }, Some(a)) => {
                            assert!(m == max && len as usize == a && a > max)
                        }
                        (e, a) => panic!("unexpected {e:?} for announced length {a:?}"),
                    }
                    return cut;
                }
            }
        }
    }
    cut
}

/// Decodes one frame both ways and checks what the decoders say against
/// the bytes.
pub fn check_frame(f: &Frame) {
    let (tag, body) = (f.tag(), f.body());
    assert_eq!(Frame::new(tag, &body).raw(), f.raw(), "re-encodes exactly");
    let contains = |s: &[u8]| {
        let (start, end) = (s.as_ptr() as usize, s.as_ptr() as usize + s.len());
        let (bs, be) = (body.as_ptr() as usize, body.as_ptr() as usize + body.len());
        assert!(start >= bs && end <= be, "borrows from the body");
        assert!(!s.contains(&0));
    };
    match f.client() {
        Ok(ClientMsg::Query(q)) => {
            assert_eq!(tag, b'Q');
            contains(q);
            check_options(&String::from_utf8_lossy(q));
        }
        Ok(ClientMsg::Parse { name, query }) => {
            assert_eq!(tag, b'P');
            contains(name);
            contains(query);
        }
        Ok(ClientMsg::Bind { portal, statement }) => {
            assert_eq!(tag, b'B');
            contains(portal);
            contains(statement);
        }
        Ok(ClientMsg::Execute { portal, .. }) => {
            assert_eq!(tag, b'E');
            contains(portal);
            assert_eq!(body.len(), portal.len() + 5);
        }
        Ok(ClientMsg::Close { kind, name }) => {
            assert_eq!((tag, body[0]), (b'C', kind));
            contains(name);
        }
        Ok(ClientMsg::Sync) => assert_eq!(tag, b'S'),
        Ok(ClientMsg::Terminate) => assert_eq!(tag, b'X'),
        Ok(ClientMsg::FunctionCall) => assert_eq!(tag, b'F'),
        Ok(ClientMsg::Other) => assert!(!b"QPBECSXF".contains(&tag)),
        Err(e) => assert!(matches!(e, FrameError::Malformed { .. })),
    }
    match f.backend() {
        Ok(BackendMsg::ReadyForQuery(s)) => {
            assert_eq!(tag, b'Z');
            assert!(b"ITE".contains(&s) && body.len() == 1);
        }
        Ok(BackendMsg::ErrorResponse(fields)) => {
            assert_eq!(tag, b'E');
            for code in [b'S', b'V', b'C', b'M', b'D', b'P', 0] {
                if let Some(v) = fields.get(code) {
                    contains(v);
                }
            }
        }
        Ok(BackendMsg::CommandComplete(t)) => {
            assert_eq!(tag, b'C');
            contains(t);
        }
        Ok(BackendMsg::Other) => assert!(!b"ZEC".contains(&tag)),
        Err(e) => assert!(matches!(e, FrameError::Malformed { .. })),
    }
    if matches!(tag, b'E' | b'N') {
        check_shift(tag, &body);
    }
}

/// `shift_position` on an ErrorResponse or NoticeResponse body: when it
/// answers, the answer is a well-formed frame of the same type, with the
/// same fields, whose `P` is the old one moved back, never below 1.
fn check_shift(tag: u8, body: &[u8]) {
    let shift = body.len() as u32 % 97;
    let Some(out) = shift_position(tag, body, shift) else {
        return;
    };
    let mut buf = BytesMut::from(&out[..]);
    let f = match split_frame(&mut buf, usize::MAX) {
        Ok(Some(f)) => f,
        other => panic!("shift_position made no frame: {other:?}"),
    };
    assert!(buf.is_empty());
    assert_eq!(f.tag(), tag);
    let (moved, orig) = (Frame::new(b'E', &f.body()), Frame::new(b'E', body));
    let (Ok(BackendMsg::ErrorResponse(new)), Ok(BackendMsg::ErrorResponse(old))) =
        (moved.backend(), orig.backend())
    else {
        panic!("not error fields");
    };
    let number = |v: Option<&[u8]>| -> Option<u32> { std::str::from_utf8(v?).ok()?.parse().ok() };
    let (Some(was), Some(now)) = (number(old.get(b'P')), number(new.get(b'P'))) else {
        panic!("P lost in shift_position");
    };
    assert_eq!(now, was.saturating_sub(shift).max(1));
    for code in [b'S', b'V', b'C', b'M', b'D'] {
        assert_eq!(old.get(code), new.get(code), "field {code} changed");
    }
}

/// `option_settings` on any text: names come out folded as the server
/// folds them.
pub fn check_options(options: &str) {
    for (k, _) in option_settings(options) {
        assert!(!k.contains('-'), "{k:?}");
        assert!(!k.bytes().any(|b| b.is_ascii_uppercase()), "{k:?}");
    }
}
