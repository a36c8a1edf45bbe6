//! The Postgres wire protocol (v3) as frames over raw bytes, with no I/O.
//!
//! The proxy relays almost every byte unchanged, so a frame keeps the exact
//! bytes it was cut from ([`Frame::raw`]) and only the few messages a
//! fencing decision needs are decoded, borrowing from those bytes. Splitting
//! a buffer never copies a body: `BytesMut::split_to` + `freeze` hands out
//! the same allocation.
//!
//! Every length is checked before anything is allocated or sliced: a length
//! below 4 (it counts itself) or above the configured maximum is a typed
//! error, so a hostile peer costs its own connection and never the
//! process's memory.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Postgres refuses startup packets above this (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// The default ceiling for one regular message: Postgres's own limit for
/// most messages is 1 GiB, but a proxy that buffers whole frames should not
/// let one connection take that much.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024 * 1024;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol major version 3, any minor.
const PROTOCOL_3: u32 = 3 << 16;

/// Why bytes could not be read as Postgres frames. Each one ends the
/// connection that sent them, and only that one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message length {len} is below the minimum of 4")]
    TooShort { len: u32 },
    #[error("message length {len} exceeds the maximum of {max}")]
    TooLong { len: u64, max: usize },
    #[error("startup packet: {0}")]
    BadStartup(String),
    #[error("malformed {what} message: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
}

/// The first packet of a connection, which has no type byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupKind {
    Ssl,
    GssEnc,
    /// Forwarded as is; the secret key's length is not fixed from protocol
    /// 3.2 on, so it stays opaque.
    Cancel,
    Startup {
        version: u32,
        /// Name/value pairs in order (`user`, `database`, `options`, ...).
        params: Vec<(String, String)>,
    },
}

/// A startup packet and the exact bytes it came as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupPacket {
    pub raw: Bytes,
    pub kind: StartupKind,
}

impl StartupPacket {
    /// A startup parameter by name.
    pub fn param(&self, name: &str) -> Option<&str> {
        match &self.kind {
            StartupKind::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Cuts a startup packet off the front of `buf`, or returns `None` until
/// enough bytes have arrived.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::BadStartup(format!(
            "length {len} is below the minimum of 8"
        )));
    }
    if len as usize > MAX_STARTUP_LEN {
        return Err(FrameError::TooLong {
            len: len.into(),
            max: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    let raw = buf.split_to(len as usize).freeze();
    let code = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let kind = match code {
        SSL_REQUEST if len == 8 => StartupKind::Ssl,
        GSSENC_REQUEST if len == 8 => StartupKind::GssEnc,
        CANCEL_REQUEST if len >= 16 => StartupKind::Cancel,
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            return Err(FrameError::BadStartup(format!(
                "request code {code} with length {len}"
            )))
        }
        v if v >> 16 == PROTOCOL_3 >> 16 => StartupKind::Startup {
            version: v,
            params: startup_params(&raw[8..])?,
        },
        v => {
            return Err(FrameError::BadStartup(format!(
                "unsupported protocol version {}.{}",
                v >> 16,
                v & 0xffff
            )))
        }
    };
    Ok(Some(StartupPacket { raw, kind }))
}

fn startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let bad = |why: &str| FrameError::BadStartup(why.to_owned());
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut body).ok_or_else(|| bad("unterminated parameter name"))?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut body).ok_or_else(|| bad("unterminated parameter value"))?;
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| bad("parameter is not UTF-8"))
        };
        params.push((text(name)?, text(value)?));
    }
    if !body.is_empty() {
        return Err(bad("bytes after the terminating zero"));
    }
    Ok(params)
}

/// Like [`take_cstr`], for a message body where the string must be there.
fn cstr<'a>(b: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], FrameError> {
    take_cstr(b).ok_or(FrameError::Malformed {
        what,
        why: "unterminated string",
    })
}

