#!/usr/bin/env python3
"""Writes the hand-made seed inputs into corpus/<target>/seed-*.

Run from fuzz/: python3 make_seeds.py. The fuzzers' own finds are added
beside these (afl-cmin'ed, see README.md); this only rewrites seed-* files.
Signed tokens need the `cryptography` package (Ed25519, seed [7] * 32, the
same key as src/token.rs's SEED).
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def frame(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def startup(params, version=196608):
    body = struct.pack(">I", version)
    for k, v in params:
        body += cstr(k) + cstr(v)
    body += b"\0"
    return struct.pack(">I", len(body) + 4) + body


def parse(name, q, types=()):
    return frame(b"P", cstr(name) + cstr(q) + struct.pack(">H", len(types))
                 + b"".join(struct.pack(">I", t) for t in types))


def bind(portal, stmt, params=()):
    body = cstr(portal) + cstr(stmt) + struct.pack(">H", 0) + struct.pack(">H", len(params))
    for p in params:
        body += struct.pack(">i", len(p)) + p
    return frame(b"B", body + struct.pack(">H", 0))


def describe(kind, name):
    return frame(b"D", kind + cstr(name))


def execute(portal, rows=0):
    return frame(b"E", cstr(portal) + struct.pack(">I", rows))


SYNC = frame(b"S", b"")
FLUSH = frame(b"H", b"")
TERMINATE = frame(b"X", b"")


def query(q):
    return frame(b"Q", cstr(q))


def close(kind, name):
    return frame(b"C", kind + cstr(name))


def error(fields, tag=b"E"):
    return frame(tag, b"".join(c + cstr(v) for c, v in fields) + b"\0")


def ready(s):
    return frame(b"Z", s)


def complete(t):
    return frame(b"C", cstr(t))


EXTENDED = (parse("", "INSERT INTO t VALUES ($1)", (23,)) + bind("", "", (b"42",))
            + describe(b"P", "") + execute("") + SYNC)
NAMED = (parse("s1", "/* fencing.token=5 fencing.resource=orders */ UPDATE t SET v = 1")
         + bind("p1", "s1") + execute("p1", 10) + close(b"P", "p1") + close(b"S", "s1") + SYNC)
SIMPLE = query("SET fencing.token = '7'; INSERT INTO orders VALUES (1)")
BACKEND = (frame(b"1", b"") + frame(b"2", b"") + frame(b"T", b"\0\0") + complete("INSERT 0 1")
           + ready(b"I") + ready(b"T") + ready(b"E")
           + error([(b"S", "ERROR"), (b"V", "ERROR"), (b"C", "42601"),
                    (b"M", "syntax error at or near \"x\""), (b"P", "60")])
           + error([(b"S", "NOTICE"), (b"C", "00000"), (b"M", "hi"), (b"P", "3")], b"N")
           + error([(b"S", "ERROR"), (b"C", "ZF001"), (b"M", "stale token")]))
COPY = (query("COPY t FROM STDIN") + frame(b"d", b"1\tone\n2\ttwo\n") + frame(b"c", b""))

SSL = struct.pack(">II", 8, 80877103)
GSS = struct.pack(">II", 8, 80877104)
CANCEL = struct.pack(">IIII", 16, 80877102, 4242, 0xDEADBEEF)
STARTUP = startup([("user", "alice"), ("database", "app"),
                   ("options", "-c fencing.token=5 -c fencing.resource=orders"),
                   ("application_name", "psql")])
STARTUP_ESC = startup([("user", "bob"),
                       ("options", r"-cfencing.token=18446744073709551615 --fencing-resource=shard:7/eu "
                                   r"-c application_name=a\ b -c")])
STARTUP_32 = startup([("user", "u"), ("_pq_.x", "y")], version=(3 << 16) | 2)


def signed_tokens():
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        return []
    import base64
    key = Ed25519PrivateKey.from_private_bytes(bytes([7] * 32))
    out = []
    for res, n in [("orders", 42), ("shard:7/eu-west.1_x", 18446744073709551615),
                   ("x" * 128, 12345678901234567890)]:
        sig = key.sign(b"fencepost-v1\0" + res.encode() + b"\0" + str(n).encode())
        tok = f"{n}." + base64.urlsafe_b64encode(sig).decode().rstrip("=")
        out.append(res.encode() + b"\0" + tok.encode())
    return out


def http1_body(mode, length, reads, body):
    return bytes([mode, length >> 8, length & 255, len(reads)] + [r - 1 for r in reads]) + body


SEEDS = {
    "pg_frame": [
        b"\x40\x07" + EXTENDED,
        b"\x40\x3f" + NAMED,
        b"\x01\x00" + SIMPLE + TERMINATE,
        b"\x40\x05" + BACKEND,
        b"\x40\x3f" + COPY + FLUSH,
        b"\x00\x00" + frame(b"Q", b"no terminator"),
        b"\xff\x01" + b"Q\xff\xff\xff\xff",
        b"\x10\x02" + b"Q\x00\x00\x00\x03",
    ],
    "pg_startup": [
        STARTUP + EXTENDED,
        STARTUP_ESC + SIMPLE + TERMINATE,
        STARTUP_32,
        SSL,
        GSS,
        CANCEL,
        struct.pack(">II", 8, 196608) + b"garbage",
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    "token": [
        b"42", b"0", b"18446744073709551615", b"18446744073709551616",
        b"00000000000000000042", b" 7 \t", b"-1", b"+1", b"0x10", b"1 2", b"",
        b"7.", b"7.abc", b"orders\x0099", b"bad name\x005", b"\xff\x00\xfe",
        b"7." + b"A" * 86,
    ] + signed_tokens(),
    "http1": [
        # byte 0: read size, byte 1: bit 0 set for a response; then the stream
        b"\x05\x00PUT /kv/a HTTP/1.1\r\nHost: p\r\nFencing-Token: 7\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n",
        b"\x03\x00POST /kv/%6bv HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\nX",
        b"\x01\x00POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"\x01\x00GET / HTTP/1.1\nHost: p\r\n\r\n",
        b"\x07\x00PUT /kv//x;y/..;/%252e HTTP/1.1\r\nHost: p\r\nConnection: Fencing-Token\r\n\r\n",
        b"\x02\x00POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"\x04\x01HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"\x09\x01HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end",
        b"\x02\x01HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"\x02\x01HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n",
    ],
    "http1_body": [
        # byte 0: bit 0 set for chunked, else bytes 1-2 a Content-Length;
        # byte 3: how many read sizes follow (each % 32 + 1); then the body
        http1_body(1, 0, [], b"5\r\nhello\r\n0\r\n\r\n"),
        http1_body(1, 0, [1], b"5\r\nhello\r\n3;ext=\"v\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n"),
        http1_body(1, 0, [3, 7], b"A\r\n0123456789\r\n0\r\n\r\n"),
        http1_body(1, 0, [2], b"5\r\nhelloXX0\r\n\r\n"),
        http1_body(1, 0, [], b"5\nhello\r\n0\r\n\r\n"),
        http1_body(1, 0, [5], b"fffffffffffffff\r\nx"),
        http1_body(1, 0, [4], b"0\r\nA: b\r\nC:\r\n\r\n"),
        http1_body(1, 0, [1, 2, 3], b"5;a=b;c\r\nhello\r\n0\r\n\n"),
        http1_body(0, 5, [2], b"helloGET / HTTP/1.1\r\n"),
        http1_body(0, 0, [], b"GET / HTTP/1.1\r\n"),
        http1_body(0, 300, [31, 17], b"x" * 100),
    ],
    "http_headers": [
        b"/orders/1\nFencing-Token:5\nFencing-Resource:orders",
        b"/orders/eu/1\nhost:localhost\nfencing-token: 42 \ncontent-type:application/json",
        b"/kv/x\nFencing-Token:5\nFencing-Token:6",
        b"/\nFencing-Resource:ord\xffers\nFencing-Token:7",
        b"/other\nFencing-Resource:a\nFencing-Resource:b\nFencing-Token:\t9",
        b"/orders/\nFencing-Token:18446744073709551616",
        b"/orders/1\nFencing-Token:5\nFencing-Resource:payments",
        b"/orders/../payments/a\nFencing-Token:5",
        b"/orders/%2e%2e/x\nFencing-Token:5\nFencing-Resource:orders",
        b"/kv/..%2F..%5cadmin\nFencing-Token:5",
    ],
}

for target, seeds in SEEDS.items():
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        if f.startswith("seed-"):
            os.remove(os.path.join(d, f))
    for i, s in enumerate(seeds):
        with open(os.path.join(d, f"seed-{i:02}"), "wb") as fh:
            fh.write(s)
    print(target, len(seeds))