/// Takes a zero-terminated string off the front of `b`.
fn take_cstr<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    // `memchr` for a query's text; a short string (a name, a command tag)
    // costs less scanned in place than `memchr`'s set-up (callgrind).
    // The unnamed statement or portal, which most messages name, at once.
    let at = if b.first() == Some(&0) {
        0
    } else if b.len() <= 32 {
        b.iter().position(|&c| c == 0)?
    } else {
        memchr::memchr(0, b)?
    };
    let (s, rest) = b.split_at(at);
    *b = &rest[1..];
    Some(s)
}

/// One typed message, either direction: `tag`, a 4-byte length, the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Encodes a frame from its parts (copies the body once).
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(5 + body.len());
        b.put_u8(tag);
        b.put_u32((body.len() + 4) as u32);
        b.put_slice(body);
        Frame { raw: b.freeze() }
    }

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The body, without tag and length; shares the frame's bytes.
    pub fn body(&self) -> Bytes {
        self.raw.slice(5..)
    }

    /// The exact bytes the frame was read from.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_raw(self) -> Bytes {
        self.raw
    }

    /// Decodes the front-end messages the proxy acts on.
    pub fn client(&self) -> Result<ClientMsg<'_>, FrameError> {
        client_msg(&self.raw)
    }

    /// Decodes the back-end messages the proxy acts on.
    pub fn backend(&self) -> Result<BackendMsg<'_>, FrameError> {
        self.borrowed().backend()
    }

    /// The message borrowed, as [`frames`] gives one.
    pub fn borrowed(&self) -> FrameRef<'_> {
        FrameRef { raw: &self.raw }
    }
}

/// A message where it lies in a batch ([`frames`]), or a [`Frame`]
/// borrowed: what the proxy reads of a server message, without a `Bytes`
/// of its own (a reference count up and down per message). Always one
/// whole message: made only by [`frames`] and [`Frame::borrowed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    raw: &'a [u8],
}

impl<'a> FrameRef<'a> {
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The body, without tag and length.
    pub fn body(&self) -> &'a [u8] {
        &self.raw[5..]
    }

    /// The exact bytes of the message.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Decodes the back-end messages the proxy acts on.
    pub fn backend(&self) -> Result<BackendMsg<'a>, FrameError> {
        let b = &self.raw[5..];
        Ok(match self.tag() {
            b'Z' => match b {
                [s @ (b'I' | b'T' | b'E')] => BackendMsg::ReadyForQuery(*s),
                _ => {
                    return Err(FrameError::Malformed {
                        what: "ReadyForQuery",
                        why: "bad status",
                    })
                }
            },
            b'E' => BackendMsg::ErrorResponse(ErrorFields(b)),
            b'C' => {
                let mut rest = b;
                BackendMsg::CommandComplete(take_cstr(&mut rest).ok_or(FrameError::Malformed {
                    what: "CommandComplete",
                    why: "unterminated tag",
                })?)
            }
            _ => BackendMsg::Other,
        })
    }
}

/// Decodes a front-end message from its bytes as read (tag, length, body;
/// [`message_len`] long): a message still in the read buffer, with no
/// [`Frame`] of its own.
pub fn client_msg(raw: &[u8]) -> Result<ClientMsg<'_>, FrameError> {
    let (Some(&tag), Some(mut b)) = (raw.first(), raw.get(5..)) else {
        return Err(FrameError::Malformed {
            what: "client",
            why: "shorter than a message header",
        });
    };
    Ok(match tag {
        b'Q' => ClientMsg::Query(cstr(&mut b, "Query")?),
        b'P' => {
            let name = cstr(&mut b, "Parse")?;
            let query = cstr(&mut b, "Parse")?;
            ClientMsg::Parse { name, query }
        }
        b'B' => {
            let portal = cstr(&mut b, "Bind")?;
            let statement = cstr(&mut b, "Bind")?;
            ClientMsg::Bind { portal, statement }
        }
        b'E' => {
            let portal = cstr(&mut b, "Execute")?;
            if b.len() != 4 {
                return Err(FrameError::Malformed {
                    what: "Execute",
                    why: "row limit is not 4 bytes",
                });
            }
            ClientMsg::Execute {
                portal,
                max_rows: b.get_u32(),
            }
        }
        b'C' => {
            let Some((&kind, mut rest)) = b.split_first() else {
                return Err(FrameError::Malformed {
                    what: "Close",
                    why: "empty",
                });
            };
            ClientMsg::Close {
                kind,
                name: cstr(&mut rest, "Close")?,
            }
        }
        b'S' => ClientMsg::Sync,
        b'X' => ClientMsg::Terminate,
        b'F' => ClientMsg::FunctionCall,
        _ => ClientMsg::Other,
    })
}

/// Front-end messages; strings borrow from the frame and are raw bytes
/// because their encoding is the client's (usually, not always, UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg<'a> {
    Query(&'a [u8]),
    Parse {
        name: &'a [u8],
        query: &'a [u8],
    },
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        max_rows: u32,
    },
    /// `kind` is `S` (statement) or `P` (portal).
    Close {
        kind: u8,
        name: &'a [u8],
    },
    Sync,
    Terminate,
    FunctionCall,
    /// Everything relayed without a look: Describe, Flush, COPY data,
    /// passwords and SASL.
    Other,
}

/// Back-end messages the proxy acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMsg<'a> {
    ReadyForQuery(u8),
    ErrorResponse(ErrorFields<'a>),
    CommandComplete(&'a [u8]),
    Other,
}

/// The fields of an ErrorResponse or NoticeResponse body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFields<'a>(&'a [u8]);

impl<'a> ErrorFields<'a> {
    /// The value of field `code` (`C` SQLSTATE, `M` message, ...).
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        let mut b = self.0;
        while let Some((&c, mut rest)) = b.split_first() {
            if c == 0 {
                return None;
            }
            let v = take_cstr(&mut rest)?;
            if c == code {
                return Some(v);
            }
            b = rest;
        }
        None
    }
}

/// An ErrorResponse or NoticeResponse (`tag`) with its `P` (cursor
/// position, in characters of the statement text) moved back by `shift`,
/// for a statement text that went to the server with `shift` ASCII
/// characters prepended. `None` when there is no `P` field to move.
pub fn shift_position(tag: u8, body: &[u8], shift: u32) -> Option<Bytes> {
    map_position(tag, body, |pos| pos.saturating_sub(shift).max(1))
}

/// The error or notice with its `P` (position) field replaced by
/// `map(position)`; `None` when it has no readable position.
pub fn map_position(tag: u8, body: &[u8], map: impl FnOnce(u32) -> u32) -> Option<Bytes> {
    let fields = ErrorFields(body);
    let pos: u32 = std::str::from_utf8(fields.get(b'P')?).ok()?.parse().ok()?;
    let new = map(pos).to_string();
    let mut out = BytesMut::with_capacity(body.len());
    let mut b = body;
    while let Some((&c, mut rest)) = b.split_first() {
        if c == 0 {
            break;
        }
        let v = take_cstr(&mut rest)?;
        out.put_u8(c);
        out.extend_from_slice(if c == b'P' { new.as_bytes() } else { v });
        out.put_u8(0);
        b = rest;
    }
    out.put_u8(0);
    Some(Frame::new(tag, &out).into_raw())
}

/// Cuts one typed frame off the front of `buf`, or returns `None` until
/// enough bytes have arrived. The length is checked before waiting for the
/// body, so an oversized frame is refused without buffering it.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    // No reserve for an announced length: a peer's claim is not a reason
    // to allocate, the read loop grows the buffer as bytes come.
    Ok(frame_len(buf, max)?.map(|total| Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

/// The length (tag included) of the complete message at the start of
/// `buf`, `None` if it is not all there yet; the checks of
/// [`split_frame`], for a caller that handles the message where it lies
/// and cuts it off ([`cut_frame`]) only if it must keep it.
pub fn message_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    frame_len(buf, max)
}

/// Cuts the first `len` bytes off `buf` as a frame: `len` is what
/// [`message_len`] said of `buf`, so they are one whole message.
pub fn cut_frame(buf: &mut BytesMut, len: usize) -> Frame {
    Frame {
        raw: buf.split_to(len).freeze(),
    }
}

/// The length (tag included) of the complete message at the start of
/// `buf`; `None` if it is not all there yet.
fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::TooShort { len });
    }
    if len as usize > max {
        return Err(FrameError::TooLong {
            len: len.into(),
            max,
        });
    }
    let total = 1 + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// How many bytes at the start of `buf` are complete messages, and the
/// error of a malformed message right after them, if one is there: what a
/// relay may cut off as one batch ([`frames`]) and forward in one write.
pub fn complete_frames(buf: &[u8], max: usize) -> (usize, Option<FrameError>) {
    let mut at = 0;
    loop {
        match frame_len(&buf[at..], max) {
            Ok(Some(n)) => at += n,
            Ok(None) => return (at, None),
            Err(e) => return (at, Some(e)),
        }
    }
}

/// The messages of `batch` (complete ones only, as [`complete_frames`]
/// measured), each with its offset, borrowed where they lie.
pub fn frames(batch: &[u8]) -> impl Iterator<Item = (usize, FrameRef<'_>)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let n = frame_len(&batch[at..], usize::MAX).ok().flatten()?;
        let f = FrameRef {
            raw: &batch[at..at + n],
        };
        at += n;
        Some((at - n, f))
    })
}

/// An ErrorResponse as Postgres sends one: severity (also as the
/// non-localized `V` field), SQLSTATE and message.
pub fn error_response(severity: &str, code: &str, message: &str) -> Bytes {
    error_response_with(severity, code, message, None)
}

/// Like [`error_response`], with an optional `D` (detail) field.
pub fn error_response_with(
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
) -> Bytes {
    let mut body = BytesMut::new();
    let mut field = |c: u8, v: &str| {
        body.put_u8(c);
        // A NUL inside would end the field early; Postgres never sends one.
        body.extend(v.bytes().filter(|&b| b != 0));
        body.put_u8(0);
    };
    field(b'S', severity);
    field(b'V', severity);
    field(b'C', code);
    field(b'M', message);
    if let Some(d) = detail {
        field(b'D', d);
    }
    body.put_u8(0);
    Frame::new(b'E', &body).into_raw()
}

/// ReadyForQuery with transaction status `I`, `T` or `E`.
pub fn ready_for_query(status: u8) -> Bytes {
    Frame::new(b'Z', &[status]).into_raw()
}

/// A simple-protocol Query message.
pub fn query(text: &str) -> Bytes {
    let mut body = Vec::with_capacity(text.len() + 1);
    body.extend(text.bytes().filter(|&b| b != 0));
    body.push(0);
    Frame::new(b'Q', &body).into_raw()
}

/// An Execute of `portal` with no row limit.
pub fn execute(portal: &str) -> Bytes {
    let mut body = Vec::with_capacity(portal.len() + 5);
    body.extend(portal.bytes().filter(|&b| b != 0));
    body.push(0);
    body.put_u32(0);
    Frame::new(b'E', &body).into_raw()
}

/// A statement run inside an extended-protocol batch without touching the
/// client's unnamed statement or portal: Parse and Bind under `name`
/// (no parameters, text results), Execute, then Close of the portal and
/// the statement so the name can be used again. The server answers with
/// ParseComplete, BindComplete, the rows, CommandComplete and two
/// CloseComplete (five completions), or with an ErrorResponse that
/// discards the rest up to Sync.
pub fn run_named(name: &str, text: &str) -> Bytes {
    let cstr = |b: &mut BytesMut, s: &str| {
        b.extend(s.bytes().filter(|&c| c != 0));
        b.put_u8(0);
    };
    let mut out = BytesMut::new();
    let mut body = BytesMut::new();
    cstr(&mut body, name);
    cstr(&mut body, text);
    body.put_u16(0);
    out.extend_from_slice(Frame::new(b'P', &body).raw());
    body.clear();
    cstr(&mut body, name);
    cstr(&mut body, name);
    body.put_u16(0); // parameter formats
    body.put_u16(0); // parameters
    body.put_u16(0); // result formats: all text
    out.extend_from_slice(Frame::new(b'B', &body).raw());
    out.extend_from_slice(&execute(name));
    for kind in [b'P', b'S'] {
        body.clear();
        body.put_u8(kind);
        cstr(&mut body, name);
        out.extend_from_slice(Frame::new(b'C', &body).raw());
    }
    out.freeze()
}

/// Parse of `name` with parameters of the types `oids` (the guard's
/// prepared statement, parsed once per server session).
pub fn parse_typed(name: &str, text: &str, oids: &[u32]) -> Bytes {
    let mut body = BytesMut::with_capacity(name.len() + text.len() + 4 + 4 * oids.len());
    body.extend(name.bytes().filter(|&c| c != 0));
    body.put_u8(0);
    body.extend(text.bytes().filter(|&c| c != 0));
    body.put_u8(0);
    body.put_u16(u16::try_from(oids.len()).unwrap_or(u16::MAX));
    for oid in oids {
        body.put_u32(*oid);
    }
    Frame::new(b'P', &body).into_raw()
}

/// Close of a prepared statement (`kind` `S`) or portal (`P`); closing a
/// name that does not exist is not an error.
pub fn close(kind: u8, name: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(name.len() + 2);
    body.put_u8(kind);
    body.extend(name.bytes().filter(|&c| c != 0));
    body.put_u8(0);
    Frame::new(b'C', &body).into_raw()
}

/// Runs the prepared statement `statement` with `params` (text format)
/// in the portal `portal`, appended to `out`: Bind, Execute, then Close of
/// the portal (a named portal outlives its Execute until the transaction
/// ends, and a second Bind of its name in the same block would fail). The
/// server answers BindComplete, the rows, CommandComplete, CloseComplete
/// (three completions), or an ErrorResponse that discards the rest up to
/// Sync. The client's unnamed statement and portal are left alone.
pub fn bind_execute_close(out: &mut BytesMut, statement: &str, portal: &str, params: &[&[u8]]) {
    // Written in place: no body, frame or message of its own to copy from.
    // Built from temporaries it cost 3,700 instructions a call, a sixth
    // of what guard mode adds to a TPC-B-like transaction in the proxy
    // (callgrind, one pgbench client, `-M prepared`).
    let params_len: usize = params.iter().map(|p| 4 + p.len()).sum();
    out.reserve(3 * portal.len() + statement.len() + params_len + 34);
    put_message(out, b'B', |out| {
        put_cstr(out, portal);
        put_cstr(out, statement);
        out.put_u16(0); // parameter formats: all text
        out.put_u16(u16::try_from(params.len()).unwrap_or(u16::MAX));
        for p in params {
            out.put_i32(i32::try_from(p.len()).unwrap_or(i32::MAX));
            out.extend_from_slice(p);
        }
        out.put_u16(0); // result formats: all text
    });
    put_message(out, b'E', |out| {
        put_cstr(out, portal);
        out.put_u32(0); // all rows
    });
    put_message(out, b'C', |out| {
        out.put_u8(b'P');
        put_cstr(out, portal);
    });
}

/// Appends one message to `out`: `tag`, its length, then what `body`
/// writes, the length filled in after.
fn put_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = u32::try_from(out.len() - at).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` as a C string, without the NULs it may hold (the names the
/// proxy makes have none).
fn put_cstr(out: &mut BytesMut, s: &str) {
    if s.as_bytes().contains(&0) {
        out.extend(s.bytes().filter(|&c| c != 0));
    } else {
        out.extend_from_slice(s.as_bytes());
    }
    out.put_u8(0);
}

/// Sync: ends an extended-protocol unit (commits an implicit
/// transaction; inside a block, only answers ReadyForQuery).
pub const SYNC: &[u8] = &[b'S', 0, 0, 0, 4];

/// Terminate: the polite end of a session.
pub fn terminate() -> Bytes {
    Frame::new(b'X', &[]).into_raw()
}

/// The single byte that answers SSLRequest with "yes": the TLS handshake
/// follows.
pub const ACCEPT_ENCRYPTION: &[u8] = b"S";

/// The single byte that answers SSLRequest or GSSENCRequest with "no".
pub const REFUSE_ENCRYPTION: &[u8] = b"N";

/// SSLRequest, as a client (here: the proxy towards its server) sends it
/// before its startup packet: length 8, then the code 80877103
/// (`1234 << 16 | 5679`).
pub const SSL_REQUEST_PACKET: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Splits startup options (`-c a=b --c=d`, backslash escapes a space) into
/// name/value settings, as the server's `pg_split_opts` does.
pub fn option_settings(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(s) = w.strip_prefix("-c") {
            Some(s.to_owned())
        } else {
            w.strip_prefix("--").map(str::to_owned)
        };
        if let Some((k, v)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            // The server folds '-' to '_' in names given this way.
            out.push((k.replace('-', "_").to_ascii_lowercase(), v.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_shifted_back() {
        let e = error_response_with("ERROR", "42601", "syntax error", None);
        let mut body = BytesMut::from(&e[5..e.len() - 1]);
        body.extend_from_slice(b"P60\0\0");
        let shifted = shift_position(b'E', &body, 50).unwrap();
        let mut buf = BytesMut::from(&shifted[..]);
        let f = split_frame(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        match f.backend().unwrap() {
            BackendMsg::ErrorResponse(fields) => {
                assert_eq!(fields.get(b'P'), Some(&b"10"[..]));
                assert_eq!(fields.get(b'C'), Some(&b"42601"[..]));
            }
            _ => panic!("not an error"),
        }
        assert!(shift_position(b'E', &e[5..], 50).is_none());
    }

    #[test]
    fn a_batch_is_its_complete_messages_cut_as_split_frame_cuts_them() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&ready_for_query(b'I'));
        wire.extend_from_slice(&query("SELECT 1"));
        let whole = wire.len();
        wire.extend_from_slice(&query("SELECT 2")[..7]);
        assert_eq!(complete_frames(&wire, DEFAULT_MAX_FRAME), (whole, None));
        let batch = Bytes::copy_from_slice(&wire[..whole]);
        let mut one_by_one = BytesMut::from(&wire[..whole]);
        let mut n = 0;
        for (at, f) in super::frames(&batch) {
            let g = split_frame(&mut one_by_one, DEFAULT_MAX_FRAME)
                .unwrap()
                .unwrap();
            assert_eq!(f, g.borrowed());
            assert_eq!(&batch[at..at + f.raw().len()], f.raw());
            n += 1;
        }
        assert_eq!(n, 2);
        // A malformed header after complete messages: they still count.
        wire.truncate(whole);
        wire.extend_from_slice(&[b'Z', 0, 0, 0, 1]);
        assert_eq!(
            complete_frames(&wire, DEFAULT_MAX_FRAME),
            (whole, Some(FrameError::TooShort { len: 1 }))
        );
    }

    #[test]
    fn run_named_is_five_messages_under_its_own_name() {
        let mut buf = BytesMut::from(&run_named("g1", "SELECT 1")[..]);
        let mut tags = Vec::new();
        while let Some(f) = split_frame(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            if let Ok(ClientMsg::Parse { name, query }) = f.client() {
                assert_eq!((name, query), (&b"g1"[..], &b"SELECT 1"[..]));
            }
            tags.push(f.tag());
        }
        assert_eq!(tags, b"PBECC");
        assert!(buf.is_empty());
    }
    #[test]
    fn a_prepared_statement_run_is_bind_execute_close() {
        let mut out = BytesMut::new();
        out.extend_from_slice(&parse_typed("g", "SELECT $1", &[25]));
        bind_execute_close(&mut out, "g", "p", &[b"ab"]);
        let mut buf = out;
        let mut tags = Vec::new();
        while let Some(f) = split_frame(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            match f.client() {
                Ok(ClientMsg::Parse { name, query }) => {
                    assert_eq!((name, query), (&b"g"[..], &b"SELECT $1"[..]));
                    assert!(f.raw().ends_with(&[0, 1, 0, 0, 0, 25]));
                }
                Ok(ClientMsg::Bind { portal, statement }) => {
                    assert_eq!((portal, statement), (&b"p"[..], &b"g"[..]));
                    assert!(f.raw().ends_with(&[0, 1, 0, 0, 0, 2, b'a', b'b', 0, 0]));
                }
                Ok(ClientMsg::Close { kind, name }) => {
                    assert_eq!((kind, name), (b'P', &b"p"[..]));
                    assert_eq!(f.raw(), &close(b'P', "p")[..]);
                }
                _ if f.tag() == b'E' => assert_eq!(f.raw(), &execute("p")[..]),
                _ => {}
            }
            tags.push(f.tag());
        }
        assert_eq!(tags, b"PBEC");
        assert!(buf.is_empty());
    }
    use proptest::prelude::*;

    fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.put_u32(PROTOCOL_3);
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = Vec::new();
        out.put_u32(body.len() as u32 + 4);
        out.extend(body);
        out
    }

    #[test]
    fn startup_packets() {
        let raw = startup_bytes(&[("user", "postgres"), ("options", "-c fencing.token=5")]);
        let mut buf = BytesMut::from(&raw[..3]);
        assert_eq!(split_startup(&mut buf), Ok(None));
        let mut buf = BytesMut::from(&raw[..]);
        let p = split_startup(&mut buf).unwrap().unwrap();
        assert_eq!(p.param("user"), Some("postgres"));
        assert_eq!(p.param("options"), Some("-c fencing.token=5"));
        assert_eq!(&p.raw[..], &raw[..]);
        assert!(buf.is_empty());

        let mut ssl = BytesMut::new();
        ssl.put_u32(8);
        ssl.put_u32(SSL_REQUEST);
        assert_eq!(
            split_startup(&mut ssl).unwrap().unwrap().kind,
            StartupKind::Ssl
        );
        let mut packet = BytesMut::from(&SSL_REQUEST_PACKET[..]);
        assert_eq!(
            split_startup(&mut packet).unwrap().unwrap().kind,
            StartupKind::Ssl
        );
        let mut gss = BytesMut::new();
        gss.put_u32(8);
        gss.put_u32(GSSENC_REQUEST);
        assert_eq!(
            split_startup(&mut gss).unwrap().unwrap().kind,
            StartupKind::GssEnc
        );
        let mut cancel = BytesMut::new();
        cancel.put_u32(16);
        cancel.put_u32(CANCEL_REQUEST);
        cancel.put_u64(42);
        assert_eq!(
            split_startup(&mut cancel).unwrap().unwrap().kind,
            StartupKind::Cancel
        );

        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(split_startup(&mut garbage).is_err());
        let mut tiny = BytesMut::from(&[0u8, 0, 0, 3][..]);
        assert!(split_startup(&mut tiny).is_err());
    }

    #[test]
    fn typed_messages() {
        let q = Frame::new(b'Q', b"select 1\0");
        assert_eq!(q.client(), Ok(ClientMsg::Query(b"select 1")));
        let p = Frame::new(b'P', b"s1\0insert into t values (1)\0\0\0");
        assert_eq!(
            p.client(),
            Ok(ClientMsg::Parse {
                name: b"s1",
                query: b"insert into t values (1)"
            })
        );
        let b = Frame::new(b'B', b"p\0s1\0\0\0\0\0\0\0");
        assert_eq!(
            b.client(),
            Ok(ClientMsg::Bind {
                portal: b"p",
                statement: b"s1"
            })
        );
        let e = Frame::new(b'E', b"p\0\0\0\0\0");
        assert_eq!(
            e.client(),
            Ok(ClientMsg::Execute {
                portal: b"p",
                max_rows: 0
            })
        );
        assert!(Frame::new(b'E', b"p\0\0").client().is_err());
        assert!(Frame::new(b'Q', b"no terminator").client().is_err());
        assert_eq!(
            Frame::new(b'C', b"Sname\0").client(),
            Ok(ClientMsg::Close {
                kind: b'S',
                name: b"name"
            })
        );

        let z = Frame::new(b'Z', b"T");
        assert_eq!(z.backend(), Ok(BackendMsg::ReadyForQuery(b'T')));
        assert!(Frame::new(b'Z', b"x").backend().is_err());
        let err = Frame {
            raw: error_response("ERROR", "ZF001", "stale"),
        };
        let BackendMsg::ErrorResponse(f) = err.backend().unwrap() else {
            panic!("not an error");
        };
        assert_eq!(f.get(b'C'), Some(&b"ZF001"[..]));
        assert_eq!(f.get(b'M'), Some(&b"stale"[..]));
        assert_eq!(f.get(b'D'), None);
        assert_eq!(
            Frame::new(b'C', b"INSERT 0 1\0").backend(),
            Ok(BackendMsg::CommandComplete(b"INSERT 0 1"))
        );
    }

    #[test]
    fn bad_lengths() {
        let mut b = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            split_frame(&mut b, 100),
            Err(FrameError::TooShort { len: 3 })
        );
        let mut b = BytesMut::from(&[b'Q', 0, 0, 1, 0][..]);
        assert_eq!(
            split_frame(&mut b, 100),
            Err(FrameError::TooLong { len: 256, max: 100 })
        );
        let mut b = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut b, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn options_split_like_the_server() {
        assert_eq!(
            option_settings("-c fencing.token=5 -cfencing.resource=r --work-mem=4MB"),
            vec![
                ("fencing.token".into(), "5".into()),
                ("fencing.resource".into(), "r".into()),
                ("work_mem".into(), "4MB".into()),
            ]
        );
        assert_eq!(
            option_settings(r"-c application_name=a\ b"),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(option_settings("-c").is_empty());
    }

    /// Arbitrary well-formed frames, as one stream.
    fn frames() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        prop::collection::vec(
            (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)),
            0..16,
        )
    }

    proptest! {
        /// Whatever the bytes and however they are chunked, splitting
        /// never panics, and what it yields re-encodes to the input.
        #[test]
        fn arbitrary_bytes_split_anywhere(
            data in prop::collection::vec(any::<u8>(), 0..512),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            max in 4usize..1024,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut from = 0;
            'feed: for cut in cuts {
                buf.extend_from_slice(&data[from..cut]);
                from = cut;
                loop {
                    match split_frame(&mut buf, max) {
                        Ok(Some(f)) => {
                            let _ = f.client();
                            let _ = f.backend();
                            out.extend_from_slice(f.raw());
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            prop_assert!(data.starts_with(&out));
            let mut s = BytesMut::from(&data[..]);
            let _ = split_startup(&mut s);
        }

        /// Well-formed frames round-trip through any chunking.
        #[test]
        fn frames_round_trip(fs in frames(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
            let mut data = Vec::new();
            for (tag, body) in &fs {
                data.extend_from_slice(Frame::new(*tag, body).raw());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.push(data.len());
            cuts.sort_unstable();
            let (mut buf, mut from, mut got) = (BytesMut::new(), 0, Vec::new());
            for cut in cuts {
                buf.extend_from_slice(&data[from..cut]);
                from = cut;
                while let Some(f) = split_frame(&mut buf, 1024).unwrap() {
                    got.push((f.tag(), f.body().to_vec()));
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, fs);
        }

        /// Lengths outside [4, max] are errors, never panics or waits.
        #[test]
        fn bad_lengths_are_errors(tag in any::<u8>(), len in any::<u32>(), max in 4usize..100_000) {
            let mut b = BytesMut::new();
            b.put_u8(tag);
            b.put_u32(len);
            let r = split_frame(&mut b, max);
            if len < 4 {
                prop_assert_eq!(r, Err(FrameError::TooShort { len }));
            } else if len as usize > max {
                prop_assert!(matches!(r, Err(FrameError::TooLong { .. })), "expected TooLong");
            } else if len == 4 {
                prop_assert!(matches!(r, Ok(Some(_))));
            } else {
                prop_assert_eq!(r, Ok(None));
            }
        }
    }
}
